"""Tests of bench.py: the command end to end with tiny settings, its JSON and CSV, its flags and
their errors, output files, skips, OOM and Ctrl-C, the busy-machine and noise handling, the
CPU peak-memory measurement, and the analytic MAC formulas against torch.utils.flop_counter.
No test asserts anything about wall-clock times: where timing matters, times are synthetic.
"""

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from common import assert_close
from tabulate import tabulate_formats
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bench
import flatten as fl

HERE = Path(__file__).parent.parent  # the project root
# the smallest useful run: one timed call per cell, no minimum time, no budgets; one thread, as
# two threads crawl when other processes compete for a 2-core machine (each op waits for both)
TINY = ["--repeats", "1", "--max-repeats", "1", "--min-time", "0", "--warmup", "1",
        "--threads", "1", "--cell-budget", "0", "--time-budget", "0"]
SMALL = ["--resolutions", "32", "--sections", "layers", "--shapes", "pvt", *TINY]
CPU = torch.device("cpu")


def run_command(*args, timeout=120):
    return subprocess.run([sys.executable, str(HERE / "bench.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE, check=False)


def run_main(argv):
    """bench.main in-process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(argv)
    return code, out.getvalue(), err.getvalue()


def exits_2(argv, capsys):
    """parse_args(argv) exits with status 2 and one line on stderr: that line."""
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"{argv}: exit {exc.value.code}"
    assert len(err.strip().splitlines()) == 1, f"{argv}: {err!r}"
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """bench.main at r = 40 (not a multiple of 16): layers of both shapes with the default
    methods and reference, one model pair, --details."""
    out = tmp_path_factory.mktemp("bench")
    methods = [m for m in bench.METHODS if m not in ("ours-torch", "baseline")]
    code, stdout, stderr = run_main([
        "--resolutions", "40", "--models", "flatten_deit_tiny", "deit_tiny", "--methods",
        *methods, "--details", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), *TINY])
    with open(out / "r.csv") as f:
        lines = list(csv.DictReader(f))
    return SimpleNamespace(code=code, data=json.loads((out / "r.json").read_text()), csv=lines,
                           out=stdout, err=stderr, methods=methods)


# -----------------------------------------------------------------------------
# The command end to end


@pytest.mark.slow
def test_command_smoke(tmp_path):
    out = tmp_path / "r.json"
    res = run_command("--resolutions", "32", "--sections", "layers", "--shapes", "pvt",
                      "--methods", "sdpa", "ours", "official", "--json", str(out), *TINY)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    first = res.stdout.splitlines()[0]
    for fact in ("device:", f"torch {torch.__version__}", "dtype float32", "threads",
                 "batch size 1"):
        assert fact in first, f"header line {first!r} lacks {fact!r}"
    assert "focused linear (ours)" in res.stdout and "vs official" in res.stdout, res.stdout
    assert "[  1/6" in res.stderr, f"no progress on stderr: {res.stderr[-1000:]}"
    assert "Traceback" not in res.stderr, res.stderr
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["layers"]] == ["sdpa", "ours", "official"]
    assert all(r["fwd"]["status"] == "ok" for r in data["layers"]), data["layers"]


def test_json_layout(tiny_run):
    data = tiny_run.data
    assert tiny_run.code == 0
    assert set(data) == {"header", "interrupted", "elapsed_s", "layers", "models"}
    assert data["interrupted"] is False
    for key in ("device", "device_name", "torch", "dtype", "threads", "batch_size", "timer",
                "memory", "cpus", "load_average_1min", "noise_threshold"):
        assert key in data["header"], f"header lacks {key}"
    assert data["header"]["torch"] == torch.__version__ and data["header"]["dtype"] == "float32"
    layers = data["layers"]
    assert {(r["shape"], r["method"]) for r in layers} == \
        {(s, m) for s in bench.SHAPES for m in tiny_run.methods}
    for r in layers:
        for key in ("resolution", "grid", "tokens", "gmacs", "backend", "paths", "vs_sdpa_fwd",
                    "vs_sdpa_fwdbwd", "vs_official_fwd", "vs_official_fwdbwd",
                    "vs_sdpa_fwd_noisy", "fwd", "fwdbwd"):
            assert key in r, f"layer row {r['shape']}/{r['method']} lacks {key}"
        for mode in ("fwd", "fwdbwd"):
            cell = r[mode]
            assert cell["status"] == "ok", f"{r['shape']}/{r['method']} {mode}: {cell}"
            assert cell["repeats"] == len(cell["times_ms"]) == 1 and cell["noisy"] is False
            assert cell["q1_ms"] <= cell["median_ms"] <= cell["q3_ms"]
            assert cell["peak_mib"] is not None and cell["peak_mib"] > 0, f"{r['method']} {mode}"
            if bench.resource is not None:  # getrusage: minor page faults of the timed calls
                assert cell["page_faults_per_call"] >= 0, f"{r['method']} {mode} page faults"
    models = data["models"]
    assert [m["model"] for m in models] == ["flatten_deit_tiny", "deit_tiny"]
    for m in models:
        assert m["params"] > 0 and m["gmacs"] > 0 and m["images_per_s"] > 0
        assert m["fwd"]["status"] == m["train"]["status"] == "ok", m
        assert m["tokens"] == 2 * 2 + 1, "DeiT at 40: a 2x2 grid of patch-16 tokens + class"
    assert models[0]["vs_softmax_fwd"] is not None and models[1]["vs_softmax_fwd"] is None


def test_default_output_is_tables_and_notes_details_behind_the_flag(tiny_run):
    """--details adds ours against official, the floors and the page faults under each layer
    table; without it they are left out of the output (the JSON has them always)."""
    for title in ("Attention layer: DeiT-T", "Attention layer: FLatten-PVT", "Whole models"):
        assert title in tiny_run.out
    for detail in ("Ours - official, largest |difference|", "Floors, fwd / fwd+bwd",
                   "Page faults per call"):
        assert tiny_run.out.count(detail) == 2, f"--details: {detail!r} under both layer tables"
    code, out, _ = run_main(["--methods", "ours", "official", *SMALL])
    assert code == 0 and "Attention layer: FLatten-PVT" in out
    for detail in ("Ours - official", "Floors", "Page faults"):
        assert detail not in out, f"{detail!r} without --details:\n{out}"


def test_grid_of_a_resolution_that_is_not_a_multiple_of_the_patch(tiny_run):
    rows = {(r["shape"], r["method"]): r for r in tiny_run.data["layers"]}
    assert rows["deit", "ours"]["grid"] == [2, 2] and rows["deit", "ours"]["tokens"] == 5
    assert rows["deit", "official"]["tokens"] == 5, "official_forward takes the class token too"
    assert rows["pvt", "ours"]["grid"] == [10, 10] and rows["pvt", "ours"]["tokens"] == 100
    assert "note: 40 is not a multiple of 16" in tiny_run.err


def test_layer_ratios_are_time_ratios_of_the_same_run(tiny_run):
    for shape in bench.SHAPES:
        rows = {r["method"]: r for r in tiny_run.data["layers"] if r["shape"] == shape}
        for method, r in rows.items():
            for ref, mode in ((ref, mode) for ref in ("sdpa", "official")
                              for mode in ("fwd", "fwdbwd")):
                # "vs official": the row's own official formulation (l2vit's: l2vit-official)
                peer = bench.OFFICIAL_OF.get(method, ref) if ref == "official" else ref
                want = rows[peer][mode]["median_ms"] / r[mode]["median_ms"]
                assert r[f"vs_{ref}_{mode}"] == pytest.approx(want), f"{shape}/{method} {ref}"
                assert r[f"vs_{ref}_{mode}_noisy"] is False, "one timed call: no IQR"


def test_ours_against_official_differences_are_reported(tiny_run):
    """The ours row carries the largest differences from the official formulation, measured in
    the same run on the same (randomised) weights and input: float32 rounding."""
    for shape in bench.SHAPES:
        rows = {r["method"]: r for r in tiny_run.data["layers"] if r["shape"] == shape}
        e = rows["ours"]["vs_official_exactness"]
        assert 0 < e["output_max_abs"]
        assert e["output_max_abs_diff"] <= 1e-5 * max(1.0, e["output_max_abs"])
        assert e["grad_max_rel_diff"] <= 1e-5
        assert "vs_official_exactness" not in rows["official"]


def test_floors_are_reported_against_this_runs_rates(tiny_run):
    """The FocusedLinearAttention rows carry their memory floor (bytes at the copy bandwidth
    measured in the run) and compute floor (MACs at the run's matmul rate), and their time
    over each."""
    header = tiny_run.data["header"]
    bandwidth, mac_rate = header["copy_bandwidth_GBps"], header["matmul_GMACps"]
    assert bandwidth > 0 and mac_rate > 0
    for r in tiny_run.data["layers"]:
        if r["method"] not in bench.FLATTEN_METHODS:
            assert "floor_bytes" not in r
            continue
        for mode, macs in (("fwd", r["gmacs"]), ("fwdbwd", 3 * r["gmacs"])):
            want = r["floor_bytes"][mode] / bandwidth / 1e6
            assert r[f"memory_floor_ms_{mode}"] == pytest.approx(want)
            assert r[f"compute_floor_ms_{mode}"] == pytest.approx(macs / mac_rate * 1e3)
            for kind in ("memory", "compute"):
                want = r[mode]["median_ms"] / r[f"{kind}_floor_ms_{mode}"]
                assert r[f"x_{kind}_floor_{mode}"] == pytest.approx(want)


@pytest.mark.parametrize(("prefix", "bias"), [(0, False), (1, True)])
def test_floor_bytes_count_input_parameters_and_output(prefix, bias):
    B, C, h, k, (H, W) = 3, 8, 2, 5, (2, 3)
    layer = fl.FocusedLinearAttention(C, H * W, h, qkv_bias=bias, grid_size=(H, W),
                                      num_prefix_tokens=prefix)
    N, d = prefix + H * W, C // h
    params = (4 * C * C + 3 * C * bias + C      # q, kv (2C) and proj weights; q, kv, proj biases
              + d * k * k + d + C                # DWC weight and bias, scale
              + N * C)                           # positional encoding, class tokens included
    want = 2 * B * N * C * 4 + params * 4        # float32: x and the output, the parameters
    assert bench.floor_bytes(layer, torch.zeros(B, N, C)) == {"fwd": want, "fwdbwd": 2 * want}
    x64 = torch.zeros(B, N, C, dtype=torch.float64)
    assert bench.floor_bytes(layer.double(), x64)["fwd"] == 2 * want


def test_copy_bandwidth_is_a_rate_or_none_when_the_buffers_do_not_fit(monkeypatch):
    assert bench.copy_bandwidth(CPU, torch.float32, nbytes=2 ** 20) > 0

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                           "can't allocate memory")

    monkeypatch.setattr(bench.torch, "ones", no_memory)
    assert bench.copy_bandwidth(CPU, torch.float32) is None


@pytest.mark.parametrize("sabotage", ["ours", "positional_encoding"])
def test_differences_are_real_measurements(monkeypatch, sabotage):
    """A wrong layer gives a large difference: ours with its output off by 1%, or the official
    formulation without the positional encoding (zero at initialisation: the comparison
    randomises the parameters so that it counts)."""
    shape, grid = bench.SHAPES["pvt"], (4, 4)
    e = bench.compare_to_official(shape, grid, CPU, torch.float32, 1, seed=0)
    assert e["output_max_abs_diff"] < 1e-5 and e["grad_max_rel_diff"] < 1e-5
    if sabotage == "ours":
        forward = fl.FocusedLinearAttention.forward
        monkeypatch.setattr(fl.FocusedLinearAttention, "forward",
                            lambda self, x, H, W: forward(self, x, H, W) * 1.01)
    else:
        official = fl.official_forward

        def without_pe(layer, x, H, W):
            with torch.no_grad():
                layer.positional_encoding.zero_()
            return official(layer, x, H, W)
        monkeypatch.setattr(fl, "official_forward", without_pe)
    e = bench.compare_to_official(shape, grid, CPU, torch.float32, 1, seed=0)
    assert e["output_max_abs_diff"] > 1e-3 and e["grad_max_rel_diff"] > 1e-3


def test_csv_has_one_line_per_cell_with_the_header_facts(tiny_run):
    data, lines = tiny_run.data, tiny_run.csv
    assert len(lines) == 2 * (len(data["layers"]) + len(data["models"]))
    assert list(lines[0]) == bench.CSV_FIELDS
    for line in lines:
        assert line["device"] == "cpu" and line["torch"] == torch.__version__
        assert line["dtype"] == "float32" and line["status"] == "ok", line
        assert float(line["median_ms"]) > 0 and line["noisy"] == "False", line
    ours = next(x for x in lines if x["method"] == "ours" and x["mode"] == "fwdbwd")
    assert ours["grid"] == "2x2" and float(ours["vs_sdpa"]) > 0 and ours["section"] == "layers"


# -----------------------------------------------------------------------------
# Flags: one line on stderr and exit status 2 before anything runs, no traceback


@pytest.mark.parametrize(("argv", "needle"), [
    (["--resolutions", "0"], "positive"),
    (["--resolutions", "-224"], "positive"),
    (["--resolutions", "abc"], "whole number"),
    (["--resolutions", "16"], "too small"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--batch-size", "0"], "positive"),
    (["--warmup", "-1"], ">= 0"),
    (["--repeats", "5", "--max-repeats", "2"], "below --repeats"),
    (["--methods", "baseline"], "needs --baseline"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert needle in exits_2(argv, capsys)


def test_table_format_must_be_a_tabulate_format(capsys):
    err = exits_2(["--table-format", "bogus"], capsys)
    assert "bogus" in err and all(f in err for f in tabulate_formats), err
    assert bench.parse_args(["--table-format", "rst"]).table_format == "rst"


def help_entries() -> dict[str, str]:
    """--help: each option's entry, its whitespace collapsed, by its flag; and the epilog."""
    text = bench.make_parser().format_help()
    options, _, epilog = text.partition("\noptions:\n")[2].partition("\n\n")
    entries, flag = {}, None
    for line in options.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = ""
        entries[flag] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}, epilog


def test_help_shows_each_default_once_and_explains_the_methods():
    """argparse's "(default: None)" used to follow the help's own default text."""
    entries, epilog = help_entries()
    twice = {f: e for f, e in entries.items() if e.count("(default") > 1 or "(default: None)" in e}
    assert not twice, f"defaults shown twice or as None: {twice}"
    expected = {"--threads": "(default: all usable; 1 on a busy machine)",
                "--resolutions": "(default: 224 512 1024)", "--device": "(default: cpu)",
                "--seed": "(default: 0)", "--min-time": "(default: 0.2)",
                "--methods": "(default: all but reference and baseline"}
    for flag, text in expected.items():
        assert text in entries[flag], f"{flag}: {entries[flag]!r} lacks {text!r}"
    for flag in ("--json", "--details", "--baseline", "-h"):
        assert "(default" not in entries[flag], f"{flag} has no default: {entries[flag]!r}"
    explained = " ".join(epilog.split())
    for method, text in bench.METHOD_HELP.items():
        assert f"{method} {text}" in explained, f"method {method} not explained: {epilog}"
    assert list(bench.METHOD_HELP) == list(bench.METHODS), "every method is explained"


def test_threads_above_the_usable_cpus_exit_2_with_their_count(monkeypatch, capsys):
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    assert "may use 2 CPUs" in exits_2(["--threads", "3"], capsys)
    assert bench.parse_args(["--threads", "2"]).threads == 2


@pytest.mark.parametrize(("opt", "path", "needle"), [
    ("--json", "/proc/x.json", "cannot be written"),          # a folder no file can go in
    ("--csv", "/", "is a folder"),
    ("--plot", "out.txt", "suffix"),                          # no format matplotlib writes
    ("--plot", "out", "suffix"),
    ("--json", "no/such/folder/r.json", "does not exist"),
])
def test_output_paths_are_checked_before_anything_runs(opt, path, needle, capsys):
    assert needle in exits_2([opt, path], capsys)


def test_two_outputs_on_the_same_path_exit_2(tmp_path, capsys):
    path = str(tmp_path / "r.json")
    assert "the same file" in exits_2(["--json", path, "--csv", path], capsys)


def test_checking_output_paths_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    old = tmp_path / "old.json"
    old.write_text("keep")
    args = bench.parse_args(["--json", str(old), "--csv", str(tmp_path / "new.csv"),
                             "--plot", str(tmp_path / "p.svg")])
    assert args.plot.endswith("p.svg") and old.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_cuda_without_a_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA" in exits_2(["--device", "cuda"], capsys)


def test_plot_without_matplotlib_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert "matplotlib" in exits_2(["--plot", str(tmp_path / "p.png")], capsys)


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    code, _, _ = run_main(["--resolutions", "32", "64", "--sections", "layers", "--shapes", "pvt",
                           "--methods", "sdpa", "ours", "--plot", str(path), *TINY])
    assert code == 0 and path.stat().st_size > 10_000, "a PNG with two panels per layer shape"


def test_a_failed_output_is_one_line_the_others_are_written(monkeypatch, tmp_path):
    """A write that fails (a full disk, say) after the run: one line, exit status 1, and the
    other outputs are still written."""
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.json, "dump", disk_full)
    paths = {opt: tmp_path / f"r.{ext}" for opt, ext in (("json", "json"), ("csv", "csv"),
                                                         ("plot", "svg"))}
    code, _, err = run_main(["--methods", "ours", *SMALL, *(x for opt, p in paths.items()
                                                            for x in (f"--{opt}", str(p)))])
    assert code == 1, err
    want = f"bench.py: --json {paths['json']} not written: OSError: [Errno 28] No space left"
    assert [line for line in err.splitlines() if "not written" in line] == [want + " on device"]
    assert paths["csv"].stat().st_size > 0 and paths["plot"].stat().st_size > 0


@pytest.mark.slow
def test_command_error_has_no_traceback():
    res = run_command("--resolutions", "224", "abc")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""


# -----------------------------------------------------------------------------
# Methods: reference, ours-torch, baseline


def test_ours_torch_and_reference_run_with_their_fast_path_set_and_restored(monkeypatch):
    seen = []
    forward = fl.FocusedLinearAttention.forward

    def spy(self, x, H, W):
        seen.append(fl.get_fast_path())
        return forward(self, x, H, W)

    monkeypatch.setattr(fl.FocusedLinearAttention, "forward", spy)
    for method, mode in (("ours-torch", "torch"), ("reference", "off"), ("ours", "auto")):
        seen.clear()
        calls = bench.layer_calls(method, bench.SHAPES["pvt"], (4, 4), CPU, torch.float32, 1, 0)
        calls["fwd"]()
        calls["fwdbwd"]()
        assert seen == [mode, mode] and fl.get_fast_path() == "auto", (method, seen)


def test_the_path_of_ours_is_shown_and_triton_named_as_the_triton_forward(monkeypatch, tmp_path):
    """The method column names the path FocusedLinearAttention.forward_path says a forward
    takes, whatever its name; "triton" as the Triton forward."""
    path = tmp_path / "r.json"
    # whatever the name, the forward runs the training path (Triton may not be installed)
    monkeypatch.setattr(fl, "_FAST_PATHS", fl._FAST_PATHS._replace(
        run=lambda layer, x, H, W, path: fl._forward_train(layer, x, H, W)))
    for name, shown in (("inference", "[inference]"), ("triton", "[Triton forward]")):
        monkeypatch.setattr(fl.FocusedLinearAttention, "forward_path",
                            lambda self, x, name=name: name, raising=False)
        code, out, _ = run_main(["--methods", "ours", "--json", str(path), *SMALL])
        assert code == 0 and f"focused linear (ours) {shown}" in out, out
        row = json.loads(path.read_text())["layers"][0]
        assert row["paths"] == {"fwd": name, "fwdbwd": name}


def test_ours_torch_is_a_default_method_only_where_triton_runs(monkeypatch):
    default = bench.parse_args([]).methods
    assert "ours-torch" not in default and "reference" not in default   # CPU
    assert "baseline" not in default
    assert bench.parse_args(["--methods", "ours-torch"]).methods == ["ours-torch"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fl, "triton", object())
    assert "ours-torch" in bench.parse_args(["--device", "cuda"]).methods
    monkeypatch.setattr(fl, "triton", None)
    assert "ours-torch" not in bench.parse_args(["--device", "cuda"]).methods


@pytest.fixture(scope="module")
def old_flatten(tmp_path_factory):
    """A copy of flatten.py at another path, as a contributor keeps an older version."""
    path = tmp_path_factory.mktemp("old") / "flatten_old.py"
    shutil.copy(HERE / "flatten.py", path)
    return path


def test_baseline_runs_another_copy_of_flatten_with_ours_weights(old_flatten, tmp_path):
    args = bench.parse_args(["--methods", "ours", "--baseline", str(old_flatten)])
    assert args.methods == ["ours", "baseline"], "--baseline adds the method"
    module = args.baseline_module
    assert module is not fl and module.FocusedLinearAttention is not fl.FocusedLinearAttention
    shape, grid = bench.SHAPES["deit"], (3, 3)
    ours = bench.layer_calls("ours", shape, grid, CPU, torch.float32, 2, 0)
    base = bench.layer_calls("baseline", shape, grid, CPU, torch.float32, 2, 0, module)
    assert type(base["module"]) is module.FocusedLinearAttention
    for (k, a), (k2, b) in zip(ours["module"].state_dict().items(),
                               base["module"].state_dict().items()):
        assert k == k2 and torch.equal(a, b), f"baseline weight {k} differs from ours"
    torch.testing.assert_close(base["fwd"](), ours["fwd"]())
    path = tmp_path / "r.json"
    code, out, _ = run_main(["--methods", "ours", "--baseline", str(old_flatten),
                             "--json", str(path), *SMALL])
    assert code == 0 and "focused linear, baseline (flatten_old.py)" in out, out
    data = json.loads(path.read_text())
    assert [r["method"] for r in data["layers"]] == ["ours", "baseline"]
    assert all(r[m]["status"] == "ok" for r in data["layers"] for m in ("fwd", "fwdbwd"))
    assert data["header"]["baseline"] == str(old_flatten)


def test_a_baseline_that_is_missing_or_does_not_import_exits_2(tmp_path, capsys):
    assert "no such file" in exits_2(["--baseline", str(tmp_path / "none.py")], capsys)
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    assert "SyntaxError" in exits_2(["--baseline", str(broken)], capsys)
    plain = tmp_path / "plain.py"
    plain.write_text("x = 1\n")
    assert "no FocusedLinearAttention" in exits_2(["--baseline", str(plain)], capsys)


# -----------------------------------------------------------------------------
# Models


def test_first_attention_tokens_come_from_the_built_model():
    class Embed(nn.Module):
        def out_size(self, H, W):
            return H // 4, W // 8

    class Swinlike(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = Embed()

    class WithClassTokens(Swinlike):
        num_prefix_tokens = 2

    assert bench.first_attention_tokens(Swinlike(), 64) == 16 * 8
    assert bench.first_attention_tokens(WithClassTokens(), 64) == 16 * 8 + 2
    assert bench.first_attention_tokens(nn.Linear(2, 2), 64) is None
    pvt = fl.create_model("flatten_pvt_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=2)
    assert bench.first_attention_tokens(pvt, 64) == 16 * 16, "stage 1 of a PVT: patch 4"
    deit = fl.create_model("deit_tiny", img_size=64, depth=1, num_classes=2)
    assert bench.first_attention_tokens(deit, 64) == 4 * 4 + 1, "patch 16, + class token"
    cswin = fl.create_model("flatten_cswin_tiny", img_size=64, depths=(1, 1, 1, 1),
                            num_classes=2)
    assert bench.first_attention_tokens(cswin, 64) == 16 * 16, "CSwin: 7x7 stride-4 stem"
    l2vit = fl.create_model("l2vit_tiny", depths=(1, 1, 1, 1), num_classes=2)
    assert bench.first_attention_tokens(l2vit, 66) == 17 * 17, "L2ViT: the stem pads to 4"


# L2ViT-T's softmax pair is Swin-T (its widths, depths, heads and window): SOFTMAX_PAIRS
PAIRS = [("flatten_cswin_tiny", "cswin_tiny", dict(depths=(1, 1, 1, 1))),
         ("l2vit_tiny", "swin_tiny", dict(depths=(1, 1, 1, 1), dims=(24, 48, 48, 96)))]


@pytest.mark.parametrize("ours_name,softmax_name,small", PAIRS, ids=[p[0] for p in PAIRS])
def test_models_takes_the_pair_and_pairs_it(ours_name, softmax_name, small):
    args = bench.parse_args(["--resolutions", "64", "--sections", "models", "--models",
                             ours_name, softmax_name])
    assert args.models == [ours_name, softmax_name], args.models
    rows = bench.plan(args)
    ours, softmax = (rows[bench.Case("models", n, n, 64)] for n in args.models)
    for row, seconds in ((ours, 1.0), (softmax, 3.0)):  # made-up times: the pairing, not speed
        for cell in row.cells.values():
            cell.status, cell.times_s = "ok", [seconds]
    assert bench.ratios(rows, ours)["vs_softmax_fwd"] == (3.0, False), \
        f"[{ours_name} vs {softmax_name} at 64] {bench.ratios(rows, ours)}"
    assert bench.ratios(rows, softmax)["vs_softmax_fwd"] == (None, False)
    facts = dict(device="cpu", device_name="CPU", torch="t", dtype="float32", threads=1,
                 batch_size=1, timer="t", cpus=2, threads_note="")
    line = next(x for x in bench.render(rows, facts).splitlines() if f"| {ours_name} " in x)
    assert line.rstrip(" |").endswith("3.00 / 3.00"), f"[models table] {line}"
    m = fl.create_model(ours_name, img_size=64, num_classes=2, **small)
    assert bench.model_macs(m, 1, 64) > 0, f"[{ours_name} at 64] no multiply-add count"


@pytest.fixture
def single_thread():
    """One intra-op thread for this test (float64 depthwise convolutions on a busy machine's
    thread pool took seconds per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_l2vit_official_formulation_is_the_l2vit_layer(shape, single_thread):
    """l2vit-official runs the official formulation on the l2vit layer's weights: the same
    function (outputs and every gradient), and the l2vit row's "vs official" is against it."""
    grid = (3, 5)
    calls = {m: bench.layer_calls(m, bench.SHAPES[shape], grid, CPU, torch.float64, 2, 3)
             for m in bench.L2VIT_METHODS}
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in calls["l2vit"]["module"].parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    calls["l2vit-official"]["module"].load_state_dict(calls["l2vit"]["module"].state_dict())
    case = f"[{shape} layer, grid {grid}, batch 2, seed 3, weights N(0, 0.5^2) seed 4]"
    assert_close(calls["l2vit"]["fwd"](), calls["l2vit-official"]["fwd"](),
                 f"{case} l2vit vs l2vit-official output", 1e-12, 1e-12)
    for name, a, b in zip([n for n, _ in calls["l2vit"]["module"].named_parameters()] + ["x"],
                          calls["l2vit"]["fwdbwd"](), calls["l2vit-official"]["fwdbwd"]()):
        assert_close(a, b, f"{case} gradient of {name}", 1e-10, 1e-12)
    args = bench.parse_args([*SMALL[:-len(TINY)], "--methods", "ours", "official", "l2vit",
                             "l2vit-official"])
    rows = bench.plan(args)
    for seconds, method in enumerate(args.methods, start=1):  # made-up times
        for cell in rows[bench.Case("layers", "pvt", method, 32)].cells.values():
            cell.status, cell.times_s = "ok", [float(seconds)]
    got = {m: bench.ratios(rows, rows[bench.Case("layers", "pvt", m, 32)])["vs_official_fwd"]
           for m in args.methods}
    assert got == {"ours": (2.0, False), "official": (1.0, False), "l2vit": (4 / 3, False),
                   "l2vit-official": (1.0, False)}, f"[vs official of each method] {got}"


# -----------------------------------------------------------------------------
# Budgets, skips, OOM, Ctrl-C


def measurer(*extra):
    args = bench.parse_args(["--resolutions", "32", *TINY, *extra])
    return bench.Measurer(args, CPU, 1, log=lambda m: None)


def layer_row(name="ours", macs=10):
    return bench.Row(bench.Case("layers", "pvt", name, 32), name, (8, 8), 64, macs)


def job(row, fn=lambda: None, **kw):
    return bench.Job(row, "fwd", fn, **kw)


def test_cell_over_the_memory_estimate_is_skipped_before_it_starts(monkeypatch):
    monkeypatch.setattr(bench, "free_memory", lambda device: 100 * 2 ** 10)  # 100 KiB "free"
    called, row = [], layer_row("explicit")
    measurer().run_group([job(row, lambda: called.append(1), est_s=0.001, est_bytes=2 ** 20)])
    cell = row.cells["fwd"]
    assert cell.status == "skipped" and "needs ~1.0 MiB" in cell.reason, cell
    assert not called, "a skipped cell must not run at all"


def test_cell_over_the_cell_budget_is_skipped_with_its_estimate():
    m, row = measurer("--cell-budget", "1"), layer_row("sdpa")
    m.run_group([job(row, est_s=7.4)])
    assert row.cells["fwd"].status == "skipped" and "~7.4 s per call" in row.cells["fwd"].reason
    assert m.history["pvt", "sdpa", "fwd"] == (10, 7.4), "larger resolutions extrapolate from it"


def test_budget_policy_functions():
    b = bench.Budget(warmup=1, repeats=3, cell_s=8.0, total_s=100.0)
    assert bench.skip_reason(b, 0, 1.0, None, None, "")[0] is None, "5 calls of 1 s fit in 8 s"
    reason, slow = bench.skip_reason(b, 0, 2.0, None, None, "")
    assert slow and "--cell-budget 8 s" in reason
    reason, slow = bench.skip_reason(b, 99.0, 0.5, None, None, "")
    assert not slow and "left of --time-budget" in reason
    assert "used up" in bench.skip_reason(b, 100.0, None, None, None, "")[0]
    assert "half" in bench.skip_reason(b, 0, None, 2, 1, "half the RAM")[0]
    assert bench.skip_reason(bench.Budget(1, 3, 0, 0), 1e9, 1e9, None, None, "")[0] is None
    assert bench.too_slow_reason(b, 0, 1.0) is None
    assert "a first call took 2.0 s" in bench.too_slow_reason(b, 0, 2.0)
    assert "what is left" in bench.too_slow_reason(b, 97.0, 1.0)


def test_later_resolutions_extrapolate_from_earlier_ones():
    assert bench.estimate_call_s(1600, (100, 0.5), None, False, 1e9) == pytest.approx(8.0)
    assert bench.estimate_call_s(1600, (100, 0.5), 4.0, True, 1e9) == pytest.approx(12.0), \
        "the larger: 8 s scaled, 3 x 4 s of the forward"
    assert bench.estimate_call_s(2e9, None, None, False, 1e9) == pytest.approx(2.0), \
        "without history: the calibration rate"
    assert bench.estimate_call_s(None, None, None, False, 1e9) is None
    m = measurer()
    m.history["pvt", "sdpa", "fwd"] = (100, 0.5)
    big = bench.Row(bench.Case("layers", "pvt", "sdpa", 512), "x", (128, 128), 16384, 1600)
    assert m.estimates(big, "fwd")[0] == pytest.approx(8.0), "0.5 s x 16 times the MACs"


def test_each_round_times_every_method_once_in_a_shuffled_order(monkeypatch):
    """A fixed round-robin would always run the same method after the same other one."""
    monkeypatch.setattr(bench, "peak_memory", lambda fn, device, op_names=False: (0, []))
    m, calls = measurer("--repeats", "40", "--max-repeats", "40"), []
    rows = [layer_row(name) for name in "abc"]
    m.run_group([job(row, lambda n=row.case.name: calls.append(n)) for row in rows])
    timed = calls[3:]  # after one warm-up call each
    rounds = [tuple(timed[i:i + 3]) for i in range(0, len(timed), 3)]
    assert len(rounds) == 40 and all(sorted(r) == ["a", "b", "c"] for r in rounds), rounds
    assert len(set(rounds)) == 6, "every order of three shows up in 40 rounds"
    assert all(r.cells["fwd"].status == "ok" and len(r.cells["fwd"].times_s) == 40 for r in rows)


def test_warmup_0_times_the_first_call_and_checks_it(monkeypatch):
    """--warmup 0: no untimed call; the first timed call serves for the too-slow checks."""
    monkeypatch.setattr(bench, "peak_memory", lambda fn, device, op_names=False: (0, []))
    m, calls, row = measurer("--warmup", "0", "--repeats", "3", "--max-repeats", "3"), [], \
        layer_row()
    m.run_group([job(row, lambda: calls.append(1))])
    assert len(calls) == 3 and len(row.cells["fwd"].times_s) == 3, "every call timed"
    m, calls, row = measurer("--warmup", "0", "--cell-budget", "8"), [], layer_row()
    monkeypatch.setattr(bench, "time_call", lambda fn, device: (fn(), 5.0)[1])  # 5 s a call
    m.run_group([job(row, lambda: calls.append(1))])
    assert len(calls) == 1 and row.cells["fwd"].status == "skipped", row.cells["fwd"]
    assert "a first call took 5.0 s" in row.cells["fwd"].reason
    monkeypatch.undo()
    code, out, _ = run_main(["--methods", "ours", *SMALL, "--warmup", "0"])
    assert code == 0 and "Not measured" not in out, out


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
])
def test_out_of_memory_is_a_result_and_the_run_goes_on(error):
    bad, good = layer_row("explicit"), layer_row("ours")

    def boom():
        raise error

    measurer().run_group([job(bad, boom), job(good, lambda: torch.ones(4))])
    assert bad.cells["fwd"].status == "oom", bad.cells["fwd"]
    assert good.cells["fwd"].status == "ok", good.cells["fwd"]


def test_ctrl_c_prints_and_saves_what_was_measured(monkeypatch, tmp_path):
    calls = {"n": 0}
    real = bench.time_call
    argv = ["--resolutions", "32", "--sections", "layers", *TINY]
    first_group = 2 * len(bench.parse_args(argv).methods)  # a warm-up and a timed call each

    def interrupted_later(fn, device):
        calls["n"] += 1
        if calls["n"] > first_group:
            raise KeyboardInterrupt
        return real(fn, device)

    monkeypatch.setattr(bench, "time_call", interrupted_later)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: 1e10)  # its copies: no cell
    path = tmp_path / "r.json"
    code, out, _ = run_main([*argv, "--json", str(path)])
    assert code == 130
    data = json.loads(path.read_text())
    assert data["interrupted"] is True
    status = [r[m]["status"] for r in data["layers"] for m in ("fwd", "fwdbwd")]
    assert "ok" in status and "interrupted" in status, status
    assert "not run" in out and "cells: interrupted" in out, "one line for the reason they share"


def test_ctrl_c_counts_the_cells_that_ran_and_plots_only_them(monkeypatch, tmp_path):
    """The last line used to count every planned cell ("72 cells in 1 s (interrupted)"), and
    the plot drew empty panels with an empty legend and a matplotlib warning."""
    pytest.importorskip("matplotlib")
    calls = {"n": 0}

    def fake_time(fn, device):  # synthetic times: the first cells finish, then Ctrl-C
        calls["n"] += 1
        if calls["n"] > 16:
            raise KeyboardInterrupt
        return 1e-3 * (1 + calls["n"] % 3)

    monkeypatch.setattr(bench, "time_call", fake_time)
    monkeypatch.setattr(bench, "peak_memory", lambda fn, device, op_names=False: (2 ** 20, []))
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: 1e10)
    path, plot = tmp_path / "r.json", tmp_path / "r.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" among them
        code, out, err = run_main(["--resolutions", "32", "64", "--sections", "layers",
                                   "--json", str(path), "--plot", str(plot), *TINY])
    assert code == 130 and plot.stat().st_size > 10_000, err[-2000:]
    data = json.loads(path.read_text())
    status = [r[m]["status"] for r in data["layers"] for m in ("fwd", "fwdbwd")]
    ok, not_run = status.count("ok"), status.count("interrupted")
    assert 0 < ok < len(status) and ok + not_run == len(status), status
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"{ok} of {len(status)} cells measured in ") \
        and last.endswith(f"; {not_run} not run (interrupted)"), last
    fig = bench.make_plot(data)
    try:
        measured = {r["shape"] for r in data["layers"] if "ok" in (r["fwd"]["status"],
                                                                     r["fwdbwd"]["status"])}
        assert len(fig.axes) == 2 * len(measured), "two panels per shape with a measured cell"
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        labels = {r["label"] for r in data["layers"] if r["fwd"]["status"] == "ok"}
        assert set(legend) == labels, f"legend {legend}, measured {labels}"
        drawn = sum(len(line.get_xdata()) for ax in fig.axes[::2] for line in ax.get_lines())
        assert drawn == ok, f"{drawn} points in the time panels, {ok} cells measured"
        assert f"{not_run} of {len(status)} cells not run (interrupted)" in fig._suptitle.get_text()
    finally:
        plt_close(fig)


def plt_close(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)


def plot_data(times_ms: dict[str, list[float]], missing: dict | None = None):
    """to_json data of the pvt layer table at r = 32, 64, 128 with these per-resolution times
    (ms) per method, the (method, r, mode) cells of `missing` given that status instead."""
    args = bench.parse_args(["--resolutions", "32", "64", "128", "--sections", "layers",
                             "--shapes", "pvt", "--methods", *times_ms, "--threads", "1"])
    rows = bench.plan(args)
    for row in rows.values():
        c = row.case
        for mode, m in row.cells.items():
            t = times_ms[c.name][args.resolutions.index(c.resolution)] * (1 + (mode != "fwd"))
            m.status, m.times_s, m.peak_bytes = "ok", [t / 1e3] * 3, int(t * 2 ** 20)
            if (c.name, c.resolution, mode) in (missing or {}):
                m.status, m.times_s = missing[c.name, c.resolution, mode], []
    return bench.to_json(rows, bench.header_facts(args, CPU), False, 1.0)


def test_plot_marks_the_cells_not_measured():
    pytest.importorskip("matplotlib")
    data = plot_data({"sdpa": [1, 4, 16], "explicit": [2, 8, 32], "ours": [1, 2, 4]},
                     {("explicit", 128, "fwd"): "skipped", ("explicit", 128, "fwdbwd"): "skipped",
                      ("sdpa", 128, "fwdbwd"): "oom"})
    fig = bench.make_plot(data)
    try:
        ax = fig.axes[0]
        marks = {(line.get_marker(), round(float(line.get_xdata()[0]), 2), line.get_color())
                 for line in ax.get_lines() if line.get_linestyle() == "None"}
        assert marks == {("x", 1024 * 0.95, "C1"), ("+", 1024 * 1.05, "C1"),
                         ("+", 1024 * 1.05, "C0")}, f"marks at the skipped and OOM cells: {marks}"
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "forward not measured (skipped, OOM, error)" in legend \
            and "forward+backward not measured (skipped, OOM, error)" in legend, legend
    finally:
        plt_close(fig)


@pytest.mark.parametrize("times", [[1.2, 1.9, 3.5], [0.03, 0.06, 0.09], [3.0, 3.0, 3.0]],
                         ids=["half-a-decade", "tenths", "one-value"])
def test_plot_log_axes_label_short_ranges(times):
    """Times within one decade: the y axes show several plain-number labels (a log axis with
    decade labels only showed one, or none)."""
    pytest.importorskip("matplotlib")
    fig = bench.make_plot(plot_data({"ours": times}))
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_ylim()
            labels = [t.get_text() for t in ax.yaxis.get_majorticklabels()
                      + ax.yaxis.get_minorticklabels()
                      if t.get_text() and lo <= t.get_position()[1] <= hi]
            assert len(labels) >= 3, f"times {times} ms: y labels {labels} in ({lo:g}, {hi:g})"
            assert all(float(x) > 0 for x in labels), labels
    finally:
        plt_close(fig)


# -----------------------------------------------------------------------------
# A busy machine: fewer threads, noisy cells flagged, their ratios no result


def test_a_loaded_machine_runs_on_one_thread_and_says_so(monkeypatch):
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    monkeypatch.setattr(bench, "load_average", lambda: 3.5)
    args = bench.parse_args([])
    assert args.threads == 1 and "load average 3.5 on 2 usable CPUs" in args.threads_note
    explicit = bench.parse_args(["--threads", "2"])
    assert explicit.threads == 2 and explicit.threads_note.startswith("warning: load average")
    monkeypatch.setattr(bench, "load_average", lambda: 0.3)
    idle = bench.parse_args([])
    assert idle.threads == 2 and idle.threads_note is None
    monkeypatch.setattr(bench, "load_average", lambda: None)  # no getloadavg: all CPUs
    assert bench.parse_args([]).threads == 2


def synthetic(times, monkeypatch, load=0.3):
    """Rows of the pvt table (sdpa, ours, official at r = 32) with these per-call times (s),
    rendered: the text and the JSON."""
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    monkeypatch.setattr(bench, "load_average", lambda: load)
    args = bench.parse_args(["--resolutions", "32", "--sections", "layers", "--shapes", "pvt",
                             "--methods", *times])
    rows = bench.plan(args)
    for row in rows.values():
        for m in row.cells.values():
            m.status, m.times_s = "ok", list(times[row.case.name])
    facts = bench.header_facts(args, CPU)
    return bench.render(rows, facts), bench.to_json(rows, facts, False, 1.0)


QUIET = [1.0, 1.01, 0.99, 1.0, 1.02]
NOISY = [1.0, 0.5, 1.5, 2.5, 0.4]  # IQR 1.0 s around a median of 1 s


def test_noisy_cells_are_flagged_and_their_ratios_are_no_result(monkeypatch):
    text, data = synthetic({"sdpa": QUIET, "ours": [t / 2 for t in NOISY], "official": QUIET},
                           monkeypatch)
    rows = {r["method"]: r for r in data["layers"]}
    ours_line = next(line for line in text.splitlines() if "focused linear (ours)" in line)
    assert "500 (500)?" in ours_line, "the noisy time is marked"
    assert "2.00? / 2.00?" in ours_line, "so is every ratio computed from it"
    sdpa_line = next(line for line in text.splitlines() if "softmax, SDPA" in line)
    assert "1.00 / 1.00" in sdpa_line and "?" not in sdpa_line, "no noisy time in its ratios"
    assert "?: noisy, the IQR above 25% of the median" in text
    assert rows["ours"]["fwd"]["noisy"] and not rows["sdpa"]["fwd"]["noisy"]
    assert rows["ours"]["vs_sdpa_fwd_noisy"] and not rows["official"]["vs_sdpa_fwd_noisy"]
    assert rows["ours"]["vs_sdpa_fwd"] == pytest.approx(2.0), "the number stays in the JSON"


def test_quiet_cells_have_no_marks(monkeypatch):
    text, _ = synthetic({"sdpa": QUIET, "ours": QUIET, "official": QUIET}, monkeypatch)
    assert "?" not in text and "load average" not in text


def test_the_load_shows_in_the_output(monkeypatch):
    text, data = synthetic({"sdpa": QUIET}, monkeypatch, load=3.0)
    assert text.splitlines()[1].startswith("load average 3 on 2 usable CPUs at the start: "
                                           "measuring on 1 thread")
    assert data["header"]["load_average_1min"] == 3.0 and data["header"]["cpus"] == 2


# -----------------------------------------------------------------------------
# The measurements themselves


def test_cpu_peak_memory_follows_allocations_and_frees():
    def work():
        a = torch.empty(2 * 2 ** 20, dtype=torch.uint8)  # 2 MiB
        b = torch.empty(2 ** 20, dtype=torch.uint8)      # 1 MiB: peak 3 MiB
        del a, b
        return torch.empty(2 ** 19, dtype=torch.uint8)   # 0.5 MiB, kept

    peak, _ = bench.peak_memory(work, CPU)
    assert peak == 3 * 2 ** 20, f"peak {peak} bytes, expected 3 MiB"


@pytest.mark.skipif(bench.resource is None, reason="no getrusage on this platform")
def test_page_faults_count_the_first_touch_of_fresh_memory():
    before = bench.minor_faults()
    buf = torch.empty(64 * 2 ** 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
    buf.fill_(1)                                        # first touch: the kernel maps each page
    touched = bench.minor_faults() - before
    assert touched >= 32, f"{touched} page faults for 64 MiB of fresh memory"
    before = bench.minor_faults()
    buf.fill_(2)                                        # mapped now: no faults
    assert bench.minor_faults() - before < 32


def test_sdpa_backend_is_read_from_the_ops_that_ran():
    layer = fl.SoftmaxAttention(64, 2, qkv_bias=True).eval()
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        _, names = bench.peak_memory(lambda: layer(x, 4, 4), CPU, op_names=True)
    backend = bench.sdpa_backend(names)
    assert backend is not None and backend != "math", f"ops: {sorted(set(names))[:20]}"
    assert bench.sdpa_backend(["aten::mm"]) is None
    assert bench.sdpa_backend(["aten::_scaled_dot_product_new_kernel"]) == "new_kernel"


# -----------------------------------------------------------------------------
# The analytic MAC formulas against torch.utils.flop_counter


def counted_macs(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


@pytest.mark.parametrize("method", ["sdpa", "explicit", "ours", "ours-torch", "reference",
                                    "official", "vanilla", "l2vit", "l2vit-official"])
@pytest.mark.parametrize(("B", "C", "heads", "prefix", "grid"),
                         [(2, 48, 3, 1, (3, 5)), (1, 64, 1, 0, (4, 4))])
def test_layer_macs_match_the_flop_counter(method, B, C, heads, prefix, grid):
    """The counter does not count the CPU scaled_dot_product_attention kernel, so the 'sdpa'
    formula is checked on the same layer's explicit path (fused=False): the same matmuls."""
    shape = bench.LayerShape("t", "t", 1, C, heads, prefix)
    layer = bench.build_layer(method, shape, grid).eval()
    if method == "sdpa":
        layer.fused = False
    H, W = grid
    x = torch.randn(B, prefix + H * W, C)
    def fn():
        if method == "l2vit-official":
            return bench.l2vit_official_forward(layer, x, H, W)
        return fl.official_forward(layer, x, H, W) if method == "official" else layer(x, H, W)

    want = bench.layer_macs(method, B, prefix + H * W, C, heads, H * W)
    got = counted_macs(fn)
    assert got == want, f"{method} B={B} C={C} heads={heads} grid={grid}: {got} != {want}"


def test_layer_macs_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        bench.layer_macs("flash", 1, 16, 64, 1, 16)


@pytest.mark.slow
def test_model_macs_of_flatten_pvt_tiny():
    """FLatten-PVT-T at 224 x 224: 2.0 GFLOPs (multiply-adds) in the paper, 2.037 G counted."""
    model = fl.create_model("flatten_pvt_tiny")
    assert round(bench.model_macs(model, 1, 224) / 1e9, 3) == 2.037
