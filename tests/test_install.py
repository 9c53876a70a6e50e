"""Installing the package as a user does, then importing and running it from another directory;
and flatten.py copied alone into an empty directory.

The install: pip builds a wheel of a copy of the repository (without its tests and caches, so
the working tree is left as it was) in pip's own isolated build environment, with the build
backend pyproject.toml names fetched from the package index as `pip install .` does: nothing of
the interpreter's own setuptools or wheel is used. The wheel then goes into a fresh virtual
environment that sees the running environment's packages (torch) through a .pth file, whichever
environment that is: a user's venv, or the system interpreter.
"""

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from common import ROOT

pytestmark = pytest.mark.slow

TIMEOUT_S = 180

# runs the model the way a user would, then prints where flatten came from
SMOKE = """
import flatten, torch
m = flatten.create_model("flatten_pvt_tiny", depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64))
with torch.no_grad():
    out = m.eval()(torch.randn(1, 3, 64, 64))
assert out.shape == (1, 1000) and torch.isfinite(out).all(), f"logits {tuple(out.shape)}"
print(flatten.__file__)
"""


def run(args, cwd, what, env=None, skip_on_failure=False):
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONPATH", None)                     # only what the interpreter itself finds
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    if p.returncode != 0:
        message = f"{what}: exit code {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        if skip_on_failure:
            pytest.skip(message)
        pytest.fail(message)
    return p.stdout


def build_wheel(src: Path, dest: Path) -> Path:
    """pip wheel of the source tree, in pip's isolated build environment (build backend from the
    index). Without the index, skip: the build backend cannot be fetched."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--wheel-dir", str(dest), str(src)],
                       cwd=dest.parent, capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if p.returncode != 0:
        output = p.stdout + p.stderr
        if re.search(r"No matching distribution found for setuptools|Failed to establish|"
                     r"Could not fetch URL|NewConnectionError|Temporary failure in name", output):
            pytest.skip(f"no package index for the build backend:\n{output[-800:]}")
        pytest.fail(f"pip wheel of the repository: exit code {p.returncode}\n{output[-3000:]}")
    wheels = list(dest.glob("flatten_transformer-*.whl"))
    assert len(wheels) == 1, f"pip wheel made {sorted(w.name for w in dest.iterdir())}"
    return wheels[0]


def make_venv(path: Path) -> Path:
    """A fresh venv that also sees the running environment's site-packages (torch, pip) through
    a .pth file: the paths only, so the .pth files there (an editable install of this project,
    say) are not read. Its own site-packages comes first on sys.path."""
    py = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run([sys.executable, "-m", "venv", "--without-pip", path], path.parent,
        "python -m venv is not available", skip_on_failure=True)
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       path.parent, "the venv's site-packages").strip())
    parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                            *site.getsitepackages()])
    (purelib / "_running_environment.pth").write_text("\n".join(parent) + "\n")
    if subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        run([sys.executable, "-m", "ensurepip", "--help"], path.parent,
            "neither pip nor ensurepip is available to a venv", skip_on_failure=True)
        run([py, "-m", "ensurepip", "--default-pip"], path.parent, "ensurepip in the venv")
    return py


def repository_copy(dest: Path) -> Path:
    """The repository without .git, tests, results and build or cache folders."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "tests", "test_*.py", "conftest.py", "results", "build", "dist", "*.egg-info",
        "__pycache__", ".*cache", ".hypothesis", ".venv", "venv"))
    return dest


def test_pip_install_into_a_fresh_venv(tmp_path):
    wheel = build_wheel(repository_copy(tmp_path / "src"), tmp_path / "wheels")
    # the package is flatten.py alone: hubconf.py (torch.hub's entry points, read from a clone)
    # and the scripts stay out, so that no top-level module named hubconf gets installed
    modules = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py"))
    assert modules == ["flatten.py"], f"[the wheel {wheel.name}] holds the modules {modules}"
    py = make_venv(tmp_path / "venv")
    # --ignore-installed: the running environment, which the venv sees, may hold the package
    run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--ignore-installed",
         "--disable-pip-version-check", wheel], tmp_path, "pip install of the wheel")
    work = tmp_path / "elsewhere"
    work.mkdir()
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       work, "the venv's site-packages").strip())
    case = "[pip install into a venv, import from another directory]"
    where = Path(run([py, "-c", SMOKE], work, f"{case} the model on 1x3x64x64").strip())
    assert where.parent.resolve() == purelib.resolve(), \
        f"{case}: flatten imported from {where}, not the venv's site-packages {purelib}"
    meta = run([py, "-c", textwrap.dedent("""
        import importlib.metadata as md
        dist = md.distribution("flatten-transformer")
        print(dist.locate_file(""))
        for req in dist.requires or []:
            print(req)
        """)], work, f"{case} the installed metadata").strip().splitlines()
    assert Path(meta[0]).resolve() == purelib.resolve(), \
        f"{case}: the distribution's metadata is in {meta[0]}, not {purelib}"
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in meta[1:]]
    assert names == ["torch"], f"{case}: dependencies {meta[1:]}, expected torch only"


# imports flatten with every import flatten.py makes itself restricted to the standard library
# and torch (any other, e.g. the optional triton, fails as if it were not installed)
ALONE = """
import importlib.abc, os, sys

class StandardLibraryAndTorchOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        top = name.partition(".")[0]
        if frame is not None and os.path.basename(frame.f_code.co_filename) == "flatten.py" \\
                and top not in sys.stdlib_module_names and top != "torch":
            raise ImportError(f"{name} is neither the standard library nor torch")
        return None

sys.meta_path.insert(0, StandardLibraryAndTorchOnly())
"""


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names needs 3.10")
def test_flatten_py_alone_needs_only_torch(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "flatten.py", alone)
    case = "[flatten.py copied alone into an empty directory]"
    where = Path(run([sys.executable, "-c", ALONE + SMOKE], alone,
                     f"{case} import with the standard library and torch only, the model on "
                     "1x3x64x64").strip())
    assert where.resolve() == (alone / "flatten.py").resolve(), \
        f"{case}: flatten imported from {where}, not the copy"
