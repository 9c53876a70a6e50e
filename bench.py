"""bench.py: time, peak memory and MACs of focused linear attention against softmax attention.

Usage:
    python bench.py                                 # CPU, float32, r = 224 512 1024, both sections
    python bench.py --resolutions 224 512 1024 --device cuda --dtype bfloat16 --json out.json
    python bench.py --sections layers --shapes pvt --methods sdpa ours official --details
    python bench.py --sections layers --methods ours baseline --baseline /tmp/flatten_old.py
    python bench.py --time-budget 0 --cell-budget 0  # measure every cell, however long

docs/benchmark.md says what is measured and how. The code has three layers: 1. what to run,
2. how to measure one cell, 3. how to render; the command line at the end ties them together.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import gc
import hashlib
import importlib.machinery
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

try:
    import resource  # page faults (Unix)
except ImportError:
    resource = None
import torch
import torch.nn.functional as F
from tabulate import tabulate, tabulate_formats
from torch import nn

import flatten as fl

# =============================================================================
# 1. What to run


@dataclass(frozen=True)
class LayerShape:
    """One attention layer of a real model: tokens on a (r / patch)^2 grid, plus class tokens."""
    name: str
    title: str
    patch: int
    dim: int
    heads: int
    prefix: int  # class tokens

    def grid(self, resolution: int) -> tuple[int, int]:
        g = resolution // self.patch  # a conv patch embedding drops the remainder pixels
        return g, g


SHAPES = {"deit": LayerShape("deit", "DeiT-T layer (patch 16, C 192, 3 heads, + class token)",
                             16, 192, 3, 1),
          "pvt": LayerShape("pvt", "FLatten-PVT stage-1 layer (patch 4, C 64, 1 head)",
                            4, 64, 1, 0)}
METHOD_HELP = {  # --help: what each layer method runs
    "sdpa": "softmax attention through F.scaled_dot_product_attention (the row names the "
            "backend that ran)",
    "explicit": "softmax attention with the explicit N x N matrix",
    "ours": "focused linear attention, flatten.FocusedLinearAttention with its fast paths",
    "ours-torch": 'ours with set_fast_path("torch"): no Triton kernels (differs from ours only '
                  "on CUDA with Triton)",
    "reference": 'ours with set_fast_path("off"): the plain reference forward',
    "baseline": "the FocusedLinearAttention of another copy of flatten.py (--baseline FILE), "
                "with ours' weights",
    "official": "the official code's formulation (flatten.official_forward), with ours' weights",
    "vanilla": "vanilla linear attention: ReLU kernel, no focusing, no DWC",
    "l2vit": "L^2ViT's linear attention with its local concentration module (LCM)",
    "l2vit-official": "L^2ViT's official formulation of l2vit, op by op "
                      "(bench.l2vit_official_forward), with l2vit's weights"}
METHODS = {"sdpa": "softmax, SDPA", "explicit": "softmax, explicit NxN",
           "ours": "focused linear (ours)", "ours-torch": "focused linear (ours), no Triton",
           "reference": "focused linear (ours), reference forward",
           "baseline": "focused linear, baseline", "official": "focused linear, official",
           "vanilla": "vanilla linear", "l2vit": "L2ViT linear + LCM",
           "l2vit-official": "L2ViT linear + LCM, official"}
FLATTEN_METHODS = ("ours", "ours-torch", "reference", "baseline", "official")
FAST_PATH = {"ours-torch": "torch", "reference": "off"}  # flatten.set_fast_path during calls
L2VIT_METHODS = ("l2vit", "l2vit-official")
# the official formulation each layer method is compared with ("vs official"): its own for
# L2ViT's attention, FLatten's for the others
OFFICIAL_OF = dict.fromkeys(L2VIT_METHODS, "l2vit-official")
# "vs softmax" in the models table: flatten_X against X, and these pairs. L2ViT-T has Swin-T's
# widths, depths, heads and window 7 (28.6M against 28.3M parameters, 4.69 against 4.49 GMACs):
# its local blocks are Swin's windows without the shift, its global blocks linear attention
# with the LCM where Swin shifts its windows.
SOFTMAX_PAIRS = {"l2vit_tiny": "swin_tiny"}
DEFAULT_MODELS = ("flatten_pvt_tiny", "pvt_tiny", "flatten_deit_tiny", "deit_tiny")
MIN_RESOLUTION = 32  # the PVT models need one token in their last stage (stride 32)
KERNEL_SIZE, LCM_KERNEL = 5, 7  # FocusedLinearAttention's DWC and L2ViT's LCM defaults
LAYER_MODES, MODEL_MODES = ("fwd", "fwdbwd"), ("fwd", "train")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward", "train": "training step"}


@dataclass(frozen=True)
class Case:
    """One table row: a layer method on a shape, or a model, at one resolution."""
    section: str  # "layers" | "models"
    group: str    # layer shape, or the model's name
    name: str     # method, or the model's name
    resolution: int

    @property
    def modes(self) -> tuple[str, str]:
        return LAYER_MODES if self.section == "layers" else MODEL_MODES


@dataclass
class Row:
    """What a case's table row shows: its facts and the measurement of each mode (its cells)."""
    case: Case
    label: str
    grid: tuple[int, int] | None = None
    tokens: int | None = None            # models: of the first attention stage, once built
    macs: int | None = None
    params: int | None = None
    backend: str | None = None           # SDPA's backend, or the path ours' forward takes
    paths: dict[str, str] | None = None  # the path of a FocusedLinearAttention call, per mode
    exactness: dict[str, float] | None = None  # ours against the official formulation
    floor_bytes: dict[str, int] | None = None  # the bytes a call must move at least, per mode
    cells: dict[str, Measurement] = field(init=False)

    def __post_init__(self):
        self.cells = {mode: Measurement() for mode in self.case.modes}


def plan(args) -> dict[Case, Row]:
    """A row per case in table order, before anything runs (an interrupted run shows them all)."""
    rows = []
    for r in args.resolutions:
        if "layers" in args.sections:
            rows += [_layer_row(Case("layers", s, m, r), args)
                     for s, m in itertools.product(args.shapes, args.methods)]
        if "models" in args.sections:
            rows += [Row(Case("models", n, n, r), n) for n in args.models]
    return {row.case: row for row in rows}


def _layer_row(case: Case, args) -> Row:
    shape, method = SHAPES[case.group], case.name
    grid = shape.grid(case.resolution)
    G = grid[0] * grid[1]
    label = METHODS[method] + (f" ({os.path.basename(args.baseline)})"
                               if method == "baseline" else "")
    macs = layer_macs(method, args.batch_size, shape.prefix + G, shape.dim, shape.heads, G)
    return Row(case, label, grid, shape.prefix + G, macs)


def load_baseline(path: str):
    """Another copy of flatten.py (an older version, say), imported as a module of its own."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise FileNotFoundError("no such file")
    name = "_bench_baseline_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    loader = importlib.machinery.SourceFileLoader(name, full)  # whatever the suffix
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        loader.exec_module(module)
        if not hasattr(module, "FocusedLinearAttention"):
            raise ImportError("it defines no FocusedLinearAttention")
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build_layer(method: str, shape: LayerShape, grid: tuple[int, int], baseline=None):
    """The layer a method runs in, with the shape's dim, heads and class tokens."""
    C, h, G = shape.dim, shape.heads, grid[0] * grid[1]
    kw = {"qkv_bias": True, "num_prefix_tokens": shape.prefix}
    if method in ("sdpa", "explicit"):
        return fl.SoftmaxAttention(C, h, fused=method == "sdpa", **kw)
    if method == "vanilla":
        return fl.VanillaLinearAttention(C, h, **kw)
    if method in L2VIT_METHODS:
        return fl.L2ViTLinearAttention(C, h, **kw)
    if method == "baseline":  # ours' weights, drawn first as for ours
        weights = build_layer("ours", shape, grid).state_dict()
        layer = baseline.FocusedLinearAttention(C, G, h, grid_size=grid, **kw)
        layer.load_state_dict(weights)
        return layer
    if method in FLATTEN_METHODS:
        return fl.FocusedLinearAttention(C, G, h, grid_size=grid, **kw)
    raise ValueError(f"unknown method {method!r}")


def l2vit_official_forward(layer: fl.L2ViTLinearAttention, x: torch.Tensor, H: int,
                           W: int) -> torch.Tensor:
    """The l2vit layer's function in the official L^2ViT code's formulation, op by op and layout
    by layout (classification/models/l2vit.py at fad0341: LinearAttention.forward, then the LCM
    on norm3's output), on the layer's own weights: q, k and v as strided views of one qkv
    output, the denominator as q @ (the keys' sum) clamped at 100, the temperature on K^T V,
    the LCM's image a contiguous (B, C, H, W) copy of the tokens. Class tokens as in the layer.
    The baseline of the l2vit row's "vs official"."""
    attn, lcm, P = layer.attn, layer.lcm, layer.num_prefix_tokens
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = F.relu(q)
    k = F.relu(k)
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    a = (k.transpose(-2, -1) @ v) * attn.temperature
    a = (q @ a) / denom
    a = attn.proj(a.transpose(1, 2).reshape(B, N, C))
    t = layer.lcm_norm(x[:, P:] + a[:, P:])
    t = t.transpose(-1, -2).contiguous().view(B, C, H, W)
    t = lcm.conv2(lcm.bn(lcm.act(lcm.conv1(t))))
    t = t.flatten(2).transpose(-1, -2)
    return torch.cat([a[:, :P], a[:, P:] + t], dim=1) if P else a + t


def layer_calls(method: str, shape: LayerShape, grid, device, dtype, batch: int, seed: int,
                baseline=None) -> dict:
    """A method's layer, its calls on the shape's seeded input, floor bytes and paths."""
    H, W = grid
    torch.manual_seed(seed)  # the same weights at every run, and for every FLatten method
    layer = build_layer(method, shape, grid, baseline).to(device, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape.prefix + H * W, shape.dim, generator=g).to(device, dtype)
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=g).to(device, dtype)
    inputs = [p for p in layer.parameters() if p.requires_grad] + [xg]
    mode = FAST_PATH.get(method)

    def forward(t):
        if method == "official":
            return fl.official_forward(layer, t, H, W)
        if method == "l2vit-official":
            return l2vit_official_forward(layer, t, H, W)
        with fl.fast_path(mode) if mode else contextlib.nullcontext():
            return layer(t, H, W)

    def fwd():
        with torch.no_grad():
            return forward(x)

    def fwdbwd():
        return torch.autograd.grad(forward(xg), inputs, grad_out, allow_unused=True)

    paths = None
    if method != "official" and hasattr(layer, "forward_path"):
        with fl.fast_path(mode or fl.get_fast_path()):
            with torch.no_grad():
                paths = {"fwd": str(layer.forward_path(x))}
            paths["fwdbwd"] = str(layer.forward_path(xg))
    floor = floor_bytes(layer, x) if method in FLATTEN_METHODS else None
    return {"module": layer, "fwd": fwd, "fwdbwd": fwdbwd, "floor": floor, "paths": paths}


def compare_to_official(shape: LayerShape, grid, device, dtype, batch: int,
                        seed: int) -> dict[str, float] | None:
    """Ours' largest differences from official_forward, with parameters ~ N(0, 0.1^2)."""
    ours = layer_calls("ours", shape, grid, device, dtype, batch, seed)
    official = layer_calls("official", shape, grid, device, dtype, batch, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours["module"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    official["module"].load_state_dict(ours["module"].state_dict())
    try:
        out, ref = ours["fwd"](), official["fwd"]()
        grads, ref_grads = ours["fwdbwd"](), official["fwdbwd"]()
    except (RuntimeError, NotImplementedError):  # out of memory: the timed cells will say so
        return None
    pairs = [(a, b) for a, b in zip(grads, ref_grads) if a is not None and b is not None]
    return {"output_max_abs_diff": (out - ref).abs().max().item(),
            "output_max_abs": ref.abs().max().item(),
            "grad_max_rel_diff": max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                     for a, b in pairs)}


def first_attention_tokens(model: nn.Module, resolution: int) -> int | None:
    """Tokens of a model's first attention stage: its patch embedding's grid, class tokens."""
    modules = dict(model.named_modules())
    for name in ("patch_embed", "patch_embed1", "stage1_conv_embed", "downsample_layers.0"):
        embed = modules.get(name)
        if hasattr(embed, "out_size"):
            h, w = embed.out_size(resolution, resolution)
            return h * w + int(getattr(model, "num_prefix_tokens", 0) or 0)
    return None


def model_calls(model: nn.Module, batch: int, resolution: int, device, dtype, seed: int) -> dict:
    """Inference, and a training step without the optimizer step, on a seeded batch."""
    g = torch.Generator().manual_seed(seed)
    chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    x = torch.randn(batch, chans, resolution, resolution, generator=g).to(device, dtype)
    target = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return model(x)

    def train():
        loss = F.cross_entropy(model(x).float(), target)
        return torch.autograd.grad(loss, params, allow_unused=True)

    return {"module": model, "fwd": fwd, "train": train}


# =============================================================================
# 2. How to measure one cell

BACKWARD_FACTOR = 3.0  # forward + backward ~ 3 x forward: estimates and the compute floor
CPU_MEMORY_FRACTION, GPU_MEMORY_FRACTION = 0.5, 0.9
NOISE_THRESHOLD = 0.25  # a cell whose IQR exceeds this fraction of its median is noisy
SDPA_BACKENDS = {  # aten kernel behind F.scaled_dot_product_attention -> a short name
    "flash_attention_for_cpu": "flash (CPU)", "flash_attention": "flash", "cudnn_attention":
    "cuDNN", "efficient_attention": "memory-efficient", "attention_math": "math",
    "fused_attention_overrideable": "overrideable"}


@dataclass
class Measurement:
    """One cell's result: per-call times, peak memory, page faults, or why there are none."""
    status: str = "pending"  # ok | skipped | oom | error | interrupted | pending
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    faults: list[int] = field(default_factory=list)  # minor page faults of each timed call
    estimate_s: float | None = None
    estimate_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def quartiles_s(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q1, q3

    @property
    def noisy(self) -> bool:
        """The IQR above NOISE_THRESHOLD of the median: the time is no result."""
        q1, q3 = self.quartiles_s() if self.ok else (0, 0)
        return q3 - q1 > NOISE_THRESHOLD * (self.median_s or 0)

    def to_dict(self) -> dict:
        out = {"status": self.status, "reason": self.reason or None}
        if self.times_s:
            (q1, q3), ms = self.quartiles_s(), [t * 1e3 for t in self.times_s]
            out.update(median_ms=self.median_s * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
                       iqr_ms=(q3 - q1) * 1e3, min_ms=min(ms), max_ms=max(ms), repeats=len(ms),
                       noisy=self.noisy, times_ms=ms)
        mib = [None if b is None else b / 2 ** 20 for b in (self.peak_bytes, self.estimate_bytes)]
        return {**out, "peak_mib": mib[0], "estimate_s": self.estimate_s, "estimate_mib": mib[1],
                "page_faults_per_call": statistics.mean(self.faults) if self.faults else None}


def minor_faults() -> int | None:
    """Minor page faults of this process so far (every thread), or None without getrusage."""
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


def peak_memory(fn: Callable[[], object], device: torch.device,
                op_names: bool = False) -> tuple[int | None, list[str]]:
    """Peak bytes one call allocates above those allocated before it, and its op names:
    torch.cuda.max_memory_allocated, or on CPU the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    prof = (profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda)
            if op_names or not cuda else None)
    with prof or contextlib.nullcontext():
        out = fn()
    del out
    names = [e.name for e in prof.events()] if op_names else []
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, names
    try:  # the profiler's event tree; its layout is not a public API
        from torch._C._profiler import _EventType
        stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while stack:
            events.append(stack.pop())
            stack.extend(events[-1].children)
    except (ImportError, AttributeError):
        return None, names
    allocs = [e for e in events if e.tag == _EventType.Allocation
              and e.extra_fields.device.type == "cpu"]
    if not allocs:
        return None, names
    first = min(allocs, key=lambda e: e.start_time_ns).extra_fields
    base = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in allocs) - base, names


def sdpa_backend(names: Sequence[str]) -> str | None:
    """The SDPA backend among a call's aten op names (None if it did not call SDPA)."""
    prefix = "aten::_scaled_dot_product_"
    found = [n[len(prefix):] for n in names if n.startswith(prefix)]
    return ([SDPA_BACKENDS[n] for n in found if n in SDPA_BACKENDS] or found or [None])[0]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())) or any(
        s in str(err) for s in ("out of memory", "can't allocate memory", "not enough memory"))


def free_memory(device: torch.device) -> int | None:
    """Bytes a cell may allocate: 90% of the free GPU memory, half of MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(GPU_MEMORY_FRACTION * (free + cached))
    line = _proc_line("/proc/meminfo", "MemAvailable:")
    return None if line is None else int(CPU_MEMORY_FRACTION * int(line.split()[1]) * 1024)


def _proc_line(path: str, start: str) -> str | None:
    """The first line of a /proc file that starts so, or None (no such file or line)."""
    with contextlib.suppress(OSError), open(path) as f:
        return next((line for line in f if line.startswith(start)), None)
    return None


def calibrate(device: torch.device, dtype: torch.dtype) -> float:
    """Multiply-adds per second of a 512 x 512 matmul: the fallback for time estimates."""
    a = torch.randn(512, 512, device=device).to(dtype)
    for _ in range(2):
        a @ a
    return 512 ** 3 / max(min(time_call(lambda: a @ a, device) for _ in range(5)), 1e-9)


def copy_bandwidth(device: torch.device, dtype: torch.dtype,
                   nbytes: int | None = None) -> float | None:
    """Bytes per second (read + written) of a copy larger than the caches; None if no room."""
    nbytes = nbytes or (2 ** 30 if device.type == "cuda" else 2 ** 26)
    try:
        src = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype,
                         device=device)
        dst = torch.zeros_like(src)
    except RuntimeError as err:
        if is_oom(err):
            return None
        raise
    dst.copy_(src)
    t = min(time_call(lambda: dst.copy_(src), device) for _ in range(7))
    return 2 * src.numel() * src.element_size() / max(t, 1e-12)


def floor_bytes(layer: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes one call must move at least: x, the parameters, the output (and gradients)."""
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    act = x.numel() * x.element_size()
    return {"fwd": 2 * act + params, "fwdbwd": 4 * act + 2 * params}


def layer_macs(method: str, batch: int, tokens: int, dim: int, heads: int, grid_tokens: int) -> int:
    """Forward multiply-adds of a layer's matmuls and convolutions (G: the DWC's grid tokens)."""
    B, N, C, G = batch, tokens, dim, grid_tokens
    d = C // heads
    macs = 4 * B * N * C * C                # q (C -> C), kv (C -> 2C), proj (C -> C)
    if method in ("sdpa", "explicit"):
        return macs + 2 * B * N * N * C     # Q K^T and A V: N x N x d per head
    if method not in (*FLATTEN_METHODS, "vanilla", *L2VIT_METHODS):
        raise ValueError(f"unknown method {method!r}")
    macs += 2 * B * N * C * d + B * N * C   # K^T V and Q (K^T V): N d^2 per head; Q . sum_j K_j
    if method in FLATTEN_METHODS:
        macs += B * C * G * KERNEL_SIZE ** 2        # depthwise conv on v
    elif method in L2VIT_METHODS:
        macs += 2 * B * C * G * LCM_KERNEL ** 2     # the LCM's two depthwise convs
    return macs


def layer_memory_estimate(method: str, mode: str, batch: int, tokens: int, dim: int, heads: int,
                          element_size: int, backend: str | None) -> int:
    """A rough upper estimate of a layer call's peak bytes, to skip what cannot fit."""
    train = mode != "fwd"
    est = batch * tokens * dim * element_size * (40 if train else 12)
    if method == "explicit" or (method == "sdpa" and backend == "math"):
        est += batch * heads * tokens * tokens * element_size * (4 if train else 2)
    return est


def model_macs(model: nn.Module, batch: int, resolution: int) -> int | None:
    """Forward multiply-adds of a model by the flop counter on fake tensors (None if it fails)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    # softmax on its explicit path: the counter misses CPU SDPA
    fused = [m for m in model.modules() if isinstance(m, fl.SoftmaxAttention) and m.fused]
    p, chans = next(model.parameters()), getattr(getattr(model, "cfg", None), "in_chans", 3)
    try:
        for m in fused:
            m.fused = False
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(batch, chans, resolution, resolution, device=p.device, dtype=p.dtype)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
        return counter.get_total_flops() // 2
    except (RuntimeError, NotImplementedError):  # an op fake tensors cannot run: no count
        return None
    finally:
        for m in fused:
            m.fused = True


# The budget policy: pure functions of the estimates, the budgets and the time used.

@dataclass(frozen=True)
class Budget:
    warmup: int     # untimed calls before a cell's memory call and timed calls
    repeats: int    # timed calls at least
    cell_s: float   # --cell-budget (0: none)
    total_s: float  # --time-budget (0: none)

    @property
    def calls(self) -> int:
        return self.warmup + 1 + self.repeats  # warm-up, the memory call, the timed calls


def estimate_call_s(macs: int | None, prev: tuple[int, float] | None, fwd_s: float | None,
                    backward: bool, rate: float) -> float | None:
    """One call's seconds: the previous resolution's scaled by the MACs, or 3 x the forward's,
    the larger; else the MACs at the calibration rate (MAC/s)."""
    guesses = [prev[1] * macs / prev[0]] if prev and macs else []
    guesses += [BACKWARD_FACTOR * fwd_s] if backward and fwd_s is not None else []
    if guesses or macs is None:
        return max(guesses, default=None)
    return (BACKWARD_FACTOR if backward else 1.0) * macs / rate


def skip_reason(budget: Budget, elapsed: float, est_s: float | None, est_bytes: int | None,
                free_bytes: int | None, free_what: str) -> tuple[str | None, bool]:
    """Why a cell must not start (or None); True when it is the time per call."""
    if est_bytes is not None and free_bytes is not None and est_bytes > free_bytes:
        return (f"needs ~{_fmt_bytes(est_bytes)} by estimate, {_fmt_bytes(free_bytes)} may be "
                f"allocated ({free_what})"), False
    cost, left = est_s and est_s * budget.calls, budget.total_s - elapsed
    if cost and 0 < budget.cell_s < cost:
        return (f"~{_fmt_s(est_s)} per call by estimate: {budget.calls} calls ~{_fmt_s(cost)} > "
                f"--cell-budget {budget.cell_s:g} s"), True
    if budget.total_s > 0 and left <= 0:
        return f"--time-budget {budget.total_s:g} s used up", False
    if budget.total_s > 0 and cost and cost > left:
        return (f"~{_fmt_s(cost)} by estimate > {_fmt_s(left)} left of --time-budget "
                f"{budget.total_s:g} s"), False
    return None, False


def too_slow_reason(budget: Budget, elapsed: float, t_call: float) -> str | None:
    """Why a cell whose first call (warm-up, or the first timed call) took t_call stops."""
    rest = t_call * (1 + budget.repeats)  # the memory call and the timed calls
    if 0 < budget.cell_s < t_call * budget.calls:
        return (f"a first call took {_fmt_s(t_call)}: {budget.calls} calls "
                f"~{_fmt_s(t_call * budget.calls)} > --cell-budget {budget.cell_s:g} s")
    if budget.total_s > 0 and rest > budget.total_s - elapsed:
        return (f"a first call took {_fmt_s(t_call)}: the rest ~{_fmt_s(rest)} > what is left "
                f"of --time-budget {budget.total_s:g} s")
    return None


def is_busy(load: float | None, cpus: int) -> bool:
    """Other processes keep every usable CPU busy: 1-minute load average >= CPUs."""
    return load is not None and load >= cpus


@dataclass
class Job:
    """A cell about to be measured: a row in one mode, its call and its estimates."""
    row: Row
    mode: str
    fn: Callable[[], object] | None = None  # None: a cell ended before it could run
    est_s: float | None = None
    est_bytes: int | None = None
    want_ops: bool = False  # read SDPA's backend from the memory call's ops

    @property
    def result(self) -> Measurement:
        return self.row.cells[self.mode]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.row.case.group, self.row.case.name, self.mode


class Measurer:
    """Measures groups of jobs within the budgets, the timed calls in shuffled rounds."""

    def __init__(self, args, device: torch.device, total: int, log: Callable[[str], None]):
        self.budget = Budget(args.warmup, args.repeats, args.cell_budget, args.time_budget)
        self.args, self.device, self.total, self.done, self.log = args, device, total, 0, log
        self.history: dict[tuple, tuple[int, float]] = {}  # Job.key: (MACs, seconds per call)
        self.mem_history: dict[tuple, tuple[int, int]] = {}  # Job.key: (tokens, peak bytes)
        # the first calls of a process pay one-time costs (thread pools, the profiler): here
        peak_memory(lambda: torch.ones(8, device=device) * 2, device, op_names=True)
        self.rate = calibrate(device, args.torch_dtype)  # MAC/s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimates(self, row: Row, mode: str) -> tuple[float | None, int | None]:
        """A call's seconds and (from the previous resolution, by tokens) peak bytes."""
        fwd, key = row.cells["fwd"], (row.case.group, row.case.name, mode)
        fwd_s = fwd.median_s if fwd.ok else fwd.estimate_s if fwd.status == "skipped" else None
        prev = self.mem_history.get(key)
        return (estimate_call_s(row.macs, self.history.get(key), fwd_s, mode != "fwd", self.rate),
                int(prev[1] * row.tokens / prev[0]) if prev and row.tokens else None)

    def out_of_time(self, rows: Sequence[Row]) -> bool:
        """When the time budget is used up, mark these rows skipped (before building them)."""
        if self.budget.total_s <= 0 or self.elapsed() < self.budget.total_s:
            return False
        for row, mode in ((r, mode) for r in rows for mode in r.case.modes):
            self._end(Job(row, mode), "skipped", f"--time-budget {self.budget.total_s:g} s used up")
        return True

    def run_group(self, jobs: Sequence[Job]) -> None:
        """Each job's checks, warm-up and memory call; then the timed calls in rounds."""
        free = free_memory(self.device)
        active = [job for job in jobs if self._start(job, free) and not self._finished(job)]
        order = random.Random(self.args.seed)  # a fresh order each round: none always follows
        while active:
            for job in order.sample(active, len(active)):
                try:
                    self._timed(job)
                except (RuntimeError, NotImplementedError) as err:
                    self.fail(job, err)
                if job.result.status != "pending" or self._finished(job):
                    active.remove(job)

    def _start(self, job: Job, free: int | None) -> bool:
        """A job's budget checks, warm-up and memory call: True if it may go on."""
        b, dev, res = self.budget, self.device, job.result
        res.estimate_s, res.estimate_bytes = job.est_s, job.est_bytes
        what = "half the available RAM" if dev.type == "cpu" else "90% of free GPU memory"
        reason, slow = skip_reason(b, self.elapsed(), job.est_s, job.est_bytes, free, what)
        if reason:  # later resolutions extrapolate from a time estimate: they skip too
            return self._skip(job, reason, job.est_s if slow else None)
        try:  # without warm-up, the first timed call serves for the checks
            t = (min(time_call(job.fn, dev) for _ in range(b.warmup)) if b.warmup
                 else self._timed(job))
            reason = too_slow_reason(b, self.elapsed(), t)
            if reason and t <= 0.25 * b.cell_s:  # one more look: load comes in bursts
                t = min(t, time_call(job.fn, dev))
                reason = too_slow_reason(b, self.elapsed(), t)
            if reason:
                res.estimate_s = t
                return self._skip(job, reason, t)
            res.peak_bytes, names = peak_memory(job.fn, dev, op_names=job.want_ops)
            job.row.backend = (job.want_ops and sdpa_backend(names)) or job.row.backend
        except (RuntimeError, NotImplementedError) as err:  # OOM, an op a dtype lacks
            self.fail(job, err)
            return False
        return True

    def _timed(self, job: Job) -> float:
        faults = minor_faults() if self.device.type == "cpu" else None
        t = time_call(job.fn, self.device)
        job.result.times_s.append(t)
        if faults is not None:
            job.result.faults.append(minor_faults() - faults)
        return t

    def _finished(self, job: Job) -> bool:
        res, a = job.result, self.args
        n = len(res.times_s)
        if n < a.max_repeats and (n < a.repeats or sum(res.times_s) < a.min_time):
            return False
        self._remember(job, res.median_s)
        if res.peak_bytes is not None and job.row.tokens:
            self.mem_history[job.key] = (job.row.tokens, res.peak_bytes)
        self._end(job, "ok")
        return True

    def _remember(self, job: Job, seconds: float | None) -> None:
        if job.row.macs and seconds is not None:
            self.history[job.key] = (job.row.macs, seconds)

    def _skip(self, job: Job, reason: str, seconds: float | None) -> bool:
        self._remember(job, seconds)
        self._end(job, "skipped", reason)
        return False

    def fail(self, job: Job, err: BaseException) -> None:
        gc.collect()  # the failed call's tensors, held by the exception's frames
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if is_oom(err):
            self._end(job, "oom", f"out of memory: {_first_line(err)}")
        else:
            self._end(job, "error", f"{type(err).__name__}: {_first_line(err)}")

    def _end(self, job: Job, status: str, reason: str = "") -> None:
        res, c = job.result, job.row.case
        res.status, res.reason, self.done = status, reason, self.done + 1
        text = f"{status}: {reason}" if reason else status
        if res.ok:
            mem = "" if res.peak_bytes is None else f", peak {_fmt_bytes(res.peak_bytes)}"
            text = f"{res.median_s * 1e3:.3g} ms (median of {len(res.times_s)}{mem})"
        else:
            res.times_s, res.faults = [], []
        self.log(f"[{self.done:3d}/{self.total} {self.elapsed():5.0f}s] {c.section} {c.group} "
                 f"r={c.resolution} N={job.row.tokens} {c.name} {job.mode}: {text}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _fmt_bytes(n: float) -> str:
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.1f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s >= 0.1 else f"{s * 1e3:.0f} ms"


# =============================================================================
# 3. How to render


def softmax_pair(model: str) -> str | None:
    """The softmax model a model's row is compared with: X for flatten_X, SOFTMAX_PAIRS."""
    return model[len("flatten_"):] if model.startswith("flatten_") else SOFTMAX_PAIRS.get(model)


def ratios(rows: dict[Case, Row], row: Row) -> dict[str, tuple[float | None, bool]]:
    """Speed-ups of a row against SDPA and official, or flatten_X against X: (value, noisy)."""
    c = row.case
    if c.section == "layers":
        refs = {ref: rows.get(Case("layers", c.group, name, c.resolution))
                for ref, name in (("sdpa", "sdpa"),
                                  ("official", OFFICIAL_OF.get(c.name, "official")))}
    else:
        other = softmax_pair(c.name)
        refs = {"softmax": rows.get(Case("models", other, other, c.resolution))}
    out = {}
    for (ref, peer), mode in itertools.product(refs.items(), c.modes):
        a, b = peer.cells[mode] if peer else None, row.cells[mode]
        out[f"vs_{ref}_{mode}"] = ((a.median_s / b.median_s, a is not b and (a.noisy or b.noisy))
                                   if a and a.ok and b.ok and b.median_s > 0 else (None, False))
    return out


def floor_ratios(row: Row, bandwidth: float | None, mac_rate: float | None) -> dict:
    """A layer row's memory and compute floors in ms per mode, and its time over each."""
    out = {}
    for mode in LAYER_MODES:
        cell = row.cells[mode]
        floors = {"memory": row.floor_bytes[mode] / bandwidth
                  if row.floor_bytes and bandwidth else None,
                  "compute": row.macs * (1 if mode == "fwd" else BACKWARD_FACTOR) / mac_rate
                  if row.macs and mac_rate else None}
        for name, floor in floors.items():
            out[f"{name}_floor_ms_{mode}"] = None if floor is None else floor * 1e3
            out[f"x_{name}_floor_{mode}"] = cell.median_s / floor if cell.ok and floor else None
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return (f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1
            else f"{x:.3f}")


def _cell_text(m: Measurement) -> str:
    if not m.ok:
        return {"skipped": "skipped", "oom": "OOM", "error": "error"}.get(m.status, "not run")
    q1, q3 = m.quartiles_s()
    return f"{_num(m.median_s * 1e3)} ({_num((q3 - q1) * 1e3)})" + "?" * m.noisy


def _mem_text(m: Measurement) -> str:
    return ("n/a" if m.peak_bytes is None else _num(m.peak_bytes / 2 ** 20)) if m.ok else "-"


def _pair(rs: dict, ref: str, modes: Sequence[str]) -> str:
    vals = [rs.get(f"vs_{ref}_{mode}", (None, False)) for mode in modes]
    if all(v is None for v, _ in vals):
        return "-"
    return " / ".join(_num(v) + "?" * noisy for v, noisy in vals)


def _notes(rows: Sequence[Row]) -> list[str]:
    """Why cells were not measured: a line per cell, or per reason shared by more than two."""
    cells = [(row, mode, m) for row in rows for mode, m in row.cells.items()
             if not m.ok and m.status != "pending"]
    counts = collections.Counter((m.status, m.reason) for _, _, m in cells)
    notes, done = [], set()
    for row, mode, m in cells:
        why, key = m.status + (f" ({m.reason})" if m.reason else ""), (m.status, m.reason)
        if counts[key] <= 2:
            notes.append(f"  r={row.case.resolution} {row.label} {MODE_TITLES[mode]}: {why}")
        elif key not in done:
            done.add(key)
            notes.append(f"  {counts[key]} cells: {why}")
    return ["Not measured:", *notes] if notes else []


def summary_line(rows: dict[Case, Row], elapsed: float, interrupted: bool) -> str:
    """The last line: how many cells were measured, and what became of the others."""
    status = collections.Counter(m.status for row in rows.values() for m in row.cells.values())
    total = sum(status.values())
    words = {"skipped": "skipped", "oom": "out of memory", "error": "failed",
             "interrupted": "not run (interrupted)", "pending": "not run"}
    rest = [f"{status[s]} {w}" for s, w in words.items() if status[s]]
    line = f"{status['ok']} of {total} cells measured in {elapsed:.0f} s"
    return line + (f"; {', '.join(rest)}" if rest else "") + \
        ("; the run was interrupted" if interrupted and not status["interrupted"] else "")


def header_line(facts: dict) -> str:
    return (f"device: {facts['device_name']} ({facts['device']}) | torch {facts['torch']} | "
            f"dtype {facts['dtype']} | threads {facts['threads']} | "
            f"batch size {facts['batch_size']}")


def _load_line(facts: dict) -> list[str]:
    loads = [facts.get("load_average_1min"), facts.get("load_average_1min_end")]
    if facts.get("threads_note"):
        return [facts["threads_note"]]
    if facts["device"] == "cpu" and any(is_busy(x, facts["cpus"]) for x in loads):
        return [(f"warning: load average {loads[0]} at the start, {loads[1]} at the end, on "
                 f"{facts['cpus']} CPUs: other processes competed for them; times are noisy")]
    return []


def _details(sel: Sequence[Row], facts: dict) -> list[str]:
    """--details under a layer table: ours against official, the floors, the page faults."""
    out = [f"Ours - official, largest |difference| ({facts['dtype']}, parameters ~ N(0, 0.1^2)):"]
    out += [f"  r={r.case.resolution}: output {e['output_max_abs_diff']:.2g} (|output| <= "
            f"{e['output_max_abs']:.3g}); gradients {e['grad_max_rel_diff']:.2g} of their "
            "largest entry" for r in sel if (e := r.exactness)]
    out = out if len(out) > 1 else []
    bandwidth, mac_rate = facts.get("copy_bandwidth_GBps"), facts.get("matmul_GMACps")
    floored = [r for r in sel if r.floor_bytes]
    if floored and bandwidth and mac_rate:
        out.append(f"Floors, fwd / fwd+bwd, and each row's time over them: memory (x, the "
                   f"parameters, the output and for fwd+bwd their gradients, each moved once at "
                   f"{bandwidth:.3g} GB/s, this run's copy rate); compute (the MACs at "
                   f"{mac_rate:.3g} GMAC/s, this run's 512x512 matmul rate; fwd+bwd 3x fwd):")
        for res in dict.fromkeys(r.case.resolution for r in floored):
            at = [r for r in floored if r.case.resolution == res]
            fr = [floor_ratios(r, bandwidth * 1e9, mac_rate * 1e9) for r in at]
            b, macs = at[0].floor_bytes, at[0].macs
            size = {"memory": f"{b['fwd'] / 1e6:.3g} / {b['fwdbwd'] / 1e6:.3g} MB",
                    "compute": f"{macs / 1e9:.3g} / {3 * macs / 1e9:.3g} GMAC"}
            for kind, lead in zip(size, (f"  r={res}:", " " * len(f"  r={res}:"))):
                ms = " / ".join(_num(fr[0][f"{kind}_floor_ms_{m}"]) for m in LAYER_MODES)
                gaps = ", ".join(f"{r.case.name} " + " / ".join(
                    _num(f[f"x_{kind}_floor_{m}"]) + "x" for m in LAYER_MODES)
                    for r, f in zip(at, fr))
                out.append(f"{lead} {kind} {ms} ms ({size[kind]}); {gaps}")
    if faulted := [r for r in sel if any(m.faults for m in r.cells.values())]:
        out.append("Page faults per call (minor, mean of the timed calls: memory the allocator "
                   "gave back and the call touched again), fwd / fwd+bwd:")
        out += [f"  r={res}: " + ", ".join(f"{r.case.name} " + " / ".join(
            f"{statistics.mean(m.faults):.0f}" if m.faults else "-" for m in r.cells.values())
            for r in faulted if r.case.resolution == res)
            for res in dict.fromkeys(r.case.resolution for r in faulted)]
    return out


LAYER_HEADERS = ["r", "N", "method", "fwd ms (IQR)", "fwd+bwd ms (IQR)", "fwd MiB",
                 "fwd+bwd MiB", "GMAC", "vs SDPA", "vs official"]
MODEL_HEADERS = ["r", "model", "N", "params M", "GMAC", "fwd ms (IQR)", "images/s",
                 "train ms (IQR)", "fwd MiB", "train MiB", "vs softmax"]


def render(rows: dict[Case, Row], facts: dict, tablefmt: str = "github",
           details: bool = False) -> str:
    """The header line and the tables, each with its missing cells (and details)."""
    out, B = [header_line(facts), *_load_line(facts), ""], facts["batch_size"]
    layer_rows = [r for r in rows.values() if r.case.section == "layers"]
    for shape_name in dict.fromkeys(r.case.group for r in layer_rows):
        sel = [r for r in layer_rows if r.case.group == shape_name]
        table = [[row.case.resolution, row.tokens,
                  row.label + (f" [{row.backend}]" if row.backend else ""),
                  *map(_cell_text, row.cells.values()), *map(_mem_text, row.cells.values()),
                  _num(row.macs / 1e9), *(_pair(ratios(rows, row), ref, LAYER_MODES)
                                          for ref in ("sdpa", "official"))] for row in sel]
        out += [f"Attention layer: {SHAPES[shape_name].title}, batch {B}",
                tabulate(table, LAYER_HEADERS, tablefmt=tablefmt, disable_numparse=True),
                *_notes(sel), *(_details(sel, facts) if details else []), ""]
    if sel := [r for r in rows.values() if r.case.section == "models"]:
        table = []
        for row in sel:
            fwd, train = row.cells["fwd"], row.cells["train"]
            table.append([
                row.case.resolution, row.case.name, "-" if row.tokens is None else row.tokens,
                "-" if row.params is None else f"{row.params / 1e6:.2f}",
                "-" if row.macs is None else f"{row.macs / 1e9:.3f}", _cell_text(fwd),
                _num(B / fwd.median_s) if fwd.ok else "-", _cell_text(train), _mem_text(fwd),
                _mem_text(train), _pair(ratios(rows, row), "softmax", MODEL_MODES)
                if softmax_pair(row.case.name) else ""])
        out += [f"Whole models, batch {B} (N: tokens of the first attention stage)",
                tabulate(table, MODEL_HEADERS, tablefmt=tablefmt, disable_numparse=True),
                *_notes(sel), ""]
    out.append(f"ms: median (IQR) per call, {facts['timer']}; MiB: peak above the baseline; "
               "GMAC: forward multiply-adds (= the papers' GFLOPs); vs X: speed-up, time of X / "
               "time of the row, forward / forward+backward (or training step).")
    if any(m.noisy for r in rows.values() for m in r.cells.values()):
        out.append(f"?: noisy, the IQR above {NOISE_THRESHOLD:.0%} of the median; a ratio marked "
                   "? uses such a time and is no result (rerun it on a quieter machine).")
    return "\n".join(out)


def to_json(rows: dict[Case, Row], facts: dict, interrupted: bool, elapsed: float) -> dict:
    out = {"header": facts, "interrupted": interrupted, "elapsed_s": elapsed, "layers": [],
           "models": []}
    bandwidth, mac_rate = facts.get("copy_bandwidth_GBps"), facts.get("matmul_GMACps")
    for row in rows.values():
        c, fwd = row.case, row.cells["fwd"]
        d = {"resolution": c.resolution, "grid": row.grid and list(row.grid),
             "tokens": row.tokens, "gmacs": None if row.macs is None else row.macs / 1e9}
        if c.section == "layers":
            d = {"shape": c.group, "method": c.name, "label": row.label, **d,
                 "backend": row.backend, "paths": row.paths}
        else:
            d = {"model": c.name, "label": row.label, **d, "params": row.params,
                 "images_per_s": facts["batch_size"] / fwd.median_s if fwd.ok else None}
        for key, (value, noisy) in ratios(rows, row).items():
            d[key], d[key + "_noisy"] = value, noisy
        if row.exactness:
            d["vs_official_exactness"] = row.exactness
        if row.floor_bytes:
            d["floor_bytes"] = row.floor_bytes
            d.update(floor_ratios(row, bandwidth and bandwidth * 1e9, mac_rate and mac_rate * 1e9))
        d.update((mode, m.to_dict()) for mode, m in row.cells.items())
        out[c.section].append(d)
    return out


HEADER_FIELDS = ["device", "device_name", "torch", "dtype", "threads", "batch_size"]
CSV_FIELDS = ["section", "shape", "model", "method", "label", "backend", "resolution", "grid",
              "tokens", "params", "gmacs", "mode", "status", "reason", "median_ms", "q1_ms",
              "q3_ms", "iqr_ms", "min_ms", "max_ms", "repeats", "noisy", "peak_mib",
              "page_faults_per_call", "estimate_s", "estimate_mib", "images_per_s",
              *(f"vs_{r}{n}" for r in ("sdpa", "official", "softmax") for n in ("", "_noisy")),
              *HEADER_FIELDS]


def write_csv(path: str, data: dict) -> None:
    """One line per cell (row x mode) of to_json's data, the header facts on every line."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for section, d in ((s, d) for s in ("layers", "models") for d in data[s]):
            for mode in LAYER_MODES if section == "layers" else MODEL_MODES:
                line = {**d, **d[mode], "section": section, "mode": mode,
                        "grid": d["grid"] and "x".join(map(str, d["grid"])),
                        "images_per_s": d.get("images_per_s") if mode == "fwd" else None,
                        **{k: data["header"][k] for k in HEADER_FIELDS}}
                for ref in ("sdpa", "official", "softmax"):
                    line[f"vs_{ref}"] = d.get(f"vs_{ref}_{mode}")
                    line[f"vs_{ref}_noisy"] = d.get(f"vs_{ref}_{mode}_noisy") \
                        if line[f"vs_{ref}"] is not None else None
                w.writerow({k: "" if v is None else v for k, v in line.items()})


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


NOT_MEASURED = {"skipped": "skipped", "oom": "OOM", "error": "error"}  # marked in the plot
MODE_MARKS = {"fwd": ("-", "x"), "fwdbwd": ("--", "+")}  # line style, mark of a missing cell


def write_plot(path: str, data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = make_plot(data)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def make_plot(data: dict):
    """A figure of time and peak memory against tokens per layer shape, of the measured cells
    only: fwd solid, fwd+bwd dashed. A cell skipped, out of memory or failed is a mark in its
    method's colour along the panel's foot at its token count (x fwd, + fwd+bwd); cells not run
    (an interrupted run) are counted in the title. A shape with nothing to show has no panels."""
    import matplotlib.pyplot as plt
    colours = {m: f"C{k}" for k, m in enumerate(dict.fromkeys(d["method"] for d in data["layers"]))}
    shown: dict[str, list[dict]] = {}
    for d in data["layers"]:
        if any(d[mode]["status"] == "ok" or d[mode]["status"] in NOT_MEASURED
               for mode in LAYER_MODES):
            shown.setdefault(d["shape"], []).append(d)
    status = [d[mode]["status"] for d in data["layers"] for mode in LAYER_MODES]
    not_run = sum(s not in ("ok", *NOT_MEASURED) for s in status)
    missing = f"{not_run} of {len(status)} cells not run" + \
        (" (interrupted)" if data["interrupted"] else "") if not_run else ""
    if not shown:
        fig = plt.figure(figsize=(8, 2))
        fig.text(0.5, 0.5, f"{header_line(data['header'])}\n{missing}\n\nno layer cell was "
                 "measured", ha="center", va="center", fontsize=9)
        return fig
    title = header_line(data["header"]) + "\nsolid: forward, dashed: forward+backward" + \
        (f"; {missing}" if missing else "")
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 4.2 * len(shown) + 0.8), squeeze=False)
    handles: dict[str, object] = {}  # one legend for the figure: a method has one colour
    for (ax_t, ax_m), (shape_name, sel) in zip(axes, shown.items()):
        for ax, key, ylabel in ((ax_t, "median_ms", "ms per call (median)"),
                                (ax_m, "peak_mib", "peak MiB above baseline")):
            handles.update(_plot_panel(ax, sel, key, colours))
            ax.set_title(SHAPES[shape_name].title, fontsize=9)
            ax.set(xlabel="tokens N", ylabel=ylabel)
    fig.suptitle(title, fontsize=9)
    foot = 0.8 / fig.get_figheight()  # the legend's strip under the panels
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, foot, 1, 1))
    return fig


def _plot_panel(ax, sel: list[dict], key: str, colours: dict) -> dict:
    """One panel: each method's measured cells as lines, its missing ones as marks in rows
    along the foot; returns the legend handles by label."""
    import matplotlib.ticker
    from matplotlib.lines import Line2D
    values, marks, handles, missing = [], [], {}, set()
    for method in dict.fromkeys(d["method"] for d in sel):
        line = sorted((d for d in sel if d["method"] == method), key=lambda d: d["tokens"])
        colour, row = colours[method], len({m[3] for m in marks})
        for mode, (style, mark) in MODE_MARKS.items():
            pts = [(d["tokens"], d[mode][key]) for d in line
                   if d[mode]["status"] == "ok" and d[mode][key]]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=colour)
                values += pts
            for d in (d for d in line if d[mode]["status"] in NOT_MEASURED):
                # fwd just left of the token count, fwd+bwd just right
                marks.append((d["tokens"], d["tokens"] * (0.95 if mode == "fwd" else 1.05),
                              mark, row, colour))
                missing.add(mode)
        label = line[0]["label"]
        handles[label] = Line2D([], [], color=colour, marker="o", label=label)
    rows = len({m[3] for m in marks})
    foot = 0.04 + 0.06 * rows if marks else 0.0  # the axes fraction the marks take
    for _, x, mark, row, colour in marks:  # x: data, y: axes fraction
        ax.plot(x, 0.04 + 0.06 * (rows - 1 - row), mark, color=colour, markersize=8,
                markeredgewidth=2, transform=ax.get_xaxis_transform())
    for mode in (mode for mode in LAYER_MODES if mode in missing):
        label = f"{MODE_TITLES[mode]} not measured ({', '.join(NOT_MEASURED.values())})"
        handles[label] = Line2D([], [], color="grey", marker=MODE_MARKS[mode][1], ls="",
                                markeredgewidth=2, label=label)
    tokens = sorted({n for n, _ in values} | {m[0] for m in marks})
    ax.set_xscale("log")
    ax.set_xlim(tokens[0] / 1.25, tokens[-1] * 1.25)
    ax.set_xticks(tokens, [f"{n:,}" for n in tokens])  # the token counts shown
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if values:
        _log_y(ax, [v for _, v in values], foot)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
    return handles


def _nice(v: float, up: bool) -> float:
    """The nearest 1, 2 or 5 times a power of ten at or above (up) or at or below v."""
    e = math.floor(math.log10(v))
    steps = [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 2, 5)]
    return min(x for x in steps if x >= v * (1 - 1e-9)) if up else \
        max(x for x in steps if x <= v * (1 + 1e-9))


def _log_y(ax, values: list[float], foot: float) -> None:
    """A log y axis labelled in plain numbers however short its range: limits at the 1-2-5
    numbers around the values (the lower one further down by `foot`, the axes fraction kept
    free for marks); decades labelled, and below two decades 2x and 5x, below one 2x to 9x."""
    import matplotlib.ticker as ticker
    lo, hi = _nice(min(values), up=False), _nice(max(values), up=True)
    if lo == hi:
        lo, hi = _nice(lo * 0.99, up=False), _nice(hi * 1.01, up=True)
    span = math.log10(hi / lo)
    lo, hi = lo / 10 ** (0.04 * span), hi * 10 ** (0.04 * span)  # values at a limit stay in view
    lo /= 10 ** (1.08 * span * foot / (1 - foot))
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if span >= 2:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        return
    subs = (2.0, 5.0) if span >= 1 else tuple(float(m) for m in range(2, 10))
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=subs))
    ax.yaxis.set_minor_formatter(plain)


# =============================================================================
# The command line: the flags, their checks before anything runs, the run, the outputs


class _Parser(argparse.ArgumentParser):
    """argparse, with a one-line error (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, what: str, low: float):
    """An argparse type: a kind(text) of at least low, else the error 'expected {what}'."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default once, after its help: "(default: 224 512 1024)"; none where the help
    says it in its own words, or where there is none (None, a switch). The epilog as written."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "(default" in text or default is None or default is False \
                or default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def make_parser() -> argparse.ArgumentParser:
    width = max(map(len, METHOD_HELP))
    methods = [textwrap.fill(text, 78, initial_indent=f"  {name:<{width}}  ",
                             subsequent_indent=" " * (width + 4))
               for name, text in METHOD_HELP.items()]
    p = _Parser(prog="bench.py", formatter_class=_HelpFormatter,
                description="Time, peak memory and MACs of focused linear attention against\n"
                "softmax attention, layers and models; docs/benchmark.md says how.",
                epilog="layer methods (--methods):\n" + "\n".join(methods))
    add, positive = p.add_argument, _number(int, "a positive whole number", 1)
    seconds = _number(float, "a number of seconds >= 0", 0)
    add("--resolutions", nargs="+", default=[224, 512, 1024], metavar="R",
        type=_number(int, "a positive whole number of pixels", 1),
        help="image sizes r (r x r pixels); the token grid is r // patch")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    add("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="of the weights and inputs")
    add("--batch-size", type=positive, default=1, help="images (or token sequences) per call")
    add("--threads", type=positive, help="CPU threads (default: all usable; 1 on a busy machine)")
    add("--sections", nargs="+", choices=["layers", "models"], default=["layers", "models"],
        help="attention layers, whole models")
    add("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
        help="layer shapes: deit (DeiT-T layer), pvt (FLatten-PVT stage 1)")
    add("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
        help=f"layer methods, of {', '.join(METHODS)}, each explained below (default: all but "
        "reference and baseline; ours-torch only on CUDA with Triton)")
    add("--baseline", metavar="FILE", help="another copy of flatten.py: adds the method "
        "baseline, its FocusedLinearAttention with ours' weights")
    add("--models", nargs="+", choices=fl.list_models(), default=list(DEFAULT_MODELS),
        metavar="MODEL", help="models of the model section")
    add("--warmup", type=_number(int, "a whole number >= 0", 0), default=1,
        help="untimed calls before a cell; 0: the first timed call serves")
    add("--repeats", type=positive, default=3, help="at least this many timed calls")
    add("--min-time", type=seconds, default=0.2, help="more until this many seconds are timed")
    add("--max-repeats", type=positive, default=50, help="at most this many timed calls")
    add("--cell-budget", type=seconds, default=8.0,
        help="skip a cell estimated to take longer, warm-up included")
    add("--time-budget", type=seconds, default=120.0, help="skip the cells that would not "
        "finish within this many seconds (either budget: 0 for none)")
    add("--seed", type=int, default=0, help="of the weights, inputs and timing order")
    add("--json", metavar="PATH", help="save every number and the header facts as JSON")
    add("--csv", metavar="PATH", help="save one line per cell as CSV")
    add("--plot", metavar="PATH", help="save a log-log plot of time and memory against tokens "
        "(matplotlib; the suffix picks the format)")
    add("--table-format", default="github", choices=tabulate_formats, metavar="FORMAT",
        help="a tabulate format")
    add("--details", action="store_true", help="ours against official, floors and page faults "
        "under each layer table")
    return p


def output_problem(opt: str, path: str) -> str | None:
    """Why an output path cannot be written, found by creating the file and removing it."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"--{opt} {path}: is a folder, not a file"
    if not os.path.isdir(os.path.dirname(full)):
        return f"--{opt} {path}: the folder does not exist"
    try:
        existed = os.path.exists(full)
        open(full, "ab" if existed else "xb").close()  # appending nothing leaves it as it is
        if not existed:
            os.remove(full)
    except OSError as err:
        return f"--{opt} {path}: cannot be written ({err.strerror or err})"
    return None


def parse_args(argv: Sequence[str] | None = None):
    """The flags, checked: a problem is one line and exit status 2, before anything runs."""
    p = make_parser()
    args = p.parse_args(argv)
    cpus, load = usable_cpus(), load_average()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available to this torch "
                f"({torch.__version__}, torch.cuda.is_available() is False)")
    if min(args.resolutions) < MIN_RESOLUTION:
        p.error(f"--resolutions {min(args.resolutions)}: too small, the PVT models need at least "
                f"{MIN_RESOLUTION} pixels")
    if args.max_repeats < args.repeats:
        p.error(f"--max-repeats {args.max_repeats} is below --repeats {args.repeats}")
    if args.threads is not None and args.threads > cpus:
        p.error(f"--threads {args.threads}: this process may use {cpus} CPUs")
    if args.plot:
        try:
            import matplotlib.backend_bases
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
        formats = sorted(matplotlib.backend_bases.FigureCanvasBase.get_supported_filetypes())
        if os.path.splitext(args.plot)[1][1:].lower() not in formats:
            p.error(f"--plot {args.plot}: the suffix must name a format matplotlib writes: "
                    + ", ".join("." + f for f in formats))
    outputs = [(opt, getattr(args, opt)) for opt in ("json", "csv", "plot") if getattr(args, opt)]
    for problem in filter(None, (output_problem(opt, path) for opt, path in outputs)):
        p.error(problem)
    for (o1, p1), (o2, p2) in itertools.combinations(outputs, 2):
        if os.path.realpath(p1) == os.path.realpath(p2):
            p.error(f"--{o1} and --{o2} name the same file, {p1}")
    if args.methods is None:  # ours-torch differs from ours only where Triton kernels run
        optional = {"ours-torch": args.device == "cuda" and fl.triton is not None,
                    "reference": False, "baseline": bool(args.baseline)}
        args.methods = [m for m in METHODS if optional.get(m, True)]
    args.methods += ["baseline"] if args.baseline else []
    if "baseline" in args.methods and not args.baseline:
        p.error("--methods baseline needs --baseline FILE, a copy of flatten.py")
    args.baseline_module = None
    if args.baseline:
        try:
            args.baseline_module = load_baseline(args.baseline)
        except Exception as err:  # noqa: BLE001 (whatever importing a file raises: one line)
            p.error(f"--baseline {args.baseline}: cannot import it: {type(err).__name__}: "
                    f"{_first_line(err)}")
    for opt in ("resolutions", "shapes", "methods", "models", "sections"):
        setattr(args, opt, list(dict.fromkeys(getattr(args, opt))))
    args.torch_dtype, args.cpus, args.load = getattr(torch, args.dtype), cpus, load
    busy, args.threads_note = args.device == "cpu" and is_busy(load, cpus), None
    if busy and args.threads is None:
        args.threads_note = (f"load average {load:g} on {cpus} usable CPUs at the start: "
                             "measuring on 1 thread (--threads N chooses); times may be noisy")
    elif busy:
        args.threads_note = (f"warning: load average {load:g} on {cpus} usable CPUs at the "
                             f"start: {args.threads} thread(s) compete with other processes")
    args.threads = args.threads or (1 if busy else cpus)
    return args


def header_facts(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"device": device.type,
            "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
            "torch": torch.__version__, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "batch_size": args.batch_size, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "flatten_commit": _commit(),
            "triton": getattr(fl.triton, "__version__", None),
            "timer": "CUDA events" if cuda else "time.perf_counter",
            "memory": "torch.cuda.max_memory_allocated" if cuda
            else "torch.profiler allocation events (profile_memory=True)",
            "macs": "multiply-adds of matmuls and convolutions (1 MAC = 2 FLOP)",
            "warmup": args.warmup, "repeats": args.repeats, "min_time_s": args.min_time,
            "max_repeats": args.max_repeats, "cell_budget_s": args.cell_budget,
            "time_budget_s": args.time_budget, "seed": args.seed, "cpus": args.cpus,
            "load_average_1min": args.load, "threads_note": args.threads_note,
            "noise_threshold": NOISE_THRESHOLD, "baseline": args.baseline}


def _commit() -> str | None:
    """The git commit of flatten.py's folder (with "+changes" when it differs), or None."""
    here = os.path.dirname(os.path.abspath(fl.__file__))
    try:
        run = [subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)
               for a in (["rev-parse", "HEAD"], ["status", "--porcelain", "--", "flatten.py"])]
    except (OSError, subprocess.SubprocessError):
        return None
    if run[0].returncode:
        return None
    return run[0].stdout.strip() + ("+changes" if run[1].stdout.strip() else "")


def _cpu_name() -> str:
    if line := _proc_line("/proc/cpuinfo", "model name"):
        return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "CPU"


def prepare_layer(args, row: Row, device, backends: dict) -> dict:
    """A layer row's calls, with its floor bytes, paths and peak-memory estimate per mode."""
    shape, name, B = SHAPES[row.case.group], row.case.name, args.batch_size
    if name == "sdpa" and shape.name not in backends:  # SDPA's backend, from a tiny input
        tiny = layer_calls("sdpa", shape, (2, 2), device, args.torch_dtype, B, 0)["fwd"]
        backends[shape.name] = sdpa_backend(peak_memory(tiny, device, op_names=True)[1])
    calls = layer_calls(name, shape, row.grid, device, args.torch_dtype, B, args.seed,
                        args.baseline_module)
    row.floor_bytes, row.paths = calls["floor"], calls["paths"]
    fwd_path = (row.paths or {}).get("fwd")
    row.backend = backends.get(shape.name) if name == "sdpa" else (
        "Triton forward" if fwd_path == "triton" else fwd_path)
    elem = torch.empty((), dtype=args.torch_dtype).element_size()
    calls["bytes"] = {mode: layer_memory_estimate(name, mode, B, row.tokens, shape.dim,
                                                  shape.heads, elem, backends.get(shape.name))
                      for mode in LAYER_MODES}
    return calls


def prepare_model(args, row: Row, device, models: dict) -> dict:
    """A model row's calls; a model is built once, then resized (set_input_size)."""
    name, r = row.case.name, row.case.resolution
    if name not in models:
        torch.manual_seed(args.seed)
        models[name] = (fl.create_model(name, img_size=r), r)
    model, size = models[name]
    if size != r:
        model.set_input_size(r)
    model = model.to(device, args.torch_dtype)
    models[name] = (model, r)
    row.params = sum(p.numel() for p in model.parameters())
    row.tokens = first_attention_tokens(model, r)
    row.macs = model_macs(model, args.batch_size, r)
    return model_calls(model, args.batch_size, r, device, args.torch_dtype, args.seed)


def run_resolution(args, measurer: Measurer, rows: dict[Case, Row], r: int, state: dict) -> None:
    """Resolution r: per layer shape (then models) build the calls, measure mode by mode."""
    groups = [("layers", s, args.methods) for s in args.shapes if "layers" in args.sections]
    groups += [("models", None, args.models)] if "models" in args.sections else []
    for section, shape_name, names in groups:
        group = [rows[Case(section, shape_name or n, n, r)] for n in names]
        if measurer.out_of_time(group):
            continue
        calls = {}
        for row in group:
            try:
                calls[row.case.name] = (
                    prepare_layer(args, row, measurer.device, state["backends"])
                    if section == "layers" else
                    prepare_model(args, row, measurer.device, state["models"]))
            except Exception as err:  # noqa: BLE001 (memory, a baseline that differs: the row says)
                for mode in row.case.modes:
                    measurer.fail(Job(row, mode), err)
        if "ours" in calls and "official" in calls:
            rows[Case(section, shape_name, "ours", r)].exactness = compare_to_official(
                SHAPES[shape_name], group[0].grid, measurer.device, args.torch_dtype,
                args.batch_size, args.seed)
        for mode in group[0].case.modes:
            jobs = []
            for row in (x for x in group if x.case.name in calls):
                call = calls[row.case.name]
                call["module"].train(mode != "fwd")
                est_s, est_bytes = measurer.estimates(row, mode)
                jobs.append(Job(row, mode, call[mode], est_s,
                                call["bytes"][mode] if "bytes" in call else est_bytes,
                                row.case.name == "sdpa"))
            measurer.run_group(jobs)
        del calls
        gc.collect()


def save_outputs(args, rows: dict[Case, Row], facts: dict, interrupted: bool, elapsed: float,
                 log: Callable[[str], None]) -> bool:
    """Write each output on its own; a failure is one line. True if all were written."""
    data, ok = to_json(rows, facts, interrupted, elapsed), True
    for opt, write in (("json", write_json), ("csv", write_csv), ("plot", write_plot)):
        if path := getattr(args, opt):
            try:
                write(path, data)
                log(f"saved {path}")
            except Exception as err:  # noqa: BLE001 (a full disk, a plotting failure: one line)
                ok = False
                log(f"bench.py: --{opt} {path} not written: {type(err).__name__}: "
                    f"{_first_line(err)}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no kineto start/stop lines on stderr
    for r, patch in itertools.product(args.resolutions, (16, 4)):  # DeiT, then PVT stage 1
        if r % patch:
            log(f"note: {r} is not a multiple of {patch}: a patch-{patch} embedding drops the "
                f"last {r % patch} pixels (grid {r // patch}x{r // patch})")
    if args.threads_note:
        log(args.threads_note)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    facts, rows = header_facts(args, device), plan(args)
    cells = sum(len(case.modes) for case in rows)
    if any(c.section == "layers" and c.name in FLATTEN_METHODS for c in rows):
        bandwidth = copy_bandwidth(device, args.torch_dtype)
        facts["copy_bandwidth_GBps"] = bandwidth and bandwidth / 1e9
    measurer = Measurer(args, device, cells, log)
    facts["matmul_GMACps"] = measurer.rate / 1e9
    log(header_line(facts))
    interrupted, state = False, {"backends": {}, "models": {}}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for r in args.resolutions:
                run_resolution(args, measurer, rows, r, state)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: printing and saving what was measured")
    finally:
        torch.set_num_threads(threads_before)
    for m in (m for row in rows.values() for m in row.cells.values() if m.status == "pending"):
        m.status, m.reason = "interrupted", "not run: the run was interrupted"
    elapsed = measurer.elapsed()
    facts["load_average_1min_end"] = load_average()
    print(render(rows, facts, args.table_format, args.details))
    print("\n" + summary_line(rows, elapsed, interrupted))
    written = save_outputs(args, rows, facts, interrupted, elapsed, log)
    return 130 if interrupted else 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
