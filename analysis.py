"""Attention maps of focused linear attention as explicit matrices, and their rank and row entropy
at DeiT-T's shape (the paper's Fig. 5).

As a library (next to flatten.py): linear_attention_matrix(q, k) (the N x n matrix of linear
attention), dwc_matrix(weight, H, W) (the DWC as N x N matrices) and attention_map(layer, x, H,
W) (a FocusedLinearAttention layer's whole attention, with or without its DWC): O(N^2), for
visualising attention and for tests.

Usage:
    python analysis.py                      # 14 x 14 = 196 tokens, 3 heads of d = 64, p = 3
    python analysis.py --grid 28 28 --heads 1 --head-dim 64 --seed 1
A bad flag (a grid of 0, an even kernel, maps larger than half the available memory) is one line
on stderr and exit status 2, before anything is computed.

Method: one random input x (1, N, C), N(0, 1), with N = H * W tokens and C = heads * head_dim,
and one seeded FocusedLinearAttention layer at PyTorch's default initialisation. The four maps
share its q and k projections:
    softmax                 softmax(q k^T / sqrt(d))                          (N, N) per head
    vanilla linear          ReLU(q) ReLU(k)^T, rows normalised (eps 1e-6)     (N, N) per head
    focused linear          phi_p(q) phi_p(k)^T, rows normalised: attention_map(layer, x, H, W)
    focused linear + DWC    A + M_c for every channel c of a head: attention_map(.., with_dwc=True)
For each it prints the numerical rank (float64, numpy's tolerance sigma_max * N * eps; min and
max over heads, and over channels for the DWC map) and the mean row entropy in nats,
-sum_j a_ij log a_ij; rows are taken as |a_ij| / sum_j |a_ij| (the DWC map has negative entries;
for the other maps this is their own rows). Uniform rows have entropy log N.

These are random weights, not trained ones: the paper (trained FLatten-DeiT-T, block 3) reports
rank 196 (softmax), 54 (linear) and 196 (with the DWC); at random initialisation the linear maps
reach their bound d = 64.

Sample output (python analysis.py, torch 2.13 CPU, about 10 s):
    attention maps at N = 196 tokens (14x14), 3 heads of d = 64, p = 3, DWC kernel 5, seed 0
    map                   rank (min-max)  mean row entropy (nats)
    softmax               196-196         5.223
    vanilla linear        64-64           5.225
    focused linear        64-64           4.819
    focused linear + DWC  196-196         4.023
    (uniform rows: log N = 5.278; rank bound of the linear maps: d = 64)
At initialisation softmax and vanilla linear rows are nearly uniform; focusing sharpens them.
The DWC row entropy is of |A + M_c| and mostly says how much weight the conv's 25 taps carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import bench  # its one-line argument errors and its reading of the free memory
import flatten as fl

# -----------------------------------------------------------------------------
# Explicit N x n matrices of focused linear attention: the O(N^2) references of flatten.py's
# linear_attention and DWC, and a layer's whole attention as one matrix


def linear_attention_matrix(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6,
                            normalizer: str = "mean") -> torch.Tensor:
    """The explicit attention matrix of linear attention: A (B, h, N, n) with out = A @ v.

    The O(N^2) reference of flatten.linear_attention:
        A_ij = (q_i . k_j) / (sum_j' q_i . k_j' + eps')
    with eps' = n * eps for the 'mean' normaliser and eps for 'sum'.
    """
    fl._check_normalizer(normalizer)
    dt = fl._compute_dtype(q)
    with fl._autocast_off(q.device.type):
        scores = q.to(dt) @ k.to(dt).transpose(-2, -1)          # (B, h, N, n)
        eps = eps * k.shape[-2] if normalizer == "mean" else eps
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


@torch.no_grad()
def attention_map(layer: fl.FocusedLinearAttention, x: torch.Tensor, H: int, W: int,
                  with_dwc: bool = False) -> torch.Tensor:
    """The equivalent attention matrix of a FocusedLinearAttention layer for input x.

    Without the DWC: A (B, h, N, n) (rows: queries, columns: key tokens), so that the attention
    part of the output before proj is A @ v per head. With the DWC: A + M_c per channel c of the
    head, (B, h, d, N, n), where M_c is the DWC's matrix (dwc_matrix; for sr_ratio > 1 composed
    with the 1-D interpolation). For visualising attention (the paper's Fig. 3 and 5) and rank.
    """
    B, N, C = x.shape
    h, P = layer.num_heads, layer.num_prefix_tokens
    layer._check_input(x, H, W)
    q = layer.q(x)
    xk, kh, kw = layer._key_tokens(x, H, W)
    k = layer.kv(xk)[..., :C] + layer._positional_encoding(kh, kw)
    scale = F.softplus(layer.scale)
    q, k = fl.focus(q, layer.focusing_factor, scale), fl.focus(k, layer.focusing_factor, scale)
    q, k = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k))
    A = linear_attention_matrix(q, k, normalizer=layer.normalizer)   # (B, h, N, n)
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


# -----------------------------------------------------------------------------
# Rank and entropy


@dataclass(frozen=True)
class MapStats:
    name: str
    rank: int        # smallest rank over heads (and channels)
    rank_max: int    # largest
    entropy: float   # mean row entropy, nats


def row_entropy(maps: torch.Tensor) -> float:
    """Mean over rows of -sum_j a_ij log a_ij, rows normalised as |a| / sum |a|. maps (..., N, n).

    All-zero rows (a vanilla linear query that ReLU zeroes) have no distribution and are left out.
    """
    a = maps.abs().flatten(0, -2)
    total = a.sum(dim=-1, keepdim=True)
    a = a[total[:, 0] > 0] / total[total[:, 0] > 0]
    return float(-torch.special.xlogy(a, a).sum(dim=-1).mean())


def _stats(name: str, maps: torch.Tensor) -> MapStats:
    ranks = torch.linalg.matrix_rank(maps.double())
    return MapStats(name, int(ranks.min()), int(ranks.max()), row_entropy(maps.double()))


@torch.no_grad()
def analyse(grid: Tuple[int, int] = (14, 14), num_heads: int = 3, head_dim: int = 64,
            focusing_factor: float = 3, kernel_size: int = 5, seed: int = 0) -> List[MapStats]:
    """The four maps' rank and entropy for one seeded random input and layer (module doc)."""
    H, W = grid
    N, C, h = H * W, num_heads * head_dim, num_heads
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = fl.FocusedLinearAttention(C, N, h, qkv_bias=True, kernel_size=kernel_size,
                                          focusing_factor=focusing_factor, grid_size=(H, W))
        layer = layer.double().eval()
        x = torch.randn(1, N, C, dtype=torch.float64)
    q = layer.q(x).reshape(1, N, h, head_dim).transpose(1, 2)                     # (1, h, N, d)
    k = layer.kv(x)[..., :C].reshape(1, N, h, head_dim).transpose(1, 2)
    softmax = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)  # (1, h, N, N)
    vanilla = linear_attention_matrix(F.relu(q), F.relu(k), eps=1e-6, normalizer="sum")
    focused = attention_map(layer, x, H, W)                                    # (1, h, N, N)
    with_dwc = attention_map(layer, x, H, W, with_dwc=True)                    # (1, h, d, N, N)
    return [_stats("softmax", softmax), _stats("vanilla linear", vanilla),
            _stats("focused linear", focused), _stats("focused linear + DWC", with_dwc)]


def _problem(args) -> Optional[str]:
    """What is wrong with the parsed flags, in one line, or None."""
    H, W = args.grid
    if H < 1 or W < 1:
        return f"--grid {H} {W}: expected two positive whole numbers (H W)"
    for flag, value in (("--heads", args.heads), ("--head-dim", args.head_dim)):
        if value < 1:
            return f"{flag} {value}: expected a positive whole number"
    if not 0 < args.focusing_factor < math.inf:
        return f"--focusing-factor {args.focusing_factor:g}: expected a finite number > 0"
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        return f"--kernel-size {args.kernel_size}: expected an odd positive whole number"
    # the largest map, focused linear + DWC, holds heads * head_dim * N^2 float64 numbers
    need = args.heads * args.head_dim * (H * W) ** 2 * 8
    free = bench.free_memory(torch.device("cpu"))  # half of what the system has available
    if free is not None and need > free:
        return (f"--grid {H} {W}: the maps would need about {need / 2**30:.1f} GiB (heads x "
                f"head dim x N^2 float64 numbers, N = {H * W}), more than half the "
                f"{2 * free / 2**30:.1f} GiB available; take a smaller grid")
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = bench._Parser(prog="analysis.py", description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("H", "W"))
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--focusing-factor", type=float, default=3)
    ap.add_argument("--kernel-size", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    problem = _problem(args)
    if problem:
        ap.error(problem)
    H, W = args.grid
    rows = analyse((H, W), args.heads, args.head_dim, args.focusing_factor, args.kernel_size,
                   args.seed)
    print(f"attention maps at N = {H * W} tokens ({H}x{W}), {args.heads} heads of "
          f"d = {args.head_dim}, p = {args.focusing_factor:g}, DWC kernel {args.kernel_size}, "
          f"seed {args.seed}")
    print(f"{'map':<22}{'rank (min-max)':<16}mean row entropy (nats)")
    for r in rows:
        print(f"{r.name:<22}{f'{r.rank}-{r.rank_max}':<16}{r.entropy:.3f}")
    print(f"(uniform rows: log N = {math.log(H * W):.3f}; rank bound of the linear maps: "
          f"d = {args.head_dim})")


if __name__ == "__main__":
    main()
