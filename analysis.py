"""Rank and row entropy of attention maps at DeiT-T's shape (the paper's Fig. 5).

Usage:
    python analysis.py                      # 14 x 14 = 196 tokens, 3 heads of d = 64, p = 3
    python analysis.py --grid 28 28 --heads 1 --head-dim 64 --seed 1

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

import argparse
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import flatten as fl


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
    vanilla = fl.linear_attention_matrix(F.relu(q), F.relu(k), eps=1e-6, normalizer="sum")
    focused = fl.attention_map(layer, x, H, W)                                    # (1, h, N, N)
    with_dwc = fl.attention_map(layer, x, H, W, with_dwc=True)                    # (1, h, d, N, N)
    return [_stats("softmax", softmax), _stats("vanilla linear", vanilla),
            _stats("focused linear", focused), _stats("focused linear + DWC", with_dwc)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("H", "W"))
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--focusing-factor", type=float, default=3)
    ap.add_argument("--kernel-size", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
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
