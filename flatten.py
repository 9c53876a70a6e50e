"""Focused linear attention and the FLatten backbones, in one file.

FLatten Transformer: Vision Transformer using Focused Linear Attention
(Han, Pan, Han, Song, Huang; ICCV 2023, arXiv 2308.00442).

This file needs torch and the Python standard library only: copy it into your project.
It holds, top to bottom:
  - the functional core: the focused kernel phi_p, linear attention in the O(N d^2) order,
    and explicit N x N references of the attention and of the depthwise-conv (DWC) term;
  - the modules: FocusedLinearAttention (a drop-in for the official module that runs at any
    resolution), SoftmaxAttention (the PVT-style baseline), and the two comparators of the
    papers: VanillaLinearAttention (ReLU kernel, no focusing, no DWC) and L2ViTLinearAttention
    (L^2ViT's linear attention with its local concentration module);
  - the backbones: FLatten-PVT, FLatten-PVTv2 and FLatten-DeiT with their softmax counterparts,
    with timm-style factories (create_model, list_models);
  - checkpoint loading (load_pretrained) that reads the released official files safely.

Shape letters: B batch, N query tokens, n key tokens, C channels, h heads, d = C / h head dim,
H x W the token grid (N = H * W, plus class tokens in DeiT), p the focusing factor.
Nothing runs or prints at import or construction.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: fused CUDA kernels for inference (the Triton section below)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = [
    "focus", "linear_attention", "linear_attention_matrix", "dwc_matrix", "resample_grid",
    "official_forward", "attention_map",
    "FocusedLinearAttention", "SoftmaxAttention", "VanillaLinearAttention", "L2ViTLinearAttention",
    "PVTConfig", "PyramidVisionTransformer", "DeiTConfig", "VisionTransformer",
    "create_model", "list_models", "load_pretrained", "checkpoint_filter_fn",
    "set_fast_path", "get_fast_path",
]

_HALF = (torch.float16, torch.bfloat16)
# the inference path focuses through t = 2^e y / ||y|| while the sum of squares behind ||t^p|| stays
# this many binary orders clear of overflow and of the smallest normal number (_norm_scale_exponent)
_NORM_SCALED_MARGIN = 30
_NORM_SCALE_MAX_EXPONENT = 32  # 2^e at most: 2^e / ||y|| stays finite
# _head_matmul: multiply-adds of one head's product from which a loop of mm beats one batched matmul
_HEAD_MATMUL_LOOP = 1 << 23

# -----------------------------------------------------------------------------
# Functional core


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast
        return False


def _autocast_off(device_type: str):
    """A context without autocast: our backward passes compute in the dtypes they chose."""
    return torch.autocast(device_type, enabled=False) if _autocast_enabled(device_type) else contextlib.nullcontext()


def _plain_backward(backward):
    """For autograd.Function.backward: runs with autocast off (the pass computes in the dtypes it
    chose) and refuses a second derivative with PyTorch's "differentiate twice" error."""
    @functools.wraps(backward)
    def wrapped(ctx, g):
        with _autocast_off(g.device.type):
            return backward(ctx, g)
    return torch.autograd.function.once_differentiable(wrapped)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float16 / bfloat16 attention runs in float32: the kernel's power and the normaliser's
    # reduction overflow or underflow in half precision (the top NaN report of such code).
    return torch.float32 if t.dtype in _HALF else t.dtype


def focus(x: torch.Tensor, focusing_factor: float = 3.0, scale: Optional[torch.Tensor] = None,
          offset: float = 1e-6) -> torch.Tensor:
    """The focused kernel phi_p on the last dimension.

    y = (ReLU(x) + offset) / scale, phi_p(x) = ||y|| * y^p / ||y^p||  (element-wise power).
    With offset=0 and scale=None this is the paper's f_p(ReLU(x)); the defaults of the module
    (offset 1e-6, scale = softplus(learned)) are the official code's. x: (..., C), scale: C
    values per channel ((C,) or (1, 1, C)) or one (a scalar) -> (..., C), in float32 for
    half-precision inputs.

    Computed through t = y / max(y): y^p / ||y^p|| = t^p / ||t^p|| and ||y|| = max(y) ||t||, so
    nothing overflows for large y and nothing is 0/0 for tokens that ReLU zeroes (||t^p|| >= 1
    wherever y has a positive entry; an all-zero token maps to zero). A hand-written backward
    (_Focus) saves t, the mask [x > 0] and three numbers per token, where autograd through the
    formula keeps every intermediate.
    """
    if focusing_factor <= 0:
        raise ValueError(f"focusing_factor must be > 0, got {focusing_factor}")
    dt = _compute_dtype(x)
    if scale is None:
        scale = torch.ones(x.shape[-1], dtype=dt, device=x.device)
    return _Focus.apply(x, scale.reshape(-1).to(dt), float(focusing_factor), float(offset), False)


def _focus_temporary(x: torch.Tensor, focusing_factor: float, scale: torch.Tensor) -> torch.Tensor:
    """focus() of a temporary the caller drops: without autograd it is overwritten in place."""
    scale = scale.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _Focus.apply(x, scale, float(focusing_factor), 1e-6, False)
    # no autograd: skip autograd.Function's bookkeeping (it shows at a few hundred tokens)
    return _focus_forward(x, scale, float(focusing_factor), 1e-6, x.dtype == scale.dtype)[0]


def _focus_forward(x, s, p: float, offset: float, inplace: bool, keep_t: bool = False):
    """phi_p(x) and the per-token t, m, a, b that _Focus.backward needs (see _Focus).

    t = y / m is overwritten by the power unless keep_t (then t is returned intact)."""
    dt = s.dtype
    tiny = torch.finfo(dt).tiny
    y = x.clamp_min_(0) if inplace else torch.clamp_min(x.to(dt), 0)
    if offset:
        y.add_(offset)
    y.div_(s)
    m = y.amax(dim=-1, keepdim=True).clamp_min_(tiny)
    t = y.div_(m)
    a = torch.linalg.vector_norm(t, dim=-1, keepdim=True).mul_(m)
    if p != 1:
        P = t.pow(p) if keep_t else t.pow_(p)
    else:
        P = t
    b = torch.linalg.vector_norm(P, dim=-1, keepdim=True).clamp_min_(tiny)
    phi = P * (a / b) if P is t and keep_t else P.mul_(a / b)
    return phi, t, m, a, b


class _Focus(torch.autograd.Function):
    """phi_p with a fused forward (in-place passes) and a derived backward.

    Per token, with y = (ReLU(x) + offset) / s, m = max(y), t = y / m, P = t^p, a = ||y||,
    b = ||P|| and phi = (a / b) P. For an upstream gradient g and sg = g . P:
        dL/dy = (p / m) t^(p-1) * ((a / b) g - (sg a / b^3) P) + (sg m / (a b)) t
    (the terms of d(P)/dy, d(1/b)/dy and d(a)/dy), then dL/dx = dL/dy [x > 0] / s and
    dL/ds = -sum_tokens dL/dy * y / s = -(sum_tokens m dL/dy * t) / s.
    Saves t, the mask [x > 0] (one byte per entry) and three numbers per token; the backward
    takes about a dozen passes over the tokens. Not twice differentiable (says so if asked).
    """

    @staticmethod
    def forward(ctx, x, s, p, offset, inplace):
        positive = x > 0 if ctx.needs_input_grad[0] else None
        phi, t, m, a, b = _focus_forward(x, s, p, offset, inplace, keep_t=True)
        ctx.save_for_backward(positive, s, t, m, a, b)
        ctx.p, ctx.offset, ctx.x_dtype = p, offset, x.dtype
        return phi

    @staticmethod
    @_plain_backward
    def backward(ctx, g):
        positive, s, t, m, a, b = ctx.saved_tensors
        p, dt = ctx.p, s.dtype
        g = g.to(dt)
        tp1 = None
        if p != 1:
            tp1 = t.pow(p - 1) if p != 2 else t
            if p < 1:  # t^(p-1) is infinite at t = 0, where [x > 0] zeroes the gradient anyway
                tp1 = torch.where(t > 0, tp1, torch.zeros_like(tp1))
        P = tp1 * t if tp1 is not None else t
        sg = (g * P).sum(dim=-1, keepdim=True)
        a_b = a / b
        p_m = p / m
        gy = g * (a_b * p_m)                                      # dL/dy, term by term
        gy.addcmul_(P, sg * a_b * p_m / b.square(), value=-1)
        if tp1 is not None:
            gy.mul_(tp1)
        gy.addcmul_(t, sg * m / (a.clamp_min(torch.finfo(dt).tiny) * b))
        if not ctx.offset:
            gy.masked_fill_(a == 0, 0.)  # a token ReLU zeroes: phi is 0 all around it
        gs = None
        if ctx.needs_input_grad[1]:
            gs = ((gy * t).reshape(-1, t.shape[-1]).t() @ m.reshape(-1)).div_(s).neg_()
            if s.numel() != gs.numel():  # one scale for every channel
                gs = gs.sum().reshape(s.shape)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy.div_(s).mul_(positive).to(ctx.x_dtype)
        return gx, gs, None, None, None


def _check_normalizer(normalizer: str) -> None:
    if normalizer not in ("mean", "sum"):
        raise ValueError(f"normalizer must be 'mean' or 'sum', got {normalizer!r}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     normalizer: str = "mean") -> torch.Tensor:
    """Linear attention in the O(N d^2) order: out_i = q_i (K^T V / n) / (q_i . mean_j k_j + eps).

    q: (B, h, N, d) and k: (B, h, n, d) non-negative features (after the kernel), v: (B, h, n, dv)
    -> (B, h, N, dv) in v's dtype. normalizer='mean' is the official code since May 2024; 'sum'
    is the paper's Eq. 4 and the code the released checkpoints were trained with
    (out_i = q_i K^T V / (q_i . sum_j k_j + eps)). With eps = 0 the two are identical.

    Computed as (q K^T V) / (q . sum_j k_j + n eps) for 'mean': multiplying numerator and
    normaliser by n is exact algebra and saves two passes. Strided views (heads split off a
    (B, N, C) tensor) are used as they are, without copies; the output has the layout of a
    (B, N, h, dv) tensor, so merging the heads back is free.
    """
    _check_normalizer(normalizer)
    q, k, v = _attention_operands(q, k, v)
    eps = eps * k.shape[-2] if normalizer == "mean" else eps
    with _autocast_off(q.device.type):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = _LinearAttention.apply(q, k, v, float(eps))
        else:
            out = _linear_attention_forward(q, k, v, float(eps))[0]
    return out.to(v.dtype).transpose(1, 2)                  # (B, N, h, dv) memory


def _attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v of linear_attention, checked, with batch and head dims broadcast to one shape."""
    if (q.dim(), k.dim(), v.dim()) != (4, 4, 4) or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError("expected q (B, h, N, d), k (B, h, n, d), v (B, h, n, dv), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] == k.shape[:2] == v.shape[:2]:
        return q, k, v
    try:
        batch = torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2])
    except RuntimeError:
        raise ValueError("the (B, h) of q, k and v must be equal or broadcast, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}") from None
    return tuple(t.expand(batch + t.shape[2:]) for t in (q, k, v))


def _linear_attention_forward(q, k, v, eps: float):
    """(out in (B, N, h, dv) memory, kv, ks, r) for (B, h, *, d) inputs; see _LinearAttention."""
    dt = _compute_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    B, h, N, _ = q.shape
    kv = _head_matmul(k.transpose(-2, -1), v)             # (B, h, d, dv)
    ks = k.sum(dim=-2)                                    # (B, h, d)
    # einsum, not q @ ks[..., None]: a batched matrix-vector bmm is several times slower on CPU
    r = torch.einsum("bhnd,bhd->bhn", q, ks).add_(eps).reciprocal_().unsqueeze(-1)  # (B, h, N, 1)
    if _is_compiling():  # the compiler picks its own layouts (and rejects out=)
        return ((q @ kv) * r).transpose(1, 2), kv, ks, r
    # written straight into (B, N, h, dv) memory: merging the heads afterwards is free
    out = torch.empty(B, N, h, v.shape[-1], dtype=dt, device=q.device)
    _head_matmul(q, kv, out=out.transpose(1, 2)).mul_(r)
    return out, kv, ks, r


class _LinearAttention(torch.autograd.Function):
    """out = (q KV) * r with KV = k^T v, ks = sum_j k_j, r = 1 / (q . ks + eps); per (B, h).

    Backward, for an upstream gradient g (N x dv), with G = g KV^T (N x d):
        dL/dr_i = q_i . G_i,   dL/dden_i = -r_i^2 dL/dr_i   (den = q . ks + eps)
        dL/dq   = r G + dL/dden ks^T,    dL/dKV = q^T (r g),   dL/dks = q^T dL/dden
        dL/dk   = v dL/dKV^T + 1 dL/dks^T,    dL/dv = k dL/dKV
    Saves q, k, v (which the caller holds anyway) and the small KV, ks, r.
    """

    @staticmethod
    def forward(ctx, q, k, v, eps):
        out, kv, ks, r = _linear_attention_forward(q, k, v, eps)
        dt = out.dtype
        ctx.save_for_backward(q.to(dt), k.to(dt), v.to(dt), kv, ks, r)
        return out

    @staticmethod
    @_plain_backward
    def backward(ctx, g):
        q, k, v, kv, ks, r = ctx.saved_tensors
        g = g.to(q.dtype).transpose(1, 2)                     # (B, h, N, dv)
        G = _matmul_like(g, kv.transpose(-2, -1), q)          # (B, h, N, d)
        gden = (q * G).sum(dim=-1, keepdim=True).mul_(r.square()).neg_()    # (B, h, N, 1)
        gq = G.mul_(r).addcmul_(gden, ks.unsqueeze(-2))
        gkv = _head_matmul(q.transpose(-2, -1), g * r)        # (B, h, d, dv)
        gks = torch.einsum("bhnd,bhn->bhd", q, gden.squeeze(-1))
        gk = _matmul_like(v, gkv.transpose(-2, -1), k).add_(gks.unsqueeze(-2))
        gv = _matmul_like(k, gkv, v)
        return gq, gk, gv, None


def _matmul_like(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b in the memory layout of `like`, an input of the result's shape: gradients of heads
    that are strided views of a (B, N, C) tensor then merge back into (B, N, C) without a copy.
    (linear_attention gives all operands one (B, h); a broadcast `like` gets a dense layout.)"""
    if _is_compiling():
        return a @ b  # the compiler picks its own layouts, and rejects a strided out=
    return _head_matmul(a, b, out=torch.empty_like(like))


def _head_matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b for heads (B, h, m, k) and (B, h, k, n), written into out (or a new tensor).

    The heads are strided views of (B, N, C) tensors, whose B and h strides do not merge: for
    B > 1 torch.matmul copies the strided operands into one batch dimension. So a large product
    runs as one mm per (sample, head), a medium one as one bmm over the heads per sample, and
    only small ones as one matmul (the forms and the threshold _HEAD_MATMUL_LOOP were chosen by
    timing them on the CPU of README.md). Other shapes: matmul."""
    if a.dim() == 4 and a.shape[:2] == b.shape[:2] and not _is_compiling():
        B, h, m, k = a.shape
        n = b.shape[-1]
        loop_heads = m * k * n >= _HEAD_MATMUL_LOOP
        if loop_heads or (B > 1 and h * m * k * n >= _HEAD_MATMUL_LOOP):
            if out is None:
                out = a.new_empty(a.shape[:-1] + b.shape[-1:])
            for i in range(B):
                if loop_heads:
                    for j in range(h):
                        torch.mm(a[i, j], b[i, j], out=out[i, j])
                else:
                    torch.matmul(a[i], b[i], out=out[i])
            return out
    return a @ b if out is None else torch.matmul(a, b, out=out)


def _depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Depthwise conv2d, stride 1, zero padding k // 2 (odd k): x (B, C, H, W), weight (C, 1, k, k).

    With autograd on CPU (no autocast) through _DepthwiseConv, whose backward is two forward
    convolutions; elsewhere F.conv2d and its own backward."""
    pad = weight.shape[-1] // 2
    if (x.device.type == "cpu" and torch.is_grad_enabled() and not _is_compiling()
            and not _autocast_enabled("cpu")
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return _DepthwiseConv.apply(x, weight, bias, pad)
    return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution whose gradients are depthwise convolutions themselves.

    PyTorch's CPU backward of a depthwise convolution (oneDNN) is slow and allocates a fixed
    workspace; bench.py's forward+backward rows show the gain of replacing it. With stride 1
    and padding k // 2 for an odd k, for an upstream gradient g (B, C, H, W):
        dL/dx    = conv(g, w flipped in both spatial axes), same padding (a transposed
                   convolution of stride 1 is the convolution with the flipped kernel);
        dL/dw[c] = sum_b conv(x[b, c] zero-padded by k // 2, kernel g[b, c]): its k x k output
                   at (i, j) is sum_yx x_pad[b, c, y + i, x + j] g[b, c, y, x];
        dL/db[c] = sum of g[:, c] over the batch and the pixels.
    The weight gradient runs one sample at a time (a grouped convolution with the batch as
    input channels is slower than the loop). Not twice differentiable (says so if asked).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad):
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.has_bias = pad, bias is not None
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    @_plain_backward
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        C, pad = x.shape[1], ctx.pad
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(g, weight.flip((-2, -1)), None, padding=pad, groups=C)
        if ctx.needs_input_grad[1]:
            for b in range(x.shape[0]):   # (1, C, k, k) per sample
                kernel = g[b:b + 1].transpose(0, 1).contiguous()   # (C, 1, H, W)
                gwb = F.conv2d(x[b:b + 1], kernel, None, padding=pad, groups=C)
                gw = gwb if gw is None else gw.add_(gwb)
            gw = gw.reshape(weight.shape)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            gb = g.sum(dim=(0, 2, 3))
        return gx, gw, gb, None


def linear_attention_matrix(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6,
                            normalizer: str = "mean") -> torch.Tensor:
    """The explicit attention matrix of linear attention: A (B, h, N, n) with out = A @ v.

    The O(N^2) reference of linear_attention: A_ij = (q_i . k_j) / (sum_j' q_i . k_j' + eps')
    with eps' = n * eps for the 'mean' normaliser and eps for 'sum'.
    """
    _check_normalizer(normalizer)
    dt = _compute_dtype(q)
    with _autocast_off(q.device.type):
        scores = q.to(dt) @ k.to(dt).transpose(-2, -1)          # (B, h, N, n)
        n = k.shape[-2]
        eps = eps * n if normalizer == "mean" else eps
        return scores / (scores.sum(dim=-1, keepdim=True) + eps)


def dwc_matrix(weight: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The depthwise convolution (zero padding k // 2, no bias) as explicit matrices.

    weight: (d, 1, k, k) -> M: (d, N, N) with N = H * W and tokens row-major, so that for one
    channel c and token values v_c (N,), conv(v)_c = M[c] @ v_c. Built by convolving the N unit
    images: obviously right, O(N^2 d) memory; for analysis and tests.
    """
    d, _, kh, kw = weight.shape
    N = H * W
    eye = torch.eye(N, dtype=weight.dtype, device=weight.device).reshape(N, 1, H, W)
    cols = F.conv2d(eye.expand(N, d, H, W), weight, padding=(kh // 2, kw // 2), groups=d)
    return cols.reshape(N, d, N).permute(1, 2, 0)  # column j of M[c] is the response to e_j


def resample_grid(table: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int],
                  num_prefix_tokens: int = 0, mode: str = "bicubic") -> torch.Tensor:
    """Resample a learned per-token table (1, P + h*w, C) from grid old_hw to grid new_hw.

    The first num_prefix_tokens rows (class tokens) are kept; the grid rows are interpolated as
    a 2-D image in float32 (bicubic, align_corners=False: the official recipe for fine-tuning at
    a new resolution and timm's) and cast back. Returns the table itself when the grids match.
    """
    old_hw, new_hw = tuple(old_hw), tuple(new_hw)
    if old_hw == new_hw:
        return table
    P, C = num_prefix_tokens, table.shape[-1]
    if table.shape[-2] != P + old_hw[0] * old_hw[1]:
        raise ValueError(f"table has {table.shape[-2]} rows but {P} prefix tokens + grid "
                         f"{old_hw[0]}x{old_hw[1]} = {P + old_hw[0] * old_hw[1]}")
    prefix, grid = table[:, :P], table[:, P:]
    grid = grid.reshape(1, old_hw[0], old_hw[1], C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], C).to(table.dtype)
    return torch.cat([prefix, grid], dim=1) if P else grid


def _to_2tuple(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(i) for i in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or (height, width), got {x}")
    return x


def _check_tokens(x: torch.Tensor, H: int, W: int, P: int, dim: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} channels but the layer was built for dim={dim}")
    if x.shape[1] != P + H * W:
        extra = f" + {P} class tokens" if P else ""
        raise ValueError(f"x has {x.shape[1]} tokens but H*W{extra} = {H}*{W}{extra} = {P + H * W}")


def _values_to_grid(v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """v (B, n, C) -> (B, H*W, C) for the DWC. Reproduced on purpose: with n != H*W (sr_ratio > 1)
    the official code brings v back to N tokens by 1-D linear interpolation along the flattened
    (row-major) token axis, not in 2-D."""
    if v.shape[1] == H * W:
        return v
    return F.interpolate(v.transpose(1, 2), size=H * W, mode="linear", align_corners=False).transpose(1, 2)


def _norm_scale_exponent(p: float, C: int, dtype: torch.dtype) -> Optional[int]:
    """The e of the inference path's t = 2^e y / ||y|| (step 2), or None where t = y / max(y).

    t lies in [0, 2^e] and its largest entry is at least 2^e C^(-1/2), so the sum of squares of
    t^p over the C channels lies in [2^(2pe) C^(-p), 2^(2pe) C]. e is the largest that keeps the
    upper end _NORM_SCALED_MARGIN binary orders below overflow (at most _NORM_SCALE_MAX_EXPONENT);
    None where the lower end then comes within the margin of the smallest normal number. The
    small entries of t^p keep the same headroom: at e = 0 those of tokens that ReLU left near the
    floor are subnormal in float32, whose arithmetic is much slower on x86."""
    fi, lc = torch.finfo(dtype), math.log2(C)
    top, bottom = math.log2(fi.max) - _NORM_SCALED_MARGIN, math.log2(fi.tiny) + _NORM_SCALED_MARGIN
    bound = (top - lc) / (2 * p)  # inf for a p this small that 2p is 0 in float
    e = _NORM_SCALE_MAX_EXPONENT if bound >= _NORM_SCALE_MAX_EXPONENT else math.floor(bound)
    return e if 2 * p * e - p * lc >= bottom else None


# -----------------------------------------------------------------------------
# Optional Triton kernels: the inference forward on CUDA
#
# Used by FocusedLinearAttention when Triton imports, the input is on a CUDA device and nothing
# needs a gradient (FocusedLinearAttention.kernel_path says which path a call takes; 
# flatten.set_fast_path("torch") turns them off). The projections stay cuBLAS GEMMs (self.q, self.kv,
# self.proj); everything between them is two kernels, all arithmetic in float32:
#   keys:    per head and chunk of key tokens, phi_p(k + pe) and its partial K^T V and sum_j k_j
#            (summed over the chunks afterwards, in a fixed order: deterministic);
#   queries: per head and block of query tokens, t^p of the queries (their factor c cancels up to
#            the eps, step 3 of the inference path below), the normalised t^p K^T V, plus the DWC
#            of v over the k x k neighbours of each grid token, read straight from v.
# The focused kernel scales by the per-token maximum, as _Focus does (exact for any p > 0). Loads
# of the q and k rows repeat per head (norms run over all C channels), meant to hit the cache.
# Tested in Triton's interpreter on CPU tensors; not yet timed on a GPU (README). A kernel that
# fails to compile or launch warns once and leaves the torch paths to do the work (_triton_failed).

_TRITON_BLOCK_N = 64      # tokens per tile
_TRITON_PROGRAMS = 512    # about this many programs share the keys' reduction
_TRITON_MAX_HEAD_DIM = 64  # a d x d K^T V tile in float32 registers: at 128 it spills heavily
_FAST_PATH_MODES = ("auto", "torch", "off")
_fast_path_mode = os.environ.get("FLATTEN_FAST_PATH", "auto").strip().lower()
_triton_failures: set = set()  # configurations whose kernels failed to compile or launch


def set_fast_path(mode: str) -> None:
    """Choose the fast paths of FocusedLinearAttention for this process: "auto" (default: every
    one that applies, the Triton kernels on CUDA included), "torch" (the torch ones only) or
    "off" (always the reference forward). The environment variable FLATTEN_FAST_PATH sets the
    mode at import."""
    global _fast_path_mode
    if mode not in _FAST_PATH_MODES:
        raise ValueError(f"fast path mode must be one of {', '.join(_FAST_PATH_MODES)}, got {mode!r}")
    _fast_path_mode = mode


def get_fast_path() -> str:
    """The mode set_fast_path (or FLATTEN_FAST_PATH) chose."""
    if _fast_path_mode not in _FAST_PATH_MODES:
        raise ValueError(f"FLATTEN_FAST_PATH must be one of {', '.join(_FAST_PATH_MODES)}, "
                         f"got {_fast_path_mode!r}")
    return _fast_path_mode


def _on_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


class _TritonFailure(RuntimeError):
    """A Triton kernel failed to compile or launch (the cause is chained)."""


def _triton_failed(key: tuple, error: Exception) -> None:
    """The kernels failed to compile or launch for this configuration (a Triton or GPU they were
    never run on): warn once, and use the torch paths for it from now on (correct, only slower)."""
    _triton_failures.add(key)
    warnings.warn(f"flatten.py: the Triton kernels failed ({type(error).__name__}: {error}); this "
                  "configuration uses the torch path from now on. To skip them: "
                  "flatten.set_fast_path('torch') or FLATTEN_FAST_PATH=torch", RuntimeWarning)


if triton is not None:
    @triton.jit
    def _tl_power(t, p, P_INT: tl.constexpr):
        # t^p, t >= 0: products for the integer powers 1 to 4 (as torch.pow), else exp2(p log2 t)
        if P_INT == 1:
            r = t
        elif P_INT == 2:
            r = t * t
        elif P_INT == 3:
            r = t * t * t
        elif P_INT == 4:
            r = (t * t) * (t * t)
        else:  # 0 stays 0 (masked entries; a clamp to the tiny number would give tiny^p, large for p < 1)
            r = tl.where(t > 0, tl.exp2(p * tl.log2(tl.maximum(t, 1.1754944e-38))), 0.0)
        return r

    @triton.jit
    def _tl_focus_y(z_ptr, row_stride, rows, pe_ptr, pe_rows, s, c, mask, offset, C,
                    HAS_PE: tl.constexpr):
        # y = (ReLU(z + pe) + offset) / s of a (BLOCK_N, D_PAD) tile (0 where masked); s is 1 / scale
        z = tl.load(z_ptr + rows[:, None] * row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_PE:
            z += tl.load(pe_ptr + pe_rows[:, None] * C + c[None, :], mask=mask, other=0.0)
        return tl.where(mask, (tl.maximum(z, 0.0) + offset) * s[None, :], 0.0)

    @triton.jit
    def _tl_focus_stats(z_ptr, row_stride, rows, rmask, pe_ptr, pe_rows, inv_s_ptr, offset, p, C,
                        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, HAS_PE: tl.constexpr,
                        P_INT: tl.constexpr, BLOCK_N: tl.constexpr):
        # per token, over all C channels: m = max(y), ||t|| and ||t^p|| for t = y / m (masked rows: 1)
        cols = tl.arange(0, D_PAD)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        m = tl.zeros([BLOCK_N], dtype=tl.float32)
        for hh in range(H):
            c = hh * D + cols
            s = tl.load(inv_s_ptr + c, mask=cmask, other=0.0)
            y = _tl_focus_y(z_ptr, row_stride, rows, pe_ptr, pe_rows, s, c, mask, offset, C, HAS_PE)
            m = tl.maximum(m, tl.max(y, axis=1))
        m = tl.where(rmask, m, 1.0)
        sum_t2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_tp2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for hh in range(H):
            c = hh * D + cols
            s = tl.load(inv_s_ptr + c, mask=cmask, other=0.0)
            t = _tl_focus_y(z_ptr, row_stride, rows, pe_ptr, pe_rows, s, c, mask, offset, C, HAS_PE) / m[:, None]
            tp = _tl_power(t, p, P_INT)
            sum_t2 += tl.sum(t * t, axis=1)
            sum_tp2 += tl.sum(tp * tp, axis=1)
        return m, tl.sqrt(tl.where(rmask, sum_t2, 1.0)), tl.sqrt(tl.where(rmask, sum_tp2, 1.0))

    @triton.jit
    def _flatten_keys_kernel(k_ptr, v_ptr, row_stride, pe_ptr, inv_s_ptr, kv_ptr, ks_ptr,
                             n, chunk, offset, p, C, H: tl.constexpr, D: tl.constexpr,
                             D_PAD: tl.constexpr, P_INT: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (b, chunk, head): sum over the chunk's key tokens of phi_p(k)^T v and of phi_p(k)
        b, ch, hh = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # 64-bit offsets
        cols = tl.arange(0, D_PAD)
        cmask = cols < D
        c = hh * D + cols
        s = tl.load(inv_s_ptr + c, mask=cmask, other=0.0)
        kv = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
        ks = tl.zeros([D_PAD], dtype=tl.float32)
        for start in range(ch * chunk, tl.minimum(ch * chunk + chunk, n), BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            rmask = tok < n
            rows = b * n + tok
            mask = rmask[:, None] & cmask[None, :]
            m, norm_t, norm_tp = _tl_focus_stats(k_ptr, row_stride, rows, rmask, pe_ptr, tok, inv_s_ptr,
                                                 offset, p, C, H, D, D_PAD, True, P_INT, BLOCK_N)
            t = _tl_focus_y(k_ptr, row_stride, rows, pe_ptr, tok, s, c, mask, offset, C, True) / m[:, None]
            phi = _tl_power(t, p, P_INT) * (norm_t * m / norm_tp)[:, None]   # ||y|| t^p / ||t^p||
            v = tl.load(v_ptr + rows[:, None] * row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
            kv += tl.dot(tl.trans(phi), v, input_precision="ieee")
            ks += tl.sum(phi, axis=0)
        base = (b * tl.num_programs(1) + ch) * H + hh
        tl.store(kv_ptr + base * D_PAD * D_PAD + cols[:, None] * D_PAD + cols[None, :], kv)
        tl.store(ks_ptr + base * D_PAD + cols, ks)

    @triton.jit
    def _flatten_queries_kernel(q_ptr, v_ptr, v_stride, inv_s_ptr, kv_ptr, ks_ptr, w_ptr, bias_ptr,
                                out_ptr, N, GH, GW, PREFIX, offset, p, eps, C, H: tl.constexpr,
                                D: tl.constexpr, D_PAD: tl.constexpr, KS: tl.constexpr,
                                P_INT: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (b, block, head): t^p KV / (t^p . ks + eps / c) + DWC(v) for a block of queries
        b, blk, hh = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        tok = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = tok < N
        rows = b * N + tok
        cols = tl.arange(0, D_PAD)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        c = hh * D + cols
        m, norm_t, norm_tp = _tl_focus_stats(q_ptr, C, rows, rmask, inv_s_ptr, tok, inv_s_ptr,
                                             offset, p, C, H, D, D_PAD, False, P_INT, BLOCK_N)
        s = tl.load(inv_s_ptr + c, mask=cmask, other=0.0)
        tp = _tl_power(_tl_focus_y(q_ptr, C, rows, inv_s_ptr, tok, s, c, mask, offset, C, False) / m[:, None],
                       p, P_INT)
        kv = tl.load(kv_ptr + (b * H + hh) * D_PAD * D_PAD + cols[:, None] * D_PAD + cols[None, :])
        ks = tl.load(ks_ptr + (b * H + hh) * D_PAD + cols)
        den = tl.sum(tp * ks[None, :], axis=1) + eps * norm_tp / (norm_t * m)   # eps / c
        out = tl.dot(tp, kv, input_precision="ieee") / den[:, None]
        # the DWC: grid tokens only (class tokens first), zero padding k // 2
        g = tok - PREFIX
        in_grid = rmask & (g >= 0)
        gi, gj = g // GW, g % GW
        acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for ky in tl.static_range(KS):
            for kx in tl.static_range(KS):
                ii, jj = gi + (ky - KS // 2), gj + (kx - KS // 2)
                ok = in_grid & (ii >= 0) & (ii < GH) & (jj >= 0) & (jj < GW)
                src = b * N + PREFIX + ii * GW + jj
                vv = tl.load(v_ptr + src[:, None] * v_stride + c[None, :],
                             mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols * (KS * KS) + (ky * KS + kx), mask=cmask, other=0.0)
                acc += vv * w[None, :]
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        out += tl.where(in_grid[:, None], acc + bias[None, :], 0.0)
        tl.store(out_ptr + rows[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# Attention modules


class FocusedLinearAttention(nn.Module):
    """Focused linear attention (FLatten), a drop-in for the official module.

    Same constructor, parameter names and shapes as the official code, so an official
    state_dict loads with strict=True; forward(x, H, W) with x (B, N, C) -> (B, N, C).
    num_patches is the token count of the construction grid, which is square unless grid_size
    says otherwise. At any other H x W the learned positional_encoding is resampled as a 2-D grid
    (resample_grid: float32 bicubic); at the construction grid it is used as is.

    Differences from the official module: it runs at any H x W (the official one only at its
    construction grid); attn_drop and qk_scale are accepted and ignored, as there (linear
    attention has no attention matrix to drop out); nothing is printed. Extras, keyword-only:
    grid_size (non-square construction grids), num_prefix_tokens (class tokens that take part
    in the attention but not in the DWC; sr_ratio must then be 1), normalizer ('mean' = current
    official code, 'sum' = the code the released checkpoints were trained with).

    Three ways to the same function (kernel_path(x) says which a call takes): with autograd,
    hand-written backward passes (_Focus, _LinearAttention); without (no_grad, inference_mode
    or a frozen layer; sr_ratio 1, float32 or float64, no autocast), a path with fewer passes
    (_forward_inference); and without autograd on CUDA with Triton installed, two fused kernels
    (_forward_triton). They agree to float32 rounding.
    """

    def __init__(self, dim: int, num_patches: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 sr_ratio: int = 1, focusing_factor: float = 3, kernel_size: int = 5, *,
                 grid_size: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 0,
                 normalizer: str = "mean"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if focusing_factor <= 0:
            raise ValueError(f"focusing_factor must be > 0, got {focusing_factor}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        if num_prefix_tokens and sr_ratio > 1:
            raise ValueError("class tokens (num_prefix_tokens > 0) need sr_ratio = 1")
        _check_normalizer(normalizer)
        if grid_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"num_patches={num_patches} is not a square: pass grid_size=(H, W)")
            grid_size = (side, side)
        grid_size = _to_2tuple(grid_size)
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(f"grid_size {grid_size} does not hold num_patches={num_patches}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.sr_ratio, self.focusing_factor, self.kernel_size = sr_ratio, focusing_factor, kernel_size
        self.num_prefix_tokens, self.normalizer = num_prefix_tokens, normalizer
        self.grid_size = grid_size

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        d = self.head_dim
        # one depthwise kernel over the head dim, shared by all heads (as in the official code)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kh, kw = self.key_grid(*grid_size)
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_prefix_tokens + kh * kw, dim))

    def key_grid(self, H: int, W: int) -> Tuple[int, int]:
        """The grid of key tokens for a query grid H x W (smaller by sr_ratio, floored)."""
        return H // self.sr_ratio, W // self.sr_ratio

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Resample positional_encoding to a new construction grid, permanently."""
        grid_size = _to_2tuple(grid_size)
        with torch.no_grad():
            pe = resample_grid(self.positional_encoding, self.key_grid(*self.grid_size),
                               self.key_grid(*grid_size), self.num_prefix_tokens)
        self.positional_encoding = nn.Parameter(pe.detach().clone())
        self.grid_size = grid_size

    def _positional_encoding(self, kh: int, kw: int) -> torch.Tensor:
        return resample_grid(self.positional_encoding, self.key_grid(*self.grid_size), (kh, kw),
                             self.num_prefix_tokens)

    def _keys_values(self, x: torch.Tensor, H: int, W: int, split: bool = True):
        """k, v (B, n, C) and the key grid; with sr_ratio > 1 from the reduced tokens."""
        B, N, C = x.shape
        if self.sr_ratio > 1:
            x_ = self.sr(x.transpose(1, 2).reshape(B, C, H, W))
            kh, kw = x_.shape[-2:]
            x = self.norm(x_.flatten(2).transpose(1, 2))
        else:
            kh, kw = H, W
        if split:  # two GEMMs on the halves of the kv weight: k and v come out contiguous
            C = self.dim
            w, b = self.kv.weight, self.kv.bias
            k = F.linear(x, w[:C], None if b is None else b[:C])
            v = F.linear(x, w[C:], None if b is None else b[C:])
        else:
            k, v = self.kv(x).chunk(2, dim=-1)
        return k, v, kh, kw

    def _dwc(self, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """DWC(v) over the patch tokens: v (B, n, C) -> (B, H*W, C), raw v (no kernel)."""
        v = _values_to_grid(v, H, W)
        B, _, C = v.shape
        h = self.num_heads
        # The kernel is shared by the heads: tile it over the C = h * d channels and convolve
        # (B, C, H, W) viewed channels-last on v's own memory, instead of copying v into
        # (B * h, d, H, W) as the official code does.
        weight, bias = self.dwc.weight, self.dwc.bias
        if h > 1:  # cat, not repeat: a fraction of the dispatch cost
            weight, bias = torch.cat([weight] * h), torch.cat([bias] * h)
        v = v.reshape(B, H, W, C).permute(0, 3, 1, 2)
        out = _depthwise_conv(v, weight.to(v.dtype), bias.to(v.dtype))
        return out.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        P, h = self.num_prefix_tokens, self.num_heads
        _check_tokens(x, H, W, P, self.dim)
        if self.sr_ratio > 1 and (H < self.sr_ratio or W < self.sr_ratio):
            raise ValueError(f"grid {H}x{W} is smaller than sr_ratio={self.sr_ratio}")
        if x.shape[0] == 0:  # no samples: an empty output (the kernels below need one)
            return self.proj_drop(self.proj(x))
        path = self.kernel_path(x)
        if path == "triton":
            try:
                return self._forward_triton(x, H, W)
            except _TritonFailure as e:
                _triton_failed(self._triton_key(x), e.__cause__)
            path = self.kernel_path(x)
        if path == "inference":
            return self._forward_inference(x, H, W)
        B, N, C = x.shape
        q = self.q(x)
        k, v, kh, kw = self._keys_values(x, H, W)
        pe = self._positional_encoding(kh, kw)
        k = k.add_(pe) if k.dtype == pe.dtype else k + pe  # under autocast: float32, as officially
        scale = F.softplus(self.scale).to(_compute_dtype(q))
        q = _focus_temporary(q, self.focusing_factor, scale)  # norms over all C channels,
        k = _focus_temporary(k, self.focusing_factor, scale)  # before the head split
        q, k, vh = (t.view(B, -1, h, C // h).transpose(1, 2) for t in (q, k, v))  # (B, h, *, d) views
        out = linear_attention(q, k, vh, normalizer=self.normalizer)              # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                                # a view
        dwc = self._dwc(v[:, P:], H, W)                                           # no DWC for class tokens
        # out of place: an in-place add into a slice of a view costs autograd a copy of the whole
        out = torch.cat([out[:, :P], out[:, P:] + dwc], dim=1) if P else out + dwc
        return self.proj_drop(self.proj(out))

    # --- inference path: no autograd, sr_ratio 1, float32 / float64 ---------------------------
    #
    # The same function as forward, computed with fewer passes over the tokens, for when nothing
    # needs a gradient:
    #   1. The softplus scale s > 0 and the offset o = 1e-6 fold into the q and k projections:
    #      (ReLU(z) + o) / s = max(z / s + o / s, o / s). So GEMMs with Wq / s and Wk / s (biases
    #      b / s + o / s; the k GEMM adds onto (pe + bk) / s + o / s, written first), then one
    #      clamp against the floor o / s, give y for q and k in two contiguous blocks, (2, B * N, C).
    #   2. phi_p(y) = ||y|| t^p / ||t^p|| for t = y / lambda with any lambda > 0 per token, so
    #      phi = c t^p with c = ||y|| / ||t^p||. lambda = 2^-e ||y|| costs no pass of its own
    #      (||y|| is needed anyway): t lies in [0, 2^e] and its largest entry is at least
    #      2^e C^(-1/2), so the sum of squares behind ||t^p|| (vector_norm does not rescale) lies
    #      in [2^(2pe) C^(-p), 2^(2pe) C]. _norm_scale_exponent picks e to keep both ends
    #      _NORM_SCALED_MARGIN binary orders inside the normal range (for p up to 22 at C = 192,
    #      24 at C = 64), and as large as that allows: at e = 0 the entries of tokens near the
    #      floor o / s are subnormal in t^(2p), and x86 is much slower on those.
    #      Beyond that lambda = max(y), as in _Focus: t has a 1 in every token and ||t^p|| >= 1
    #      for any p. (||y|| itself needs y^2 to stay normal: y above ~1e-19, i.e. s below ~1e13
    #      in float32; the official formulation already fails there, as y^p underflows.)
    #   3. The per-token factor c of the queries cancels between numerator and normaliser, up to
    #      the eps, which it rescales: with q = c t^p,
    #          q KV / (q . ks + eps) = t^p KV / (t^p . ks + eps / c),
    #      exact algebra (c > 0, eps included), so only the keys are multiplied by their c.
    #   4. q, k and v share one buffer (3, B * N, C). glibc's malloc returns a freed block above
    #      its mmap threshold to the system, and trims the top of the heap beyond twice that
    #      threshold; either way the next call page-faults the memory in again (bench.py
    #      reports page faults per call). The threshold follows the largest block freed (up to
    #      32 MB): one block of 3 N C is meant to keep the path's other temporaries (the DWC,
    #      the output; N C each) below twice it, so that the heap keeps its pages between calls.
    #      How often that holds depends on what else the process allocates (README).
    #   5. q KV goes into the spent k block, and r q KV + DWC(v) is one pass over it (addcmul).
    # The folded weights are derived on every call (a few C x C operations), not cached: a cache
    # could not see parameters changed in place through .data.

    def kernel_path(self, x: torch.Tensor) -> str:
        """Which implementation forward(x, H, W) takes: "triton" (CUDA, Triton installed and
        fast path "auto", nothing needs a gradient, head_dim <= 64, float32 / bfloat16 / float16),
        "inference" (_forward_inference: no gradient needed, sr_ratio 1, float32 or float64, no
        autocast) or "general" (forward's own code with the hand-written backward passes: the
        rest, autograd included)."""
        if _is_compiling() or (torch.is_grad_enabled()
                               and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return "general"
        mode = get_fast_path()
        if mode == "off":
            return "general"
        if (triton is not None and mode == "auto" and _on_cuda(x) and self.head_dim <= _TRITON_MAX_HEAD_DIM
                and x.dtype in (torch.float32,) + _HALF and self._triton_key(x) not in _triton_failures):
            return "triton"
        if (self.sr_ratio != 1 or x.dtype in _HALF or x.dtype != self.scale.dtype
                or _autocast_enabled(x.device.type)):
            return "general"
        return "inference"

    def _triton_key(self, x: torch.Tensor) -> tuple:
        return (x.device, x.dtype, self.head_dim, self.num_heads, self.kernel_size, float(self.focusing_factor))

    def _forward_inference(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        h, d, P, p = self.num_heads, self.head_dim, self.num_prefix_tokens, self.focusing_factor
        inv = F.softplus(self.scale.reshape(C)).reciprocal_()          # 1 / s
        floor = inv * 1e-6                                             # o / s
        rows = inv.view(C, 1)
        bq, bkv = self.q.bias, self.kv.bias
        # q and k in two blocks, (2, B * N, C): every pass below runs over contiguous memory;
        # v in a third block of the same buffer (step 4)
        qkv = x.new_empty(3, B * N, C)
        y, v = qkv[:2], qkv[2].view(B, N, C)
        x2 = x.reshape(B * N, C)
        torch.addmm(floor if bq is None else torch.addcmul(floor, bq, inv), x2, (self.q.weight * rows).t(),
                    out=y[0])
        # k: (pe + bk) / s + o / s written first, the GEMM adds onto it (no pass of its own for pe)
        bk = floor if bkv is None else torch.addcmul(floor, bkv[:C], inv)
        yk = y[1]
        torch.addcmul(bk, self._positional_encoding(H, W).expand(B, N, C), inv, out=yk.view(B, N, C))
        torch.addmm(yk, x2, (self.kv.weight[:C] * rows).t(), out=yk)  # (not addmm_: flop counters miss it)
        wv = self.kv.weight[C:].t()                             # now, while x is in cache
        if bkv is None:
            torch.mm(x2, wv, out=qkv[2])
        else:
            torch.addmm(bkv[C:], x2, wv, out=qkv[2])
        y.clamp_min_(floor)                                     # y of q and of k, >= o / s > 0
        e = _norm_scale_exponent(p, C, y.dtype)
        if e is not None:
            a = torch.linalg.vector_norm(y, dim=-1, keepdim=True)   # ||y||
            t = y.div_(a * 2.0 ** -e)                           # 2^e y / ||y||
        else:
            m = y.amax(dim=-1, keepdim=True)
            t = y.div_(m)
            a = torch.linalg.vector_norm(t, dim=-1, keepdim=True).mul_(m)
        if p != 1:
            t.pow_(p)
        c = a.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True))   # phi = c t^p
        # the queries t^p are up to 2^(pe): the keys take 2^(-pe) (their phi times 2^(-pe)), so
        # that q KV keeps the magnitude of phi(q) KV; the normaliser's eps / c follows (step 3)
        back = 1.0 if e is None else 2.0 ** (-p * e)
        t[1].mul_(c[1].mul_(back))                              # the keys' phi 2^(-pe); queries: step 3
        q, k = y.view(2, B, N, h, d).transpose(2, 3)             # (B, h, N, d) views
        kv = _head_matmul(k.transpose(-2, -1), v.view(B, N, h, d).transpose(1, 2))
        eps = 1e-6 * N if self.normalizer == "mean" else 1e-6  # as in linear_attention
        eps = c[0].view(B, 1, N).reciprocal_().mul_(eps * back)  # 2^(-pe) eps / c of every query
        r = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=-2)).add_(eps).reciprocal_().unsqueeze(-1)
        # step 5: k is spent, q KV goes into its block of y (one large buffer fewer per call)
        _head_matmul(q, kv, out=k)
        dwc = self._dwc(v[:, P:], H, W).view(B, N - P, h, d).transpose(1, 2)
        torch.addcmul(dwc, k[:, :, P:], r[:, :, P:], out=k[:, :, P:])
        del dwc  # before the projection allocates its output: the peak stays at 4 N C
        if P:
            k[:, :, :P].mul_(r[:, :, :P])
        return self.proj_drop(self.proj(yk.view(B, N, C)))

    def _forward_triton(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """forward through the two Triton kernels (see the Triton section); no autograd."""
        B, N, C = x.shape
        h, d, P = self.num_heads, self.head_dim, self.num_prefix_tokens
        p = float(self.focusing_factor)
        q = self.q(x)                                           # (B, N, C), contiguous
        k, v, kh, kw = self._keys_values(x, H, W, split=False)  # views of one (B, n, 2C) tensor
        n = k.shape[1]
        if n == N:
            v_grid, v_stride = v, 2 * C
        else:  # sr_ratio > 1 (no class tokens): v back to N tokens, as in _dwc
            v_grid, v_stride = _values_to_grid(v, H, W).contiguous(), C
        pe = self._positional_encoding(kh, kw).reshape(n, C).float().contiguous()
        inv_s = F.softplus(self.scale).reshape(C).float().reciprocal()
        p_int = int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
        d_pad = max(16, triton.next_power_of_2(d))
        bn = _TRITON_BLOCK_N
        # the keys in chunks of whole tiles, about _TRITON_PROGRAMS programs in all
        chunk = triton.cdiv(triton.cdiv(n, max(1, _TRITON_PROGRAMS // (B * h))), bn) * bn
        chunks = triton.cdiv(n, chunk)
        kv = x.new_empty((B, chunks, h, d_pad, d_pad), dtype=torch.float32)
        ks = x.new_empty((B, chunks, h, d_pad), dtype=torch.float32)
        eps = 1e-6 * n if self.normalizer == "mean" else 1e-6  # as in linear_attention
        weight = self.dwc.weight.reshape(d, -1).float().contiguous()
        out = torch.empty_like(q)
        bias, warps = self.dwc.bias.float(), 8 if d_pad >= 64 else 4  # 8 warps: fewer register spills
        # Only the launches are guarded: their compile errors and out-of-resources become a
        # _TritonFailure (forward falls back); errors of the torch ops above raise as usual. (A
        # fault inside a running kernel surfaces later, as a CUDA error, and cannot be caught here.)
        try:  # Triton launches on the current CUDA device: make it x's
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                _flatten_keys_kernel[(B, chunks, h)](k, v, 2 * C, pe, inv_s, kv, ks, n, chunk, 1e-6, p,
                                                     C, h, d, d_pad, p_int, bn, num_warps=warps)
                kv, ks = kv.sum(dim=1), ks.sum(dim=1)           # (B, h, d_pad, d_pad), (B, h, d_pad)
                _flatten_queries_kernel[(B, triton.cdiv(N, bn), h)](
                    q, v_grid, v_stride, inv_s, kv, ks, weight, bias, out,
                    N, H, W, P, 1e-6, p, eps, C, h, d, d_pad, self.kernel_size, p_int, bn, num_warps=warps)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - compile, PTX assembly or launch failures
            raise _TritonFailure(str(e)) from e
        return self.proj_drop(self.proj(out))


def official_forward(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int,
                     normalizer: str = "mean") -> torch.Tensor:
    """The official formulation, op by op (FACTS.md section 2), on a layer's own weights.

    The baseline bench.py measures our speed against, and a second reference for the tests.
    The official order of operations (power without rescaling, n^-1/2 on both K^T and V, a
    (B*h, d, H, W) copy of v for the DWC) and the official precision (none raised). It uses the
    layer's positional encoding resampled to H x W, so it runs at any size; sr_ratio any; class
    tokens (num_prefix_tokens) as in FocusedLinearAttention: in the attention, not in the DWC.
    """
    B, N, C = x.shape
    h, p = layer.num_heads, layer.focusing_factor
    q = layer.q(x)
    k, v, kh, kw = layer._keys_values(x, H, W, split=False)
    n = k.shape[1]
    k = k + layer._positional_encoding(kh, kw)
    scale = F.softplus(layer.scale)
    q = F.relu(q) + 1e-6
    k = F.relu(k) + 1e-6
    q = q / scale
    k = k / scale
    q_norm = q.norm(dim=-1, keepdim=True)
    k_norm = k.norm(dim=-1, keepdim=True)
    q = q ** p
    k = k ** p
    q = (q / q.norm(dim=-1, keepdim=True)) * q_norm
    k = (k / k.norm(dim=-1, keepdim=True)) * k_norm
    q, k, v = (t.reshape(B, -1, h, C // h).permute(0, 2, 1, 3) for t in (q, k, v))
    if normalizer == "mean":
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    else:
        z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = k.transpose(-2, -1) @ v
    out = q @ kv * z
    if layer.sr_ratio > 1:
        v = F.interpolate(v.transpose(-2, -1).reshape(B * h, -1, n), size=N, mode="linear")
        v = v.reshape(B, h, -1, N).transpose(-2, -1)
    P = layer.num_prefix_tokens
    fmap = v[:, :, P:].transpose(-2, -1).reshape(B * h, -1, H, W)
    fmap = layer.dwc(fmap).reshape(B, h, -1, H * W).transpose(-2, -1)
    if P:
        fmap = torch.cat([torch.zeros_like(out[:, :, :P]), fmap], dim=2)
    out = (out + fmap).transpose(1, 2).reshape(B, N, C)
    return layer.proj_drop(layer.proj(out))


@torch.no_grad()
def attention_map(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int,
                  with_dwc: bool = False) -> torch.Tensor:
    """The equivalent attention matrix of a FocusedLinearAttention layer for input x.

    Without the DWC: A (B, h, N, N) (rows: queries, columns: tokens of v), so that the attention
    part of the output before proj is A @ v per head; with sr_ratio > 1 its columns are the n
    reduced tokens. With the DWC: A + M_c per channel c of the head, (B, h, d, N, N), where M_c is
    the DWC's matrix (dwc_matrix; for sr_ratio > 1 composed with the 1-D interpolation). For
    visualising attention (the paper's Fig. 3 and 5) and for rank analysis.
    """
    B, N, C = x.shape
    h, P = layer.num_heads, layer.num_prefix_tokens
    _check_tokens(x, H, W, P, layer.dim)
    q = layer.q(x)
    k, _, kh, kw = layer._keys_values(x, H, W)
    k = k + layer._positional_encoding(kh, kw)
    scale = F.softplus(layer.scale)
    q, k = focus(q, layer.focusing_factor, scale), focus(k, layer.focusing_factor, scale)
    q, k = (t.reshape(B, -1, h, C // h).transpose(1, 2) for t in (q, k))
    A = linear_attention_matrix(q, k, normalizer=layer.normalizer)  # (B, h, N, n)
    if not with_dwc:
        return A
    n = A.shape[-1]
    M = dwc_matrix(layer.dwc.weight.to(A.dtype), H, W)  # (d, HW, HW) acting on interpolated v
    if n - P != H * W:
        interp = torch.eye(n - P, dtype=A.dtype, device=A.device).unsqueeze(0)
        interp = F.interpolate(interp, size=H * W, mode="linear", align_corners=False)[0].T
        M = M @ interp                                   # (d, HW, n)
    full = torch.zeros(M.shape[0], N, n, dtype=A.dtype, device=A.device)
    full[:, P:, P:] = M
    return A.unsqueeze(2) + full                         # (B, h, d, N, n)


class SoftmaxAttention(nn.Module):
    """PVT-style softmax attention: the baseline, with the same projections and forward(x, H, W).

    q, kv, proj, and for sr_ratio > 1 the spatial reduction sr (Conv2d k = stride = sr_ratio) and
    norm (LayerNorm) applied to the keys' and values' tokens. fused=True computes it with
    F.scaled_dot_product_attention, fused=False with the explicit N x n matrix (the reference;
    both are tested equal). num_prefix_tokens: class tokens, kept out of the spatial reduction.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 sr_ratio: int = 1, *, fused: bool = True, num_prefix_tokens: int = 0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.sr_ratio, self.fused, self.num_prefix_tokens = sr_ratio, fused, num_prefix_tokens
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        P, h = self.num_prefix_tokens, self.num_heads
        _check_tokens(x, H, W, P, self.dim)
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, h, -1).transpose(1, 2)        # (B, h, N, d)
        if self.sr_ratio > 1:
            if H < self.sr_ratio or W < self.sr_ratio:
                raise ValueError(f"grid {H}x{W} is smaller than sr_ratio={self.sr_ratio}")
            grid = self.sr(x[:, P:].transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
            x = self.norm(torch.cat([x[:, :P], grid], dim=1) if P else grid)
        k, v = self.kv(x).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, n, d)
        if self.fused:
            drop = self.attn_drop.p if self.training else 0.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale               # (B, h, N, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class VanillaLinearAttention(nn.Module):
    """Plain linear attention (the paper's Table 4 baseline): ReLU kernel, no focusing, no DWC.

    out_i = phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j) + eps), phi = ReLU. Same
    projections and forward(x, H, W) as FocusedLinearAttention.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, eps: float = 1e-6, *,
                 num_prefix_tokens: int = 0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.eps = dim, num_heads, eps
        self.num_prefix_tokens = num_prefix_tokens
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        _check_tokens(x, H, W, self.num_prefix_tokens, self.dim)
        B, N, C = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, N, self.num_heads, -1).transpose(1, 2) for t in (self.q(x), k, v))
        out = linear_attention(F.relu(q), F.relu(k), v, eps=self.eps, normalizer="sum")
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class L2ViTLinearAttention(nn.Module):
    """L^2ViT's global linear attention followed by its Local Concentration Module (LCM).

    Attention, per head: a_i = q_i (K^T V * t) / max(q_i . sum_j k_j, 100), ReLU kernel on q and
    k, t a learnable per-head temperature initialised to d^-1/2, then proj. The LCM (depthwise
    7x7 conv, GELU, BatchNorm, depthwise 7x7 conv over the patch-token grid) is its own pre-norm
    residual branch after the attention. forward(x, H, W) returns the sum of both branches'
    updates, a + LCM(LN(x + a)), so that x + forward(x) is L^2ViT's x + a, then + LCM(LN(.)).
    Class tokens (num_prefix_tokens) take part in the attention but not in the LCM.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, lcm_kernel: int = 7, *,
                 num_prefix_tokens: int = 0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_prefix_tokens = dim, num_heads, num_prefix_tokens
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.full((1, num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.lcm_norm = nn.LayerNorm(dim)
        pad = lcm_kernel // 2
        self.lcm = nn.Sequential(
            nn.Conv2d(dim, dim, lcm_kernel, padding=pad, groups=dim), nn.GELU(), nn.BatchNorm2d(dim),
            nn.Conv2d(dim, dim, lcm_kernel, padding=pad, groups=dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        P = self.num_prefix_tokens
        _check_tokens(x, H, W, P, self.dim)
        B, N, C = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, N, self.num_heads, -1).transpose(1, 2) for t in (self.q(x), k, v))
        q, k = F.relu(q), F.relu(k)
        kv = (k.transpose(-2, -1) @ v) * self.temperature                         # (B, h, d, d)
        z = (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)).clamp_min(100.)  # (B, h, N, 1)
        a = self.proj(((q @ kv) / z).transpose(1, 2).reshape(B, N, C))
        grid = self.lcm_norm(x[:, P:] + a[:, P:]).transpose(1, 2).reshape(B, C, H, W)
        lcm = self.lcm(grid).flatten(2).transpose(1, 2)
        return torch.cat([a[:, :P], a[:, P:] + lcm], dim=1) if P else a + lcm


# -----------------------------------------------------------------------------
# Building blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> [3x3 depthwise conv on the token grid (PVTv2)] -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0., dwconv: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            x = self.dwconv(x, H, W)
        return self.drop(self.fc2(self.drop(self.act(x))))


class DWConv(nn.Module):
    """3x3 depthwise conv over (B, H*W, C) tokens (PVTv2's MLP); keeps the official key names."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm: (B, C_in, H, W) -> tokens (B, H'*W', C), H', W'."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, padding: int = 0,
                 norm: bool = True):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def out_size(self, H: int, W: int) -> Tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x), H, W); x + mlp(norm2(x), H, W).

    attn_type 'L' is focused linear attention, 'S' softmax attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: Tuple[int, int], *,
                 attn_type: str = "L", sr_ratio: int = 1, qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., focusing_factor: float = 3,
                 kernel_size: int = 5, mlp_dwconv: bool = False, num_prefix_tokens: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == "L":
            self.attn = FocusedLinearAttention(
                dim, grid_size[0] * grid_size[1], num_heads, qkv_bias, None, attn_drop, drop,
                sr_ratio, focusing_factor, kernel_size, grid_size=grid_size,
                num_prefix_tokens=num_prefix_tokens)
        elif attn_type == "S":
            self.attn = SoftmaxAttention(dim, num_heads, qkv_bias, None, attn_drop, drop, sr_ratio,
                                         num_prefix_tokens=num_prefix_tokens)
        else:
            raise ValueError(f"attn_type must be 'L' (focused linear) or 'S' (softmax), got {attn_type!r}")
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, dwconv=mlp_dwconv)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _check_image(x: torch.Tensor, in_chans: int, min_hw: Tuple[int, int], name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects images (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name} expects {in_chans} input channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[2] < min_hw[0] or x.shape[3] < min_hw[1]:
        raise ValueError(f"{name} needs images of at least {min_hw[0]}x{min_hw[1]} "
                         f"(one patch in its last stage), got {x.shape[2]}x{x.shape[3]}")


class _Classifier(nn.Module):
    """The timm-style head API shared by the backbones."""

    num_classes: int
    num_features: int

    def _make_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier; num_classes=0 makes forward return pooled features."""
        self._make_head(num_classes)
        if num_classes > 0:
            _init_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -----------------------------------------------------------------------------
# FLatten-PVT and FLatten-PVTv2


@dataclass(frozen=True)
class PVTConfig:
    """A PVT (version 1) or PVTv2 (version 2) backbone; per-stage tuples have 4 entries.

    attn_type has one letter per stage: 'L' focused linear attention, 'S' softmax. Softmax stages
    use sr_ratios, focused linear ones la_sr_ratios (the FLatten models: all 1).
    """
    version: int = 1
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: Tuple[int, ...] = (64, 128, 320, 512)
    num_heads: Tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4)
    depths: Tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: Tuple[int, ...] = (8, 4, 2, 1)
    la_sr_ratios: Tuple[int, ...] = (1, 1, 1, 1)
    attn_type: str = "LLLL"
    qkv_bias: bool = True
    drop_rate: float = 0.
    attn_drop_rate: float = 0.
    drop_path_rate: float = 0.
    focusing_factor: float = 3
    kernel_size: int = 5


class PyramidVisionTransformer(_Classifier):
    """FLatten-PVT (version 1) and FLatten-PVTv2 (version 2), with the official state_dict keys.

    Version 1: non-overlapping patch embeddings (patch_size, then 2), a learned pos_embed per
    stage, MLP fc1-GELU-fc2. Version 2: overlapping patch embeddings (7/4 then 3/2), no
    pos_embed, MLP with a 3x3 depthwise conv, a LayerNorm after every stage. Both: mean over the
    last stage's tokens, then head. Unlike the official v1 class there is no final `norm` (it was
    never applied; load_pretrained drops it), and every position table is resampled to the input
    size, so the model runs at any H x W.
    """

    def __init__(self, cfg: PVTConfig):
        super().__init__()
        if cfg.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {cfg.version}")
        for name in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios", "la_sr_ratios"):
            if len(getattr(cfg, name)) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), got {getattr(cfg, name)}")
        if len(cfg.attn_type) != 4:
            raise ValueError(f"attn_type needs 4 letters, got {cfg.attn_type!r}")
        self.cfg = cfg
        self.num_features = cfg.embed_dims[-1]
        img_size = _to_2tuple(cfg.img_size)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.grid_sizes: List[Tuple[int, int]] = []
        hw, cur = img_size, 0
        for i in range(4):
            in_chans = cfg.in_chans if i == 0 else cfg.embed_dims[i - 1]
            if cfg.version == 1:
                k = cfg.patch_size if i == 0 else 2
                embed = PatchEmbed(in_chans, cfg.embed_dims[i], k, k)
            else:
                k, s = (7, 4) if i == 0 else (3, 2)
                embed = PatchEmbed(in_chans, cfg.embed_dims[i], k, s, k // 2)
            hw = embed.out_size(*hw)
            if min(hw) < 1:
                raise ValueError(f"img_size {img_size} leaves no tokens in stage {i + 1}")
            self.grid_sizes.append(hw)
            setattr(self, f"patch_embed{i + 1}", embed)
            if cfg.version == 1:
                setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, hw[0] * hw[1], cfg.embed_dims[i])))
            linear = cfg.attn_type[i] == "L"
            blocks = nn.ModuleList([
                Block(cfg.embed_dims[i], cfg.num_heads[i], cfg.mlp_ratios[i], hw,
                      attn_type=cfg.attn_type[i],
                      sr_ratio=cfg.la_sr_ratios[i] if linear else cfg.sr_ratios[i],
                      qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                      drop_path=dpr[cur + j], focusing_factor=cfg.focusing_factor,
                      kernel_size=cfg.kernel_size, mlp_dwconv=cfg.version == 2)
                for j in range(cfg.depths[i])])
            cur += cfg.depths[i]
            setattr(self, f"block{i + 1}", blocks)
            if cfg.version == 2:
                setattr(self, f"norm{i + 1}", nn.LayerNorm(cfg.embed_dims[i], eps=1e-6))
        self._make_head(cfg.num_classes)
        self.apply(_init_weights)
        for i in range(1, 5):
            if cfg.version == 1:
                nn.init.trunc_normal_(getattr(self, f"pos_embed{i}"), std=.02)
        self._min_size = self._smallest_input()

    def _smallest_input(self) -> Tuple[int, int]:
        """The smallest image (per side) that leaves one token in the last stage."""
        side = 1
        while True:
            s = side
            for i in range(1, 5):
                s = getattr(self, f"patch_embed{i}").out_size(s, s)[0]
            if s >= 1:
                return side, side
            side += 1

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample every position table to a new input size, permanently (for fine-tuning)."""
        hw = _to_2tuple(img_size)
        for i in range(1, 5):
            hw = getattr(self, f"patch_embed{i}").out_size(*hw)
            if self.cfg.version == 1:
                pe = getattr(self, f"pos_embed{i}")
                with torch.no_grad():
                    new = resample_grid(pe, self.grid_sizes[i - 1], hw)
                setattr(self, f"pos_embed{i}", nn.Parameter(new.detach().clone()))
            for blk in getattr(self, f"block{i}"):
                if isinstance(blk.attn, FocusedLinearAttention):
                    blk.attn.set_grid_size(hw)
            self.grid_sizes[i - 1] = hw
        self.cfg = replace(self.cfg, img_size=img_size)

    def _stages(self, x: torch.Tensor):
        """Yield each stage's output tokens (B, H*W, C_i) with H, W."""
        _check_image(x, self.cfg.in_chans, self._min_size, type(self).__name__)
        B = x.shape[0]
        for i in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            if self.cfg.version == 1:
                x = self.pos_drop(x + resample_grid(getattr(self, f"pos_embed{i}"), self.grid_sizes[i - 1], (H, W)))
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            if self.cfg.version == 2:
                x = getattr(self, f"norm{i}")(x)
            yield x, H, W
            x = x.transpose(1, 2).reshape(B, -1, H, W)

    def forward_intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four stage outputs as feature maps [(B, C_i, H_i, W_i)] for dense prediction."""
        return [t.transpose(1, 2).reshape(t.shape[0], -1, H, W) for t, H, W in self._stages(x)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last stage's tokens (B, N_4, C_4)."""
        for x, _, _ in self._stages(x):
            pass
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)


# -----------------------------------------------------------------------------
# FLatten-DeiT (the paper's DeiT variant; no official code exists)


@dataclass(frozen=True)
class DeiTConfig:
    """A DeiT (ViT with a class token) with focused linear ('L') or softmax ('S') attention."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.
    attn_type: str = "L"
    qkv_bias: bool = True
    drop_rate: float = 0.
    attn_drop_rate: float = 0.
    drop_path_rate: float = 0.
    focusing_factor: float = 3
    kernel_size: int = 5


class VisionTransformer(_Classifier):
    """FLatten-DeiT and DeiT: patch 16 embedding, a class token, pos_embed, pre-norm blocks.

    Design (the DeiT code of the paper was never released): every block uses focused linear
    attention; the class token takes part in the attention as a query and as a key (with its
    own row of the layer's positional_encoding), and the DWC runs over the patch-token grid only
    (the class token's output has no DWC term), as in the lab's sibling methods. The classifier
    reads the normalised class token. All position tables are resampled to the input size.
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        if cfg.attn_type not in ("L", "S"):
            raise ValueError(f"attn_type must be 'L' or 'S', got {cfg.attn_type!r}")
        self.cfg = cfg
        self.num_features = cfg.embed_dim
        p = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, p, p, norm=False)
        self.grid_size = self.patch_embed.out_size(*_to_2tuple(cfg.img_size))
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {cfg.img_size} is smaller than one {p}x{p} patch")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, self.grid_size, attn_type=cfg.attn_type,
                  qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                  drop_path=dpr[i], focusing_factor=cfg.focusing_factor,
                  kernel_size=cfg.kernel_size, num_prefix_tokens=1)
            for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self._make_head(cfg.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample pos_embed and every positional_encoding to a new input size, permanently."""
        hw = self.patch_embed.out_size(*_to_2tuple(img_size))
        with torch.no_grad():
            new = resample_grid(self.pos_embed, self.grid_size, hw, num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(new.detach().clone())
        for blk in self.blocks:
            if isinstance(blk.attn, FocusedLinearAttention):
                blk.attn.set_grid_size(hw)
        self.grid_size = hw
        self.cfg = replace(self.cfg, img_size=img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised tokens (B, 1 + N, C), the class token first."""
        p = self.cfg.patch_size
        _check_image(x, self.cfg.in_chans, (p, p), type(self).__name__)
        x, H, W = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + resample_grid(self.pos_embed, self.grid_size, (H, W), num_prefix_tokens=1))
        for blk in self.blocks:
            x = blk(x, H, W)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)


# -----------------------------------------------------------------------------
# Factories

_PVT_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}
_PVT_V2_DEPTHS = {"b0": (2, 2, 2, 2), "b1": (2, 2, 2, 2), "b2": (3, 4, 6, 3), "b3": (3, 4, 18, 3),
                  "b4": (3, 8, 27, 3), "b5": (3, 6, 40, 3)}
_DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _pvt_v2_config(size: str) -> dict:
    cfg = dict(version=2, depths=_PVT_V2_DEPTHS[size])
    if size == "b0":
        cfg["embed_dims"] = (32, 64, 160, 256)
    if size == "b5":
        cfg["mlp_ratios"] = (4, 4, 4, 4)
    return cfg


_MODELS: Dict[str, Tuple[type, dict]] = {}
for _s, _d in _PVT_DEPTHS.items():
    _MODELS[f"flatten_pvt_{_s}"] = (PVTConfig, dict(depths=_d))
    _MODELS[f"pvt_{_s}"] = (PVTConfig, dict(depths=_d, attn_type="SSSS"))
for _s in _PVT_V2_DEPTHS:
    _MODELS[f"flatten_pvt_v2_{_s}"] = (PVTConfig, _pvt_v2_config(_s))
    _MODELS[f"pvt_v2_{_s}"] = (PVTConfig, dict(_pvt_v2_config(_s), attn_type="SSSS"))
for _s, (_c, _h) in _DEIT_SIZES.items():
    _MODELS[f"flatten_deit_{_s}"] = (DeiTConfig, dict(embed_dim=_c, num_heads=_h))
    _MODELS[f"deit_{_s}"] = (DeiTConfig, dict(embed_dim=_c, num_heads=_h, attn_type="S"))


def list_models(pattern: str = "") -> List[str]:
    """Names create_model knows, optionally those containing `pattern`."""
    return sorted(name for name in _MODELS if pattern in name)


def create_model(name: str, checkpoint: Union[None, str, os.PathLike, dict] = None,
                 **overrides) -> nn.Module:
    """Build a model by name; overrides replace config fields (img_size, num_classes, depths, ...).

    With checkpoint (a path or a state dict), load it through load_pretrained.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cfg_cls, base = _MODELS[name]
    known = {f.name for f in fields(cfg_cls)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"{name} has no config field {', '.join(bad)}; fields: {', '.join(sorted(known))}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    cfg = cfg_cls(**{**base, **tuples})
    model = (PyramidVisionTransformer if cfg_cls is PVTConfig else VisionTransformer)(cfg)
    if checkpoint is not None:
        load_pretrained(model, checkpoint)
    return model


def _factory(name: str):
    def build(**overrides) -> nn.Module:
        return create_model(name, **overrides)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Build {name}; keyword arguments override its config fields."
    return build


for _name in _MODELS:
    globals()[_name] = _factory(_name)
    __all__.append(_name)


# -----------------------------------------------------------------------------
# Checkpoint loading


def _inert_class(qualified: str) -> type:
    """A stand-in for a class or function pickled in a checkpoint (a training config, say).

    The weights-only unpickler "constructs" it instead of importing and running the real thing:
    every construction gives an empty OrderedDict (which the unpickler then fills with the
    pickled items and attributes, as plain data). Nothing from the file is executed.
    """
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name,
                           "__new__": lambda cls, *args, **kwargs: OrderedDict()})


def _torch_load(path: Union[str, os.PathLike]) -> dict:
    """torch.load with weights_only=True; never executes pickled code.

    The released official checkpoints also pickle a config object (a yacs CfgNode) next to the
    weights, which weights_only=True refuses. Such classes are replaced by inert stand-ins
    (torch >= 2.5), so the tensors come out and nothing from the file runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        ser = torch.serialization
        if not hasattr(ser, "get_unsafe_globals_in_checkpoint"):
            raise ValueError(
                f"{path} holds pickled objects besides tensors and this torch ({torch.__version__}) "
                "cannot read around them safely; upgrade to torch >= 2.5, or, if you trust the file, "
                "re-save its weights once: torch.save(torch.load(path, weights_only=False)['model'], "
                "'weights.pth')") from err
        names = ser.get_unsafe_globals_in_checkpoint(path)
        try:
            with ser.safe_globals([_inert_class(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err2:  # e.g. a global of a blocked module such as os
            raise ValueError(f"refused to load {path}: it pickles {', '.join(sorted(names))}, which "
                             "weights_only loading will not even stand in for") from err2


def _unwrap(checkpoint: dict) -> Dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    sd = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]})")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _square_grid(rows: int, key: str) -> Tuple[int, int]:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"cannot tell the grid of {key} ({rows} positions, not a square): build the "
                         "model at the checkpoint's size, load, then call set_input_size")
    return side, side


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a (possibly official) state_dict to `model`; a pure function of its inputs.

    Drops the official v1 `norm` (never applied) when the model has none; resamples pos_embed*
    and positional_encoding tables whose size differs (the checkpoint's grids are taken as
    square, as the official models are); keeps the model's own classifier when the checkpoint's
    has another shape (another num_classes, or num_classes=0).
    """
    own = model.state_dict()
    out = {}
    head = [k for k in own if k.startswith("head.")]
    if any(k in state_dict and state_dict[k].shape != own[k].shape for k in head) or \
            (not head and any(k.startswith("head.") for k in state_dict)):
        # another num_classes: keep the model's own (freshly initialised) classifier
        state_dict = {**{k: v for k, v in state_dict.items() if not k.startswith("head.")},
                      **{k: own[k] for k in head}}
    for key, value in state_dict.items():
        if key.startswith("norm.") and key not in own and isinstance(model, PyramidVisionTransformer):
            continue
        target = own.get(key)
        if target is not None and target.shape != value.shape and value.dim() == 3 \
                and (key.startswith("pos_embed") or key.endswith("positional_encoding")):
            prefix, new_hw = _table_layout(model, key)
            value = resample_grid(value, _square_grid(value.shape[1] - prefix, key), new_hw, prefix)
        out[key] = value
    return out


def _table_layout(model: nn.Module, key: str) -> Tuple[int, Tuple[int, int]]:
    """(class tokens, grid) of a position table of `model`."""
    if key.endswith("positional_encoding"):
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        return layer.num_prefix_tokens, layer.key_grid(*layer.grid_size)
    if isinstance(model, VisionTransformer):
        return 1, model.grid_size
    return 0, model.grid_sizes[int(key[len("pos_embed"):]) - 1]


def load_pretrained(model: nn.Module, checkpoint: Union[str, os.PathLike, dict], strict: bool = True):
    """Load a checkpoint (path or dict) into `model`: official FLatten files or our own.

    A path is read with torch.load(weights_only=True): no pickled code runs (see _torch_load for
    the config objects of the released files). Unwraps 'model' / 'state_dict' containers and a
    'module.' prefix, adapts keys and sizes with checkpoint_filter_fn, then loads. Any key still
    missing, unexpected or of another shape raises one ValueError that lists them all.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = _torch_load(checkpoint)
    sd = checkpoint_filter_fn(_unwrap(checkpoint), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or shapes):
        parts = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    return model.load_state_dict(sd, strict=strict)
