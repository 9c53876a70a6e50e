"""bench.py: time and peak memory of focused linear attention against softmax attention.

Usage:
    python bench.py                                   # CPU, float32, 224 512 1024, both sections
    python bench.py --resolutions 224 512 1024 --device cuda --dtype bfloat16 --json out.json
    python bench.py --sections layers --shapes pvt --methods sdpa ours official
    python bench.py --time-budget 0 --cell-budget 0   # measure every cell, however long
    python bench.py --help

What it measures, at every resolution r (image r x r):

1. Attention layers, for two real layer shapes, each method on the same input:
   - deit: a DeiT-T layer, patch 16: N = (r/16)^2 patch tokens + 1 class token, C = 192, 3 heads;
   - pvt:  a FLatten-PVT stage-1 layer, patch 4: N = (r/4)^2 tokens, C = 64, 1 head;
   all with sr_ratio 1 (every query attends to every token), qkv_bias on. Methods:
   - sdpa:     softmax through F.scaled_dot_product_attention (the backend it used is named);
   - explicit: softmax with the explicit N x N matrix;
   - ours:     focused linear attention, FocusedLinearAttention.forward (flatten.py); its forward
               row says [Triton forward] where flatten.py's Triton kernels compute it (CUDA);
   - ours-torch: ours with the Triton kernels off (flatten.set_fast_path('torch')): a default
               method only where they run (CUDA with Triton installed), to show what they gain;
   - official: the official formulation op by op (flatten.official_forward), on a layer with the
               same weights as ours (class token as ours: in the attention, not in the DWC);
   - vanilla:  linear attention with a ReLU kernel, no focusing, no DWC (the paper's Table 4);
   - l2vit:    L^2ViT's linear attention with its local concentration module.
2. Whole models: FLatten-PVT-T against PVT-T (softmax with spatial reduction) and FLatten-DeiT-T
   against DeiT-T: parameters, GMACs, inference latency and images/s, one training step
   (forward + cross-entropy + backward to every parameter; no optimizer step), peak memory.
   Each model is built once and resized with set_input_size, so its position tables hold the
   grid of r (parameter counts grow with r).

How it measures:
- Inputs, layers and models are built outside the timed region; a call is only the work:
  forward under no_grad in eval mode, or forward + torch.autograd.grad of the output (a fixed
  random upstream gradient) with respect to the parameters and the input, in train mode.
- Per cell: --warmup untimed calls, one call for peak memory, then the timed calls: at least
  --repeats, more until --min-time seconds are timed, at most --max-repeats. The methods of one
  (shape, r, forward or forward+backward) group are timed in rounds, one call each, so that slow
  drifts in the machine's load hit them alike (short bursts still show in the IQR); the order
  within a round is shuffled (seeded): a call may run slower or faster depending on which
  call ran before it (caches, allocator), and a fixed order would give any such bias to the
  same method all along (README.md: three runs in each order showed none beyond the noise).
- Times: the median and the interquartile range (IQR) of the per-call times, time.perf_counter
  around each call on CPU; CUDA events recorded around each call, after a synchronize, on GPU.
- Threads: torch.set_num_threads(--threads), by default every CPU this process may run on.
- Peak memory, in MiB above what was allocated before the call (the call's inputs, weights and
  earlier results are the baseline; the output is included): on GPU the allocator's
  torch.cuda.max_memory_allocated after reset_peak_memory_stats; on CPU the torch profiler's
  allocation events (profile_memory=True): every tensor allocation and free of the call, each
  with the allocator's running total, whose maximum is the peak. Not a formula.
- Page faults (CPU, where getrusage exists): the process's minor page faults during each timed
  call, their mean per cell. Memory the C allocator gave back to the system between calls (glibc
  returns blocks above its mmap threshold and trims the heap top) faults in again, page by page,
  at a cost that depends on the allocator's state: this explains much of the spread of CPU times
  from run to run, and shows which methods keep their memory.
- GMACs: forward multiply-adds of matmuls and convolutions (multiply-add = 1, the papers'
  "GFLOPs" convention; 2 x GMACs = GFLOP). For the layers an analytic formula (layer_macs),
  checked in test_bench.py against torch.utils.flop_counter; for the models the flop counter
  itself, run on fake tensors (no compute), with softmax on its explicit path because the counter
  does not count the CPU SDPA kernel.
- Skips: a cell whose estimated memory exceeds what is free (half of MemAvailable on CPU, 90% of
  the free GPU memory), or whose estimated time exceeds --cell-budget, or the time left of
  --time-budget, is not started and is shown as skipped with the estimate. Time estimates scale
  the same method's time at the previous resolution by the ratio of GMACs (forward + backward:
  3 x forward), or else divide its GMACs by the rate of a calibration matmul. An out-of-memory
  error is recorded as OOM and the run goes on; Ctrl-C prints and saves what was measured.

Output: a header line (device, torch version, dtype, threads, batch size), one table per layer
shape and one for the models (tabulate), progress on stderr; --json, --csv and --plot save it.
In the layer tables "vs SDPA" and "vs official" are speed-ups, time of SDPA softmax (or of the
official formulation) divided by the row's time, forward / forward+backward; above 1 = faster.
Under each layer table, when both ours and official ran: the largest |difference| between the
two on the cell's input, with every parameter drawn from N(0, 0.1^2), of the forward output and
of every gradient (relative to its largest entry).
An excerpt (this project's idle 2-core CPU, `python bench.py`, some columns left out;
README.md has more and how to read it, results/cpu_float32_2threads.txt the whole output):

    | r   | N    | method                      | fwd ms (IQR) | fwd+bwd ms (IQR) | vs SDPA     | vs official |
    |-----|------|-----------------------------|--------------|------------------|-------------|-------------|
    | 224 | 3136 | softmax, SDPA [flash (CPU)] | 18.3 (0.38)  | 68.1 (1.78)      | 1.00 / 1.00 | 0.14 / 0.25 |
    | 224 | 3136 | focused linear (ours)       | 2.00 (0.26)  | 9.32 (1.26)      | 9.16 / 7.31 | 1.25 / 1.79 |
    | 224 | 3136 | focused linear, official    | 2.50 (0.56)  | 16.7 (2.81)      | 7.31 / 4.08 | 1.00 / 1.00 |
    Ours - official, largest |difference| (float32, parameters ~ N(0, 0.1^2)):
      r=224: output 5.4e-07 (|output| <= 1.64); gradients 1.7e-06 of their largest entry
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

try:
    import resource  # page faults (Unix)
except ImportError:
    resource = None
import torch
import torch.nn as nn
import torch.nn.functional as F

import flatten as fl

# -----------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class LayerShape:
    """One attention layer of a real model: tokens on a (r / patch)^2 grid, plus class tokens."""
    name: str
    title: str
    patch: int
    dim: int
    heads: int
    prefix: int  # class tokens

    def grid(self, resolution: int) -> Tuple[int, int]:
        g = resolution // self.patch  # a conv patch embedding drops the remainder pixels
        return g, g


SHAPES = {
    "deit": LayerShape("deit", "DeiT-T layer (patch 16, C 192, 3 heads, + class token)", 16, 192, 3, 1),
    "pvt": LayerShape("pvt", "FLatten-PVT stage-1 layer (patch 4, C 64, 1 head)", 4, 64, 1, 0),
}

METHODS = {
    "sdpa": "softmax, SDPA",
    "explicit": "softmax, explicit NxN",
    "ours": "focused linear (ours)",
    "ours-torch": "focused linear (ours), no Triton",
    "official": "focused linear, official",
    "vanilla": "vanilla linear",
    "l2vit": "L2ViT linear + LCM",
}

DEFAULT_MODELS = ("flatten_pvt_tiny", "pvt_tiny", "flatten_deit_tiny", "deit_tiny")
MIN_RESOLUTION = 32  # the PVT models need one token in their last stage (stride 32)
KERNEL_SIZE, LCM_KERNEL = 5, 7  # FocusedLinearAttention's DWC and L2ViT's LCM defaults
LAYER_MODES = ("fwd", "fwdbwd")
MODEL_MODES = ("fwd", "train")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward", "train": "training step"}
BACKWARD_FACTOR = 3.0  # forward + backward ~ 3 x forward, for estimates only
CPU_MEMORY_FRACTION, GPU_MEMORY_FRACTION = 0.5, 0.9
SDPA_BACKENDS = {  # aten kernel behind F.scaled_dot_product_attention -> a short name
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def layer_macs(method: str, batch: int, tokens: int, dim: int, heads: int, grid_tokens: int,
               kernel_size: int = KERNEL_SIZE, lcm_kernel: int = LCM_KERNEL) -> int:
    """Forward multiply-adds of one attention layer: its matmuls and convolutions, nothing else.

    B batch, N tokens (with class tokens), C dim, d = C / heads, G = grid tokens (the DWC's and
    LCM's image, without class tokens), every query attending to all N tokens (sr_ratio 1).
    Elementwise work (kernels, softmax, norms) is not counted, as in torch.utils.flop_counter.
    """
    B, N, C, G = batch, tokens, dim, grid_tokens
    d = C // heads
    macs = 4 * B * N * C * C                # q (C -> C), kv (C -> 2C), proj (C -> C)
    if method in ("sdpa", "explicit"):
        return macs + 2 * B * N * N * C     # Q K^T and A V: N x N x d per head
    if method not in ("ours", "ours-torch", "official", "vanilla", "l2vit"):
        raise ValueError(f"unknown method {method!r}")
    macs += 2 * B * N * C * d + B * N * C   # K^T V and Q (K^T V): N d^2 per head; Q . sum_j K_j
    if method in ("ours", "ours-torch", "official"):
        macs += B * C * G * kernel_size ** 2        # depthwise conv on v
    elif method == "l2vit":
        macs += 2 * B * C * G * lcm_kernel ** 2     # the LCM's two depthwise convs
    return macs


def layer_memory_estimate(method: str, mode: str, batch: int, tokens: int, dim: int, heads: int,
                          element_size: int, sdpa_backend: Optional[str]) -> int:
    """A deliberately rough upper estimate of a layer call's peak bytes, to skip what cannot fit.

    A few dozen (B, N, C) temporaries, plus for the explicit N x N softmax (and SDPA's math
    backend) the score and probability matrices: two live in the forward, about four in the
    backward (measured on CPU: 77 MiB for two 37.5 MiB matrices at N = 3136).
    """
    train = mode != "fwd"
    est = batch * tokens * dim * element_size * (40 if train else 12)
    if method == "explicit" or (method == "sdpa" and sdpa_backend == "math"):
        est += batch * heads * tokens * tokens * element_size * (4 if train else 2)
    return est


# -----------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    """One cell: a callable timed on one device, or the reason it was not."""
    status: str = "pending"  # ok | skipped | oom | error | interrupted | pending
    reason: str = ""
    times_s: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    faults: List[int] = field(default_factory=list)  # minor page faults of each timed call (CPU)
    estimate_s: Optional[float] = None
    estimate_bytes: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def faults_per_call(self) -> Optional[float]:
        return statistics.mean(self.faults) if self.faults else None

    def quartiles_s(self) -> Tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q1, q3

    def to_dict(self) -> dict:
        out = {"status": self.status, "reason": self.reason or None}
        if self.times_s:
            q1, q3 = self.quartiles_s()
            out.update(median_ms=self.median_s * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
                       iqr_ms=(q3 - q1) * 1e3, min_ms=min(self.times_s) * 1e3,
                       max_ms=max(self.times_s) * 1e3, repeats=len(self.times_s),
                       times_ms=[t * 1e3 for t in self.times_s])
        out["peak_mib"] = None if self.peak_bytes is None else self.peak_bytes / 2 ** 20
        out["page_faults_per_call"] = self.faults_per_call
        out["estimate_s"] = self.estimate_s
        out["estimate_mib"] = None if self.estimate_bytes is None else self.estimate_bytes / 2 ** 20
        return out


@dataclass
class Row:
    """One line of a table: a layer method or a model at one resolution, with its two cells."""
    section: str           # "layers" | "models"
    name: str              # method key or model name
    label: str
    group: str             # layer shape or model name
    resolution: int
    grid: Tuple[int, int]
    tokens: int
    macs: Optional[int]
    modes: Tuple[str, str]
    cells: Dict[str, Measurement] = field(default_factory=dict)
    params: Optional[int] = None
    backend: Optional[str] = None
    exactness: Optional[Dict[str, float]] = None   # ours against the official formulation
    floor_bytes: Optional[Dict[str, int]] = None   # per mode: the bytes a call must move at least

    def __post_init__(self):
        for m in self.modes:
            self.cells.setdefault(m, Measurement())

    def time_s(self, mode: str) -> Optional[float]:
        cell = self.cells[mode]
        return cell.median_s if cell.ok else None


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den is not None and den > 0 else None


def layer_ratios(rows: Sequence[Row], row: Row) -> Dict[str, Optional[float]]:
    """Speed-ups of a layer row against SDPA softmax and the official formulation, same cell."""
    peers = {r.name: r for r in rows if r.section == "layers" and r.group == row.group
             and r.resolution == row.resolution}
    out = {}
    for ref in ("sdpa", "official"):
        for mode in LAYER_MODES:
            base = peers.get(ref)
            out[f"vs_{ref}_{mode}"] = _ratio(base.time_s(mode) if base else None, row.time_s(mode))
    return out


def model_ratios(rows: Sequence[Row], row: Row) -> Dict[str, Optional[float]]:
    """Speed-ups of flatten_X against its softmax counterpart X, at the same resolution."""
    name = row.name
    other = name[len("flatten_"):] if name.startswith("flatten_") else None
    peer = next((r for r in rows if r.section == "models" and r.name == other
                 and r.resolution == row.resolution), None)
    return {f"vs_softmax_{mode}": _ratio(peer.time_s(mode) if peer else None, row.time_s(mode))
            if other else None for mode in MODEL_MODES}


def floor_ratios(row: Row, bandwidth: Optional[float], mac_rate: Optional[float]) -> Dict[str, Optional[float]]:
    """A layer row's floors in ms per mode and its time over each: memory (floor_bytes at the
    copy bandwidth, B/s) and compute (its multiply-adds at the matmul rate, MAC/s; forward+backward
    counted as three forwards: each product's backward is two products of the same size)."""
    out: Dict[str, Optional[float]] = {}
    for mode in LAYER_MODES:
        memory = row.floor_bytes[mode] / bandwidth if row.floor_bytes and bandwidth else None
        compute = row.macs * (1 if mode == "fwd" else 3) / mac_rate if row.macs and mac_rate else None
        for name, floor in (("memory", memory), ("compute", compute)):
            out[f"{name}_floor_ms_{mode}"] = None if floor is None else floor * 1e3
            out[f"x_{name}_floor_{mode}"] = _ratio(row.time_s(mode), floor)
    return out


# -----------------------------------------------------------------------------
# Measuring one call


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (every thread), or None without getrusage.

    A page fault is the kernel mapping a page at its first touch: memory that the C allocator
    gave back to the system (glibc returns blocks above its mmap threshold, and trims the top of
    the heap) faults in again on reuse, a cost that varies with the allocator's state, so the
    tables show it beside the times."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: perf_counter on CPU; CUDA events around it, synchronised, on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _profiler_events(prof) -> list:
    """Every event of a finished torch.profiler run, flattened from its event tree."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    events = []
    while stack:
        e = stack.pop()
        events.append(e)
        stack.extend(e.children)
    return events


def peak_memory(fn: Callable[[], object], device: torch.device,
                op_names: bool = False) -> Tuple[Optional[int], List[str]]:
    """Peak bytes allocated by one call above those allocated before it, and its aten op names.

    GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the profiler's
    allocation events (profile_memory=True) carry the allocator's running total; its maximum
    minus the total before the first event is the peak. None when no event was recorded.
    """
    from torch.profiler import ProfilerActivity, profile
    names: List[str] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        if op_names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = fn()
            names = [e.name for e in prof.events()]
        else:
            out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, names
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    try:  # the profiler's event tree (torch >= 2.0); its layout is not a public API
        from torch._C._profiler import _EventType
        events = _profiler_events(prof)
    except (ImportError, AttributeError):
        return None, names
    allocs = []
    for e in events:
        if e.tag == _EventType.Allocation:
            if e.extra_fields.device.type == "cpu":
                allocs.append(e)
        elif op_names:
            names.append(e.name)
    if not allocs:
        return None, names
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in allocs) - base, names


def sdpa_backend(names: Sequence[str]) -> Optional[str]:
    """The SDPA backend among a call's aten op names (None if it did not call SDPA)."""
    for name in names:
        if name in SDPA_BACKENDS:
            return SDPA_BACKENDS[name]
    for name in names:  # a backend this table does not know: its aten name
        if name.startswith("aten::_scaled_dot_product"):
            return name[len("aten::_scaled_dot_product_"):]
    return None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(err)
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a benchmark may still allocate: 90% of the free GPU memory (plus what torch holds
    cached), or half of the kernel's MemAvailable on CPU (None where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(GPU_MEMORY_FRACTION * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(CPU_MEMORY_FRACTION * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return None


def calibrate(device: torch.device, dtype: torch.dtype) -> float:
    """Multiply-adds per second of a 512 x 512 matmul: the fallback for time estimates."""
    a = torch.randn(512, 512, device=device).to(dtype)
    fn = lambda: a @ a  # noqa: E731
    for _ in range(2):
        fn()
    t = min(time_call(fn, device) for _ in range(5))
    return 512 ** 3 / max(t, 1e-9)


def floor_bytes(layer: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """The bytes one call of the layer must move at least once, whatever the implementation: the
    forward reads x and every parameter (the positional encoding included) and writes the output;
    forward+backward also reads the output's gradient and writes the gradients of x and of every
    parameter. Temporaries, a second pass over x or anything saved for the backward come on top."""
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    act = x.numel() * x.element_size()
    return {"fwd": 2 * act + params, "fwdbwd": 4 * act + 2 * params}


def copy_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: Optional[int] = None) -> Optional[float]:
    """Bytes per second (read + written) of the fastest of seven copies of a buffer larger than the
    caches, 64 MiB on CPU and 1 GiB on CUDA: the rate at which a call can stream memory. None if
    the buffers do not fit."""
    nbytes = nbytes or (2 ** 30 if device.type == "cuda" else 2 ** 26)
    try:
        src = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
        dst = torch.zeros_like(src)
    except RuntimeError as err:
        if is_oom(err):
            return None
        raise
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    t = min(time_call(fn, device) for _ in range(7))
    return 2 * src.numel() * src.element_size() / max(t, 1e-12)


# -----------------------------------------------------------------------------
# Running cells


@dataclass
class Case:
    """A row's cell about to run: the call, its estimates and where the result goes."""
    row: Row
    mode: str
    fn: Callable[[], object]
    est_s: Optional[float] = None
    est_bytes: Optional[int] = None
    want_ops: bool = False

    @property
    def cell(self) -> Measurement:
        return self.row.cells[self.mode]


class Runner:
    """Runs groups of cases (warm-up, memory, timing in shuffled rounds) within the time budgets."""

    def __init__(self, args, device: torch.device, total_cells: int, log=None):
        self.args, self.device = args, device
        self.total, self.done = total_cells, 0
        self.start = time.perf_counter()
        self.history: Dict[tuple, Tuple[int, float]] = {}  # (group, name, mode) -> (macs, s)
        self.mem_history: Dict[tuple, Tuple[int, int]] = {}  # (group, name, mode) -> (tokens, bytes)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # first calls of the process pay one-time costs (thread pools, the profiler's start-up):
        # pay them here, outside every cell
        peak_memory(lambda: torch.ones(8, device=device) * 2, device, op_names=True)
        self.rate = calibrate(device, args.torch_dtype)  # MAC/s, for time estimates

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate_s(self, row: Row, mode: str, fwd_mode: str) -> Optional[float]:
        """One call's seconds: scaled from the previous resolution, else from the calibration."""
        if row.macs is None:
            return None
        guesses = []
        prev = self.history.get((row.group, row.name, mode))
        if prev:
            guesses.append(prev[1] * row.macs / prev[0])
        if mode != fwd_mode:
            fwd = row.cells[fwd_mode]
            t = fwd.median_s if fwd.ok else fwd.estimate_s if fwd.status == "skipped" else None
            if t is not None:
                guesses.append(BACKWARD_FACTOR * t)
        if guesses:
            return max(guesses)
        return (1.0 if mode == fwd_mode else BACKWARD_FACTOR) * row.macs / self.rate

    def cost_s(self, est_call: float) -> float:
        """Seconds a cell takes if one call takes est_call: warm-up, memory call, repeats."""
        return est_call * (self.args.warmup + 1 + self.args.repeats)

    def precheck(self, case: Case, free: Optional[int]) -> Tuple[Optional[str], bool]:
        """Why the case must not start (or None), and whether the reason is the estimated time of
        one call (later resolutions then extrapolate from that estimate and skip too)."""
        a, est = self.args, case.est_s
        if case.est_bytes is not None and free is not None and case.est_bytes > free:
            return (f"needs ~{_fmt_bytes(case.est_bytes)} by estimate, {_fmt_bytes(free)} may be "
                    f"allocated ({'half the available RAM' if self.device.type == 'cpu' else '90% of free GPU memory'})"), False
        if est is not None and a.cell_budget > 0 and self.cost_s(est) > a.cell_budget:
            return (f"~{_fmt_s(est)} per call by estimate: {a.warmup + 1 + a.repeats} calls "
                    f"~{_fmt_s(self.cost_s(est))} > --cell-budget {a.cell_budget:g} s"), True
        if a.time_budget > 0:
            left = a.time_budget - self.elapsed()
            if left <= 0:
                return f"--time-budget {a.time_budget:g} s used up", False
            if est is not None and self.cost_s(est) > left:
                return (f"~{_fmt_s(self.cost_s(est))} by estimate > {_fmt_s(left)} left of "
                        f"--time-budget {a.time_budget:g} s"), False
        return None, False

    def check_after_warmup(self, t_warm: float) -> Optional[str]:
        """Why a case whose warm-up call took t_warm must stop there (its estimate was wrong)."""
        a = self.args
        rest = t_warm * (1 + a.repeats)  # the memory call and the timed calls
        if a.cell_budget > 0 and self.cost_s(t_warm) > a.cell_budget:
            return (f"a warm-up call took {_fmt_s(t_warm)}: {a.warmup + 1 + a.repeats} calls "
                    f"~{_fmt_s(self.cost_s(t_warm))} > --cell-budget {a.cell_budget:g} s")
        if a.time_budget > 0 and rest > a.time_budget - self.elapsed():
            return (f"a warm-up call took {_fmt_s(t_warm)}: the rest ~{_fmt_s(rest)} > what is left "
                    f"of --time-budget {a.time_budget:g} s")
        return None

    def out_of_time(self, rows: Sequence[Row]) -> bool:
        """When the run's time budget is used up, mark these rows skipped (before building them)."""
        a = self.args
        if a.time_budget <= 0 or self.elapsed() < a.time_budget:
            return False
        for row in rows:
            for mode in row.modes:
                row.cells[mode].status = "skipped"
                row.cells[mode].reason = f"--time-budget {a.time_budget:g} s used up"
                self._progress(Case(row, mode, lambda: None))
        return True

    def _progress(self, case: Case) -> None:
        self.done += 1
        row, cell = case.row, case.cell
        what = f"{row.section} {row.group} r={row.resolution} N={row.tokens} {row.name} {case.mode}"
        if cell.ok:
            mem = "" if cell.peak_bytes is None else f", peak {_fmt_bytes(cell.peak_bytes)}"
            if cell.faults_per_call is not None:
                mem += f", {cell.faults_per_call:.0f} page faults/call"
            res = f"{cell.median_s * 1e3:.3g} ms (median of {len(cell.times_s)}{mem})"
        else:
            res = f"{cell.status}: {cell.reason}" if cell.reason else cell.status
        self.log(f"[{self.done:3d}/{self.total} {self.elapsed():5.0f}s] {what}: {res}")

    def _fail(self, case: Case, err: BaseException) -> None:
        """Record an OOM or a runtime error (an op this device or dtype lacks) of one case."""
        if is_oom(err):
            case.cell.status, case.cell.reason = "oom", "out of memory: " + _first_line(err)
        else:
            case.cell.status, case.cell.reason = "error", f"{type(err).__name__}: {_first_line(err)}"
        case.cell.times_s, case.cell.faults = [], []

    def _free(self) -> None:
        """After a failed call, once its exception (and the tensors its frames hold) is gone."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_group(self, cases: List[Case]) -> None:
        """Warm up and measure memory per case, then time all of them in rounds, one call each,
        in a fresh (seeded) order every round."""
        a, dev = self.args, self.device
        free = free_memory(dev)
        active: List[Case] = []
        for case in cases:
            cell = case.cell
            cell.estimate_s, cell.estimate_bytes = case.est_s, case.est_bytes
            reason, too_slow = self.precheck(case, free)
            if reason:
                cell.status, cell.reason = "skipped", reason
                if too_slow:
                    # later resolutions extrapolate from this estimate: they skip too
                    self.history[(case.row.group, case.row.name, case.mode)] = (case.row.macs, case.est_s)
                self._progress(case)
                continue
            try:
                t_warm = min(time_call(case.fn, dev) for _ in range(a.warmup))
                reason = self.check_after_warmup(t_warm)
                if reason and t_warm <= 0.25 * a.cell_budget:
                    # one more look before giving up: a burst of load elsewhere is common
                    t_warm = min(t_warm, time_call(case.fn, dev))
                    reason = self.check_after_warmup(t_warm)
                if reason:
                    cell.status, cell.reason, cell.estimate_s = "skipped", reason, t_warm
                    if case.row.macs:
                        self.history[(case.row.group, case.row.name, case.mode)] = (case.row.macs, t_warm)
                    self._progress(case)
                    continue
                cell.peak_bytes, names = peak_memory(case.fn, dev, op_names=case.want_ops)
                if case.want_ops:
                    case.row.backend = sdpa_backend(names) or case.row.backend
            except (RuntimeError, NotImplementedError) as err:  # OOM or an op this device/dtype lacks
                self._fail(case, err)
            if case.cell.status in ("oom", "error"):
                self._free()
                self._progress(case)
                continue
            active.append(case)
        order = random.Random(a.seed)  # a fresh order each round: no method always follows another
        while active:
            for case in order.sample(active, len(active)):
                try:
                    faults = minor_faults() if dev.type == "cpu" else None
                    case.cell.times_s.append(time_call(case.fn, dev))
                    if faults is not None:
                        case.cell.faults.append(minor_faults() - faults)
                except (RuntimeError, NotImplementedError) as err:
                    self._fail(case, err)
                if case.cell.status in ("oom", "error"):
                    self._free()
                    active.remove(case)
                    self._progress(case)
                    continue
                times = case.cell.times_s
                if len(times) >= a.max_repeats or (len(times) >= a.repeats and sum(times) >= a.min_time):
                    case.cell.status = "ok"
                    row = case.row
                    if row.macs:
                        self.history[(row.group, row.name, case.mode)] = (row.macs, case.cell.median_s)
                    if case.cell.peak_bytes is not None:
                        self.mem_history[(row.group, row.name, case.mode)] = (row.tokens, case.cell.peak_bytes)
                    active.remove(case)
                    self._progress(case)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _fmt_bytes(n: float) -> str:
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.1f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s >= 0.1 else f"{s * 1e3:.0f} ms"


# -----------------------------------------------------------------------------
# The two sections


def build_layer(method: str, shape: LayerShape, grid: Tuple[int, int]) -> nn.Module:
    """The layer a method runs in, with the shape's dim, heads and class tokens."""
    C, h, P = shape.dim, shape.heads, shape.prefix
    G = grid[0] * grid[1]
    if method in ("sdpa", "explicit"):
        return fl.SoftmaxAttention(C, h, qkv_bias=True, fused=method == "sdpa", num_prefix_tokens=P)
    if method in ("ours", "ours-torch", "official"):
        return fl.FocusedLinearAttention(C, G, h, qkv_bias=True, grid_size=grid, num_prefix_tokens=P)
    if method == "vanilla":
        return fl.VanillaLinearAttention(C, h, qkv_bias=True, num_prefix_tokens=P)
    if method == "l2vit":
        return fl.L2ViTLinearAttention(C, h, qkv_bias=True, num_prefix_tokens=P)
    raise ValueError(f"unknown method {method!r}")


def detect_sdpa_backend(shape: LayerShape, device, dtype, batch: int) -> Optional[str]:
    """The SDPA backend for this shape's heads, dtype and device, from a tiny input."""
    from torch.profiler import ProfilerActivity, profile
    layer = build_layer("sdpa", shape, (2, 2)).to(device, dtype).eval()
    x = torch.randn(batch, shape.prefix + 4, shape.dim, device=device).to(dtype)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x, 2, 2)
    return sdpa_backend([e.name for e in prof.events()])


@contextlib.contextmanager
def triton_off():
    """flatten.py without its Triton kernels (the ours-torch rows)."""
    saved = fl.get_fast_path()
    fl.set_fast_path("torch")
    try:
        yield
    finally:
        fl.set_fast_path(saved)


def layer_cases(method: str, shape: LayerShape, grid, device, dtype, batch: int, seed: int) -> Dict[str, Callable[[], object]]:
    """The forward and forward+backward calls of one layer method on the shape's input."""
    H, W = grid
    torch.manual_seed(seed)  # the same weights at every run; the same input for every method
    layer = build_layer(method, shape, grid).to(device, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape.prefix + H * W, shape.dim, generator=g).to(device, dtype)
    if method == "official":
        forward = lambda t: fl.official_forward(layer, t, H, W)  # noqa: E731
    elif method == "ours-torch":
        def forward(t):
            with triton_off():
                return layer(t, H, W)
    else:
        forward = lambda t: layer(t, H, W)  # noqa: E731
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=g).to(device, dtype)
    inputs = [p for p in layer.parameters() if p.requires_grad] + [xg]

    def fwd():
        with torch.no_grad():
            return forward(x)

    def fwdbwd():
        return torch.autograd.grad(forward(xg), inputs, grad_out, allow_unused=True)

    with torch.no_grad(), triton_off() if method == "ours-torch" else contextlib.nullcontext():
        # ours: which implementation its forward call takes (flatten.kernel_path)
        path = layer.kernel_path(x) if method in ("ours", "ours-torch") else None
    return {"fwd": fwd, "fwdbwd": fwdbwd, "layer": layer, "floor": floor_bytes(layer, x), "path": path}


def compare_to_official(shape: LayerShape, grid, device, dtype, batch: int, seed: int) -> Optional[Dict[str, float]]:
    """The largest differences between ours and the official formulation on the cell's input, on
    a layer whose every parameter is drawn from N(0, 0.1^2) (at initialisation the positional
    encoding is zero and the scale uniform, which would hide a mistake in either): of the forward
    output (no autograd: ours takes its inference path, or its Triton kernels on CUDA), absolute; and of every gradient of
    forward+backward (ours: its autograd path), relative to that gradient's largest entry."""
    ours = layer_cases("ours", shape, grid, device, dtype, batch, seed)
    official = layer_cases("official", shape, grid, device, dtype, batch, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours["layer"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    official["layer"].load_state_dict(ours["layer"].state_dict())
    try:
        out, ref = ours["fwd"](), official["fwd"]()
        grads, ref_grads = ours["fwdbwd"](), official["fwdbwd"]()
    except (RuntimeError, NotImplementedError):  # out of memory: the timed cells will say so
        return None
    pairs = [(a, b) for a, b in zip(grads, ref_grads) if a is not None and b is not None]
    return {"output_max_abs_diff": (out - ref).abs().max().item(), "output_max_abs": ref.abs().max().item(),
            "grad_max_rel_diff": max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                     for a, b in pairs)}


def run_layers(args, runner: Runner, rows: List[Row], r: int, backends: Dict[str, Optional[str]]) -> None:
    """The layer section at resolution r: per shape, the forward group, then forward+backward."""
    device, dtype = runner.device, args.torch_dtype
    elem = torch.empty((), dtype=dtype).element_size()
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        grid = shape.grid(r)
        group_rows = [row for row in rows if row.section == "layers" and row.group == shape_name
                      and row.resolution == r]
        if runner.out_of_time(group_rows):
            continue
        if "sdpa" in args.methods and shape_name not in backends:
            backends[shape_name] = detect_sdpa_backend(shape, device, dtype, args.batch_size)
        calls = {}
        for row in group_rows:
            calls[row.name] = layer_cases(row.name, shape, grid, device, dtype, args.batch_size, args.seed)
            if row.name == "sdpa":
                row.backend = backends.get(shape_name)
            if row.name in ("ours", "ours-torch", "official"):
                row.floor_bytes = calls[row.name]["floor"]
            if calls[row.name]["path"] == "triton":  # the forward's fused kernels (CUDA)
                row.backend = "Triton forward"
        if "ours" in calls and "official" in calls:
            ours_row = next(row for row in group_rows if row.name == "ours")
            ours_row.exactness = compare_to_official(shape, grid, device, dtype, args.batch_size, args.seed)
        for mode in LAYER_MODES:
            cases = []
            for row in group_rows:
                calls[row.name]["layer"].train(mode != "fwd")
                cases.append(Case(
                    row, mode, calls[row.name][mode],
                    est_s=runner.estimate_s(row, mode, "fwd"),
                    est_bytes=layer_memory_estimate(row.name, mode, args.batch_size, row.tokens, shape.dim,
                                                    shape.heads, elem, backends.get(shape_name)),
                    want_ops=row.name == "sdpa"))
            runner.run_group(cases)
        del calls
        gc.collect()


def model_macs(model: nn.Module, batch: int, resolution: int) -> Optional[int]:
    """Forward multiply-adds of a model from torch.utils.flop_counter, on fake tensors.

    Softmax runs on its explicit path while counting (the counter misses the CPU SDPA kernel);
    None if fake tensors are unavailable in this torch or cannot run the model.
    """
    from torch.utils.flop_counter import FlopCounterMode
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:
        return None
    fused = [m for m in model.modules() if isinstance(m, fl.SoftmaxAttention) and m.fused]
    dev = next(model.parameters()).device
    try:
        for m in fused:
            m.fused = False
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(batch, model.cfg.in_chans, resolution, resolution, device=dev,
                            dtype=next(model.parameters()).dtype)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
        return counter.get_total_flops() // 2
    except (RuntimeError, NotImplementedError):  # an op fake tensors cannot run: no count
        return None
    finally:
        for m in fused:
            m.fused = True


def model_tokens(model: nn.Module, resolution: int) -> int:
    """Tokens of the first attention layer: stage 1 of a PVT, all tokens of a DeiT."""
    if isinstance(model, fl.VisionTransformer):
        g = model.patch_embed.out_size(resolution, resolution)
        return g[0] * g[1] + model.num_prefix_tokens
    g = model.patch_embed1.out_size(resolution, resolution)
    return g[0] * g[1]


def run_models(args, runner: Runner, rows: List[Row], r: int, models: Dict[str, nn.Module]) -> None:
    """The model section at resolution r; models are built once and resized (set_input_size)."""
    device, dtype = runner.device, args.torch_dtype
    group_rows = [row for row in rows if row.section == "models" and row.resolution == r]
    if runner.out_of_time(group_rows):
        return
    calls = {}
    for row in group_rows:
        if row.name not in models:
            torch.manual_seed(args.seed)
            models[row.name] = fl.create_model(row.name, img_size=r).to(device, dtype)
        model = models[row.name]
        if model.cfg.img_size != r:
            model.set_input_size(r)
            model.to(device, dtype)
        row.params = sum(p.numel() for p in model.parameters())
        row.tokens = model_tokens(model, r)
        row.macs = model_macs(model, args.batch_size, r)
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, r, r, generator=g).to(device, dtype)
        target = torch.randint(0, model.num_classes, (args.batch_size,), generator=g).to(device)
        calls[row.name] = _model_calls(model, x, target)
    for mode in MODEL_MODES:
        cases = []
        for row in group_rows:
            models[row.name].train(mode != "fwd")
            est_bytes = None
            prev = runner.mem_history.get((row.group, row.name, mode))
            if prev:
                est_bytes = int(prev[1] * row.tokens / prev[0])
            cases.append(Case(row, mode, calls[row.name][mode],
                              est_s=runner.estimate_s(row, mode, "fwd"), est_bytes=est_bytes))
        runner.run_group(cases)
    del calls
    gc.collect()


def _model_calls(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return model(x)

    def train():
        loss = F.cross_entropy(model(x).float(), target)
        return torch.autograd.grad(loss, params, allow_unused=True)

    return {"fwd": fwd, "train": train}


def plan_rows(args) -> List[Row]:
    """Every row of both sections, before anything runs (so an interrupted run shows them all)."""
    rows = []
    B = args.batch_size
    if "layers" in args.sections:
        for r in args.resolutions:
            for shape_name in args.shapes:
                shape = SHAPES[shape_name]
                grid = shape.grid(r)
                G = grid[0] * grid[1]
                N = shape.prefix + G
                for method in args.methods:
                    rows.append(Row("layers", method, METHODS[method], shape_name, r, grid, N,
                                    layer_macs(method, B, N, shape.dim, shape.heads, G), LAYER_MODES))
    if "models" in args.sections:
        for r in args.resolutions:
            for name in args.models:
                p = 16 if "deit" in name else 4
                g = r // p
                tokens = g * g + (1 if "deit" in name else 0)
                rows.append(Row("models", name, name, name, r, (g, g), tokens, None, MODEL_MODES))
    return rows


# -----------------------------------------------------------------------------
# Output


def header_facts(args, device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": device.type, "device_name": name, "torch": torch.__version__,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                   else "torch.profiler allocation events (profile_memory=True)"),
        "macs": "multiply-adds of matmuls and convolutions (1 MAC = 2 FLOP)",
        "warmup": args.warmup, "repeats": args.repeats, "min_time_s": args.min_time,
        "max_repeats": args.max_repeats, "cell_budget_s": args.cell_budget,
        "time_budget_s": args.time_budget, "seed": args.seed,
        "cpus": _default_threads(), "load_average_1min": _load_average(),
    }


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _busy(facts: dict) -> bool:
    loads = [facts.get("load_average_1min"), facts.get("load_average_1min_end")]
    return any(x is not None and x >= facts["cpus"] for x in loads)


def header_line(facts: dict) -> str:
    return (f"device: {facts['device_name']} ({facts['device']}) | torch {facts['torch']} | "
            f"dtype {facts['dtype']} | threads {facts['threads']} | batch size {facts['batch_size']}")


def _cell_text(cell: Measurement) -> str:
    if cell.ok:
        q1, q3 = cell.quartiles_s()
        return f"{_num(cell.median_s * 1e3)} ({_num((q3 - q1) * 1e3)})"
    return {"skipped": "skipped", "oom": "OOM", "error": "error", "interrupted": "not run",
            "pending": "not run"}[cell.status]


def _mem_text(cell: Measurement) -> str:
    if cell.ok:
        return "n/a" if cell.peak_bytes is None else _num(cell.peak_bytes / 2 ** 20)
    return "-"


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _times(x: Optional[float]) -> str:
    return "-" if x is None else _num(x) + "x"


def _pair(a: Optional[float], b: Optional[float]) -> str:
    return f"{_num(a)} / {_num(b)}" if a is not None or b is not None else "-"


def _notes(rows: Sequence[Row]) -> List[str]:
    """Why each cell that was not measured was not: one line per cell, or per reason when the
    same reason (a used-up time budget, an interruption) holds for several."""
    cells = [(row, mode, cell) for row in rows for mode, cell in row.cells.items()
             if not cell.ok and cell.status != "pending"]
    counts: Dict[Tuple[str, str], int] = {}
    for _, _, cell in cells:
        counts[cell.status, cell.reason] = counts.get((cell.status, cell.reason), 0) + 1
    notes, done = [], set()
    for row, mode, cell in cells:
        key = (cell.status, cell.reason)
        if counts[key] > 2:
            if key not in done:
                done.add(key)
                notes.append(f"  {counts[key]} cells: {cell.status}" + (f" ({cell.reason})" if cell.reason else ""))
            continue
        what = f"r={row.resolution} {row.label} {MODE_TITLES[mode]}"
        notes.append(f"  {what}: {cell.status}" + (f" ({cell.reason})" if cell.reason else ""))
    return notes


def render(rows: Sequence[Row], facts: dict, tablefmt: str = "github") -> str:
    from tabulate import tabulate
    out = [header_line(facts),
           f"timing: median (IQR) of per-call times, {facts['timer']}; peak memory: {facts['memory']}"]
    if facts["device"] == "cpu" and _busy(facts):
        out.append(f"warning: load average {facts['load_average_1min']:g} at the start, "
                   f"{facts.get('load_average_1min_end', '?')} at the end, on {facts['cpus']} CPUs: other "
                   "processes competed for them, so the times are noisy and multi-threaded ones slow")
    out.append("")
    for shape_name in dict.fromkeys(r.group for r in rows if r.section == "layers"):
        shape = SHAPES[shape_name]
        sel = [r for r in rows if r.section == "layers" and r.group == shape_name]
        table = []
        for row in sel:
            ratios = layer_ratios(rows, row)
            label = row.label + (f" [{row.backend}]" if row.backend else "")
            table.append([row.resolution, row.tokens, label, _cell_text(row.cells["fwd"]),
                          _cell_text(row.cells["fwdbwd"]), _mem_text(row.cells["fwd"]),
                          _mem_text(row.cells["fwdbwd"]), _num(row.macs / 1e9),
                          _pair(ratios["vs_sdpa_fwd"], ratios["vs_sdpa_fwdbwd"]),
                          _pair(ratios["vs_official_fwd"], ratios["vs_official_fwdbwd"])])
        out.append(f"Attention layer: {shape.title}, batch {facts['batch_size']}")
        out.append(tabulate(table, headers=["r", "N", "method", "fwd ms (IQR)", "fwd+bwd ms (IQR)",
                                            "fwd MiB", "fwd+bwd MiB", "GMAC", "vs SDPA", "vs official"],
                            tablefmt=tablefmt, disable_numparse=True))
        notes = _notes(sel)
        if notes:
            out.append("Not measured:")
            out.extend(notes)
        exact = [r for r in sel if r.exactness]
        if exact:
            out.append(f"Ours - official, largest |difference| ({facts['dtype']}, parameters ~ N(0, 0.1^2)):")
            for r in exact:
                e = r.exactness
                out.append(f"  r={r.resolution}: output {e['output_max_abs_diff']:.2g} (|output| <= "
                           f"{e['output_max_abs']:.3g}); gradients {e['grad_max_rel_diff']:.2g} of "
                           "their largest entry")
        floored = [r for r in sel if r.floor_bytes]
        bandwidth, mac_rate = facts.get("copy_bandwidth_GBps"), facts.get("matmul_GMACps")
        if floored and bandwidth and mac_rate:
            out.append(f"Floors: memory (x, parameters, output and for fwd+bwd their gradients, each moved once at "
                       f"this run's copy bandwidth, {bandwidth:.3g} GB/s) and compute (the GMAC at this run's "
                       f"512x512 matmul rate, {mac_rate:.3g} GMAC/s; fwd+bwd: 3x the forward's), fwd / fwd+bwd:")
            for res in dict.fromkeys(r.resolution for r in floored):
                at = [r for r in floored if r.resolution == res]
                fr = [floor_ratios(r, bandwidth * 1e9, mac_rate * 1e9) for r in at]
                for kind, size in (("memory", f"{at[0].floor_bytes['fwd'] / 1e6:.3g} / "
                                              f"{at[0].floor_bytes['fwdbwd'] / 1e6:.3g} MB"),
                                   ("compute", f"{at[0].macs / 1e9:.3g} / {3 * at[0].macs / 1e9:.3g} GMAC")):
                    ms = " / ".join(_num(fr[0][f"{kind}_floor_ms_{m}"]) for m in LAYER_MODES)
                    gaps = ", ".join(f"{r.name} " + " / ".join(_times(f[f"x_{kind}_floor_{m}"]) for m in LAYER_MODES)
                                     for r, f in zip(at, fr))
                    lead = f"  r={res}:" if kind == "memory" else " " * len(f"  r={res}:")
                    out.append(f"{lead} {kind} {ms} ms ({size}); {gaps}")
        faulted = [r for r in sel if any(r.cells[m].faults for m in LAYER_MODES)]
        if faulted:
            out.append("Page faults per call (minor, mean of the timed calls; memory the allocator gave back "
                       "and the call touched again), fwd / fwd+bwd:")
            for res in dict.fromkeys(r.resolution for r in faulted):
                at = [r for r in faulted if r.resolution == res]
                out.append(f"  r={res}: " + ", ".join(
                    f"{r.name} " + " / ".join("-" if r.cells[m].faults_per_call is None
                                              else f"{r.cells[m].faults_per_call:.0f}" for m in LAYER_MODES)
                    for r in at))
        out.append("")
    sel = [r for r in rows if r.section == "models"]
    if sel:
        table = []
        for row in sel:
            ratios = model_ratios(rows, row)
            fwd = row.time_s("fwd")
            table.append([row.resolution, row.name, row.tokens,
                          "-" if row.params is None else f"{row.params / 1e6:.2f}",
                          "-" if row.macs is None else f"{row.macs / 1e9:.3f}",
                          _cell_text(row.cells["fwd"]),
                          _num(facts["batch_size"] / fwd) if fwd else "-",
                          _cell_text(row.cells["train"]), _mem_text(row.cells["fwd"]),
                          _mem_text(row.cells["train"]),
                          _pair(ratios["vs_softmax_fwd"], ratios["vs_softmax_train"])
                          if row.name.startswith("flatten_") else ""])
        out.append(f"Whole models, batch {facts['batch_size']} (N: tokens of the first attention layer)")
        out.append(tabulate(table, headers=["r", "model", "N", "params M", "GMAC", "fwd ms (IQR)",
                                            "images/s", "train ms (IQR)", "fwd MiB", "train MiB",
                                            "vs softmax"],
                            tablefmt=tablefmt, disable_numparse=True))
        notes = _notes(sel)
        if notes:
            out.append("Not measured:")
            out.extend(notes)
        out.append("")
    out.append("ms: median (interquartile range) per call; MiB: peak above the baseline; GMAC: forward "
               "multiply-adds (= the papers' GFLOPs); vs X: speed-up, time of X / time of the row, "
               "forward / forward+backward (or training step).")
    return "\n".join(out)


def to_json(rows: Sequence[Row], facts: dict, interrupted: bool, elapsed: float) -> dict:
    out = {"header": facts, "interrupted": interrupted, "elapsed_s": elapsed, "layers": [], "models": []}
    for row in rows:
        d = {"resolution": row.resolution, "grid": list(row.grid), "tokens": row.tokens,
             "gmacs": None if row.macs is None else row.macs / 1e9}
        if row.section == "layers":
            d = {"shape": row.group, "method": row.name, "label": row.label, **d,
                 "backend": row.backend, **layer_ratios(rows, row)}
            if row.exactness:
                d["vs_official_exactness"] = row.exactness
            if row.floor_bytes:
                bandwidth, mac_rate = facts.get("copy_bandwidth_GBps"), facts.get("matmul_GMACps")
                d["floor_bytes"] = row.floor_bytes
                d.update(floor_ratios(row, bandwidth and bandwidth * 1e9, mac_rate and mac_rate * 1e9))
        else:
            fwd = row.time_s("fwd")
            d = {"model": row.name, **d, "params": row.params,
                 "images_per_s": facts["batch_size"] / fwd if fwd else None,
                 **model_ratios(rows, row)}
        for mode, cell in row.cells.items():
            d[mode] = cell.to_dict()
        out[row.section].append(d)
    return out


CSV_FIELDS = ["section", "shape", "model", "method", "label", "backend", "resolution", "grid", "tokens",
              "params", "gmacs", "mode", "status", "reason", "median_ms", "q1_ms", "q3_ms", "iqr_ms",
              "min_ms", "max_ms", "repeats", "peak_mib", "page_faults_per_call", "estimate_s", "estimate_mib",
              "images_per_s",
              "vs_sdpa", "vs_official", "vs_softmax",
              "device", "device_name", "torch", "dtype", "threads", "batch_size"]


def write_csv(path: str, rows: Sequence[Row], facts: dict) -> None:
    """One line per cell (row x mode), with the header facts repeated on every line."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            layer = row.section == "layers"
            ratios = layer_ratios(rows, row) if layer else model_ratios(rows, row)
            for mode, cell in row.cells.items():
                d = cell.to_dict()
                d.pop("times_ms", None)
                fwd = row.time_s("fwd")
                w.writerow({
                    "section": row.section, "shape": row.group if layer else "",
                    "model": "" if layer else row.name, "method": row.name if layer else "",
                    "label": row.label, "backend": row.backend or "", "resolution": row.resolution,
                    "grid": f"{row.grid[0]}x{row.grid[1]}", "tokens": row.tokens,
                    "params": row.params if row.params is not None else "",
                    "gmacs": row.macs / 1e9 if row.macs is not None else "", "mode": mode,
                    **{k: ("" if v is None else v) for k, v in d.items()},
                    "images_per_s": facts["batch_size"] / fwd if (not layer and mode == "fwd" and fwd) else "",
                    "vs_sdpa": _blank(ratios.get(f"vs_sdpa_{mode}")),
                    "vs_official": _blank(ratios.get(f"vs_official_{mode}")),
                    "vs_softmax": _blank(ratios.get(f"vs_softmax_{mode}")),
                    **{k: facts[k] for k in ("device", "device_name", "torch", "dtype", "threads", "batch_size")},
                })


def _blank(x):
    return "" if x is None else x


def write_plot(path: str, rows: Sequence[Row], facts: dict) -> None:
    """Forward (solid) and forward+backward (dashed) time and peak memory against tokens, log-log:
    one panel pair per layer shape, one colour per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    shapes = list(dict.fromkeys(r.group for r in rows if r.section == "layers"))
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4.2 * len(shapes)), squeeze=False)
    for i, shape_name in enumerate(shapes):
        ax_t, ax_m = axes[i]
        for k, method in enumerate(dict.fromkeys(r.name for r in rows if r.group == shape_name)):
            sel = sorted((r for r in rows if r.section == "layers" and r.group == shape_name
                          and r.name == method), key=lambda r: r.tokens)
            color = f"C{k}"
            for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
                pts = [(r.tokens, r.cells[mode]) for r in sel if r.cells[mode].ok]
                label = METHODS[method] if mode == "fwd" else None
                if pts:
                    ax_t.plot([n for n, _ in pts], [c.median_s * 1e3 for _, c in pts], style, marker="o",
                              color=color, label=label)
                mem = [(n, c.peak_bytes / 2 ** 20) for n, c in pts if c.peak_bytes]
                if mem:
                    ax_m.plot([n for n, _ in mem], [m for _, m in mem], style, marker="o", color=color, label=label)
        for ax, ylabel in ((ax_t, "ms per call (median)"), (ax_m, "peak MiB above baseline")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(SHAPES[shape_name].title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
    fig.suptitle(header_line(facts) + "\nsolid: forward, dashed: forward+backward", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, with a one-line error (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _resolution(text: str) -> int:
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be a whole number of pixels, got {text!r}")
    if r <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {r}")
    if r < MIN_RESOLUTION:
        raise argparse.ArgumentTypeError(
            f"resolution {r} is too small: the PVT models need at least {MIN_RESOLUTION} pixels")
    return r


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {n}")
    return n


def _non_negative(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return x


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench.py", description=(
        "Time and peak memory of focused linear attention against softmax attention "
        "(attention layers and whole models) across resolutions."))
    p.add_argument("--resolutions", type=_resolution, nargs="+", default=[224, 512, 1024], metavar="R",
                   help="image sizes r (r x r pixels); the token grid is r // patch (default 224 512 1024)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and inputs (default float32)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="(default 1)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: every CPU this process may use)")
    p.add_argument("--sections", nargs="+", choices=["layers", "models"], default=["layers", "models"],
                   help="attention layers, whole models (default both)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                   help="layer shapes: deit (DeiT-T layer), pvt (FLatten-PVT stage 1)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="attention methods of the layer section (default: all; ours-torch, ours "
                        "without flatten.py's Triton kernels, only on CUDA with Triton installed)")
    p.add_argument("--models", nargs="+", choices=fl.list_models(), default=list(DEFAULT_MODELS),
                   metavar="MODEL", help=f"models of the model section (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--warmup", type=_positive_int, default=1, help="untimed calls before a cell (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="at least this many timed calls (default 3)")
    p.add_argument("--min-time", type=_non_negative, default=0.2,
                   help="more timed calls until this many seconds are timed (default 0.2)")
    p.add_argument("--max-repeats", type=_positive_int, default=50, help="at most this many timed calls (default 50)")
    p.add_argument("--cell-budget", type=_non_negative, default=8.0,
                   help="skip a cell estimated to take longer, warm-up included; 0: no limit (default 8)")
    p.add_argument("--time-budget", type=_non_negative, default=120.0,
                   help="skip the cells that would not finish within this many seconds of the run; "
                        "0: no limit (default 120)")
    p.add_argument("--seed", type=int, default=0, help="of the weights, the inputs and the timing order (default 0)")
    p.add_argument("--json", metavar="PATH", help="save every number and the header facts as JSON")
    p.add_argument("--csv", metavar="PATH", help="save one line per cell as CSV")
    p.add_argument("--plot", metavar="PATH", help="save a log-log plot of time and memory against tokens "
                                                   "(needs matplotlib)")
    p.add_argument("--table-format", default="github", help="tabulate format (default github)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available to this torch "
                f"({torch.__version__}, torch.cuda.is_available() is False)")
    if args.max_repeats < args.repeats:
        p.error(f"--max-repeats {args.max_repeats} is below --repeats {args.repeats}")
    for opt in ("json", "csv", "plot"):
        path = getattr(args, opt)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{opt} {path}: the folder does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    args.torch_dtype = getattr(torch, args.dtype)
    args.threads = args.threads or _default_threads()
    args.resolutions = list(dict.fromkeys(args.resolutions))
    if args.methods is None:  # ours-torch differs from ours only where the Triton kernels run
        triton_runs = args.device == "cuda" and fl.triton is not None
        args.methods = [m for m in METHODS if m != "ours-torch" or triton_runs]
    for opt in ("shapes", "methods", "models", "sections"):
        setattr(args, opt, list(dict.fromkeys(getattr(args, opt))))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    # kineto (the CPU memory profiler) logs every start and stop on stderr unless told not to
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    for r in args.resolutions:
        for patch in (16, 4):  # DeiT, then PVT stage 1
            if r % patch:
                log(f"note: {r} is not a multiple of {patch}: a patch-{patch} embedding drops the last "
                    f"{r % patch} pixels (grid {r // patch}x{r // patch})")
    facts = header_facts(args, device)
    rows = plan_rows(args)
    if any(r.section == "layers" and r.name in ("ours", "official") for r in rows):
        bandwidth = copy_bandwidth(device, args.torch_dtype)
        facts["copy_bandwidth_GBps"] = None if bandwidth is None else bandwidth / 1e9
    total = sum(len(r.modes) for r in rows)
    runner = Runner(args, device, total, log)
    facts["matmul_GMACps"] = runner.rate / 1e9
    log(header_line(facts))
    load = facts["load_average_1min"]
    if device.type == "cpu" and load is not None and load >= facts["cpus"]:
        log(f"warning: load average {load:g} on {facts['cpus']} CPUs: other processes compete for them, so "
            "times are noisy (see the IQR) and multi-threaded calls can stall, each op waiting for a thread "
            "that is not running; --threads 1 suffers less")
    interrupted = False
    try:
        backends: Dict[str, Optional[str]] = {}
        models: Dict[str, nn.Module] = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for r in args.resolutions:  # resolution first: a time budget cuts the largest r
                if "layers" in args.sections:
                    run_layers(args, runner, rows, r, backends)
                if "models" in args.sections:
                    run_models(args, runner, rows, r, models)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: printing and saving what was measured")
    finally:
        torch.set_num_threads(threads_before)
    for row in rows:
        for cell in row.cells.values():
            if cell.status == "pending":
                cell.status, cell.reason = "interrupted", "not run: the run was interrupted"
    elapsed = runner.elapsed()
    facts["load_average_1min_end"] = _load_average()
    print(render(rows, facts, args.table_format))
    print(f"\n{total} cells in {elapsed:.0f} s" + (" (interrupted)" if interrupted else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, facts, interrupted, elapsed), f, indent=1)
        log(f"saved {args.json}")
    if args.csv:
        write_csv(args.csv, rows, facts)
        log(f"saved {args.csv}")
    if args.plot:
        write_plot(args.plot, rows, facts)
        log(f"saved {args.plot}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
