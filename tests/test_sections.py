"""flatten.py cut apart as a user would copy it: section 1 alone (the method with its helpers),
and the whole file without section 5 (the fast paths). Each cut must be a working file: no name
left undefined (ruff's F821, when ruff is installed), and the official layer fixture through it.
"""

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import torch
from common import ATOL, ROOT, RTOL, assert_close, load_fixture

FLA_FIXTURE = "fixture_fla_sr1.pt"
# a section starts at a rule of '=' followed by its numbered title: "# 1. Focused linear ..."
SECTION = re.compile(r"^# =+\n# (\d)\. ", re.MULTILINE)


def sections() -> dict:
    """flatten.py's text by part: "header" (docstring, imports, __all__), then "1" ... "5"."""
    text = (ROOT / "flatten.py").read_text()
    starts = [(m.start(), m.group(1)) for m in SECTION.finditer(text)]
    assert [n for _, n in starts] == ["1", "2", "3", "4", "5"], \
        f"[flatten.py] section titles found: {[n for _, n in starts]}, expected 1 to 5"
    parts = {"header": text[:starts[0][0]]}
    for (start, n), (end, _) in zip(starts, starts[1:] + [(len(text), None)]):
        parts[n] = text[start:end]
    return parts


def import_cut(tmp_path, name: str, keep) -> object:
    parts = sections()
    path = tmp_path / f"{name}.py"
    path.write_text("".join(parts[k] for k in ["header", *keep]))
    if shutil.which("ruff") or importlib.util.find_spec("ruff"):
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated",
                               "--select", "F821,F822", str(path)], capture_output=True, text=True)
        assert lint.returncode == 0, \
            f"[{name}: flatten.py sections {keep}] undefined names:\n{lint.stdout}{lint.stderr}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize("keep", [["1"], ["1", "2", "3", "4"]],
                         ids=["section-1-alone", "without-section-5"])
def test_cut_file_runs_the_official_layer_fixture(tmp_path, keep):
    fl = import_cut(tmp_path, "flatten_cut", keep)
    case = f"[flatten.py sections {'+'.join(keep)}, {FLA_FIXTURE}]"
    assert not hasattr(fl, "set_fast_path"), f"{case}: the cut still holds section 5"
    d = load_fixture(FLA_FIXTURE)
    c = d["config"]
    layer = fl.FocusedLinearAttention(c["dim"], c["num_patches"], c["num_heads"], qkv_bias=True,
                                      sr_ratio=c["sr_ratio"], focusing_factor=c["focusing_factor"],
                                      kernel_size=c["kernel_size"])
    layer.load_state_dict(d["state_dict"], strict=True)
    x = d["input"].clone().requires_grad_()
    assert layer.forward_path(x) == "reference", f"{case}: path {layer.forward_path(x)}"
    out = layer.eval()(x, d["H"], d["W"])
    assert_close(out, d["output"], f"{case} output vs official", RTOL, ATOL)
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), f"{case}: gradient not finite"
    layer.set_grid_size((4, 16))  # the helpers of section 1: resampling in place
    assert tuple(layer.positional_encoding.shape) == (1, 64, c["dim"]), \
        f"{case}: positional_encoding {tuple(layer.positional_encoding.shape)} after set_grid_size"


def test_file_without_section_5_runs_a_model_and_loads(tmp_path):
    fl = import_cut(tmp_path, "flatten_no_fast_paths", ["1", "2", "3", "4"])
    d = load_fixture("fixture_flatten_pvt_micro.pt")
    c = d["config"]
    m = fl.create_model("flatten_pvt_tiny", img_size=c["img_size"], embed_dims=c["embed_dims"],
                        depths=c["depths"], num_classes=c["num_classes"])
    fl.load_pretrained(m, d["state_dict"])
    with torch.no_grad():
        out = m.eval()(d["input"])
    assert_close(out, d["output"], "[flatten.py without section 5, PVT micro fixture] logits")
