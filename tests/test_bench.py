"""Tests of bench.py: the command end to end with tiny settings, its JSON and CSV, its errors,
skips, OOM and Ctrl-C handling, the CPU peak-memory measurement, and the analytic FLOP formulas
against torch.utils.flop_counter. No test asserts anything about wall-clock times.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import flatten as fl

HERE = Path(__file__).parent.parent  # the project root
# the smallest useful run: one timed call per cell, no minimum time, no budgets; one thread, as
# two threads crawl when other processes compete for this 2-core machine (each op waits for both)
TINY = ["--repeats", "1", "--max-repeats", "1", "--min-time", "0", "--warmup", "1", "--threads", "1",
        "--cell-budget", "0", "--time-budget", "0"]


def run_command(*args, timeout=120):
    return subprocess.run([sys.executable, str(HERE / "bench.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """bench.main in-process at r = 40 (not a multiple of 16): layers of both shapes, one model pair."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--resolutions", "40", "--models", "flatten_deit_tiny", "deit_tiny",
            "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), *TINY]
    code = bench.main(argv)
    return code, json.loads((out / "r.json").read_text()), list(csv.DictReader(open(out / "r.csv")))


# -----------------------------------------------------------------------------
# The command end to end


@pytest.mark.slow
def test_command_smoke(tmp_path):
    out = tmp_path / "r.json"
    res = run_command("--resolutions", "32", "--sections", "layers", "--shapes", "pvt",
                      "--methods", "sdpa", "ours", "official", "--json", str(out), *TINY)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    first = res.stdout.splitlines()[0]
    for fact in ("device:", f"torch {torch.__version__}", "dtype float32", "threads", "batch size 1"):
        assert fact in first, f"header line {first!r} lacks {fact!r}"
    assert "focused linear (ours)" in res.stdout and "vs official" in res.stdout, res.stdout
    assert "[  1/6" in res.stderr, f"no progress on stderr: {res.stderr[-1000:]}"
    assert "Traceback" not in res.stderr, res.stderr
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["layers"]] == ["sdpa", "ours", "official"]
    assert all(r["fwd"]["status"] == "ok" for r in data["layers"]), data["layers"]


def test_json_layout(tiny_run):
    code, data, _ = tiny_run
    assert code == 0
    assert set(data) == {"header", "interrupted", "elapsed_s", "layers", "models"}
    assert data["interrupted"] is False
    for key in ("device", "device_name", "torch", "dtype", "threads", "batch_size", "timer", "memory"):
        assert key in data["header"], f"header lacks {key}"
    assert data["header"]["torch"] == torch.__version__ and data["header"]["dtype"] == "float32"
    layers = data["layers"]
    assert {(r["shape"], r["method"]) for r in layers} == \
        {(s, m) for s in bench.SHAPES for m in bench.METHODS if m != "ours-torch"}, \
        "one row per shape x method (ours-torch only where the Triton kernels run)"
    for r in layers:
        for key in ("resolution", "grid", "tokens", "gmacs", "backend", "vs_sdpa_fwd", "vs_sdpa_fwdbwd",
                    "vs_official_fwd", "vs_official_fwdbwd", "fwd", "fwdbwd"):
            assert key in r, f"layer row {r['shape']}/{r['method']} lacks {key}"
        for mode in ("fwd", "fwdbwd"):
            cell = r[mode]
            assert cell["status"] == "ok", f"{r['shape']}/{r['method']} {mode}: {cell}"
            assert cell["repeats"] == len(cell["times_ms"]) == 1
            assert cell["q1_ms"] <= cell["median_ms"] <= cell["q3_ms"]
            assert cell["peak_mib"] is not None and cell["peak_mib"] > 0, f"{r['method']} {mode} peak"
            if bench.resource is not None:  # getrusage: minor page faults of the timed calls
                assert cell["page_faults_per_call"] >= 0, f"{r['method']} {mode} page faults"
    models = data["models"]
    assert [m["model"] for m in models] == ["flatten_deit_tiny", "deit_tiny"]
    for m in models:
        assert m["params"] > 0 and m["gmacs"] > 0 and m["images_per_s"] > 0
        assert m["fwd"]["status"] == m["train"]["status"] == "ok", m
    assert models[0]["vs_softmax_fwd"] is not None and models[1]["vs_softmax_fwd"] is None


def test_grid_of_a_resolution_that_is_not_a_multiple_of_the_patch(tiny_run):
    _, data, _ = tiny_run
    rows = {(r["shape"], r["method"]): r for r in data["layers"]}
    assert rows["deit", "ours"]["grid"] == [2, 2] and rows["deit", "ours"]["tokens"] == 5, "40 // 16 = 2, + cls"
    assert rows["deit", "official"]["tokens"] == 5, "official_forward takes the class token too"
    assert rows["pvt", "ours"]["grid"] == [10, 10] and rows["pvt", "ours"]["tokens"] == 100


def test_layer_ratios_are_time_ratios_of_the_same_run(tiny_run):
    _, data, _ = tiny_run
    for shape in bench.SHAPES:
        rows = {r["method"]: r for r in data["layers"] if r["shape"] == shape}
        for method, r in rows.items():
            for ref in ("sdpa", "official"):
                for mode in ("fwd", "fwdbwd"):
                    want = rows[ref][mode]["median_ms"] / r[mode]["median_ms"]
                    assert r[f"vs_{ref}_{mode}"] == pytest.approx(want), f"{shape}/{method} vs {ref} {mode}"


def test_ours_against_official_differences_are_reported(tiny_run):
    """The ours row carries the largest differences from the official formulation, measured in
    the same run on the same (randomised) weights and input: float32 rounding."""
    _, data, _ = tiny_run
    for shape in bench.SHAPES:
        rows = {r["method"]: r for r in data["layers"] if r["shape"] == shape}
        e = rows["ours"]["vs_official_exactness"]
        assert 0 < e["output_max_abs"] and e["output_max_abs_diff"] <= 1e-5 * max(1.0, e["output_max_abs"])
        assert e["grad_max_rel_diff"] <= 1e-5
        assert "vs_official_exactness" not in rows["official"]


def test_floors_are_reported_against_this_runs_rates(tiny_run):
    """Ours and the official formulation carry their memory floor (bytes at the copy bandwidth
    measured in the run) and compute floor (MACs at the run's matmul rate), and their time over each."""
    _, data, _ = tiny_run
    bandwidth, mac_rate = data["header"]["copy_bandwidth_GBps"], data["header"]["matmul_GMACps"]
    assert bandwidth > 0 and mac_rate > 0
    for r in data["layers"]:
        if r["method"] not in ("ours", "official"):
            assert "floor_bytes" not in r
            continue
        for mode, macs in (("fwd", r["gmacs"]), ("fwdbwd", 3 * r["gmacs"])):
            assert r[f"memory_floor_ms_{mode}"] == pytest.approx(r["floor_bytes"][mode] / bandwidth / 1e6)
            assert r[f"compute_floor_ms_{mode}"] == pytest.approx(macs / mac_rate * 1e3)
            for kind in ("memory", "compute"):
                want = r[mode]["median_ms"] / r[f"{kind}_floor_ms_{mode}"]
                assert r[f"x_{kind}_floor_{mode}"] == pytest.approx(want)


@pytest.mark.parametrize("prefix, bias", [(0, False), (1, True)])
def test_floor_bytes_count_input_parameters_and_output(prefix, bias):
    B, C, h, k, (H, W) = 3, 8, 2, 5, (2, 3)
    layer = fl.FocusedLinearAttention(C, H * W, h, qkv_bias=bias, grid_size=(H, W), num_prefix_tokens=prefix)
    N, d = prefix + H * W, C // h
    params = (4 * C * C + 3 * C * bias + C      # q, kv (2C) and proj weights; q and kv biases; proj's
              + d * k * k + d + C                # DWC weight and bias, scale
              + N * C)                           # positional encoding, class tokens included
    want = 2 * B * N * C * 4 + params * 4        # float32: x and the output, the parameters
    got = bench.floor_bytes(layer, torch.zeros(B, N, C))
    assert got == {"fwd": want, "fwdbwd": 2 * want}
    assert bench.floor_bytes(layer.double(), torch.zeros(B, N, C, dtype=torch.float64))["fwd"] == 2 * want


def test_copy_bandwidth_is_a_rate_or_none_when_the_buffers_do_not_fit(monkeypatch):
    assert bench.copy_bandwidth(torch.device("cpu"), torch.float32, nbytes=2 ** 20) > 0

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(bench.torch, "ones", no_memory)
    assert bench.copy_bandwidth(torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize("sabotage", ["dwc", "positional_encoding"])
def test_differences_are_real_measurements(monkeypatch, sabotage):
    """A wrong layer gives a large difference: ours without its DWC term, or the official
    formulation without the positional encoding (zero at initialisation: the comparison
    randomises the parameters so that it counts)."""
    shape, grid, cpu = bench.SHAPES["pvt"], (4, 4), torch.device("cpu")
    e = bench.compare_to_official(shape, grid, cpu, torch.float32, 1, seed=0)
    assert e["output_max_abs_diff"] < 1e-5 and e["grad_max_rel_diff"] < 1e-5
    if sabotage == "dwc":
        monkeypatch.setattr(fl.FocusedLinearAttention, "_dwc", lambda self, v, H, W: torch.zeros_like(v))
    else:
        official = fl.official_forward

        def without_pe(layer, x, H, W):
            with torch.no_grad():
                layer.positional_encoding.zero_()
            return official(layer, x, H, W)
        monkeypatch.setattr(fl, "official_forward", without_pe)
    e = bench.compare_to_official(shape, grid, cpu, torch.float32, 1, seed=0)
    assert e["output_max_abs_diff"] > 1e-3 and e["grad_max_rel_diff"] > 1e-3


def test_csv_has_one_line_per_cell_with_the_header_facts(tiny_run):
    _, data, lines = tiny_run
    assert len(lines) == 2 * (len(data["layers"]) + len(data["models"]))
    for line in lines:
        assert line["device"] == "cpu" and line["torch"] == torch.__version__ and line["dtype"] == "float32"
        assert line["status"] == "ok" and float(line["median_ms"]) > 0, line


# -----------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, no traceback


@pytest.mark.parametrize("argv, needle", [
    (["--resolutions", "0"], "positive"),
    (["--resolutions", "-224"], "positive"),
    (["--resolutions", "abc"], "whole number"),
    (["--resolutions", "16"], "too small"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--batch-size", "0"], "positive"),
    (["--json", "no/such/folder/r.json"], "does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"{argv}: exit {exc.value.code}"
    assert len(err.strip().splitlines()) == 1 and needle in err, f"{argv}: {err!r}"


def test_cuda_without_a_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "CUDA" in err, err


def test_plot_without_matplotlib_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as exc:
        bench.main(["--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "matplotlib" in err and len(err.strip().splitlines()) == 1, err


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    code = bench.main(["--resolutions", "32", "64", "--sections", "layers", "--methods", "sdpa", "ours",
                       "--plot", str(path), *TINY])
    assert code == 0 and path.stat().st_size > 10_000, "a PNG with two panels per layer shape"


@pytest.mark.slow
def test_command_error_has_no_traceback():
    res = run_command("--resolutions", "224", "abc")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""


# -----------------------------------------------------------------------------
# Skips, OOM, Ctrl-C


def small_args(*extra):
    return bench.parse_args(["--resolutions", "32", *TINY, *extra])


def test_cell_over_the_memory_estimate_is_skipped_before_it_starts(monkeypatch, capsys):
    monkeypatch.setattr(bench, "free_memory", lambda device: 100 * 2 ** 10)  # 100 KiB "free"
    called = []
    runner = bench.Runner(small_args(), torch.device("cpu"), 1, log=lambda m: None)
    row = bench.Row("layers", "explicit", "x", "pvt", 32, (8, 8), 64, 10, bench.LAYER_MODES)
    runner.run_group([bench.Case(row, "fwd", lambda: called.append(1), est_s=0.001, est_bytes=2 ** 20)])
    cell = row.cells["fwd"]
    assert cell.status == "skipped" and "needs ~1.0 MiB" in cell.reason, cell
    assert not called, "a skipped cell must not run at all"


def test_cell_over_the_time_budget_is_skipped_with_its_estimate():
    args = small_args()
    args.cell_budget = 1.0
    runner = bench.Runner(args, torch.device("cpu"), 1, log=lambda m: None)
    row = bench.Row("layers", "sdpa", "x", "pvt", 32, (8, 8), 64, 10, bench.LAYER_MODES)
    runner.run_group([bench.Case(row, "fwd", lambda: None, est_s=7.4)])
    assert row.cells["fwd"].status == "skipped" and "~7.4 s per call" in row.cells["fwd"].reason
    assert runner.history["pvt", "sdpa", "fwd"] == (10, 7.4), "larger resolutions extrapolate from it"


def test_later_resolutions_extrapolate_from_earlier_ones():
    runner = bench.Runner(small_args(), torch.device("cpu"), 1, log=lambda m: None)
    runner.history[("pvt", "sdpa", "fwd")] = (100, 0.5)  # 0.5 s at 100 MACs
    big = bench.Row("layers", "sdpa", "x", "pvt", 512, (128, 128), 16384, 1600, bench.LAYER_MODES)
    assert runner.estimate_s(big, "fwd", "fwd") == pytest.approx(8.0), "0.5 s x 16 times the MACs"
    big.cells["fwd"].status, big.cells["fwd"].times_s = "ok", [4.0]
    assert runner.estimate_s(big, "fwdbwd", "fwd") == pytest.approx(12.0), "3 x this cell's forward"


def test_each_round_times_every_method_once_in_a_shuffled_order(monkeypatch):
    """A fixed round-robin would always run the same method after the same other one."""
    monkeypatch.setattr(bench, "peak_memory", lambda fn, device, op_names=(): (0, []))
    runner = bench.Runner(small_args("--repeats", "40", "--max-repeats", "40"), torch.device("cpu"), 3,
                          log=lambda m: None)
    calls = []
    rows = [bench.Row("layers", name, "x", "pvt", 32, (8, 8), 64, 10, bench.LAYER_MODES) for name in "abc"]
    runner.run_group([bench.Case(row, "fwd", lambda n=row.name: calls.append(n)) for row in rows])
    timed = calls[3:]  # after one warm-up call each
    rounds = [tuple(timed[i:i + 3]) for i in range(0, len(timed), 3)]
    assert len(rounds) == 40 and all(sorted(r) == ["a", "b", "c"] for r in rounds), rounds
    assert len(set(rounds)) == 6, "every order of three shows up in 40 rounds"
    assert all(row.cells["fwd"].status == "ok" and len(row.cells["fwd"].times_s) == 40 for row in rows)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
])
def test_out_of_memory_is_a_result_and_the_run_goes_on(error):
    runner = bench.Runner(small_args(), torch.device("cpu"), 2, log=lambda m: None)
    bad = bench.Row("layers", "explicit", "x", "pvt", 32, (8, 8), 64, 10, bench.LAYER_MODES)
    good = bench.Row("layers", "ours", "x", "pvt", 32, (8, 8), 64, 10, bench.LAYER_MODES)

    def boom():
        raise error

    runner.run_group([bench.Case(bad, "fwd", boom), bench.Case(good, "fwd", lambda: torch.ones(4))])
    assert bad.cells["fwd"].status == "oom", bad.cells["fwd"]
    assert good.cells["fwd"].status == "ok", good.cells["fwd"]


def test_ctrl_c_prints_and_saves_what_was_measured(monkeypatch, tmp_path, capsys):
    calls = {"n": 0}
    real = bench.time_call

    def interrupted_later(fn, device):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real(fn, device)

    monkeypatch.setattr(bench, "time_call", interrupted_later)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: 1e10)  # its timed copies are no cell
    path = tmp_path / "r.json"
    code = bench.main(["--resolutions", "32", "--sections", "layers", "--json", str(path), *TINY])
    assert code == 130
    data = json.loads(path.read_text())
    assert data["interrupted"] is True
    status = [r[m]["status"] for r in data["layers"] for m in ("fwd", "fwdbwd")]
    assert "ok" in status and "interrupted" in status, status
    assert "not run" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The measurements themselves


def test_cpu_peak_memory_follows_allocations_and_frees():
    def work():
        a = torch.empty(2 * 2 ** 20, dtype=torch.uint8)  # 2 MiB
        b = torch.empty(2 ** 20, dtype=torch.uint8)      # 1 MiB: peak 3 MiB
        del a, b
        return torch.empty(2 ** 19, dtype=torch.uint8)   # 0.5 MiB, kept

    peak, _ = bench.peak_memory(work, torch.device("cpu"))
    assert peak == 3 * 2 ** 20, f"peak {peak} bytes, expected 3 MiB"


@pytest.mark.skipif(bench.resource is None, reason="no getrusage on this platform")
def test_page_faults_count_the_first_touch_of_fresh_memory():
    before = bench.minor_faults()
    buf = torch.empty(64 * 2 ** 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
    buf.fill_(1)                                        # first touch: the kernel maps each page
    touched = bench.minor_faults() - before
    assert touched >= 32, f"{touched} page faults for 64 MiB of fresh memory (32 even with 2 MiB pages)"
    before = bench.minor_faults()
    buf.fill_(2)                                        # mapped now: no faults
    assert bench.minor_faults() - before < 32


def test_layer_cases_report_the_path_of_ours(monkeypatch):
    """run_layers labels the ours row "Triton forward" where layer_cases reports that flatten.py's
    kernels compute its forward (CUDA with Triton installed; stood in for here)."""
    grid, args = (4, 4), ("cpu", torch.float32, 1, 0)
    assert bench.layer_cases("ours", bench.SHAPES["pvt"], grid, *args)["path"] == "inference"
    assert bench.layer_cases("official", bench.SHAPES["pvt"], grid, *args)["path"] is None
    monkeypatch.setattr(fl, "triton", object())
    monkeypatch.setattr(fl, "_on_cuda", lambda t: True)
    assert bench.layer_cases("ours", bench.SHAPES["pvt"], grid, *args)["path"] == "triton"
    # ours-torch: the same layer with the kernels off, in its forward call too
    cases = bench.layer_cases("ours-torch", bench.SHAPES["pvt"], grid, *args)
    assert cases["path"] == "inference"
    taken = []
    monkeypatch.setattr(fl.FocusedLinearAttention, "_forward_triton", lambda *a: taken.append(1))
    cases["fwd"]()
    assert not taken and fl.get_fast_path() == "auto"


def test_ours_torch_is_a_default_method_only_where_triton_runs(monkeypatch):
    assert "ours-torch" not in bench.parse_args([]).methods                 # CPU
    assert "ours-torch" in bench.parse_args(["--methods", "ours-torch"]).methods
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fl, "triton", object())
    assert bench.parse_args(["--device", "cuda"]).methods == list(bench.METHODS)
    monkeypatch.setattr(fl, "triton", None)
    assert "ours-torch" not in bench.parse_args(["--device", "cuda"]).methods


def test_sdpa_backend_is_read_from_the_ops_that_ran():
    layer = fl.SoftmaxAttention(64, 2, qkv_bias=True).eval()
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        _, names = bench.peak_memory(lambda: layer(x, 4, 4), torch.device("cpu"), op_names=True)
    backend = bench.sdpa_backend(names)
    assert backend is not None and backend != "math", f"ops: {sorted(set(names))[:20]}"
    assert bench.sdpa_backend(["aten::mm"]) is None


# -----------------------------------------------------------------------------
# The analytic FLOP formulas against torch.utils.flop_counter


def counted_macs(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


@pytest.mark.parametrize("method", ["sdpa", "explicit", "ours", "ours-torch", "official", "vanilla", "l2vit"])
@pytest.mark.parametrize("B, C, heads, prefix, grid", [(2, 48, 3, 1, (3, 5)), (1, 64, 1, 0, (4, 4))])
def test_layer_macs_match_the_flop_counter(method, B, C, heads, prefix, grid):
    """The counter does not count the CPU scaled_dot_product_attention kernel, so the 'sdpa' formula
    is checked on the same layer's explicit path (fused=False): the same matmuls, written out."""
    shape = bench.LayerShape("t", "t", 1, C, heads, prefix)
    P = prefix
    layer = bench.build_layer(method, shape, grid).eval()
    if method == "sdpa":
        layer.fused = False
    H, W = grid
    x = torch.randn(B, P + H * W, C)
    if method == "official":
        fn = lambda: fl.official_forward(layer, x, H, W)  # noqa: E731
    else:
        fn = lambda: layer(x, H, W)  # noqa: E731
    want = bench.layer_macs(method, B, P + H * W, C, heads, H * W)
    got = counted_macs(fn)
    assert got == want, f"{method} B={B} C={C} heads={heads} prefix={P} grid={grid}: counter {got}, formula {want}"


def test_layer_macs_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        bench.layer_macs("flash", 1, 16, 64, 1, 16)


@pytest.mark.slow
def test_model_macs_match_the_facts_table():
    """FACTS.md: flatten_pvt_tiny has 2.037 GFLOPs (multiply-adds) at 224 x 224."""
    model = fl.create_model("flatten_pvt_tiny")
    assert round(bench.model_macs(model, 1, 224) / 1e9, 3) == 2.037
