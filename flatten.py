"""Focused linear attention and the FLatten backbones, in one file.

FLatten Transformer: Vision Transformer using Focused Linear Attention. Han, Pan, Han, Song,
Huang; ICCV 2023 (arXiv 2308.00442). Official code: github.com/LeapLabTHU/FLatten-Transformer.

torch and the Python standard library only: copy this file into your project. Top to bottom:
  1. the method: the focused kernel phi_p (focus), linear attention (linear_attention) and the
     module FocusedLinearAttention, whose forward reads like the paper (FocusedLinearAttention2d:
     the same on (B, C, H, W) feature maps);
  2. comparators: softmax, vanilla linear and L2ViT attention, and official_forward (the
     official code's formulation, op by op);
  3. the backbones: FLatten-PVT, FLatten-PVTv2, FLatten-DeiT, FLatten-Swin and FLatten-CSwin
     with their softmax counterparts, and L2ViT; timm's API (forward_intermediates,
     feature_info); create_model and list_models; the official evaluation settings of each
     name (pretrained_cfg) and its preprocessing (eval_transform);
  4. checkpoint loading (load_pretrained) of the released official files (FLatten, L2ViT);
  5. fast paths (optional reading): faster ways to the same function, behind one switch
     (set_fast_path), tested equal to the reference. Section 1 with its helpers stands alone
     (the whole method), and section 5 can be deleted: forward is then the reference.

Shape letters: B batch, N query tokens, n key tokens, C channels, h heads, d = C / h head dim,
H x W the token grid (N = H * W, plus class tokens in DeiT), p the focusing factor.
Nothing runs or prints at import or construction.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import math
import numbers
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# each section adds its public names
__all__ = ["focus", "linear_attention", "FocusedLinearAttention", "FocusedLinearAttention2d",
           "resample_grid"]

_HALF = (torch.float16, torch.bfloat16)


# =============================================================================
# 1. Focused linear attention


def focus(x: torch.Tensor, focusing_factor: float = 3.0, scale: Optional[torch.Tensor] = None,
          offset: float = 1e-6) -> torch.Tensor:
    """The focused kernel phi_p over the last dimension (the paper's Eq. 5 and 6).

        y = (ReLU(x) + offset) / scale,    phi_p(x) = ||y|| * y^p / ||y^p||   (element-wise power)

    x: (..., C) floating point; scale: positive, broadcastable to x without growing it, e.g. (C,)
    or (1, 1, C), or None -> (..., C). The module's offset 1e-6 and scale = softplus(learned) are
    the official code's; offset=0 and scale=None give the paper's f_p(ReLU(x)). Half-precision
    inputs compute and return float32. A scale's values are checked where that needs no wait for
    a device (a CPU tensor, outside torch.compile and torch.func).
    """
    p = _check_focusing_factor(focusing_factor)
    _check_focus_args(x, scale)
    dt = _compute_dtype(x)
    tiny = torch.finfo(dt).tiny
    y = F.relu(x.to(dt)) + offset
    if scale is not None:
        y = y / scale.to(dt)
    # phi_p(y) = phi_p(y / m) for any m > 0 per token. With m = max(y), t^p cannot overflow and
    # ||t^p|| >= 1, where the official y^p / ||y^p|| overflows for large y and is 0/0 for tiny y.
    m = y.amax(dim=-1, keepdim=True).clamp_min(tiny)
    t = y / m
    tp = t.pow(p) if p >= 1 else torch.where(t > 0, t.clamp_min(tiny).pow(p), 0.)  # slope at 0
    return tp * (m * t.norm(dim=-1, keepdim=True) / tp.norm(dim=-1, keepdim=True).clamp_min(tiny))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     normalizer: str = "mean",
                     key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear attention in the O(N d^2) order (the paper's Eq. 4).

        out_i = q_i (K^T V) / (q_i . sum_j k_j + n eps)    normalizer="mean" (the official code)
        out_i = q_i (K^T V) / (q_i . sum_j k_j + eps)      normalizer="sum" (the code the
                                                           released checkpoints were trained with)

    The official mean form, q_i (K^T V / n) / (q_i . mean_j k_j + eps), is the first line times
    n / n: the two normalisers differ only in the weight of eps. q: (B, h, N, d) and k: (B, h, n, d)
    non-negative features, v: (B, h, n, dv), n >= 1; B and h broadcast -> (B, h, N, dv) in v's
    dtype. Half-precision inputs compute in float32 (the sums overflow float16).

    key_padding_mask: (B, n) bool, True where a key is padding (nn.MultiheadAttention's meaning).
    Padding keys leave K^T V, sum_j k_j and the n of the mean normaliser (n counts the real keys),
    so a padded sequence gets what it gets alone; their k and v may hold anything, NaN included. A
    sequence with no real key gets zeros.
    """
    _check_normalizer(normalizer)
    _check_attention_args(q, k, v, key_padding_mask)
    dt = _compute_dtype(q)
    tiny = torch.finfo(dt).tiny
    with _autocast_off(q.device.type):
        q, k, v_ = q.to(dt), k.to(dt), v.to(dt)
        if key_padding_mask is None:
            n = k.shape[-2]
        else:
            pad = key_padding_mask[:, None, :, None]                      # (B, 1, n, 1)
            k, v_ = k.masked_fill(pad, 0.), v_.masked_fill(pad, 0.)
            n = (~pad).sum(dim=-2, keepdim=True).clamp_min(1).to(dt)      # real keys, (B, 1, 1, 1)
        # out_i is unchanged when q_i is divided by m_i and every k_j by M, the eps by m_i M: with
        # maxima of 1 the products below cannot overflow (the maxima need no gradient: out does not
        # change with them)
        m = q.detach().amax(dim=-1, keepdim=True).clamp_min(tiny)         # (B, h, N, 1)
        M = k.detach().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)   # (B, h, 1, 1)
        q, k = q / m, k / M
        kv = k.transpose(-2, -1) @ v_                                     # (B, h, d, dv)
        den = q @ k.sum(dim=-2).unsqueeze(-1)                             # (B, h, N, 1)
        out = (q @ kv) / (den + (n * eps if normalizer == "mean" else eps) / m / M)
    return out.to(v.dtype)


class FocusedLinearAttention(nn.Module):
    """Focused linear attention (FLatten): a drop-in for the official module at any resolution.

    Same constructor, parameter names and shapes as the official code, so an official
    state_dict loads with strict=True. forward(x, H, W): x (B, N, C) -> (B, N, C), tokens
    row-major over an H x W grid. num_patches is the token count of the construction grid
    (square unless grid_size says otherwise); at any other H x W the learned
    positional_encoding is resampled as a 2-D grid (resample_grid), at the construction grid
    it is used as is. attn_drop and qk_scale are accepted and ignored, as in the official code.

    Keyword-only extras: grid_size (a non-square construction grid), num_prefix_tokens (class
    tokens: in the attention, not in the DWC; sr_ratio must then be 1) and normalizer ("mean",
    the official code; "sum", the code the released checkpoints were trained with).
    """

    def __init__(self, dim: int, num_patches: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 sr_ratio: int = 1, focusing_factor: float = 3, kernel_size: int = 5, *,
                 grid_size: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 0,
                 normalizer: str = "mean"):
        super().__init__()
        grid_size = _check_layer_args(dim, num_patches, num_heads, sr_ratio, focusing_factor,
                                      kernel_size, grid_size, num_prefix_tokens, normalizer)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.sr_ratio, self.kernel_size = sr_ratio, kernel_size
        self.focusing_factor = float(focusing_factor)
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
        # one depthwise kernel over the d channels of a head, shared by all heads (official)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        kh, kw = self.key_grid(*grid_size)
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_prefix_tokens + kh * kw, dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = self._check_input(x, H, W)
        if (path := self.forward_path(x)) != "reference":  # the same function, faster (section 5)
            return _FAST_PATHS.run(self, x, H, W, path)
        h, P = self.num_heads, self.num_prefix_tokens
        q = self.q(x)                                           # (B, N, C)
        xk, kh, kw = self._key_tokens(x, H, W)                  # x, or its reduced grid
        k, v = self.kv(xk).chunk(2, dim=-1)                     # (B, n, C), n = N / sr_ratio^2
        k = k + self._positional_encoding(kh, kw)               # position, on the keys only
        scale = F.softplus(self.scale)                          # (1, 1, C), learned, > 0
        q = focus(q, self.focusing_factor, scale)               # phi_p with norms over all C,
        k = focus(k, self.focusing_factor, scale)               # before the head split
        q, k, vh = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, d)
        out = linear_attention(q, k, vh, normalizer=self.normalizer)               # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)
        dwc = self._dwc(v[:, P:], H, W)                         # (B, H*W, C): restores the rank
        out = torch.cat([out[:, :P], out[:, P:] + dwc], dim=1) if P else out + dwc
        return self.proj_drop(self.proj(out))

    def _dwc(self, v: torch.Tensor, H: int, W: int, conv=F.conv2d) -> torch.Tensor:
        """DWC(v): the depthwise k x k convolution of the raw values over the H x W grid, one
        kernel shared by the heads. v (B, n, C) -> (B, H*W, C). With n != H*W (sr_ratio > 1) v is
        first brought back to H*W tokens by 1-D linear interpolation along the flattened token
        axis, as in the official code (not in 2-D). (The training path passes its own conv.)"""
        if v.shape[1] != H * W:
            v = F.interpolate(v.transpose(1, 2), size=H * W, mode="linear", align_corners=False)
            v = v.transpose(1, 2)
        return _tokens(_shared_dwc(self.dwc, _image(v, H, W), self.num_heads, conv))

    def key_grid(self, H: int, W: int) -> Tuple[int, int]:
        """The grid of key tokens for a query grid H x W (smaller by sr_ratio, floored)."""
        return H // self.sr_ratio, W // self.sr_ratio

    def _key_tokens(self, x: torch.Tensor, H: int, W: int):
        """The tokens keys and values come from, and their grid: x on H x W, or with
        sr_ratio > 1 its spatially reduced grid (a strided conv, then LayerNorm)."""
        if self.sr_ratio == 1:
            return x, H, W
        x = self.sr(_image(x, H, W))                                 # (B, C, H / sr, W / sr)
        kh, kw = x.shape[-2:]
        return self.norm(_tokens(x)), kh, kw

    def _positional_encoding(self, kh: int, kw: int) -> torch.Tensor:
        return resample_grid(self.positional_encoding, self.key_grid(*self.grid_size), (kh, kw),
                             self.num_prefix_tokens)

    def set_grid_size(self, grid_size: Union[int, Tuple[int, int]]) -> None:
        """Resample positional_encoding to a new construction grid, in place: the parameter
        stays the same object (an optimizer holding it keeps it; build the optimizer after
        this call, as its state of the old shape does not fit), and keeps requires_grad."""
        grid_size = _to_2tuple(grid_size, "grid_size")
        new = self.key_grid(*grid_size)
        if min(new) < 1:
            raise ValueError(f"grid {grid_size} leaves no key tokens at sr_ratio={self.sr_ratio}")
        _resample_parameter(self.positional_encoding, self.key_grid(*self.grid_size), new,
                            self.num_prefix_tokens)
        self.grid_size = grid_size

    def _check_input(self, x: torch.Tensor, H: int, W: int) -> Tuple[int, int, int]:
        _check_tokens(x, H, W, self.num_prefix_tokens, self.dim)
        _check_dtype(x, self.q.weight, type(self).__name__)
        if self.sr_ratio > 1 and (H < self.sr_ratio or W < self.sr_ratio):
            raise ValueError(f"grid {H}x{W} is smaller than sr_ratio={self.sr_ratio}")
        return x.shape

    def forward_path(self, x: torch.Tensor) -> str:
        """Which implementation forward(x, H, W) takes: "reference" (the code above) or the name
        of a fast path (section 5; set_fast_path chooses which may run)."""
        return "reference" if _FAST_PATHS is None else _FAST_PATHS.choose(self, x)


class FocusedLinearAttention2d(FocusedLinearAttention):
    """FocusedLinearAttention on feature maps: forward(x) takes x (B, dim, H, W) and returns
    (B, dim, H, W), at any H x W: after a CNN's feature maps (a detector's P3-P5, a U-Net's
    bottleneck). Same constructor, parameters and state_dict keys as FocusedLinearAttention:
    num_patches (or grid_size) is the grid its positional encoding is learned on, resampled at
    any other. The attention alone, as in a transformer block: add the residual (and a norm) in
    the network around it, e.g. x = x + attn(x). Class tokens (num_prefix_tokens) do not apply.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_prefix_tokens:
            raise ValueError("FocusedLinearAttention2d takes feature maps, which have no class "
                             f"tokens; got num_prefix_tokens={self.num_prefix_tokens}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected feature maps (B, {self.dim}, H, W), got {got}")
        H, W = x.shape[-2:]
        return _image(super().forward(_tokens(x), H, W), H, W)          # (B, C, H, W)


# -----------------------------------------------------------------------------
# Small helpers of the method


class _FastPaths(NamedTuple):
    """Where the fast paths of section 5 plug in. Without section 5 (it can be deleted) there are
    none, and forward is the reference everywhere."""
    choose: Callable[[FocusedLinearAttention, torch.Tensor], str]  # (layer, x) -> path name
    run: Callable[..., torch.Tensor]                  # (layer, x, H, W, path) -> forward's output


_FAST_PATHS: Optional[_FastPaths] = None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float16 / bfloat16 attention computes in float32: the kernel's power and the normaliser's
    # sums overflow or underflow in half precision (the top NaN report of such code)
    return torch.float32 if t.dtype in _HALF else t.dtype


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast
        return False


def _autocast_off(device_type: str):
    """A context without autocast, so that the attention computes in the dtype it chose."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _is_int(v) -> bool:
    """An int (torch.export's symbolic sizes included), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_focusing_factor(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < math.inf:  # nan too
        raise ValueError(f"focusing_factor must be a finite number > 0, got {p!r}")
    return float(p)


def _check_layer_args(dim, num_patches, num_heads, sr_ratio, focusing_factor, kernel_size,
                      grid_size, num_prefix_tokens, normalizer) -> Tuple[int, int]:
    """FocusedLinearAttention's arguments, checked; returns the construction grid."""
    _check_heads(dim, num_heads)
    _check_focusing_factor(focusing_factor)
    _check_normalizer(normalizer)
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    if not _is_int(sr_ratio) or sr_ratio < 1:
        raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
    if not _is_int(num_prefix_tokens) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens and sr_ratio > 1:
        raise ValueError("class tokens (num_prefix_tokens > 0) need sr_ratio = 1")
    if grid_size is None:
        side = math.isqrt(num_patches) if _is_int(num_patches) and num_patches > 0 else 0
        if side * side != num_patches or side == 0:
            raise ValueError(f"num_patches={num_patches!r} is not a positive square: "
                             "pass grid_size=(H, W)")
        grid_size = (side, side)
    grid_size = _to_2tuple(grid_size, "grid_size")
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(f"grid_size {grid_size} does not hold num_patches={num_patches}")
    return grid_size


def _check_normalizer(normalizer: str) -> None:
    if normalizer not in ("mean", "sum"):
        raise ValueError(f"normalizer must be 'mean' or 'sum', got {normalizer!r}")


def _check_heads(dim: int, num_heads: int) -> None:
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not _is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if dim % num_heads:
        raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")


def _to_2tuple(x: Union[int, Sequence[int]], what: str = "size") -> Tuple[int, int]:
    """(height, width) from an int or a pair of ints, both positive."""
    pair = (x, x) if _is_int(x) else tuple(x) if isinstance(x, (tuple, list)) else ()
    if len(pair) != 2 or not all(_is_int(i) and i > 0 for i in pair):
        raise ValueError(f"{what} must be a positive int or (height, width), got {x!r}")
    return pair


def _check_tokens(x: torch.Tensor, H: int, W: int, P: int, dim: int) -> None:
    if not (_is_int(H) and _is_int(W) and H > 0 and W > 0):
        raise ValueError(f"H and W must be positive ints, got H={H!r}, W={W!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, C) tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} channels but the layer was built for dim={dim}")
    if x.shape[1] != P + H * W:
        extra = f" + {P} class tokens" if P else ""
        raise ValueError(f"x has {x.shape[1]} tokens but H*W{extra} = {H}*{W}{extra} = "
                         f"{P + H * W}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")


def _check_dtype(x: torch.Tensor, weight: torch.Tensor, name: str, what: str = "x is",
                 owner: str = "layer") -> None:
    """x must have the weights' dtype, or, under autocast (which casts both), neither be float64
    (which autocast leaves alone)."""
    if x.dtype == weight.dtype:
        return
    f64 = torch.float64 in (x.dtype, weight.dtype)
    if _autocast_enabled(x.device.type) and not f64:
        return
    raise ValueError(f"{name} has {weight.dtype} weights but {what} {x.dtype}: cast one to the "
                     f"other ({owner}.to({x.dtype}) or x.to({weight.dtype}))"
                     + (" (torch.autocast leaves float64 alone)" if f64
                        else ", or run under torch.autocast"))


def _check_focus_args(x: torch.Tensor, scale) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 \
            or x.shape[-1] == 0:
        raise ValueError("focus: x must be a floating-point tensor (..., C) with C >= 1, got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                            else type(x).__name__))
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"focus: scale must be a tensor of positive numbers (e.g. (C,)) or None, "
                         f"got {type(scale).__name__}")
    sizes = scale.shape[::-1]  # trailing sides first: each 1 or x's (broadcasting, x kept)
    if len(sizes) > x.dim() or any(a not in (1, b) for a, b in zip(sizes, x.shape[::-1])):
        raise ValueError(f"focus: scale of shape {tuple(scale.shape)} does not broadcast to x of "
                         f"shape {tuple(x.shape)}; expected e.g. ({x.shape[-1]},)")
    # reading values waits for the device (a sync on a GPU) and breaks a torch.compile graph:
    # checked on the CPU only, where it costs a few microseconds, and on plain tensors (not a
    # tracer's fake ones, which hold no values)
    if type(scale) in (torch.Tensor, nn.Parameter) and scale.device.type == "cpu" \
            and scale.numel() and not _is_compiling() and not _functorch_active():
        low, high = scale.min().item(), scale.max().item()
        if not 0 < low <= high < math.inf:  # NaN too
            raise ValueError("focus: scale must be positive and finite (it divides the features),"
                             f" got values from {low:g} to {high:g}")


def _check_attention_args(q, k, v, key_padding_mask) -> None:
    """linear_attention's arguments: shapes that fit, n >= 1 keys, a (B, n) bool mask."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) \
            or (q.dim(), k.dim(), v.dim()) != (4, 4, 4) or q.shape[-1] != k.shape[-1] \
            or k.shape[-2] != v.shape[-2] or q.shape[-1] == 0:
        raise ValueError("expected q (B, h, N, d), k (B, h, n, d), v (B, h, n, dv) with d >= 1, "
                         f"got {tuple(getattr(q, 'shape', ()))}, {tuple(getattr(k, 'shape', ()))}"
                         f", {tuple(getattr(v, 'shape', ()))}")
    try:
        B = torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2])[0]
    except RuntimeError:
        raise ValueError("the (B, h) of q, k and v must be equal or broadcast, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}") from None
    if k.shape[-2] == 0:
        raise ValueError(f"k and v hold no keys (n = 0, k {tuple(k.shape)}): every query needs "
                         "at least one key; for sequences of other lengths pad them and pass "
                         "key_padding_mask")
    if key_padding_mask is None:
        return
    m = key_padding_mask
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() != 2 \
            or m.shape[1] != k.shape[-2] or m.shape[0] not in (1, B):
        raise ValueError(f"key_padding_mask must be a bool tensor (B, n) = ({B}, {k.shape[-2]}), "
                         "True where a key is padding, got "
                         + (f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor)
                            else type(m).__name__))


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def _functorch_active() -> bool:
    """Inside a torch.func transform (vmap, grad, jacrev, ...), where a tensor's values cannot be
    read, and which the fast paths' autograd Functions and out= ops do not support."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # torch's own check
    return bool(active is not None and active())


def _image(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W), a view of their channels-last memory, on which
    convolutions run channels-last. (A transpose-then-reshape view of the same memory is not
    recognised as channels-last at B = 1, and its convolutions take a slow path.)"""
    if _is_compiling():
        return tokens.transpose(1, 2).unflatten(-1, (H, W)).contiguous()
    return tokens.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def _shared_dwc(dwc: nn.Conv2d, image: torch.Tensor, heads: int, conv=F.conv2d) -> torch.Tensor:
    """The DWC: one depthwise k x k kernel (d, 1, k, k) over the d channels of each head, shared
    by the heads. image (B, h*d, H, W), channels head-major -> (B, h*d, H, W), zero padding."""
    weight = dwc.weight.repeat(heads, 1, 1, 1).to(image.dtype)     # (h*d, 1, k, k)
    bias = dwc.bias.repeat(heads).to(image.dtype)
    if conv is F.conv2d and _is_compiling() and torch.is_grad_enabled() and image.requires_grad:
        conv = _conv_as_shifts  # a graph for every size otherwise (see there)
    return conv(image, weight, bias, padding=dwc.kernel_size[0] // 2, groups=image.shape[1])


def _conv_as_shifts(image: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    padding: int, groups: int) -> torch.Tensor:
    """F.conv2d of a depthwise convolution (groups = channels, stride 1, zero padding k // 2) as
    the sum of the k x k shifted copies of the image, each times its tap of the kernel. For
    torch.compile in training: inductor's convolution backward guards on the exact token count
    of an image that needs a gradient, so that every input size compiled a graph of its own;
    these elementwise ops keep the sizes dynamic."""
    H, W = image.shape[-2:]
    k = weight.shape[-1]
    x = F.pad(image, (padding,) * 4)
    out = 0. if bias is None else bias.view(1, -1, 1, 1)
    for i in range(k):
        for j in range(k):
            out = out + x[..., i:i + H, j:j + W] * weight[:, 0, i, j].view(1, -1, 1, 1)
    return out


def _tokens(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) tokens: a view of a channels-last image (and, backwards, a
    channels-last gradient for the convolution that made it, for the same reason)."""
    return image.permute(0, 2, 3, 1).flatten(1, 2)


def resample_grid(table: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int],
                  num_prefix_tokens: int = 0, mode: str = "bicubic") -> torch.Tensor:
    """Resample a learned per-token table (1, P + h*w, C) from grid old_hw to grid new_hw.

    The first num_prefix_tokens rows (class tokens) are kept; the grid rows are interpolated as
    a 2-D image in float32 (bicubic, align_corners=False: the official recipe for fine-tuning at
    a new resolution, and timm's) and cast back. Returns the table itself when the grids match.
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


def _resample_parameter(param: nn.Parameter, *args, **kwargs) -> None:
    """resample_grid of a position table, in place: the Parameter object, its requires_grad and
    an optimizer's reference to it stay (build the optimizer afterwards: its state of the old
    shape does not fit)."""
    with torch.no_grad():
        param.data = resample_grid(param, *args, **kwargs).clone()


# =============================================================================
# 2. Comparators and the official formulation

__all__ += ["SoftmaxAttention", "VanillaLinearAttention", "L2ViTLinearAttention",
            "official_forward"]


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
        _check_heads(dim, num_heads)
        if not _is_int(sr_ratio) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
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
        _check_dtype(x, self.q.weight, type(self).__name__)
        B, N, C = x.shape
        q = self.q(x).unflatten(-1, (h, -1)).transpose(1, 2)               # (B, h, N, d)
        if self.sr_ratio > 1:
            if H < self.sr_ratio or W < self.sr_ratio:
                raise ValueError(f"grid {H}x{W} is smaller than sr_ratio={self.sr_ratio}")
            grid = _tokens(self.sr(_image(x[:, P:], H, W)))
            x = self.norm(torch.cat([x[:, :P], grid], dim=1) if P else grid)
        k, v = self.kv(x).unflatten(-1, (2, h, -1)).permute(2, 0, 3, 1, 4)  # 2 x (B, h, n, d)
        if self.fused:
            drop = self.attn_drop.p if self.training else 0.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale                    # (B, h, N, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class VanillaLinearAttention(nn.Module):
    """Plain linear attention (the paper's Table 4 baseline): ReLU kernel, no focusing, no DWC.

    out_i = phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j) + eps), phi = ReLU. Same
    projections and forward(x, H, W) as FocusedLinearAttention.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, eps: float = 1e-6,
                 *, num_prefix_tokens: int = 0):
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim, self.num_heads, self.eps = dim, num_heads, eps
        self.num_prefix_tokens = num_prefix_tokens
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        _check_tokens(x, H, W, self.num_prefix_tokens, self.dim)
        _check_dtype(x, self.q.weight, type(self).__name__)
        B, N, C = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in (self.q(x), k, v))
        out = linear_attention(F.relu(q), F.relu(k), v, eps=self.eps, normalizer="sum")
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class L2ViTAttention(nn.Module):
    """L^2ViT's global linear attention, with the official keys (temperature, qkv, proj).

    forward(x): x (B, N, C) -> (B, N, C), over all N tokens; per head, with ReLU on q and k,

        a_i = q_i (K^T V * t) / max(q_i . sum_j k_j, 100)

    a sum over the keys (not a mean) and an absolute clamp at 100 (no epsilon); t the head's
    learnable temperature, (h, 1, 1) initialised to d^-1/2, which scales the head's output and
    not its denominator. Half-precision inputs compute in float32 (the sums overflow float16).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        dt = _compute_dtype(x)
        with _autocast_off(x.device.type):
            q, k, v = F.relu(qkv[0].to(dt)), F.relu(qkv[1].to(dt)), qkv[2].to(dt)  # (B, h, N, d)
            kv = (k.transpose(-2, -1) @ v) * self.temperature.to(dt)               # (B, h, d, d)
            z = (q @ k.sum(dim=-2).unsqueeze(-1)).clamp_min(100.)                  # (B, h, N, 1)
            out = ((q @ kv) / z).to(x.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class LCM(nn.Module):
    """L^2ViT's Local Concentration Module on an image (B, C, H, W) -> (B, C, H, W): depthwise
    k x k conv, GELU, BatchNorm, depthwise k x k conv, zero padding (the official keys conv1,
    bn, conv2)."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the LCM kernel_size must be an odd positive int, "
                             f"got {kernel_size!r}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(x))))


class L2ViTLinearAttention(nn.Module):
    """L^2ViT's global linear attention followed by its Local Concentration Module (LCM), as one
    layer with forward(x, H, W) like the others: the global block of the L2ViT models in section
    3 without its CPE and MLP.

    attn (L2ViTAttention) runs on x; the LCM is its own pre-norm residual branch after it, on the
    patch tokens as an H x W image. forward returns the sum of both branches' updates,
    a + LCM(LN(x + a)), so that x + forward(x) is L^2ViT's x + a, then + LCM(LN(.)). Class
    tokens (num_prefix_tokens) take part in the attention but not in the LCM.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, lcm_kernel: int = 7,
                 *, num_prefix_tokens: int = 0):
        super().__init__()
        self.dim, self.num_prefix_tokens = dim, num_prefix_tokens
        self.attn = L2ViTAttention(dim, num_heads, qkv_bias)
        self.lcm_norm = nn.LayerNorm(dim)
        self.lcm = LCM(dim, lcm_kernel)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        P = self.num_prefix_tokens
        _check_tokens(x, H, W, P, self.dim)
        _check_dtype(x, self.attn.qkv.weight, type(self).__name__)
        a = self.attn(x)
        lcm = _tokens(self.lcm(_image(self.lcm_norm(x[:, P:] + a[:, P:]), H, W)))
        return torch.cat([a[:, :P], a[:, P:] + lcm], dim=1) if P else a + lcm


def official_forward(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int,
                     normalizer: Optional[str] = None) -> torch.Tensor:
    """The official module's forward, op by op and layout by layout, on a layer's own weights.

    The baseline bench.py measures against, and a second reference for the tests (they hold it
    to the official fixtures). Every operation and memory layout of the official code: k and v as
    strided views of one kv output, the power without rescaling, n^-1/2 on both K^T and V, v
    copied into (B*h, H, W, d) and convolved as its channels-last (B*h, d, H, W) view. Beyond
    the official code: the positional encoding resampled to H x W (any size), and class tokens
    (num_prefix_tokens) in the attention but not in the DWC. normalizer: the layer's if None.
    """
    B, N, C = x.shape
    layer._check_input(x, H, W)
    h, p, P = layer.num_heads, layer.focusing_factor, layer.num_prefix_tokens
    normalizer = normalizer or layer.normalizer
    q = layer.q(x)
    if layer.sr_ratio > 1:
        x_ = layer.sr(x.permute(0, 2, 1).reshape(B, C, H, W))
        kh, kw = x_.shape[-2:]
        x_ = layer.norm(x_.reshape(B, C, kh * kw).permute(0, 2, 1))
        kv = layer.kv(x_).reshape(B, kh * kw, 2, C).permute(2, 0, 1, 3)
    else:
        kh, kw = H, W
        kv = layer.kv(x).reshape(B, N, 2, C).permute(2, 0, 1, 3)
    k, v = kv[0], kv[1]
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
    q = q.reshape(B, N, h, C // h).permute(0, 2, 1, 3)
    k = k.reshape(B, n, h, C // h).permute(0, 2, 1, 3)
    v = v.reshape(B, n, h, C // h).permute(0, 2, 1, 3)
    if normalizer == "mean":
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    else:
        z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = k.transpose(-2, -1) @ v
    out = q @ kv * z
    if layer.sr_ratio > 1:
        v = F.interpolate(v.transpose(-2, -1).reshape(B * h, C // h, n), size=N, mode="linear")
        v = v.reshape(B, h, C // h, N).transpose(-2, -1)
    out = out.transpose(1, 2).reshape(B, N, C)
    v = v[:, :, P:].reshape(B * h, H, W, C // h).permute(0, 3, 1, 2)
    dwc = layer.dwc(v).reshape(B, C, H * W).permute(0, 2, 1)
    out = torch.cat([out[:, :P], out[:, P:] + dwc], dim=1) if P else out + dwc
    return layer.proj_drop(layer.proj(out))


# =============================================================================
# 3. Backbones

__all__ += ["PVTConfig", "PyramidVisionTransformer", "DeiTConfig", "VisionTransformer",
            "SwinConfig", "SwinTransformer", "CSwinConfig", "CSwinTransformer", "L2ViTConfig",
            "L2ViT", "MODELS", "create_model", "list_models", "PRETRAINED_CFGS", "pretrained_cfg",
            "eval_transform", "EvalTransform"]


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
        return _tokens(self.dwconv(_image(x, H, W)))


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
        return self.norm(_tokens(x)), H, W


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x), H, W); x + mlp(norm2(x), H, W).

    attn_type 'L' is focused linear attention, 'S' softmax attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: Tuple[int, int], *,
                 attn_type: str = "L", sr_ratio: int = 1, qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., focusing_factor: float = 3,
                 kernel_size: int = 5, normalizer: str = "mean", mlp_dwconv: bool = False,
                 num_prefix_tokens: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == "L":
            self.attn = FocusedLinearAttention(
                dim, grid_size[0] * grid_size[1], num_heads, qkv_bias, None, attn_drop, drop,
                sr_ratio, focusing_factor, kernel_size, grid_size=grid_size,
                num_prefix_tokens=num_prefix_tokens, normalizer=normalizer)
        elif attn_type == "S":
            self.attn = SoftmaxAttention(dim, num_heads, qkv_bias, None, attn_drop, drop, sr_ratio,
                                         num_prefix_tokens=num_prefix_tokens)
        else:
            raise ValueError("attn_type must be 'L' (focused linear) or 'S' (softmax), "
                             f"got {attn_type!r}")
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


def _check_image(x: torch.Tensor, model: nn.Module, min_hw: Tuple[int, int]) -> None:
    """x must be floating-point images (B, in_chans, H, W) of at least min_hw pixels, in the
    model's dtype (or under autocast, which casts them unless they or the weights are float64)."""
    name, in_chans = type(model).__name__, model.cfg.in_chans
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} expects images (B, {in_chans}, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name} expects {in_chans} input channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[2] < min_hw[0] or x.shape[3] < min_hw[1]:
        raise ValueError(f"{name} needs images of at least {min_hw[0]}x{min_hw[1]} pixels "
                         f"(the smallest its downsampling and spatial reductions take), got "
                         f"{x.shape[2]}x{x.shape[3]}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects floating-point images, got {x.dtype}")
    _check_dtype(x, next(model.parameters()), name, "the images are", "model")


class _Classifier(nn.Module):
    """The timm-style head API shared by the backbones."""

    num_classes: int
    num_features: int

    def _make_head(self, num_classes: int) -> None:
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), "
                             f"got {num_classes!r}")
        self.num_classes = num_classes
        like = next(self.parameters())  # a new head on the model's device, in its dtype
        self.head = nn.Linear(self.num_features, num_classes, device=like.device,
                              dtype=like.dtype) if num_classes > 0 else nn.Identity()

    @property
    def head_hidden_size(self) -> int:
        """The width of forward_head(x, pre_logits=True), as timm names it: num_features."""
        return self.num_features

    @property
    def in_chans(self) -> int:
        return self.cfg.in_chans

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier; num_classes=0 makes forward return pooled features."""
        self._make_head(num_classes)
        if num_classes > 0:
            _init_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _Pyramid(_Classifier):
    """The API of the multi-stage backbones (PVT, Swin, CSwin, L2ViT) on their _stages(x), which
    yields each stage's output tokens (B, H_i*W_i, C_i) with H_i, W_i, and on feature_info, one
    dict per stage set by the family: num_chs (C_i), reduction (its stride in pixels) and module
    (the module whose output is the stage's tokens), as timm lists them. Pooling: the mean over
    tokens."""

    final_norm = False  # forward_features ends with self.norm
    feature_info: List[dict]

    def _stages(self, x: torch.Tensor):
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Union[None, int, Sequence[int]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The stage outputs as feature maps, for dense prediction (timm's interface).

        indices: the stages to return (0 is the first): None all, an int n the last n, or a
        sequence of indices (negative ones count from the end); the maps come in stage order.
        norm: apply the final norm (the models that have one) to the last stage's map, the one
        it is made for. stop_early: run no stage after the last one asked for. output_fmt:
        "NCHW" maps (B, C_i, H_i, W_i) or "NHWC" (B, H_i, W_i, C_i).
        Returns the list of maps with intermediates_only=True, else (final features, maps): the
        final features as forward_features returns them (the last stage's tokens, normalised by
        the final norm); after a stop_early before the last stage, the tokens of the last stage
        run, without the final norm (it follows the last stage only).
        """
        num_stages = len(self.feature_info)
        take, last = _feature_indices(num_stages, indices, "stages")
        channels_last = _check_output_fmt(output_fmt)
        maps = []
        for i, (tokens, H, W) in enumerate(self._stages(x)):
            normed = self.final_norm and i == num_stages - 1
            if i in take:
                t = self.norm(tokens) if norm and normed else tokens
                maps.append(_feature_map(t, H, W, channels_last))
            if stop_early and i == last:
                break
        if intermediates_only:
            return maps
        return (self.norm(tokens) if normed else tokens), maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last stage's tokens (B, N_4, C_4), normalised by the final norm
        of the models that have one."""
        for tokens, _, _ in self._stages(x):  # noqa: B007 - the last stage is the output
            pass
        return self.norm(tokens) if self.final_norm else tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)


def _feature_indices(num: int, indices, what: str) -> Tuple[set, int]:
    """timm's `indices` of forward_intermediates over `num` stages or blocks: None all, an int n
    the last n, a sequence of indices (negative from the end). Returns (the set, its largest)."""
    if indices is None:
        return set(range(num)), num - 1
    if _is_int(indices):
        if not 1 <= indices <= num:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num} {what}; "
                             f"expected an int from 1 to {num}")
        return set(range(num - indices, num)), num - 1
    given = list(indices) if isinstance(indices, (list, tuple, range)) else None
    if not given or not all(_is_int(i) and -num <= i < num for i in given):
        raise ValueError(f"indices must be None, an int or a non-empty sequence of ints in "
                         f"[{-num}, {num - 1}] ({num} {what}), got {indices!r}")
    take = {i % num for i in given}
    return take, max(take)


def _check_output_fmt(output_fmt: str) -> bool:
    """True for "NHWC" (channels last), False for "NCHW"."""
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    return output_fmt == "NHWC"


def _feature_map(tokens: torch.Tensor, H: int, W: int, channels_last: bool) -> torch.Tensor:
    """(B, H*W, C) -> a feature map (B, C, H, W), or (B, H, W, C) with channels_last."""
    return tokens.unflatten(1, (H, W)) if channels_last else _image(tokens, H, W)


def _last_block(blocks: str, depth: int) -> str:
    """feature_info's module of a stage: its last block, whose output is the stage's tokens
    (the block list itself when the stage has none)."""
    return f"{blocks}.{depth - 1}" if depth else blocks


def _drop_path_rates(rate: float, n: int) -> List[float]:
    """Stochastic depth rising linearly over the n blocks, 0 to rate (computed on the CPU, so
    that a model builds under torch.device("meta") too)."""
    return torch.linspace(0, rate, n, device="cpu").tolist()


def _check_config(cfg) -> None:
    """The fields the backbone configs share, checked: focusing_factor, normalizer, the dropout
    rates (numbers in [0, 1): drop_path_rate 1 gives NaN logits in training, anything outside
    fails deep inside the first training forward), the block counts (ints >= 0) and the MLP
    ratios (numbers > 0)."""
    if hasattr(cfg, "focusing_factor"):  # the FLatten families
        _check_focusing_factor(cfg.focusing_factor)
        _check_normalizer(cfg.normalizer)
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        r = getattr(cfg, name, 0.)  # L2ViT has drop_path_rate alone
        if not _is_real(r) or not 0 <= r < 1:  # nan too
            raise ValueError(f"{name} must be a number in [0, 1), got {r!r}")
    depths = cfg.depths if hasattr(cfg, "depths") else (cfg.depth,)
    if not all(_is_int(d) and d >= 0 for d in depths):
        raise ValueError(f"block counts (depths / depth) must be ints >= 0, got {depths}")
    ratios = cfg.mlp_ratios if hasattr(cfg, "mlp_ratios") else (cfg.mlp_ratio,)
    if not all(_is_real(r) and 0 < r < math.inf for r in ratios):
        raise ValueError(f"MLP ratios must be finite numbers > 0, got {ratios}")


def _is_real(v) -> bool:
    """An int or float (numpy's included: numbers.Real), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# -----------------------------------------------------------------------------
# FLatten-PVT and FLatten-PVTv2


@dataclass(frozen=True)
class PVTConfig:
    """A PVT (version 1) or PVTv2 (version 2) backbone; per-stage tuples have 4 entries.

    attn_type has one letter per stage: 'L' focused linear attention, 'S' softmax. Softmax stages
    use sr_ratios, focused linear ones la_sr_ratios (the FLatten models: all 1). depths are ints
    >= 0 (a stage of 0 blocks is its patch embedding alone), mlp_ratios finite numbers > 0.
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
    normalizer: str = "mean"


class PyramidVisionTransformer(_Pyramid):
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
        for name in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios",
                     "la_sr_ratios"):
            if len(getattr(cfg, name)) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), "
                                 f"got {getattr(cfg, name)}")
        if len(cfg.attn_type) != 4:
            raise ValueError(f"attn_type needs 4 letters, got {cfg.attn_type!r}")
        _check_config(cfg)
        self.cfg = cfg
        self.num_features = cfg.embed_dims[-1]
        img_size = _to_2tuple(cfg.img_size, "img_size")
        dpr = _drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.grid_sizes: List[Tuple[int, int]] = []
        self.feature_info: List[dict] = []
        hw, cur, stride = img_size, 0, 1
        for i in range(4):
            in_chans = cfg.in_chans if i == 0 else cfg.embed_dims[i - 1]
            if cfg.version == 1:
                k = cfg.patch_size if i == 0 else 2
                embed = PatchEmbed(in_chans, cfg.embed_dims[i], k, k)
            else:
                k, s = (7, 4) if i == 0 else (3, 2)
                embed = PatchEmbed(in_chans, cfg.embed_dims[i], k, s, k // 2)
            hw, stride = embed.out_size(*hw), stride * embed.stride
            if min(hw) < 1:
                raise ValueError(f"img_size {img_size} leaves no tokens in stage {i + 1}")
            self.grid_sizes.append(hw)
            self.feature_info.append(dict(num_chs=cfg.embed_dims[i], reduction=stride,
                                          module=f"norm{i + 1}" if cfg.version == 2
                                          else _last_block(f"block{i + 1}", cfg.depths[i])))
            setattr(self, f"patch_embed{i + 1}", embed)
            if cfg.version == 1:
                setattr(self, f"pos_embed{i + 1}",
                        nn.Parameter(torch.zeros(1, hw[0] * hw[1], cfg.embed_dims[i])))
            linear = cfg.attn_type[i] == "L"
            blocks = nn.ModuleList([
                Block(cfg.embed_dims[i], cfg.num_heads[i], cfg.mlp_ratios[i], hw,
                      attn_type=cfg.attn_type[i],
                      sr_ratio=cfg.la_sr_ratios[i] if linear else cfg.sr_ratios[i],
                      qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                      drop_path=dpr[cur + j], focusing_factor=cfg.focusing_factor,
                      kernel_size=cfg.kernel_size, normalizer=cfg.normalizer,
                      mlp_dwconv=cfg.version == 2)
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
        """The smallest image (per side) that leaves one token in the last stage and, in every
        stage with blocks, at least sr_ratio tokens per side to reduce."""
        cfg, side = self.cfg, 1
        while True:
            s, fits = side, True
            for i in range(4):
                s = getattr(self, f"patch_embed{i + 1}").out_size(s, s)[0]
                sr = (cfg.la_sr_ratios if cfg.attn_type[i] == "L" else cfg.sr_ratios)[i]
                fits = fits and s >= 1 and (s >= sr or not cfg.depths[i])
            if fits:
                return side, side
            side += 1

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample every position table to a new input size, permanently (for fine-tuning),
        in place: the parameters stay the same objects and keep requires_grad."""
        hw = _to_2tuple(img_size, "img_size")
        if hw[0] < self._min_size[0] or hw[1] < self._min_size[1]:
            raise ValueError(f"img_size {img_size} is below the smallest input {self._min_size}")
        for i in range(1, 5):
            hw = getattr(self, f"patch_embed{i}").out_size(*hw)
            if self.cfg.version == 1:
                _resample_parameter(getattr(self, f"pos_embed{i}"), self.grid_sizes[i - 1], hw)
            for blk in getattr(self, f"block{i}"):
                if isinstance(blk.attn, FocusedLinearAttention):
                    blk.attn.set_grid_size(hw)
            self.grid_sizes[i - 1] = hw
        self.cfg = replace(self.cfg, img_size=img_size)

    def _stages(self, x: torch.Tensor):
        """Yield each stage's output tokens (B, H*W, C_i) with H, W."""
        _check_image(x, self, self._min_size)
        for i in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            if self.cfg.version == 1:
                pe = resample_grid(getattr(self, f"pos_embed{i}"), self.grid_sizes[i - 1], (H, W))
                x = self.pos_drop(x + pe)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            if self.cfg.version == 2:
                x = getattr(self, f"norm{i}")(x)
            yield x, H, W
            x = _image(x, H, W)                                       # (B, C_i, H, W)


# -----------------------------------------------------------------------------
# FLatten-DeiT (the paper's DeiT variant; no official code exists)


@dataclass(frozen=True)
class DeiTConfig:
    """A DeiT (ViT with a class token) with focused linear ('L') or softmax ('S') attention.

    depth is an int >= 0 (0: the patch embedding, class token and final norm alone), mlp_ratio a
    finite number > 0.
    """
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
    normalizer: str = "mean"


class VisionTransformer(_Classifier):
    """FLatten-DeiT and DeiT: patch 16 embedding, a class token, pos_embed, pre-norm blocks.

    Design (the DeiT code of the paper was never released): every block uses focused linear
    attention; the class token takes part in the attention as a query and as a key (with its
    own row of the layer's positional_encoding), and the DWC runs over the patch-token grid only
    (the class token's output has no DWC term), as in the lab's sibling methods. The classifier
    reads the normalised class token, so in classification the last block's DWC, which acts on
    the patch tokens only, gets an all-zero gradient (dense prediction on forward_features
    trains it). All position tables are resampled to the input size.
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        if cfg.attn_type not in ("L", "S"):
            raise ValueError(f"attn_type must be 'L' or 'S', got {cfg.attn_type!r}")
        _check_config(cfg)
        self.cfg = cfg
        self.num_features = cfg.embed_dim
        p = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, p, p, norm=False)
        self.grid_size = self.patch_embed.out_size(*_to_2tuple(cfg.img_size, "img_size"))
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {cfg.img_size} is smaller than one {p}x{p} patch")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = _drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, self.grid_size,
                  attn_type=cfg.attn_type, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i],
                  focusing_factor=cfg.focusing_factor, kernel_size=cfg.kernel_size,
                  normalizer=cfg.normalizer, num_prefix_tokens=1)
            for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.feature_info = [dict(num_chs=cfg.embed_dim, reduction=p, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        self._make_head(cfg.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample pos_embed and every positional_encoding to a new input size, permanently,
        in place: the parameters stay the same objects and keep requires_grad."""
        hw = self.patch_embed.out_size(*_to_2tuple(img_size, "img_size"))
        if min(hw) < 1:
            raise ValueError(f"img_size {img_size} is smaller than one patch")
        _resample_parameter(self.pos_embed, self.grid_size, hw, num_prefix_tokens=1)
        for blk in self.blocks:
            if isinstance(blk.attn, FocusedLinearAttention):
                blk.attn.set_grid_size(hw)
        self.grid_size = hw
        self.cfg = replace(self.cfg, img_size=img_size)

    def _embed(self, x: torch.Tensor):
        """(B, 3, H, W) -> the tokens the first block takes (B, 1 + H'*W', C), H', W'."""
        p = self.cfg.patch_size
        _check_image(x, self, (p, p))
        x, H, W = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pe = resample_grid(self.pos_embed, self.grid_size, (H, W), num_prefix_tokens=1)
        return self.pos_drop(x + pe), H, W

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised tokens (B, 1 + N, C), the class token first."""
        x, H, W = self._embed(x)
        for blk in self.blocks:
            x = blk(x, H, W)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Union[None, int, Sequence[int]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The blocks' outputs as feature maps (timm's interface, as for its ViT): the patch
        tokens of each block asked for, the class token dropped, (B, C, H/16, W/16) ("NCHW") or
        (B, H/16, W/16, C) ("NHWC"). indices count blocks (0 to depth - 1; None all, an int n
        the last n, negative from the end); norm applies the final norm to every map (it fits
        every block); stop_early runs no block after the last one asked for. Returns the maps
        with intermediates_only=True, else (final features, maps): the final norm of the last
        block run, (B, 1 + N, C) as forward_features returns it.
        """
        take, last = _feature_indices(len(self.blocks), indices, "blocks")
        channels_last = _check_output_fmt(output_fmt)
        x, H, W = self._embed(x)
        maps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, H, W)
            if i in take:
                t = self.norm(x) if norm else x
                maps.append(_feature_map(t[:, self.num_prefix_tokens:], H, W, channels_last))
            if stop_early and i == last:
                break
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)


# -----------------------------------------------------------------------------
# FLatten-Swin


class WindowAttention(nn.Module):
    """Swin's softmax attention in w x w windows, with a learned relative position bias (L^2ViT's
    window blocks: relative_position_bias=False, none).

    forward(x, mask): x (B * windows, w * w, C), mask (windows, w*w, w*w) of 0 / -100 / -inf
    or None -> (B * windows, w * w, C). The official operations, in the official order.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., relative_position_bias: bool = True):
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        w = window_size
        self.relative_position_bias_table = None
        if relative_position_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2,
                                                                         num_heads))
            # index of the table for each (query, key) pair of a window: their offset (dy, dx)
            yx = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
            yx = yx.flatten(1)
            offset = (yx[:, :, None] - yx[:, None, :]).permute(1, 2, 0) + (w - 1)  # (w*w, w*w, 2)
            index = offset[..., 0] * (2 * w - 1) + offset[..., 1]
            self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if relative_position_bias:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B_, h, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)                     # (B_, h, N, N)
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(B_ // nw, nw, h, N, N) + mask[None, :, None]
            attn = attn.view(B_, h, N, N)
        out = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))


def _window_mask(Hp: int, Wp: int, H: int, W: int, w: int, shift: int, device) -> torch.Tensor:
    """The additive mask (windows, w*w, w*w) of a padded, cyclically shifted Hp x Wp grid: -100
    between tokens of different regions of the shift (Swin's mask, the official value), -inf for
    padding keys, which so get exactly zero weight (every window holds a real token: no row is
    all -inf)."""
    region = torch.zeros(Hp, Wp, device=device)
    if shift:
        cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
        for i, (ys, xs) in enumerate((ys, xs) for ys in cuts for xs in cuts):
            region[ys, xs] = i
    pad = torch.ones(Hp, Wp, dtype=torch.bool, device=device)
    pad[:H, :W] = False
    pad = torch.roll(pad, (-shift, -shift), dims=(0, 1))
    region, pad = (_windows(t[None, :, :, None], w, w)[..., 0] for t in (region, pad))
    mask = torch.zeros(region.shape[0], w * w, w * w, device=device)
    mask.masked_fill_(region[:, None, :] != region[:, :, None], -100.)
    return mask.masked_fill_(pad[:, None, :], float("-inf"))


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * windows, wh * ww, C): wh x ww windows (Swin's squares, CSWin's
    stripes) row-major, tokens row-major in each."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).transpose(2, 3)
    return x.reshape(B * (Hp // wh) * (Wp // ww), wh * ww, C)


def _unwindows(x: torch.Tensor, wh: int, ww: int, B: int, Hp: int, Wp: int) -> torch.Tensor:
    """The inverse of _windows: (B * windows, wh * ww, C) -> (B, Hp, Wp, C)."""
    C = x.shape[-1]
    return x.view(B, Hp // wh, Wp // ww, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)


class SwinBlock(nn.Module):
    """A Swin block: x + attn(norm1(x)); x + mlp(norm2(x)). attn_type 'L': focused linear
    attention over the whole H x W grid; 'S': softmax in w x w windows, shifted by w // 2 on odd
    blocks, the grid padded to a multiple of w (no shift when the grid fits in one window row)."""

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], window_size: int,
                 shifted: bool, mlp_ratio: float, *, attn_type: str, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, focusing_factor: float, kernel_size: int,
                 normalizer: str):
        super().__init__()
        self.attn_type, self.window_size, self.shifted = attn_type, window_size, shifted
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == "L":
            self.attn = FocusedLinearAttention(
                dim, grid_size[0] * grid_size[1], num_heads, qkv_bias, None, attn_drop, drop,
                focusing_factor=focusing_factor, kernel_size=kernel_size, grid_size=grid_size,
                normalizer=normalizer)
        elif attn_type == "S":
            self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        else:
            raise ValueError(f"attn_type letters must be 'L' or 'S', got {attn_type!r}")
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._masks: Dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.attn_type == "L":
            x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        else:
            x = x + self.drop_path(self._window_attention(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))

    def _window_attention(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        w = self.window_size
        shift = w // 2 if self.shifted and min(H, W) > w else 0
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        mask = None
        if shift or (Hp, Wp) != (H, W):
            key = (Hp, Wp, H, W, shift, x.device)
            mask = self._masks.get(key)
            if mask is None:
                mask = _window_mask(Hp, Wp, H, W, w, shift, x.device)
                if not _is_compiling() and type(mask) is torch.Tensor:  # not a tracer's tensor
                    self._masks[key] = mask
            mask = mask.to(x.dtype)
        return _in_windows(lambda t: self.attn(t, mask), x, H, W, w, shift)


def _in_windows(fn, x: torch.Tensor, H: int, W: int, w: int, shift: int = 0) -> torch.Tensor:
    """fn applied window by window: tokens (B, H*W, C) zero-padded right and bottom to multiples
    of w, rolled by -shift (Swin's shifted windows), cut into w x w windows (B * windows, w*w, C)
    for fn, put back, rolled back and cropped to (B, H*W, C)."""
    B, _, C = x.shape
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    x = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
    x = torch.roll(x, (-shift, -shift), dims=(1, 2)) if shift else x
    x = _unwindows(fn(_windows(x, w, w)), w, w, B, Hp, Wp)
    x = torch.roll(x, (shift, shift), dims=(1, 2)) if shift else x
    return x[:, :H, :W].reshape(B, H * W, C)


class PatchMerging(nn.Module):
    """2 x 2 neighbours concatenated (B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), 2C): LayerNorm,
    then Linear(4C, 2C) without bias. An odd H or W is padded by one row or column of zeros."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int):
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.flatten(1, 2))), x.shape[1], x.shape[2]


class SwinStage(nn.Module):
    def __init__(self, blocks: List[SwinBlock], downsample: Optional[PatchMerging]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


@dataclass(frozen=True)
class SwinConfig:
    """A Swin Transformer with focused linear ('L') or shifted-window softmax ('S') stages.

    window_size is the window of the softmax stages (timm's meaning: 7, or 12 for FLatten-Swin-B
    at 384). The official configs name the linear stages' window instead (56 / 96), which at the
    trained size is the whole stage: here the linear stages are global at every size. depths
    are ints >= 0 (a stage of 0 blocks is its PatchMerging alone), mlp_ratio a finite number > 0.
    """
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.
    attn_type: str = "LLSS"
    qkv_bias: bool = True
    drop_rate: float = 0.
    attn_drop_rate: float = 0.
    drop_path_rate: float = 0.
    focusing_factor: float = 3
    kernel_size: int = 5
    normalizer: str = "mean"


class SwinTransformer(_Pyramid):
    """FLatten-Swin and Swin, with the official state_dict keys (up to the fused qkv of the
    official focused linear layers, which load_pretrained splits into q and kv).

    Patch embedding 4 x 4 with LayerNorm, four stages joined by PatchMerging, a final LayerNorm,
    the mean over tokens, head. Runs at any H x W: linear stages resample their positional
    encodings, window stages pad to a multiple of the window (masks cached per grid size).
    """

    final_norm = True

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        n = len(cfg.depths)
        if len(cfg.num_heads) != n or len(cfg.attn_type) != n:
            raise ValueError(f"depths, num_heads and attn_type need one entry per stage, got "
                             f"{cfg.depths}, {cfg.num_heads}, {cfg.attn_type!r}")
        if not _is_int(cfg.window_size) or cfg.window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {cfg.window_size!r}")
        _check_config(cfg)
        self.cfg = cfg
        self.num_features = cfg.embed_dim * 2 ** (n - 1)
        p = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, p, p)
        grid = self.patch_embed.out_size(*_to_2tuple(cfg.img_size, "img_size"))
        if min(grid) < 1:
            raise ValueError(f"img_size {cfg.img_size} is smaller than one {p}x{p} patch")
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = _drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        self.layers = nn.ModuleList()
        self.feature_info = [dict(num_chs=cfg.embed_dim * 2 ** i, reduction=p * 2 ** i,
                                  module=_last_block(f"layers.{i}.blocks", cfg.depths[i]))
                             for i in range(n)]
        for i in range(n):
            dim = cfg.embed_dim * 2 ** i
            blocks = [SwinBlock(dim, cfg.num_heads[i], grid, cfg.window_size, j % 2 == 1,
                                cfg.mlp_ratio, attn_type=cfg.attn_type[i], qkv_bias=cfg.qkv_bias,
                                drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                                drop_path=dpr[sum(cfg.depths[:i]) + j],
                                focusing_factor=cfg.focusing_factor, kernel_size=cfg.kernel_size,
                                normalizer=cfg.normalizer) for j in range(cfg.depths[i])]
            self.layers.append(SwinStage(blocks, PatchMerging(dim) if i < n - 1 else None))
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        self.norm = nn.LayerNorm(self.num_features)
        self._make_head(cfg.num_classes)
        self.apply(_init_weights)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample every positional encoding to a new input size, permanently, in place."""
        grid = self.patch_embed.out_size(*_to_2tuple(img_size, "img_size"))
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size} is smaller than one patch")
        for stage in self.layers:
            for blk in stage.blocks:
                if blk.attn_type == "L":
                    blk.attn.set_grid_size(grid)
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        self.cfg = replace(self.cfg, img_size=img_size)

    def _stages(self, x: torch.Tensor):
        """Yield each stage's output tokens (B, H*W, C_i), before its PatchMerging, with H, W."""
        p = self.cfg.patch_size
        _check_image(x, self, (p, p))
        x, H, W = self.patch_embed(x)
        x = self.pos_drop(x)
        for stage in self.layers:
            for blk in stage.blocks:
                x = blk(x, H, W)
            yield x, H, W
            if stage.downsample is not None:
                x, H, W = stage.downsample(x, H, W)


# -----------------------------------------------------------------------------
# FLatten-CSwin


class CSwinLinearAttention(nn.Module):
    """The focused linear attention of a FLatten-CSwin block, global over the H x W grid.

    forward(q, k, v, H, W): q, k, v (B, N, C) from the block's qkv -> (B, N, C), before the
    block's proj. Focused linear attention (positional_encoding on the keys, phi_p with norms
    over the C channels) plus two terms of the raw values: the DWC (one k x k kernel over the
    d channels of a head, shared by the heads) and the LePE get_v (3 x 3 depthwise over C).
    The encoding is learned on grid_size and resampled to any other grid (resample_grid). It
    always runs this reference code: the fast paths of section 5 serve FocusedLinearAttention.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int],
                 focusing_factor: float = 3, kernel_size: int = 5, normalizer: str = "mean"):
        super().__init__()
        grid_size = _check_layer_args(dim, grid_size[0] * grid_size[1], num_heads, 1,
                                      focusing_factor, kernel_size, grid_size, 0, normalizer)
        d = dim // num_heads
        self.num_heads, self.kernel_size, self.grid_size = num_heads, kernel_size, grid_size
        self.focusing_factor, self.normalizer = float(focusing_factor), normalizer
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int,
                W: int) -> torch.Tensor:
        B, N, C = q.shape
        h = self.num_heads
        k = k + resample_grid(self.positional_encoding, self.grid_size, (H, W))  # on the keys
        scale = F.softplus(self.scale)                                 # (1, 1, C), learned, > 0
        q = focus(q, self.focusing_factor, scale)                      # phi_p, norms over all C
        k = focus(k, self.focusing_factor, scale)
        qh, kh, vh = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        out = linear_attention(qh, kh, vh, normalizer=self.normalizer)             # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)
        image = _image(v, H, W)                                        # (B, C, H, W), raw v
        return out + _tokens(_shared_dwc(self.dwc, image, h)) + _tokens(self.get_v(image))

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Resample positional_encoding to a new construction grid, in place (the Parameter
        object and its requires_grad stay)."""
        _resample_parameter(self.positional_encoding, self.grid_size, grid_size)
        self.grid_size = grid_size


class StripeAttention(nn.Module):
    """CSWin's softmax attention with LePE in stripes (the official LePEAttention).

    forward(q, k, v, H, W): q, k, v (B, N, C) from the block's qkv -> (B, N, C). The grid is cut
    into stripes of stripe = (height, width), None for the whole side: (None, s) stripes s wide,
    (s, None) stripes s high, (None, None) the whole grid. Per stripe and head,
    softmax(q k^T / sqrt(d)) v plus the LePE get_v(v), a 3 x 3 depthwise conv of the stripe as
    its own image (zeros past its border). Where s does not divide the grid, q, k and v are
    zero-padded to a multiple of s (LePE sees zeros past the grid, as at any stripe border) and
    the padded keys are masked out of the softmax.
    """

    def __init__(self, dim: int, num_heads: int, stripe: Tuple[Optional[int], Optional[int]],
                 attn_drop: float = 0.):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads, self.stripe = num_heads, stripe
        self.scale = (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int,
                W: int) -> torch.Tensor:
        B, N, C = q.shape
        h = self.num_heads
        sh, sw = min(self.stripe[0] or H, H), min(self.stripe[1] or W, W)  # a stripe's sides
        Hp, Wp = -(-H // sh) * sh, -(-W // sw) * sw                         # the padded grid
        S, T = (Hp // sh) * (Wp // sw), sh * sw                             # stripes, tokens
        q, k, v = (_windows(F.pad(t.reshape(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)), sh, sw)
                   for t in (q, k, v))                                      # (B*S, T, C)
        lepe = _tokens(self.get_v(_image(v, sh, sw)))                       # (B*S, T, C)
        q, k, vh = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B*S, h, T, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)                       # (B*S, h, T, T)
        if (Hp, Wp) != (H, W):
            pad = torch.ones(1, Hp, Wp, 1, dtype=torch.bool, device=q.device)
            pad[:, :H, :W] = False
            pad = _windows(pad, sh, sw)[:, None, None, :, 0]                # (S, 1, 1, T)
            attn = attn.view(B, S, h, T, T).masked_fill(pad, float("-inf")).view(B * S, h, T, T)
        out = self.attn_drop(attn.softmax(dim=-1)) @ vh                     # (B*S, h, T, d)
        out = out.transpose(1, 2).reshape(B * S, T, C) + lepe
        return _unwindows(out, sh, sw, B, Hp, Wp)[:, :H, :W].reshape(B, N, C)


class CSwinBlock(nn.Module):
    """A CSwin block: x + proj(attn(qkv(norm1(x)))); x + mlp(norm2(x)).

    One qkv and one proj per block; the attention modules (attns) take slices of q, k and v.
    attn_type 'L': one focused linear attention on all C channels, global. 'S' in the last stage:
    one softmax attention on all C channels over the whole grid; 'S' before it: two on C/2
    channels and half the heads each, attns.0 in stripes split_size wide, attns.1 split_size
    high, concatenated on the channels (CSWin's cross-shaped window).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], split_size: int,
                 mlp_ratio: float, *, attn_type: str, last: bool, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, focusing_factor: float, kernel_size: int,
                 normalizer: str):
        super().__init__()
        _check_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if attn_type == "L":
            attns = [CSwinLinearAttention(dim, num_heads, grid_size, focusing_factor, kernel_size,
                                          normalizer)]
        elif attn_type == "S" and last:
            attns = [StripeAttention(dim, num_heads, (None, None), attn_drop)]
        elif attn_type == "S":
            if num_heads % 2:
                raise ValueError(f"a stripe stage splits its heads in two: num_heads must be "
                                 f"even, got {num_heads}")
            attns = [StripeAttention(dim // 2, num_heads // 2, stripe, attn_drop)
                     for stripe in ((None, split_size), (split_size, None))]
        else:
            raise ValueError(f"attn_type letters must be 'L' or 'S', got {attn_type!r}")
        self.attns = nn.ModuleList(attns)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        qkv = self.qkv(self.norm1(x)).chunk(3, dim=-1)                # q, k, v: (B, N, C)
        if len(self.attns) == 1:
            out = self.attns[0](*qkv, H, W)
        else:                                                # channels [0, C/2) and [C/2, C)
            halves = [t.chunk(2, dim=-1) for t in qkv]
            out = torch.cat([attn(*(t[i] for t in halves), H, W)
                             for i, attn in enumerate(self.attns)], dim=-1)
        x = x + self.drop_path(self.proj(out))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class ConvStem(nn.Sequential):
    """CSwin's stem, keys 0 and 2 as in the official code: Conv2d(in, C, 7, stride 4, padding 2),
    the tokens (index 1, no parameters), LayerNorm. (B, C_in, H, W) -> (B, H'*W', C), H', W'."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(nn.Conv2d(in_chans, dim, 7, stride=4, padding=2), nn.Identity(),
                         nn.LayerNorm(dim))

    @staticmethod
    def out_size(H: int, W: int) -> Tuple[int, int]:
        return (H - 3) // 4 + 1, (W - 3) // 4 + 1

    def forward(self, x: torch.Tensor):
        x = self[0](x)
        H, W = x.shape[-2:]
        return self[2](_tokens(x)), H, W


class MergeBlock(nn.Module):
    """Between CSwin stages: Conv2d(C, C_out, 3, stride 2, padding 1), LayerNorm.
    (B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), C_out), ceil(H/2), ceil(W/2)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor, H: int, W: int):
        x = self.conv(_image(x, H, W))
        H, W = x.shape[-2:]
        return self.norm(_tokens(x)), H, W


@dataclass(frozen=True)
class CSwinConfig:
    """A CSwin Transformer with focused linear ('L') or stripe softmax ('S') stages, 4 stages.

    split_size is the stripe width of the softmax stages 1-3 (CSWin's 1, 2, 7; 12 in stage 3 of
    FLatten-CSwin-B at 384). Stage 4 and the linear stages attend over the whole grid at every
    size (the released configs' la_split_size '56-28-14-7' is the whole grid at 224), so their
    entries are unused. depths are ints >= 0 (a stage of 0 blocks is its merge alone), mlp_ratio
    a finite number > 0.
    """
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 64
    depths: Tuple[int, ...] = (2, 4, 18, 1)
    num_heads: Tuple[int, ...] = (2, 4, 8, 16)
    split_size: Tuple[int, ...] = (1, 2, 7, 7)
    mlp_ratio: float = 4.
    attn_type: str = "LLSS"
    qkv_bias: bool = True
    drop_rate: float = 0.
    attn_drop_rate: float = 0.
    drop_path_rate: float = 0.
    focusing_factor: float = 3
    kernel_size: int = 5
    normalizer: str = "mean"


class CSwinTransformer(_Pyramid):
    """FLatten-CSwin and CSWin, with the official state_dict keys.

    A 7 x 7 stride-4 conv stem with LayerNorm, four stages of CSwinBlocks joined by merge1-3
    (3 x 3 stride-2 conv, LayerNorm), a final LayerNorm, the mean over tokens, head. Runs at any
    H x W: linear stages resample their positional encodings, stripe stages pad and mask. The
    branches (and so the keys) do not depend on img_size, so a checkpoint loads at any size.
    (The official model has one branch in a stage whose grid equals its split size: the same
    function, as LePE is depthwise and the heads split the channels alike, under other keys.)
    """

    final_norm = True

    def __init__(self, cfg: CSwinConfig):
        super().__init__()
        for name in ("depths", "num_heads", "split_size"):
            if len(getattr(cfg, name)) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), "
                                 f"got {getattr(cfg, name)}")
        if len(cfg.attn_type) != 4 or set(cfg.attn_type) - set("LS"):
            raise ValueError(f"attn_type needs 4 letters 'L' or 'S', got {cfg.attn_type!r}")
        if not all(_is_int(s) and s > 0 for s in cfg.split_size):
            raise ValueError(f"split_size entries must be positive ints, got {cfg.split_size}")
        if not _is_int(cfg.embed_dim) or cfg.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {cfg.embed_dim!r}")
        _check_config(cfg)
        self.cfg = cfg
        self.num_features = cfg.embed_dim * 8
        self.stage1_conv_embed = ConvStem(cfg.in_chans, cfg.embed_dim)
        grid = self.stage1_conv_embed.out_size(*_to_2tuple(cfg.img_size, "img_size"))
        if min(grid) < 1:
            raise ValueError(f"img_size {cfg.img_size} is below the smallest input, 3x3")
        dpr = _drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        self.feature_info = [dict(num_chs=cfg.embed_dim * 2 ** i, reduction=4 * 2 ** i,
                                  module=_last_block(f"stage{i + 1}", cfg.depths[i]))
                             for i in range(4)]
        for i in range(4):
            dim = cfg.embed_dim * 2 ** i
            if i:
                setattr(self, f"merge{i}", MergeBlock(dim // 2, dim))
                grid = (-(-grid[0] // 2), -(-grid[1] // 2))
            setattr(self, f"stage{i + 1}", nn.ModuleList([
                CSwinBlock(dim, cfg.num_heads[i], grid, cfg.split_size[i], cfg.mlp_ratio,
                           attn_type=cfg.attn_type[i], last=i == 3, qkv_bias=cfg.qkv_bias,
                           drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                           drop_path=dpr[sum(cfg.depths[:i]) + j],
                           focusing_factor=cfg.focusing_factor, kernel_size=cfg.kernel_size,
                           normalizer=cfg.normalizer) for j in range(cfg.depths[i])]))
        self.norm = nn.LayerNorm(self.num_features)
        self._make_head(cfg.num_classes)
        self.apply(_init_weights)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample every positional encoding to a new input size, permanently, in place."""
        grid = self.stage1_conv_embed.out_size(*_to_2tuple(img_size, "img_size"))
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size} is below the smallest input, 3x3")
        for i in range(1, 5):
            for attn in (a for blk in getattr(self, f"stage{i}") for a in blk.attns):
                if isinstance(attn, CSwinLinearAttention):
                    attn.set_grid_size(grid)
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        self.cfg = replace(self.cfg, img_size=img_size)

    def _stages(self, x: torch.Tensor):
        """Yield each stage's output tokens (B, H*W, C_i), before the next merge, with H, W."""
        _check_image(x, self, (3, 3))
        x, H, W = self.stage1_conv_embed(x)
        for i in range(1, 5):
            if i > 1:
                x, H, W = getattr(self, f"merge{i - 1}")(x, H, W)
            for blk in getattr(self, f"stage{i}"):
                x = blk(x, H, W)
            yield x, H, W


# -----------------------------------------------------------------------------
# L2ViT (Zheng, "The Linear Attention Resurrection in Vision Transformer", arXiv 2501.16182;
# official code github.com/ChuanyangZheng/L2ViT). Every stage alternates a local window block
# (LWA) and a global linear block (LGA: L2ViTAttention of section 2, then the LCM).


class CPE(nn.Module):
    """Conditional position encoding: x + 3 x 3 depthwise conv of the tokens as an H x W image.
    (B, H*W, C) -> (B, H*W, C); the official key proj."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x + _tokens(self.proj(_image(x, H, W)))


class LWABlock(nn.Module):
    """L^2ViT's local window block: s = cpe.0(x); x = s + attn(norm1(s)) in w x w windows (the
    residual adds to the CPE's output); x = cpe.1(x); x + mlp(norm2(x)).

    The windows are Swin's without shift, relative position bias or mask: norm1's output is
    zero-padded to a multiple of w and the padding tokens stay in the softmax (keys and values
    of a zero token: the qkv bias), as in the official code; a grid smaller than w is one
    padded window."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, *,
                 qkv_bias: bool, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.cpe = nn.ModuleList([CPE(dim), CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias,
                                    relative_position_bias=False)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        s = self.cpe[0](x, H, W)
        t = _in_windows(self.attn, self.norm1(s), H, W, self.window_size)  # padded after norm1
        x = self.cpe[1](s + self.drop_path(t), H, W)
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class LGABlock(nn.Module):
    """L^2ViT's global linear block: x = cpe.0(x); x + attn(norm1(x)) (L2ViTAttention over all
    H*W tokens); x + LCM(norm3(x)) on the H x W image; x + mlp(norm2(x)). The official keys and
    their order (norm3 and local_mp, the LCM, come last)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool,
                 drop_path: float):
        super().__init__()
        self.cpe = nn.ModuleList([CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = L2ViTAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)
        self.local_mp = LCM(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.cpe[0](x, H, W)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(_tokens(self.local_mp(_image(self.norm3(x), H, W))))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class L2ViTStem(nn.Module):
    """downsample_layers.0: the image zero-padded right and bottom to a multiple of 4, then
    proj.proj = Conv2d(3 x 3, stride 2) -> BatchNorm -> ReLU -> Conv2d(3 x 3, stride 2) ->
    BatchNorm, the tokens, LayerNorm. (B, C_in, H, W) -> (B, ceil(H/4) * ceil(W/4), C), grid."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        # the official PatchEmbed holds a ConvStem that holds this Sequential: keys proj.proj.*
        self.proj = nn.ModuleDict({"proj": nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2),
            nn.ReLU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))})
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def out_size(H: int, W: int) -> Tuple[int, int]:
        return -(-H // 4), -(-W // 4)

    def forward(self, x: torch.Tensor):
        x = self.proj["proj"](F.pad(x, (0, -x.shape[3] % 4, 0, -x.shape[2] % 4)))
        H, W = x.shape[-2:]
        return self.norm(_tokens(x)), H, W


class L2ViTDownsample(nn.Module):
    """downsample_layers.1-3: LayerNorm on the tokens FIRST, then the image zero-padded right and
    bottom by one where H or W is odd, then Conv2d(2 x 2, stride 2); no norm after.
    (B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), C_out), ceil(H/2), ceil(W/2). Keys proj, norm."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 2, stride=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int):
        x = self.proj(F.pad(_image(self.norm(x), H, W), (0, W % 2, 0, H % 2)))
        H, W = x.shape[-2:]
        return _tokens(x), H, W


@dataclass(frozen=True)
class L2ViTConfig:
    """An L^2ViT: four stages of dims / depths / num_heads, each alternating window blocks
    (window_size: 7, or 12 for L2ViT-B at 384) and global linear blocks, the window block first.
    The fields in the official constructor's order, then img_size: the size the weights were
    trained at, on which nothing depends (no position tables): any H x W runs.
    """
    in_chans: int = 3
    num_classes: int = 1000
    mlp_ratios: Tuple[float, float, float, float] = (4., 4., 4., 4.)
    depths: Tuple[int, int, int, int] = (2, 2, 6, 2)
    num_heads: Tuple[int, int, int, int] = (3, 6, 12, 24)
    dims: Tuple[int, int, int, int] = (96, 192, 384, 768)
    drop_path_rate: float = 0.
    window_size: int = 7
    qkv_bias: bool = True
    img_size: Union[int, Tuple[int, int]] = 224


class L2ViT(_Pyramid):
    """L^2ViT with the official state_dict keys (BatchNorm buffers included): an official file
    loads as it is.

    The conv stem (downsample_layers.0), stages.0-3 of LWABlock / LGABlock (stage i at stride
    4 * 2^i), LayerNorm-first 2 x 2 downsampling between them (downsample_layers.1-3), a final
    LayerNorm, the mean over tokens, head. Runs at any H x W: the stem and the downsampling pad
    odd sizes with zeros, the window blocks pad their grid to a multiple of the window.
    """

    final_norm = True

    def __init__(self, cfg: L2ViTConfig):
        super().__init__()
        for name in ("dims", "depths", "num_heads", "mlp_ratios"):
            if len(getattr(cfg, name)) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), "
                                 f"got {getattr(cfg, name)}")
        if not all(_is_int(d) and d > 0 for d in cfg.dims) or cfg.dims[0] % 2:
            raise ValueError(f"dims must be positive ints, the first even (the stem's first conv "
                             f"has dims[0] / 2 channels), got {cfg.dims}")
        if not _is_int(cfg.window_size) or cfg.window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {cfg.window_size!r}")
        _check_config(cfg)
        _to_2tuple(cfg.img_size, "img_size")
        self.cfg = cfg
        self.num_features = cfg.dims[-1]
        self.downsample_layers = nn.ModuleList(
            [L2ViTStem(cfg.in_chans, cfg.dims[0])]
            + [L2ViTDownsample(cfg.dims[i - 1], cfg.dims[i]) for i in range(1, 4)])
        dpr = iter(_drop_path_rates(cfg.drop_path_rate, sum(cfg.depths)))
        self.stages = nn.ModuleList([nn.ModuleList([
            LWABlock(dim, h, cfg.window_size, r, qkv_bias=cfg.qkv_bias, drop_path=next(dpr))
            if j % 2 == 0 else LGABlock(dim, h, r, qkv_bias=cfg.qkv_bias, drop_path=next(dpr))
            for j in range(depth)])
            for dim, depth, h, r in zip(cfg.dims, cfg.depths, cfg.num_heads, cfg.mlp_ratios)])
        self.norm = nn.LayerNorm(self.num_features)
        self._make_head(cfg.num_classes)
        self.feature_info = [dict(num_chs=cfg.dims[i], reduction=4 * 2 ** i,
                                  module=_last_block(f"stages.{i}", cfg.depths[i]))
                             for i in range(4)]
        for m in self.modules():  # the official init; norms keep ones and zeros
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Records a new input size in cfg: no weight depends on it."""
        _to_2tuple(img_size, "img_size")
        self.cfg = replace(self.cfg, img_size=img_size)

    def _stages(self, x: torch.Tensor):
        """Yield each stage's output tokens (B, H*W, C_i), before the next downsampling, with
        H, W."""
        _check_image(x, self, (1, 1))
        x, H, W = self.downsample_layers[0](x)
        for i, stage in enumerate(self.stages):
            if i:
                x, H, W = self.downsample_layers[i](x, H, W)
            for blk in stage:
                x = blk(x, H, W)
            yield x, H, W


# -----------------------------------------------------------------------------
# The models by name: create_model(name, **config overrides)

_PVT_V2_B0 = dict(version=2, embed_dims=(32, 64, 160, 256))
_PVT_V2 = dict(version=2)
_SWIN_B = dict(embed_dim=128, num_heads=(4, 8, 16, 32))
_CSWIN_B = dict(embed_dim=96, num_heads=(4, 8, 16, 32))
_L2VIT_B = dict(dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
MODELS: Dict[str, Tuple[type, dict]] = {
    "flatten_pvt_tiny": (PVTConfig, dict(depths=(2, 2, 2, 2))),
    "flatten_pvt_small": (PVTConfig, dict(depths=(3, 4, 6, 3))),
    "flatten_pvt_medium": (PVTConfig, dict(depths=(3, 4, 18, 3))),
    "flatten_pvt_large": (PVTConfig, dict(depths=(3, 8, 27, 3))),
    "pvt_tiny": (PVTConfig, dict(depths=(2, 2, 2, 2), attn_type="SSSS")),
    "pvt_small": (PVTConfig, dict(depths=(3, 4, 6, 3), attn_type="SSSS")),
    "pvt_medium": (PVTConfig, dict(depths=(3, 4, 18, 3), attn_type="SSSS")),
    "pvt_large": (PVTConfig, dict(depths=(3, 8, 27, 3), attn_type="SSSS")),
    "flatten_pvt_v2_b0": (PVTConfig, dict(_PVT_V2_B0, depths=(2, 2, 2, 2))),
    "flatten_pvt_v2_b1": (PVTConfig, dict(_PVT_V2, depths=(2, 2, 2, 2))),
    "flatten_pvt_v2_b2": (PVTConfig, dict(_PVT_V2, depths=(3, 4, 6, 3))),
    "flatten_pvt_v2_b3": (PVTConfig, dict(_PVT_V2, depths=(3, 4, 18, 3))),
    "flatten_pvt_v2_b4": (PVTConfig, dict(_PVT_V2, depths=(3, 8, 27, 3))),
    "flatten_pvt_v2_b5": (PVTConfig, dict(_PVT_V2, depths=(3, 6, 40, 3), mlp_ratios=(4,) * 4)),
    "pvt_v2_b0": (PVTConfig, dict(_PVT_V2_B0, depths=(2, 2, 2, 2), attn_type="SSSS")),
    "pvt_v2_b1": (PVTConfig, dict(_PVT_V2, depths=(2, 2, 2, 2), attn_type="SSSS")),
    "pvt_v2_b2": (PVTConfig, dict(_PVT_V2, depths=(3, 4, 6, 3), attn_type="SSSS")),
    "pvt_v2_b3": (PVTConfig, dict(_PVT_V2, depths=(3, 4, 18, 3), attn_type="SSSS")),
    "pvt_v2_b4": (PVTConfig, dict(_PVT_V2, depths=(3, 8, 27, 3), attn_type="SSSS")),
    "pvt_v2_b5": (PVTConfig, dict(_PVT_V2, depths=(3, 6, 40, 3), mlp_ratios=(4,) * 4,
                                  attn_type="SSSS")),
    "flatten_deit_tiny": (DeiTConfig, dict(embed_dim=192, num_heads=3)),
    "flatten_deit_small": (DeiTConfig, dict(embed_dim=384, num_heads=6)),
    "flatten_deit_base": (DeiTConfig, dict(embed_dim=768, num_heads=12)),
    "deit_tiny": (DeiTConfig, dict(embed_dim=192, num_heads=3, attn_type="S")),
    "deit_small": (DeiTConfig, dict(embed_dim=384, num_heads=6, attn_type="S")),
    "deit_base": (DeiTConfig, dict(embed_dim=768, num_heads=12, attn_type="S")),
    "flatten_swin_tiny": (SwinConfig, dict(depths=(2, 2, 6, 2))),
    "flatten_swin_small": (SwinConfig, dict(depths=(2, 2, 18, 2))),
    "flatten_swin_base": (SwinConfig, dict(_SWIN_B, depths=(2, 2, 18, 2))),
    "flatten_swin_base_384": (SwinConfig, dict(_SWIN_B, depths=(2, 2, 18, 2), img_size=384,
                                               window_size=12)),
    "swin_tiny": (SwinConfig, dict(depths=(2, 2, 6, 2), attn_type="SSSS")),
    "swin_small": (SwinConfig, dict(depths=(2, 2, 18, 2), attn_type="SSSS")),
    "swin_base": (SwinConfig, dict(_SWIN_B, depths=(2, 2, 18, 2), attn_type="SSSS")),
    "flatten_cswin_tiny": (CSwinConfig, dict(depths=(2, 4, 18, 1))),
    "flatten_cswin_small": (CSwinConfig, dict(depths=(2, 4, 32, 2))),
    "flatten_cswin_base": (CSwinConfig, dict(_CSWIN_B, depths=(3, 6, 29, 2))),
    "flatten_cswin_base_384": (CSwinConfig, dict(_CSWIN_B, depths=(3, 6, 29, 2), img_size=384,
                                                 split_size=(1, 2, 12, 12))),
    # CSWin-T / S / B as published (the FLatten models move blocks between stages)
    "cswin_tiny": (CSwinConfig, dict(depths=(1, 2, 21, 1), attn_type="SSSS")),
    "cswin_small": (CSwinConfig, dict(depths=(2, 4, 32, 2), attn_type="SSSS")),
    "cswin_base": (CSwinConfig, dict(_CSWIN_B, depths=(2, 4, 32, 2), attn_type="SSSS")),
    # L2ViT-T / S / B / B at 384; the 22k pretrain is l2vit_base with num_classes=21841
    "l2vit_tiny": (L2ViTConfig, dict(depths=(2, 2, 6, 2))),
    "l2vit_small": (L2ViTConfig, dict(depths=(2, 2, 18, 2))),
    "l2vit_base": (L2ViTConfig, dict(_L2VIT_B, depths=(2, 2, 18, 2))),
    "l2vit_base_384": (L2ViTConfig, dict(_L2VIT_B, depths=(2, 2, 18, 2), img_size=384,
                                         window_size=12)),
}
_FAMILIES = {PVTConfig: PyramidVisionTransformer, DeiTConfig: VisionTransformer,
             SwinConfig: SwinTransformer, CSwinConfig: CSwinTransformer, L2ViTConfig: L2ViT}


def _unknown_model(name) -> str:
    close = difflib.get_close_matches(str(name).lower(), MODELS, n=3)
    return (f"unknown model {name!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
            + f"known models: {', '.join(list_models())}")


def list_models(pattern: str = "") -> List[str]:
    """Names create_model knows, sorted, or those `pattern` selects: with a wildcard (*, ? or
    [...]) the names it matches whole, as timm's list_models ("*swin*", "flatten_swin_*");
    without, the names in which it stands as whole words between underscores ("swin": the Swin
    models, not CSwin; "flatten", "tiny", "pvt_v2"). "" or "*": every name."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {type(pattern).__name__}")
    if any(c in pattern for c in "*?["):
        return sorted(fnmatch.filter(MODELS, pattern))
    words = re.compile(rf"(^|_){re.escape(pattern)}(_|$)")
    return sorted(name for name in MODELS if not pattern or words.search(name))


def create_model(name: str, checkpoint: Union[None, str, os.PathLike, dict] = None, *,
                 use_ema: bool = False, **overrides) -> nn.Module:
    """Build a model by name; overrides replace config fields (img_size, num_classes, depths,
    normalizer, ...). With checkpoint (a path or a state dict), load it through load_pretrained,
    strictly; use_ema=True loads the checkpoint's EMA weights instead of its 'model' weights.

    The released official checkpoints were trained with the sum normaliser:
    create_model("flatten_pvt_tiny", checkpoint=path, normalizer="sum").
    """
    if name not in MODELS:
        raise ValueError(_unknown_model(name))
    cfg_cls, base = MODELS[name]
    known = {f.name for f in fields(cfg_cls)}
    bad = sorted(set(overrides) - known)
    if bad:
        hint = " (weights: checkpoint=path)" if "pretrained" in bad else ""
        raise ValueError(f"{name} has no config field {', '.join(bad)}{hint}; "
                         f"fields: {', '.join(sorted(known))}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    if use_ema and checkpoint is None:
        raise ValueError("use_ema=True loads the EMA weights of a checkpoint: pass checkpoint=")
    model = _FAMILIES[cfg_cls](cfg_cls(**{**base, **tuples}))
    model.pretrained_cfg = pretrained_cfg(name)
    if checkpoint is not None:
        _load_pretrained(model, checkpoint, strict=True, use_ema=use_ema)
    return model


# -----------------------------------------------------------------------------
# The official evaluation: settings by name (timm's pretrained_cfg) and eval_transform
#
# The official FLatten pipeline (data/build.py, build_transform(is_train=False), with the
# defaults of config.py: DATA.INTERPOLATION "bicubic", TEST.CROP True) resizes each PIL image to
# a square of int(256 / 224 * IMG_SIZE) pixels whatever its aspect ratio (transforms.Resize((s,
# s)): a warp, not a resize of the short side), crops the centre IMG_SIZE x IMG_SIZE, then
# ToTensor and Normalize with timm's IMAGENET_DEFAULT_MEAN / STD. With TEST.CROP False, which
# only cfgs/flatten_swin_b_384.yaml sets, it warps to IMG_SIZE x IMG_SIZE directly. The
# cfgs/*.yaml files change nothing else of it but IMG_SIZE (224; 384 in the two *_384 files).
# In timm's terms: crop_mode "squash", crop_pct 224 / 256 (1.0 for FLatten-Swin-B 384); timm's
# resize to floor(size / crop_pct) is the official int(256 / 224 * size): 256 at 224, 438 at 384.

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _eval_cfg(official_name: Optional[str] = None, official_config: Optional[str] = None, *,
              size: int = 224, crop_pct: float = 224 / 256, crop_mode: str = "squash",
              released: bool = False) -> dict:
    """One name's evaluation settings under timm's pretrained_cfg keys, and their source."""
    return dict(input_size=(3, size, size), interpolation="bicubic", crop_pct=crop_pct,
                crop_mode=crop_mode, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                num_classes=1000, official_name=official_name, official_config=official_config,
                released=released)


# The names of an official row: the official README's "Pretrained Models" table (released=True)
# and the other cfgs/*.yaml files. Every other name (FLatten-PVTv2-B5, which has no config file;
# FLatten-DeiT and the softmax counterparts, which have no official FLatten weights) gets
# _eval_cfg() at its img_size: the official pipeline's defaults, so that it is evaluated as the
# FLatten models it is compared with. A name's settings are one entry here.
PRETRAINED_CFGS: Dict[str, dict] = {
    "flatten_pvt_tiny": _eval_cfg("FLatten-PVT-T", "cfgs/flatten_pvt_t.yaml", released=True),
    "flatten_pvt_small": _eval_cfg("FLatten-PVT-S", "cfgs/flatten_pvt_s.yaml"),
    "flatten_pvt_medium": _eval_cfg("FLatten-PVT-M", "cfgs/flatten_pvt_m.yaml"),
    "flatten_pvt_large": _eval_cfg("FLatten-PVT-L", "cfgs/flatten_pvt_b.yaml"),
    "flatten_pvt_v2_b0": _eval_cfg("FLatten-PVTv2-B0", "cfgs/flatten_pvt_v2_b0.yaml",
                                   released=True),
    "flatten_pvt_v2_b1": _eval_cfg("FLatten-PVTv2-B1", "cfgs/flatten_pvt_v2_b1.yaml"),
    "flatten_pvt_v2_b2": _eval_cfg("FLatten-PVTv2-B2", "cfgs/flatten_pvt_v2_b2.yaml"),
    "flatten_pvt_v2_b3": _eval_cfg("FLatten-PVTv2-B3", "cfgs/flatten_pvt_v2_b3.yaml"),
    "flatten_pvt_v2_b4": _eval_cfg("FLatten-PVTv2-B4", "cfgs/flatten_pvt_v2_b4.yaml"),
    "flatten_swin_tiny": _eval_cfg("FLatten-Swin-T", "cfgs/flatten_swin_t.yaml", released=True),
    "flatten_swin_small": _eval_cfg("FLatten-Swin-S", "cfgs/flatten_swin_s.yaml", released=True),
    "flatten_swin_base": _eval_cfg("FLatten-Swin-B", "cfgs/flatten_swin_b.yaml", released=True),
    "flatten_swin_base_384": _eval_cfg("FLatten-Swin-B", "cfgs/flatten_swin_b_384.yaml",
                                       size=384, crop_pct=1.0, released=True),
    "flatten_cswin_tiny": _eval_cfg("FLatten-CSwin-T", "cfgs/flatten_cswin_t.yaml",
                                    released=True),
    "flatten_cswin_small": _eval_cfg("FLatten-CSwin-S", "cfgs/flatten_cswin_s.yaml"),
    "flatten_cswin_base": _eval_cfg("FLatten-CSwin-B", "cfgs/flatten_cswin_b.yaml"),
    "flatten_cswin_base_384": _eval_cfg("FLatten-CSwin-B", "cfgs/flatten_cswin_b_384.yaml",
                                        size=384),
    # L2ViT (classification/main.py, build_transform(is_train=False)): below 384 the short side
    # resized to int(size / crop_pct), crop_pct 0.875 (timm's "center"), then the centre crop;
    # at 384 a warp to 384 x 384, no crop. The official row: the factory main.py evaluates.
    "l2vit_tiny": _eval_cfg("L2ViT-T", "main.py --model L2ViT_Tiny", crop_mode="center",
                            released=True),
    "l2vit_small": _eval_cfg("L2ViT-S", "main.py --model L2ViT_Small", crop_mode="center",
                             released=True),
    "l2vit_base": _eval_cfg("L2ViT-B", "main.py --model L2ViT_Base", crop_mode="center",
                            released=True),
    "l2vit_base_384": _eval_cfg("L2ViT-B", "main.py --model L2ViT_Base_384", size=384,
                                crop_pct=1.0, released=True),
}


def pretrained_cfg(name: str) -> dict:
    """The evaluation settings of a registered name (timm's pretrained_cfg, a new dict):
    input_size (C, H, W), interpolation, crop_pct, crop_mode, mean, std and num_classes, with
    the official row they come from (official_name, official_config: None for names without
    one) and whether its weights were released. create_model sets it as model.pretrained_cfg."""
    if name not in MODELS:
        raise ValueError(_unknown_model(name))
    if name in PRETRAINED_CFGS:
        return dict(PRETRAINED_CFGS[name])
    cfg_cls, base = MODELS[name]
    return _default_eval_cfg(cfg_cls(**base))


def _default_eval_cfg(cfg) -> dict:
    """The official pipeline of a model config's family at its img_size: FLatten's warp and
    crop (_eval_cfg's defaults); L2ViT's short side and centre crop, or from 384 up its warp to
    the size (PRETRAINED_CFGS' L2ViT rows)."""
    h, w = _to_2tuple(cfg.img_size, "img_size")
    family = {}
    if isinstance(cfg, L2ViTConfig):
        family = dict(crop_pct=1.0) if max(h, w) >= 384 else dict(crop_mode="center")
    return dict(_eval_cfg(**family), input_size=(3, h, w))


def eval_transform(model_or_name_or_cfg: Union[nn.Module, str, dict],
                   **overrides) -> "EvalTransform":
    """The official evaluation preprocessing, in torch alone: eval_transform(model)(image).

    Takes a model (its pretrained_cfg, which create_model sets; a model built from its class
    gets the official defaults at its img_size), a registered name, or a cfg dict with timm's
    keys input_size, interpolation, crop_pct, mean, std and crop_mode ("center" if absent, as
    in timm); keyword overrides replace any of these, e.g. input_size=(3, 288, 288). The
    returned EvalTransform maps images (C, H, W) or (B, C, H, W), uint8 in [0, 255] or float in
    [0, 1], to the normalised float32 batch (B, C, h, w) of the evaluation size.
    """
    src = model_or_name_or_cfg
    if isinstance(src, str):
        cfg = pretrained_cfg(src)
    elif isinstance(src, dict):
        cfg = src
    elif isinstance(src, nn.Module) and hasattr(src, "pretrained_cfg"):
        cfg = src.pretrained_cfg
    elif isinstance(src, nn.Module) and hasattr(getattr(src, "cfg", None), "img_size"):
        cfg = _default_eval_cfg(src.cfg)
    else:
        raise ValueError("eval_transform takes a model of this file, a registered name or a cfg "
                         f"dict, got {type(src).__name__}")
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    bad = sorted(set(overrides) - set(keys))
    if bad:
        raise ValueError(f"eval_transform has no setting {', '.join(bad)}; settings: "
                         f"{', '.join(keys)}")
    cfg = {"crop_mode": "center", **cfg, **overrides}
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"the cfg lacks {', '.join(missing)}; expected the keys {keys}")
    input_size = tuple(cfg["input_size"])
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {cfg['input_size']!r}")
    return EvalTransform(input_size[0], _to_2tuple(input_size[1:], "input_size (H, W)"),
                         cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"],
                         tuple(cfg["mean"]), tuple(cfg["std"]))


@dataclass(frozen=True)
class EvalTransform:
    """Resize, centre crop and normalise images for evaluation (made by eval_transform).

    crop_mode "squash" (the official FLatten pipeline) resizes to floor(size / crop_pct) on each
    side whatever the aspect ratio, "center" (timm's default) the short side to
    floor(size / crop_pct) keeping the aspect ratio; then the centre size x size crop (offsets
    rounded as torchvision rounds them), then (x - mean) / std. The resize is PIL's, which the
    official pipeline runs: an antialiased filter (F.interpolate(antialias=True) computes the
    same weights) over the width, then over the height, uint8 images rounded and clipped to
    [0, 255] after each pass (float images clipped to [0, 1]).
    """
    in_chans: int
    size: Tuple[int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', "
                             f"got {self.interpolation!r}")
        if not _is_real(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in ("squash", "center"):
            raise ValueError(f"crop_mode must be 'squash' or 'center', got {self.crop_mode!r}")
        if self.crop_mode == "center" and self.size[0] != self.size[1]:
            raise ValueError(f"crop_mode 'center' needs a square input size, got {self.size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or \
                not all(_is_real(s) and s > 0 for s in self.std):
            raise ValueError(f"mean and std need {self.in_chans} values (std > 0), got "
                             f"{self.mean}, {self.std}")

    def resize_size(self, H: int, W: int) -> Tuple[int, int]:
        """The size an H x W image is resized to before the crop."""
        h, w = (math.floor(s / self.crop_pct) for s in self.size)
        if self.crop_mode == "squash":
            return h, w
        return (h, int(h * W / H)) if H <= W else (int(h * H / W), h)  # torchvision's rounding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = self._check(image)                                      # (B, C, H, W)
        H = x.shape[-2]
        rh, rw = self.resize_size(*x.shape[-2:])
        uint8, x = x.dtype == torch.uint8, x.float()
        for size in ((H, rw), (rh, rw)):  # as PIL: the width, then the height, each pass clipped
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                              antialias=True)
            x = x.round().clamp(0, 255) if uint8 else x.clamp(0, 1)
        x = x / 255 if uint8 else x
        h, w = self.size
        top, left = int(round((rh - h) / 2)), int(round((rw - w) / 2))
        x = x[..., top:top + h, left:left + w]                      # (B, C, h, w)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)
                     for v in (self.mean, self.std))
        return ((x - mean) / std).contiguous()

    def _check(self, image) -> torch.Tensor:
        expected = (f"expected an image tensor ({self.in_chans}, H, W) or (B, {self.in_chans}, "
                    "H, W), uint8 in [0, 255] or float in [0, 1]")
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"{expected}, got a {type(image).__name__} (a PIL image: torch."
                             "from_numpy(numpy.asarray(img.convert('RGB'))).permute(2, 0, 1))")
        x = image.unsqueeze(0) if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < 1:
            raise ValueError(f"{expected}, got shape {tuple(image.shape)} (channels first: "
                             "an (H, W, C) array needs .permute(2, 0, 1))")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"{expected}, got {x.dtype}")
        if x.is_floating_point() and x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"{expected}, got float values in [{x.min().item():.4g}, "
                             f"{x.max().item():.4g}]: pass uint8, or divide by 255")
        return x


# =============================================================================
# 4. Checkpoint loading

__all__ += ["load_pretrained", "checkpoint_filter_fn"]

# Classes of a checkpoint's non-tensor objects (a training config, say) that loading stands in
# for with inert data. Any other global of the standard library (builtins.eval, os.system, ...)
# makes loading refuse the file.
_STDLIB_DATA_CLASSES = {"argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath",
                        "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "datetime.datetime",
                        "datetime.date", "datetime.timedelta"}
# numpy's scalars and arrays (a max_accuracy of np.float64, a saved RNG state): loaded as the
# numpy objects they are, through the globals torch's documentation allows for them under
# weights_only=True (numpy is there whenever a file holds them: it was saved with it).
_NUMPY_DATA = re.compile(r"numpy\.(ndarray|dtype|dtypes\.\w+DType|"
                         r"_?core\.multiarray\.(_reconstruct|scalar))$")
_STDLIB = set(getattr(sys, "stdlib_module_names", ())) or {
    "builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib",
    "runpy", "pickle", "marshal", "code", "ctypes", "functools", "operator", "types", "io"}


def _inert_class(qualified: str) -> type:
    """A stand-in for a class pickled in a checkpoint: every construction gives an empty
    OrderedDict, which the unpickler fills with the pickled items and attributes as plain data.
    Nothing from the file is executed."""
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name,
                           "__new__": lambda cls, *args, **kwargs: OrderedDict()})


def _unsafe_globals(path, error: Exception) -> List[str]:
    """The globals besides tensors that weights-only loading refused in a file."""
    ser = torch.serialization
    if zipfile.is_zipfile(path) and hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        return list(ser.get_unsafe_globals_in_checkpoint(path))
    # a legacy (non-zip) file: the loader names the first refused global in its message
    names = re.findall(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)", str(error))
    return [n if "." in n else f"builtins.{n}" for n in names]


def _stand_ins(names) -> contextlib.AbstractContextManager:
    if not names:
        return contextlib.nullcontext()
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
        raise ValueError(f"the checkpoint pickles {', '.join(sorted(names))} besides tensors, "
                         f"which this torch ({torch.__version__}) cannot read around safely: "
                         "upgrade to torch >= 2.5, or re-save the weights alone from a trusted "
                         "copy: torch.save(torch.load(path, weights_only=False)['model'], ...)")
    allowed = [_numpy_global(n) if _NUMPY_DATA.match(n) else _inert_class(n)
               for n in sorted(names)]
    if any(_NUMPY_DATA.match(n) for n in names):  # a dtype unpickles as its class, unnamed
        with contextlib.suppress(ImportError):
            dtypes = importlib.import_module("numpy.dtypes")
            allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return torch.serialization.safe_globals(allowed)


def _numpy_global(qualified: str):
    """The numpy object a checkpoint names (a _NUMPY_DATA global), or an inert stand-in where
    numpy is missing."""
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return _inert_class(qualified)


def _torch_load(path: Union[str, os.PathLike]) -> object:
    """torch.load with weights_only=True; never executes pickled code.

    The released official checkpoints pickle a config object (a yacs CfgNode) next to the
    weights, which weights_only=True refuses: such classes are replaced by inert stand-ins, so
    the tensors come out and nothing from the file runs. Anything that is not a checkpoint, or
    pickles a function or class of the standard library, raises one ValueError naming the file.
    """
    path = os.path.expanduser(path)  # "~/weights.pth" as a shell would read it
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; expected the path of a checkpoint file "
                                "(one saved with torch.save) inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    names: set = set()
    for _ in range(64):  # a legacy file names its refused globals one per attempt
        stand_ins = _stand_ins(names)
        try:
            with stand_ins:
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - every failure becomes one ValueError
            new = set(_unsafe_globals(path, err)) - names if _is_unpickling(err) else set()
            if any(n.startswith("torch.nn.modules.") for n in new):
                raise ValueError(f"{path} holds a pickled module (a file of torch.save(model)), "
                                 "whose classes loading would have to import and run; expected "
                                 "weights: save them with torch.save(model.state_dict(), path) "
                                 "and load that file") from None
            refused = sorted(n for n in new if n.split(".")[0] in _STDLIB
                             and n not in _STDLIB_DATA_CLASSES)
            if refused:
                raise ValueError(f"refused to load {path}: it pickles {', '.join(refused)}, "
                                 "which can run code; expected tensors and plain data") from None
            if not new:
                raise ValueError(f"{path} is not a checkpoint this torch can read"
                                 f"{_damage(path, err)}; expected a file saved with torch.save "
                                 f"(torch.load: {type(err).__name__}: {_reason(err)})") from err
            names |= new
    raise ValueError(f"{path}: too many pickled classes besides tensors")


def _is_unpickling(err: Exception) -> bool:
    return isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower()


def _reason(err: Exception) -> str:
    """The first line of err's message; a long one cut after its last whole sentence."""
    lines = str(err).strip().splitlines()
    if not lines:
        return "no message"
    sentences = re.split(r"(?<=\.)\s+", lines[0])
    kept = sentences[0]
    for s in sentences[1:]:
        if len(kept) + 1 + len(s) > 240:
            break
        kept += " " + s
    return kept


def _damage(path, err: Exception) -> str:
    """What can be told from the file itself: empty, or ending early (truncated, corrupted)."""
    if os.path.getsize(path) == 0:
        return ": the file is empty"
    with open(path, "rb") as f:
        zip_start = f.read(4) == b"PK\x03\x04"
    if (zip_start and not zipfile.is_zipfile(path)) or isinstance(err, EOFError) \
            or "unexpected EOF" in str(err):
        return ": the file ends early, truncated or corrupted (an interrupted download or copy?)"
    return ""


# Where a checkpoint dict holds its weights, in the order they are looked for: the official
# FLatten and L2ViT files keep the weights under 'model' and, trained with an EMA, the EMA copy
# under 'state_dict_ema' (FLatten-CSwin) or 'model_ema' (L2ViT, timm's scripts).
_WEIGHTS_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
_EMA_KEYS = ("model_ema", "state_dict_ema")


def _unwrap(checkpoint, source: str = "checkpoint",
            use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under the first of _WEIGHTS_KEYS it holds (the key
    order of the file does not matter), or under the first of _EMA_KEYS with use_ema, or the
    checkpoint itself; tensors only, the prefixes of DistributedDataParallel and torch.compile
    dropped."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}; expected a state dict "
                         "(a dict of tensors) or a dict holding one under "
                         f"{', '.join(map(repr, _WEIGHTS_KEYS))}")
    keys = _EMA_KEYS if use_ema else _WEIGHTS_KEYS
    found = [k for k in keys if isinstance(checkpoint.get(k), dict)]
    if use_ema and not found:
        raise ValueError(f"use_ema=True but {source} holds no EMA weights (no "
                         f"{' or '.join(map(repr, _EMA_KEYS))}; top-level keys: "
                         f"{sorted(map(str, checkpoint))[:10]})")
    if found:
        checkpoint = checkpoint[found[0]]
    sd = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"no tensors found in {source} (top-level keys: "
                         f"{sorted(map(str, checkpoint))[:10]})")
    # saved from DistributedDataParallel ('module.') or a torch.compile'd model ('_orig_mod.')
    for prefix in ("_orig_mod.", "module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# Keys the official training script saves next to 'model' (with 'optimizer', 'lr_scheduler' and
# 'epoch'), which the released files therefore hold; a plain state dict has none of them.
_OFFICIAL_TRAINING_KEYS = ("config", "max_accuracy")


def _warn_released_with_mean(checkpoint: dict, model: nn.Module, source: str) -> None:
    """One UserWarning when a released official checkpoint goes into focused linear layers with
    the mean normaliser: the released files were trained with the sum one.

    A heuristic: the released files are the official training script's checkpoints, the weights
    under 'model' next to 'config' or 'max_accuracy'. A state dict, or weights under 'model'
    without those keys (what most training loops save), loads without a warning; a checkpoint
    of the official script trained with normalizer="mean" warns wrongly (filter the warning).
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) or \
            not any(k in checkpoint for k in _OFFICIAL_TRAINING_KEYS):
        return
    mean = [name for name, m in model.named_modules() if getattr(m, "normalizer", None) == "mean"]
    if mean:
        keys = " and ".join(repr(k) for k in _OFFICIAL_TRAINING_KEYS if k in checkpoint)
        warnings.warn(f"{source} looks like a released official checkpoint (weights under 'model' "
                      f"next to {keys}), which were trained with normalizer=\"sum\", but "
                      f"{len(mean)} focused linear layers of {type(model).__name__} use "
                      "normalizer=\"mean\": build the model with normalizer=\"sum\", e.g. "
                      "create_model(name, normalizer=\"sum\", checkpoint=path)", UserWarning,
                      stacklevel=4)  # the caller of load_pretrained or create_model


def _describe(obj) -> Tuple[str, str]:
    """What a wrong `checkpoint` argument is, and a hint, for the error message."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}", ""
    if isinstance(obj, nn.Module):
        return f"a module ({type(obj).__name__})", ": pass its state_dict()"
    if hasattr(obj, "read"):
        name = getattr(obj, "name", None)
        return f"an open file object ({type(obj).__name__})", \
            f": pass its path, {name!r}" if isinstance(name, str) else \
            ": pass the dict that torch.load(f, weights_only=True) returns"
    text = repr(obj)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (of type {type(obj).__name__})", ""


def _square_grid(rows: int, key: str) -> Tuple[int, int]:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"cannot tell the grid of {key} ({rows} positions, not a square): build "
                         "the model at the checkpoint's size, load, then call set_input_size")
    return side, side


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a (possibly official) state_dict to `model`; a pure function of its inputs.

    Drops the official v1 `norm` (never applied) when the model has none; resamples pos_embed*
    and positional_encoding tables whose size differs (the checkpoint's grids are taken as
    square, as the official models are); keeps the model's own classifier when the checkpoint's
    has another shape (another num_classes, or num_classes=0).
    """
    own = model.state_dict()
    out = {}
    if isinstance(model, SwinTransformer):
        state_dict = _from_official_swin(state_dict, own)
    head = [k for k in own if k.startswith("head.")]
    if _other_head(state_dict, own):
        # another num_classes: keep the model's own (freshly initialised) classifier
        state_dict = {**{k: v for k, v in state_dict.items() if not k.startswith("head.")},
                      **{k: own[k] for k in head}}
    for key, value in state_dict.items():
        if key.startswith("norm.") and key not in own \
                and isinstance(model, PyramidVisionTransformer):
            continue
        target = own.get(key)
        if target is not None and target.shape != value.shape and value.dim() == 3 \
                and (key.startswith("pos_embed") or key.endswith("positional_encoding")):
            prefix, new_hw = _table_layout(model, key)
            value = resample_grid(value, _square_grid(value.shape[1] - prefix, key), new_hw, prefix)
        if target is not None and target.shape != value.shape and value.dim() == 2 \
                and key.endswith("relative_position_bias_table"):
            value = resample_grid(value[None], _square_grid(value.shape[0], key),
                                  _square_grid(target.shape[0], key))[0]
        out[key] = value
    return out


def _other_head(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's classifier has another shape than the model's (another
    num_classes, or a model without one)."""
    head = [k for k in own if k.startswith("head.")]
    return any(k in state_dict and state_dict[k].shape != own[k].shape for k in head) or \
        (not head and any(k.startswith("head.") for k in state_dict))


def _from_official_swin(state_dict: Dict[str, torch.Tensor],
                        own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official FLatten-Swin keys -> ours: the buffers relative_position_index and attn_mask
    are dropped (ours are built from the window size and the input size), and the fused qkv of
    a focused linear layer is split into its q and kv (rows q, k, v in both)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        stem, _, leaf = key.rpartition(".qkv.")
        if leaf and f"{stem}.q.{leaf}" in own:
            C = value.shape[0] // 3
            out[f"{stem}.q.{leaf}"], out[f"{stem}.kv.{leaf}"] = value[:C], value[C:]
            continue
        out[key] = value
    return out


def _table_layout(model: nn.Module, key: str) -> Tuple[int, Tuple[int, int]]:
    """(class tokens, grid) of a position table of `model`."""
    if key.endswith("positional_encoding"):
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(layer, CSwinLinearAttention):
            return 0, layer.grid_size
        return layer.num_prefix_tokens, layer.key_grid(*layer.grid_size)
    if isinstance(model, VisionTransformer):
        return 1, model.grid_size
    return 0, model.grid_sizes[int(key[len("pos_embed"):]) - 1]


def load_pretrained(model: nn.Module, checkpoint: Union[str, os.PathLike, dict],
                    strict: bool = True, *, use_ema: bool = False):
    """Load a checkpoint (path or dict) into `model`: official FLatten / L2ViT files or our own.

    A path is read with torch.load(weights_only=True): no pickled code runs (see _torch_load for
    the config objects of the released files). Takes the weights under 'model' (or
    'state_dict', ...: _WEIGHTS_KEYS), with use_ema=True the EMA weights under 'model_ema' or
    'state_dict_ema' instead (a ValueError if the file has none); drops a 'module.' prefix;
    adapts keys and sizes with checkpoint_filter_fn, then loads.

    strict=True: any key still missing, unexpected or of another shape raises one ValueError
    that lists them all. strict=False: loads every tensor that fits and warns once, listing
    what it left out (missing, unexpected and mis-shaped keys). Returns load_state_dict's
    (missing_keys, unexpected_keys). A released official FLatten file loaded into focused linear
    layers with normalizer="mean" warns (see _warn_released_with_mean). A missing path raises
    FileNotFoundError, a directory IsADirectoryError, an unreadable (empty, truncated) file, a
    pickled module or a checkpoint that is neither a path nor a dict a ValueError.
    """
    return _load_pretrained(model, checkpoint, strict, use_ema)


def _load_pretrained(model: nn.Module, checkpoint, strict: bool, use_ema: bool = False):
    """load_pretrained, which create_model calls too: a warning points at their caller."""
    if not isinstance(checkpoint, (dict, str, os.PathLike)):
        given, hint = _describe(checkpoint)
        raise ValueError(f"checkpoint is {given}; expected the path of a checkpoint file (a str "
                         "or os.PathLike) or a state dict (a dict of tensors, or a dict holding "
                         f"one under 'model', 'state_dict' or 'model_ema'){hint}")
    source = "the checkpoint dict"
    if not isinstance(checkpoint, dict):
        source = str(checkpoint)
        checkpoint = _torch_load(checkpoint)
    _warn_released_with_mean(checkpoint, model, source)
    raw = _unwrap(checkpoint, source, use_ema)
    own = model.state_dict()
    sd = checkpoint_filter_fn(raw, model)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        fit = len(set(sd) & set(own)) - len(shapes)
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:20])}"
                 + (f", ... {len(keys) - 20} more" if len(keys) > 20 else "") for title, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("shape mismatches", [f"{k}: checkpoint {tuple(sd[k].shape)} vs model "
                                        f"{tuple(own[k].shape)}" for k in shapes])) if keys]
        if strict:
            hint = " (a checkpoint of another model?)" if fit < len(own) // 2 else ""
            raise ValueError(f"{source} does not fit {type(model).__name__}: {fit} of its "
                             f"{len(own)} tensors match{hint}; " + "; ".join(parts))
        warnings.warn(f"load_pretrained(strict=False) loaded {fit} of the {len(own)} tensors of "
                      f"{type(model).__name__} from {source} and left out " + "; ".join(parts),
                      UserWarning, stacklevel=3)
        for k in shapes:
            del sd[k]
    if _other_head(raw, own):
        classes = raw["head.weight"].shape[0] if "head.weight" in raw else "?"
        warnings.warn(f"the classifier of {source} ({classes} classes) does not fit "
                      f"{type(model).__name__}'s (num_classes={model.num_classes}): the model "
                      "keeps its own, freshly initialised (to fine-tune; to load the "
                      f"checkpoint's, build the model with num_classes={classes})", UserWarning,
                      stacklevel=3)
    return model.load_state_dict(sd, strict=strict)


# =============================================================================
# 5. Fast paths (optional reading)
#
# Faster ways to compute FocusedLinearAttention.forward, each tested equal to the reference (the
# forward of section 1) on outputs and gradients. forward enters them through one dispatch
# point, _FAST_PATHS (set at the end of this section: _choose_path, then _fast_forward);
# set_fast_path (or FLATTEN_FAST_PATH) chooses which may run:
#   "auto"   every path that applies (the default);
#   "torch"  the torch paths only, not the Triton kernels;
#   "off"    always the reference.
# Nothing above this section uses it: delete it, and forward is the reference everywhere.

try:  # optional: the Triton kernels
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ += ["set_fast_path", "get_fast_path", "fast_path"]

_FAST_PATH_MODES = ("auto", "torch", "off")
_fast_path_mode = os.environ.get("FLATTEN_FAST_PATH", "").strip().lower() or "auto"  # "": unset


def set_fast_path(mode: str) -> None:
    """Choose the fast paths of FocusedLinearAttention for this process: "auto" (every one that
    applies, the Triton kernels on CUDA included), "torch" (no Triton kernels) or "off" (always
    the reference forward). The environment variable FLATTEN_FAST_PATH sets it at import."""
    global _fast_path_mode
    if mode not in _FAST_PATH_MODES:
        raise ValueError(f"fast path mode must be one of {', '.join(_FAST_PATH_MODES)}, "
                         f"got {mode!r}")
    _fast_path_mode = mode


def get_fast_path() -> str:
    """The mode set_fast_path (or FLATTEN_FAST_PATH) chose."""
    if _fast_path_mode not in _FAST_PATH_MODES:
        raise ValueError(f"FLATTEN_FAST_PATH must be one of {', '.join(_FAST_PATH_MODES)}, "
                         f"got {_fast_path_mode!r}")
    return _fast_path_mode


@contextlib.contextmanager
def fast_path(mode: str):
    """set_fast_path(mode) inside a with-block, then the mode before it again:
    `with flatten.fast_path("off"): ...` runs the reference forward (twice differentiable)."""
    before = get_fast_path()
    set_fast_path(mode)
    try:
        yield
    finally:
        set_fast_path(before)


def _choose_path(layer: FocusedLinearAttention, x: torch.Tensor) -> str:
    mode = get_fast_path()
    if mode == "off" or _is_compiling() or _functorch_active() or x.shape[0] == 0:
        return "reference"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                           for p in layer.parameters())):
        return "train"
    if mode == "auto" and _triton_applies(layer, x):
        return "triton"
    if layer.sr_ratio == 1 and x.dtype == layer.scale.dtype and x.dtype not in _HALF \
            and not _autocast_enabled(x.device.type):
        return "inference"
    return "reference"


def _fast_forward(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int, path: str):
    if path == "triton":
        try:
            return _forward_triton(layer, x, H, W)
        except _TritonFailure as e:
            _triton_failed(_triton_key(layer, x), e.__cause__)
        path = layer.forward_path(x)
    if path == "inference":
        return _forward_inference(layer, x, H, W)
    return _forward_train(layer, x, H, W)


# -----------------------------------------------------------------------------
# Training: hand-written backward passes


def _forward_train(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int):
    """The reference forward with the hand-written backward passes of _Focus, _LinearAttention
    and _DepthwiseConv, which save less for the backward than autograd through the formulas."""
    B, N, C = x.shape
    h, P, p = layer.num_heads, layer.num_prefix_tokens, layer.focusing_factor
    q = layer.q(x)
    xk, kh, kw = layer._key_tokens(x, H, W)
    w, b = layer.kv.weight, layer.kv.bias      # two GEMMs: k and v come out contiguous
    k = F.linear(xk, w[:C], None if b is None else b[:C])
    v = F.linear(xk, w[C:], None if b is None else b[C:])
    pe = layer._positional_encoding(kh, kw)
    k = k.add_(pe) if k.dtype == pe.dtype else k + pe
    dt = _compute_dtype(q)
    scale = F.softplus(layer.scale).reshape(-1).to(dt)
    q, m = _Focus.apply(q, scale, p, 1e-6, "token")    # phi(q) / m, m per query (B, N, 1)
    k, M = _Focus.apply(k, scale, p, 1e-6, "batch")    # phi(k) / M, M per sample (B, 1, 1)
    q, k, vh = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
    eps = 1e-6 * k.shape[-2] if layer.normalizer == "mean" else 1e-6
    eps = (eps / m.view(B, 1, N)).div_(M)               # as in linear_attention: maxima of 1
    with _autocast_off(x.device.type):
        out = _LinearAttention.apply(q, k, vh.to(dt), eps).to(v.dtype)   # (B, h, N, d)
    out = out.transpose(1, 2).reshape(B, N, C)
    cpu = x.device.type == "cpu" and not _autocast_enabled("cpu")
    dwc = layer._dwc(v[:, P:], H, W, _depthwise_conv if cpu else F.conv2d)
    out = torch.cat([out[:, :P], out[:, P:] + dwc], dim=1) if P else out + dwc
    return layer.proj_drop(layer.proj(out))


_TWICE = ("the fast path's hand-written backward passes cannot be differentiated twice (a "
          "gradient penalty, or any torch.autograd.grad(..., create_graph=True) differentiated "
          "again); they run whenever grad mode is on and the input or a parameter requires "
          "grad, in eval mode too. Call flatten.set_fast_path(\"off\") first: the reference "
          "forward is twice differentiable")


def _once_differentiable(backward):
    """For autograd.Function.backward: autocast off (the pass computes in the dtypes it chose),
    no graph of the pass itself, and a second derivative refused with an error naming
    set_fast_path("off"). Under create_graph=True the gradients pass through
    _NotTwiceDifferentiable joined to g and to the saved tensors that require grad, so that the
    refusal also holds when g needs no grad but the inputs do (a penalty on d out / d x)."""
    def wrapped(ctx, g, *unused):  # the gradients of outputs marked non-differentiable
        with torch.no_grad(), _autocast_off(g.device.type):
            grads = backward(ctx, g)
        if not torch.is_grad_enabled():   # create_graph=False: the usual backward
            return grads
        links = [t for t in (g, *ctx.saved_tensors) if t is not None and t.requires_grad]
        if not links:
            return grads
        out = iter(_NotTwiceDifferentiable.apply(sum(t is not None for t in grads),
                                                 *(t for t in grads if t is not None), *links))
        return tuple(None if t is None else next(out) for t in grads)
    return wrapped


class _NotTwiceDifferentiable(torch.autograd.Function):
    """The first n inputs (gradients of a hand-written backward) passed through; the others
    only link the node into the graph. Differentiating through it raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tensors[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_TWICE)


class _Focus(torch.autograd.Function):
    """phi_p(x) / D with a derived backward; x (..., C), s (C,) the scale, p, offset, and per:
    "token" divides each token by its largest entry, "batch" every token of a sample by the
    largest entry of the sample (the tokens of x[b]). Returns (phi / D, D); D needs no gradient
    (linear attention does not change with it, the eps aside, which the caller divides by D).

    Per token, with y = (ReLU(x) + offset) / s, m = max(y), t = y / m, P = t^p, a = ||y||,
    b = ||P|| and phi = (a / b) P (its largest entry is a / b). For an upstream gradient g of
    phi / D, dL/dphi = g / D, and with sg = (g / D) . P:
        dL/dy = (p / m) t^(p-1) * ((a / b) g / D - (sg a / b^3) P) + (sg m / (a b)) t
    (the terms of d(P)/dy, d(1/b)/dy and d(a)/dy), then dL/dx = dL/dy [x > 0] / s and
    dL/ds = -(sum over tokens of m dL/dy * t) / s. Saves t, the mask [x > 0] and four numbers
    per token, where autograd through the formula keeps every intermediate.
    """

    @staticmethod
    def forward(ctx, x, s, p, offset, per):
        dt = s.dtype
        tiny = torch.finfo(dt).tiny
        positive = x > 0 if ctx.needs_input_grad[0] else None
        y = torch.clamp_min(x.to(dt), 0).add_(offset).div_(s)
        m = y.amax(dim=-1, keepdim=True).clamp_min_(tiny)
        t = y.div_(m)
        a = torch.linalg.vector_norm(t, dim=-1, keepdim=True).mul_(m)
        P = t.pow(p) if p != 1 else t
        b = torch.linalg.vector_norm(P, dim=-1, keepdim=True).clamp_min_(tiny)
        f = a / b                                                 # phi = f P, max(phi) = f
        D = f if per == "token" else f.amax(dim=tuple(range(1, f.dim())), keepdim=True)
        D = D.clamp_min(tiny)
        ctx.save_for_backward(positive, s, t, m, a, b, D)
        ctx.p, ctx.offset, ctx.x_dtype = p, offset, x.dtype
        ctx.mark_non_differentiable(D)
        f = f.div_(D)
        return (P.mul_(f) if p != 1 else P * f), D   # t (P at p = 1) is saved

    @staticmethod
    @_once_differentiable
    def backward(ctx, g):
        positive, s, t, m, a, b, D = ctx.saved_tensors
        p, dt = ctx.p, s.dtype
        g = g.to(dt)
        tp1 = None
        if p != 1:
            tp1 = t.pow(p - 1) if p != 2 else t
            if p < 1:  # t^(p-1) is infinite at t = 0, where [x > 0] zeroes the gradient anyway
                tp1 = torch.where(t > 0, tp1, torch.zeros_like(tp1))
        P = tp1 * t if tp1 is not None else t
        sg = (g * P).sum(dim=-1, keepdim=True).div_(D)
        a_b, p_m = a / b, p / m
        gy = g * (a_b * p_m / D)                                  # dL/dy, term by term
        gy.addcmul_(P, sg * a_b * p_m / b.square(), value=-1)
        if tp1 is not None:
            gy.mul_(tp1)
        gy.addcmul_(t, sg * m / (a.clamp_min(torch.finfo(dt).tiny) * b))
        if not ctx.offset:
            gy.masked_fill_(a == 0, 0.)  # a token ReLU zeroes: phi is 0 all around it
        gs = None
        if ctx.needs_input_grad[1]:
            gs = ((gy * t).reshape(-1, t.shape[-1]).t() @ m.reshape(-1)).div_(s).neg_()
        gx = gy.div_(s).mul_(positive).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return gx, gs, None, None, None


class _LinearAttention(torch.autograd.Function):
    """out = (q KV) * r with KV = k^T v, ks = sum_j k_j, r = 1 / (q . ks + eps); per (B, h);
    eps a number or a tensor that broadcasts to (B, h, N).

    Backward, for an upstream gradient g (N x dv), with G = g KV^T (N x d):
        dL/dr_i = q_i . G_i,   dL/dden_i = -r_i^2 dL/dr_i   (den = q . ks + eps)
        dL/dq   = r G + dL/dden ks^T,    dL/dKV = q^T (r g),   dL/dks = q^T dL/dden
        dL/dk   = v dL/dKV^T + 1 dL/dks^T,    dL/dv = k dL/dKV
    Saves q, k, v (which the caller holds anyway) and the small KV, ks, r, where autograd
    through the formula also keeps q KV and the normaliser's intermediates. The output and the
    gradients take the memory layout of the heads they belong to (strided views of (B, N, C)
    tensors), so that merging the heads back costs no copy.
    """

    @staticmethod
    def forward(ctx, q, k, v, eps):
        kv = k.transpose(-2, -1) @ v                                    # (B, h, d, dv)
        ks = k.sum(dim=-2)                                              # (B, h, d)
        # a head whose features all underflow (q . ks = 0, a tiny eps) would get r = inf, and
        # 0 * inf = NaN: r stays finite, and so 0 where q is 0, as the reference gives
        r = torch.einsum("bhnd,bhd->bhn", q, ks).add_(eps).reciprocal_()
        r = r.clamp_max_(torch.finfo(r.dtype).max).unsqueeze(-1)
        ctx.save_for_backward(q, k, v, kv, ks, r)
        B, h, N, _ = q.shape
        out = q.new_empty(B, N, h, v.shape[-1]).transpose(1, 2)          # heads merge for free
        return torch.matmul(q, kv, out=out).mul_(r)                     # (B, h, N, dv)

    @staticmethod
    @_once_differentiable
    def backward(ctx, g):
        q, k, v, kv, ks, r = ctx.saved_tensors
        g = g.to(q.dtype)
        G = torch.matmul(g, kv.transpose(-2, -1), out=torch.empty_like(q))   # (B, h, N, d)
        gden = (q * G).sum(dim=-1, keepdim=True).mul_(r).mul_(r).neg_()     # (B, h, N, 1)
        gq = G.mul_(r).addcmul_(gden, ks.unsqueeze(-2))
        gkv = q.transpose(-2, -1) @ (g * r)                             # (B, h, d, dv)
        gks = torch.einsum("bhnd,bhn->bhd", q, gden.squeeze(-1))
        gk = torch.matmul(v, gkv.transpose(-2, -1), out=torch.empty_like(k))
        gk.add_(gks.unsqueeze(-2))
        gv = torch.matmul(k, gkv, out=torch.empty_like(v))
        return gq, gk, gv, None


def _depthwise_conv(x, weight, bias, padding: int, groups: int):
    """F.conv2d of a depthwise convolution (groups = channels), through _DepthwiseConv."""
    return _DepthwiseConv.apply(x, weight, bias, padding)


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution (stride 1, zero padding k // 2, odd k) whose gradients are
    depthwise convolutions themselves, for an upstream gradient g (B, C, H, W):
        dL/dx    = conv(g, w flipped in both spatial axes), same padding;
        dL/dw[c] = sum_b conv(x[b, c] zero-padded by k // 2, kernel g[b, c]);
        dL/db[c] = sum of g[:, c] over the batch and the pixels.
    The weight gradient runs one sample at a time.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    @_once_differentiable
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
        if ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2, 3))
        return gx, gw, gb, None


# -----------------------------------------------------------------------------
# Inference: no autograd, sr_ratio 1, float32 / float64
#
# The same function as forward, with fewer passes over the tokens and fewer temporaries:
#   1. The scale s = softplus(.) and the offset o = 1e-6 fold into the q and k projections:
#      (ReLU(z) + o) / s = max(z / s + o / s, o / s), so GEMMs with W / s (the k GEMM adds onto
#      (pe + b_k) / s + o / s, written first), then one clamp, give y for q and for k.
#   2. phi_p(y) = c t^p with t = y / max(y) and c = ||y|| / ||t^p||, in place.
#   3. The queries' factor c cancels between numerator and normaliser up to the eps:
#      q KV / (q . ks + eps) = t^p KV / (t^p . ks + eps / c) exactly, so only the keys take c,
#      divided by M, the largest c of the sample's keys (the eps then by c M): every factor of
#      the products has a maximum of 1, as in linear_attention, and cannot overflow.
#   4. r q KV + DWC(v) is one pass (addcmul) into the spent buffer of the keys.


def _focus_in_place(y: torch.Tensor, floor: torch.Tensor, p: float) -> torch.Tensor:
    """y = z / s + o / s, the clamp not yet applied -> t^p in place; returns c = ||y|| / ||t^p||
    per token (phi = c t^p, step 2)."""
    t = y.clamp_min_(floor)
    m = t.amax(dim=-1, keepdim=True)
    a = torch.linalg.vector_norm(t.div_(m), dim=-1, keepdim=True).mul_(m)    # ||y||
    if p != 1:
        t.pow_(p)
    return a.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True))


def _forward_inference(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int):
    B, N, C = x.shape
    h, d, P, p = layer.num_heads, layer.head_dim, layer.num_prefix_tokens, layer.focusing_factor
    inv = F.softplus(layer.scale.reshape(C)).reciprocal_()           # 1 / s
    floor = inv * 1e-6                                               # o / s
    wq, wk, wv = layer.q.weight, layer.kv.weight[:C], layer.kv.weight[C:]
    bq, bkv = layer.q.bias, layer.kv.bias
    x2 = x.reshape(B * N, C)
    bias_q = floor if bq is None else torch.addcmul(floor, bq, inv)
    q = torch.addmm(bias_q, x2, (wq * inv[:, None]).t())            # step 1: (q + o) / s
    bias_k = floor if bkv is None else torch.addcmul(floor, bkv[:C], inv)
    k = torch.addcmul(bias_k, layer._positional_encoding(H, W).expand(B, N, C), inv)
    k = torch.addmm(k.view(B * N, C), x2, (wk * inv[:, None]).t(), out=k.view(B * N, C))
    v = F.linear(x, wv, None if bkv is None else bkv[C:])            # (B, N, C)
    cq = _focus_in_place(q, floor, p)                                # queries: t^p (step 3)
    ck = _focus_in_place(k, floor, p).view(B, N, 1)
    M = ck.amax(dim=1, keepdim=True)                                 # (B, 1, 1)
    k.view(B, N, C).mul_(ck.div_(M))                                 # keys: phi / M = c t^p / M
    q, k, vh = (t.view(B, N, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d) views
    kv = k.transpose(-2, -1) @ vh                                    # (B, h, d, d)
    eps = 1e-6 * N if layer.normalizer == "mean" else 1e-6
    eps = cq.view(B, 1, N).reciprocal_().mul_(eps).div_(M)          # step 3
    r = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=-2)).add_(eps).reciprocal_()
    r = r.clamp_max_(torch.finfo(r.dtype).max).unsqueeze(-1)       # finite: as _LinearAttention
    out = torch.matmul(q, kv, out=k)                                 # q KV into k's buffer
    dwc = layer._dwc(v[:, P:], H, W).view(B, N - P, h, d).transpose(1, 2)
    torch.addcmul(dwc, out[:, :, P:], r[:, :, P:], out=out[:, :, P:])   # step 4
    del dwc  # before the projection allocates its output
    if P:
        out[:, :, :P].mul_(r[:, :, :P])
    return layer.proj_drop(layer.proj(out.transpose(1, 2).reshape(B, N, C)))


# -----------------------------------------------------------------------------
# Triton: the inference forward on CUDA
#
# Taken when Triton imports, the input is on a CUDA device, nothing needs a gradient and the
# head dim is at most 64 (a d x d tile of K^T V in float32 registers; at 128 it spills). The
# projections stay cuBLAS GEMMs; everything between them is two kernels, in float32:
#   keys:    per head and chunk of key tokens, phi_p(k + pe) and its partial K^T V and sum_j k_j
#            (summed over the chunks afterwards, in a fixed order: deterministic);
#   queries: per head and block of query tokens, t^p of the queries (their factor c cancels up to
#            the eps, step 3 of the inference path), the normalised t^p K^T V, plus the DWC of v
#            over the k x k neighbours of each grid token, read straight from v.
# The focused kernel scales by the per-token maximum, as the reference does, and the keys enter
# divided by a bound M of the sample's largest feature (the eps by M), so that no product of
# K^T V or of the normaliser overflows (the paths agree from 1e-20 to 1e20). A kernel that fails
# to compile or launch (a Triton or GPU it was never run on) warns once and leaves that
# configuration to the torch paths.

_TRITON_BLOCK_N = 64      # tokens per tile
_TRITON_PROGRAMS = 512    # about this many programs share the keys' reduction
_TRITON_MAX_HEAD_DIM = 64
_triton_failures: set = set()  # configurations whose kernels failed to compile or launch


def _on_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def _triton_key(layer: FocusedLinearAttention, x: torch.Tensor) -> tuple:
    return (x.device, x.dtype, layer.head_dim, layer.num_heads, layer.kernel_size,
            layer.focusing_factor)


def _triton_applies(layer: FocusedLinearAttention, x: torch.Tensor) -> bool:
    return (triton is not None and _on_cuda(x) and layer.head_dim <= _TRITON_MAX_HEAD_DIM
            and x.dtype in (torch.float32, *_HALF)
            and _triton_key(layer, x) not in _triton_failures)


class _TritonFailure(RuntimeError):
    """A Triton kernel failed to compile or launch (the cause is chained)."""


def _triton_failed(key: tuple, error: Exception) -> None:
    _triton_failures.add(key)
    warnings.warn(f"flatten.py: the Triton kernels failed ({type(error).__name__}: {error}); "
                  "this configuration uses the torch path from now on. To skip the kernels: "
                  "flatten.set_fast_path('torch') or FLATTEN_FAST_PATH=torch", RuntimeWarning,
                  stacklevel=4)


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
        else:  # 0 stays 0 (masked entries; the tiny number's tiny^p is large for p < 1)
            r = tl.where(t > 0, tl.exp2(p * tl.log2(tl.maximum(t, 1.1754944e-38))), 0.0)
        return r

    @triton.jit
    def _tl_focus_y(z_ptr, row_stride, rows, pe_ptr, pe_rows, s, c, mask, offset, C,
                    HAS_PE: tl.constexpr):
        # y = (ReLU(z + pe) + offset) * s of a (BLOCK_N, D_PAD) tile, s = 1 / scale (0 masked)
        z = tl.load(z_ptr + rows[:, None] * row_stride + c[None, :], mask=mask, other=0.0)
        z = z.to(tl.float32)
        if HAS_PE:
            z += tl.load(pe_ptr + pe_rows[:, None] * C + c[None, :], mask=mask, other=0.0)
        return tl.where(mask, (tl.maximum(z, 0.0) + offset) * s[None, :], 0.0)

    @triton.jit
    def _tl_focus_stats(z_ptr, row_stride, rows, rmask, pe_ptr, pe_rows, inv_s_ptr, offset, p, C,
                        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, HAS_PE: tl.constexpr,
                        P_INT: tl.constexpr, BLOCK_N: tl.constexpr):
        # per token, over all C channels: m = max(y), ||t||, ||t^p|| for t = y / m (masked rows: 1)
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
            t = _tl_focus_y(z_ptr, row_stride, rows, pe_ptr, pe_rows, s, c, mask, offset, C,
                            HAS_PE) / m[:, None]
            tp = _tl_power(t, p, P_INT)
            sum_t2 += tl.sum(t * t, axis=1)
            sum_tp2 += tl.sum(tp * tp, axis=1)
        return m, tl.sqrt(tl.where(rmask, sum_t2, 1.0)), tl.sqrt(tl.where(rmask, sum_tp2, 1.0))

    @triton.jit
    def _flatten_keys_kernel(k_ptr, v_ptr, row_stride, pe_ptr, inv_s_ptr, kv_ptr, ks_ptr,
                             n, chunk, offset, p, C, H: tl.constexpr, D: tl.constexpr,
                             D_PAD: tl.constexpr, P_INT: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (b, chunk, head): sum over the chunk's key tokens of phi_p(k)^T v and of phi_p(k)
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets
        inv_s_ptr += b * C  # the sample's 1 / (scale M): phi_p(k) / M
        ch, hh = tl.program_id(1), tl.program_id(2)
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
            m, norm_t, norm_tp = _tl_focus_stats(k_ptr, row_stride, rows, rmask, pe_ptr, tok,
                                                 inv_s_ptr,
                                                 offset, p, C, H, D, D_PAD, True, P_INT, BLOCK_N)
            t = _tl_focus_y(k_ptr, row_stride, rows, pe_ptr, tok, s, c, mask, offset, C, True)
            t = t / m[:, None]
            phi = _tl_power(t, p, P_INT) * (norm_t * m / norm_tp)[:, None]   # ||y|| t^p / ||t^p||
            v = tl.load(v_ptr + rows[:, None] * row_stride + c[None, :], mask=mask, other=0.0)
            v = v.to(tl.float32)
            kv += tl.dot(tl.trans(phi), v, input_precision="ieee")
            ks += tl.sum(phi, axis=0)
        base = (b * tl.num_programs(1) + ch) * H + hh
        tl.store(kv_ptr + base * D_PAD * D_PAD + cols[:, None] * D_PAD + cols[None, :], kv)
        tl.store(ks_ptr + base * D_PAD + cols, ks)

    @triton.jit
    def _flatten_queries_kernel(q_ptr, v_ptr, v_stride, inv_s_ptr, kv_ptr, ks_ptr, w_ptr, bias_ptr,
                                out_ptr, eps_ptr, N, GH, GW, PREFIX, offset, p, C, H: tl.constexpr,
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
        y = _tl_focus_y(q_ptr, C, rows, inv_s_ptr, tok, s, c, mask, offset, C, False)
        tp = _tl_power(y / m[:, None], p, P_INT)
        kv = tl.load(kv_ptr + (b * H + hh) * D_PAD * D_PAD + cols[:, None] * D_PAD + cols[None, :])
        ks = tl.load(ks_ptr + (b * H + hh) * D_PAD + cols)
        eps = tl.load(eps_ptr + b)                                             # eps / M
        den = tl.sum(tp * ks[None, :], axis=1) + eps * norm_tp / (norm_t * m)   # eps / (c M)
        # den is 0 only where tp is (a head all underflowed): 0, not 0 / 0
        out = tl.dot(tp, kv, input_precision="ieee") / tl.maximum(den, 1.1754944e-38)[:, None]
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
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * C + c[None, :], out, mask=mask)


def _forward_triton(layer: FocusedLinearAttention, x: torch.Tensor, H: int, W: int):
    B, N, C = x.shape
    h, d, P = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    p = float(layer.focusing_factor)
    q = layer.q(x)                                           # (B, N, C), contiguous
    xk, kh, kw = layer._key_tokens(x, H, W)
    k, v = layer.kv(xk).chunk(2, dim=-1)                     # views of one (B, n, 2C) tensor
    n = k.shape[1]
    if n == N:
        v_grid, v_stride = v, 2 * C
    else:  # sr_ratio > 1 (no class tokens): v back to N tokens, as in _dwc
        v_grid = F.interpolate(v.transpose(1, 2), size=N, mode="linear", align_corners=False)
        v_grid, v_stride = v_grid.transpose(1, 2).contiguous(), C
    pe = layer._positional_encoding(kh, kw).reshape(n, C).float().contiguous()
    inv_s = F.softplus(layer.scale).reshape(C).float().reciprocal()
    # the keys enter as phi_p(k) / M, the eps as eps / M (as in the inference path): M bounds the
    # largest entry of the sample's phi_p(k) by ||y|| <= sqrt(C) max(y), from one read of k
    kmax = k.amax(dim=(1, 2)).float() + pe.amax()                                # (B,)
    M = (kmax.clamp_min(0) + 1e-6).mul_(inv_s.max() * math.sqrt(C))
    inv_s_keys = (inv_s / M[:, None]).contiguous()                              # (B, C)
    p_int = int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
    d_pad = max(16, triton.next_power_of_2(d))
    bn = _TRITON_BLOCK_N
    # the keys in chunks of whole tiles, about _TRITON_PROGRAMS programs in all
    chunk = triton.cdiv(triton.cdiv(n, max(1, _TRITON_PROGRAMS // (B * h))), bn) * bn
    chunks = triton.cdiv(n, chunk)
    kv = x.new_empty((B, chunks, h, d_pad, d_pad), dtype=torch.float32)
    ks = x.new_empty((B, chunks, h, d_pad), dtype=torch.float32)
    eps = (1e-6 * n if layer.normalizer == "mean" else 1e-6) / M  # as in linear_attention
    weight = layer.dwc.weight.reshape(d, -1).float().contiguous()
    out = torch.empty_like(q)
    bias, warps = layer.dwc.bias.float(), 8 if d_pad >= 64 else 4  # 8 warps: fewer register spills
    # Only the launches are guarded: their compile errors and out-of-resources become a
    # _TritonFailure (forward falls back); errors of the torch ops above raise as usual. (A
    # fault inside a running kernel surfaces later, as a CUDA error, and cannot be caught here.)
    try:  # Triton launches on the current CUDA device: make it x's
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _flatten_keys_kernel[(B, chunks, h)](k, v, 2 * C, pe, inv_s_keys, kv, ks, n, chunk,
                                                 1e-6, p, C, h, d, d_pad, p_int, bn,
                                                 num_warps=warps)
            kv, ks = kv.sum(dim=1), ks.sum(dim=1)           # (B, h, d_pad, d_pad), (B, h, d_pad)
            _flatten_queries_kernel[(B, triton.cdiv(N, bn), h)](
                q, v_grid, v_stride, inv_s, kv, ks, weight, bias, out, eps,
                N, H, W, P, 1e-6, p, C, h, d, d_pad, layer.kernel_size, p_int, bn,
                num_warps=warps)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - compile, PTX assembly or launch failures
        raise _TritonFailure(str(e)) from e
    return layer.proj_drop(layer.proj(out))


_FAST_PATHS = _FastPaths(choose=_choose_path, run=_fast_forward)
