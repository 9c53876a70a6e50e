"""Property-based tests of flatten.py: the paper's identities, the focused kernel, rank,
linear scaling measured with counters, structure, precision and the gradients of the reference
code (plain autograd, fast paths off; the fast paths' backward passes are held to the reference
by their own tests).

Every property draws its shapes with hypothesis (batch, heads, head dim, an H x W grid that may
be odd, non-square or smaller than the DWC kernel, sr_ratio, focusing factor) and one integer
seed that feeds a torch.Generator: tensors are generated from the seed, not drawn element by
element, so a failure is reproduced from the case printed in its message. Claims that are exact
are checked in float64 with tight tolerances. Profiles (ci, dev, long) live in conftest.py.
"""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from common import assert_close, fast_path, randomize
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from torch.autograd.gradcheck import GradcheckError
from torch.utils.flop_counter import FlopCounterMode

import analysis
import flatten as fl

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors


# -----------------------------------------------------------------------------
# Drawn cases


@dataclass(frozen=True)
class Case:
    """One drawn configuration; str(case) is what every assertion message starts with."""
    B: int = 1
    h: int = 1
    d: int = 4
    H: int = 3
    W: int = 5
    sr: int = 1
    p: float = 3.0
    k: int = 5
    P: int = 0   # class tokens (num_prefix_tokens)
    seed: int = 0

    @property
    def C(self) -> int:
        return self.h * self.d

    @property
    def N(self) -> int:
        return self.P + self.H * self.W

    @property
    def n(self) -> int:
        return self.P + (self.H // self.sr) * (self.W // self.sr)

    def gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def __str__(self) -> str:
        return (f"[B={self.B} h={self.h} d={self.d} grid {self.H}x{self.W} sr={self.sr} "
                f"p={self.p!r} k={self.k} prefix={self.P} seed={self.seed}]")


SEEDS = st.integers(0, 2**32 - 1)
# the paper's p = 3, other integers, and any real p >= 1
FOCUSING = st.one_of(st.sampled_from([3.0, 1.0, 2.0, 4.0]), st.floats(1.0, 6.0))


@st.composite
def cases(draw, max_side=9, max_sr=1, prefix=False, max_heads=3, min_d=1, max_d=8, min_batch=1,
          max_batch=3, max_elems=3000, kernels=(1, 3, 5, 7)):
    """A Case whose B*h*N*d stays under max_elems unless min_batch samples alone exceed it."""
    sr = draw(st.integers(1, max_sr))
    H = draw(st.integers(sr, max_side))
    W = draw(st.integers(sr, max_side))
    k = draw(st.sampled_from(kernels))
    h = draw(st.integers(1, max_heads))
    d = draw(st.integers(min_d, max_d))
    P = draw(st.integers(0, 1)) if prefix and sr == 1 else 0
    per_sample = (P + H * W) * h * d
    B = draw(st.integers(min_batch, max(min_batch, min(max_batch, max_elems // per_sample))))
    return Case(B=B, h=h, d=d, H=H, W=W, sr=sr, p=draw(FOCUSING), k=k, P=P, seed=draw(SEEDS))


# an odd, non-square grid smaller than the kernel: every property is tried on one
TRICKY = Case(B=2, h=2, d=3, H=3, W=5, sr=1, p=3.0, k=7, P=0, seed=1)
TRICKY_SR = Case(B=2, h=2, d=3, H=5, W=7, sr=2, p=3.0, k=7, P=0, seed=2)


def randn(g, *shape, scale=1.0, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def make_layer(case, g, std=0.2, **kw):
    """A float64 FocusedLinearAttention for the case, built at the case's grid."""
    layer = fl.FocusedLinearAttention(
        case.C, case.H * case.W, case.h, qkv_bias=True, sr_ratio=case.sr, focusing_factor=case.p,
        kernel_size=case.k, grid_size=(case.H, case.W), num_prefix_tokens=case.P, **kw)
    return randomize(layer.double(), g, std)


def features(case, g, tokens, scale=1.0):
    """Focused features phi_p of Gaussian inputs: (B, h, tokens, d), strictly positive."""
    return fl.focus(randn(g, case.B, case.h, tokens, case.d, scale=scale), case.p)


def check_close(actual, expected, case, what, rtol=1e-12, atol=1e-13):
    """assert_close with the drawn case first in the message; exact claims' tolerances."""
    assert_close(actual, expected, f"{case} {what}", rtol, atol)


def gradcheck(fn, inputs, what, **kw):
    """torch.autograd.gradcheck whose failure message starts with the drawn case."""
    try:
        torch.autograd.gradcheck(fn, inputs, **kw)
    except GradcheckError as err:
        raise AssertionError(f"{what}: {err}") from None


def kv_source(layer, x, H, W):
    """The tokens k and v are projected from: x, or LayerNorm(sr(x)) with spatial reduction.
    Written out here (not flatten's private helper) so the tests rebuild it independently."""
    if layer.sr_ratio == 1:
        return x
    B, _N, C = x.shape
    grid = layer.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
    return layer.norm(grid)


def heads(t, h):
    """(B, T, C) -> (B, h, T, d): channel index = head * d + c, as the official code."""
    B, T, C = t.shape
    return t.reshape(B, T, h, C // h).transpose(1, 2)


def merge(t):
    """(B, h, T, d) -> (B, T, C)."""
    B, h, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, h * d)


def interpolation_matrix(n, N, dtype=F64):
    """1-D linear interpolation from n to N samples (align_corners=False) as an (N, n) matrix,
    from its definition: sample i reads source position (i + 1/2) n / N - 1/2, clamped."""
    R = torch.zeros(N, n, dtype=dtype)
    for i in range(N):
        src = max((i + 0.5) * n / N - 0.5, 0.0)
        i0 = min(math.floor(src), n - 1)
        i1 = min(i0 + 1, n - 1)
        lam = src - i0
        R[i, i0] += 1 - lam
        R[i, i1] += lam
    return R


def dwc_matrix_by_definition(weight, H, W):
    """M[c, i, j] = weight[c, 0, r_j - r_i + k//2, c_j - c_i + k//2] inside the window, else 0
    (zero padding, tokens row-major): the explicit sparse matrix of the depthwise conv."""
    _d, _, kh, kw = weight.shape
    r = torch.arange(H * W) // W
    c = torch.arange(H * W) % W
    dr = r[None, :] - r[:, None] + kh // 2   # (N, N): row offset of token j seen from token i
    dc = c[None, :] - c[:, None] + kw // 2
    inside = (dr >= 0) & (dr < kh) & (dc >= 0) & (dc < kw)
    M = weight[:, 0, dr.clamp(0, kh - 1), dc.clamp(0, kw - 1)]     # (d, N, N)
    return torch.where(inside, M, torch.zeros((), dtype=weight.dtype))


def numerical_rank(A):
    """Rank in float64 with numpy's default tolerance (sigma_max * max(shape) * eps)."""
    return int(torch.linalg.matrix_rank(A.double()))


# -----------------------------------------------------------------------------
# 1. Order of computation: phi(Q) (phi(K)^T V) equals the explicit matrix applied to V


@given(case=cases(max_sr=3), normalizer=st.sampled_from(["mean", "sum"]),
       eps=st.sampled_from([1e-6, 0.0, 1e-2, 1.0]), head_views=st.booleans())
@example(case=TRICKY, normalizer="mean", eps=1e-6, head_views=True)
def test_linear_order_equals_explicit_matrix(case, normalizer, eps, head_views):
    """head_views: q, k, v are strided (B, h, T, d) views of (B, T, h, d) memory, as the module
    passes them (heads split off (B, T, C) tokens), instead of contiguous tensors."""
    g = case.gen()
    q, k = features(case, g, case.N), features(case, g, case.n)
    v = randn(g, case.B, case.h, case.n, case.d + 1)
    if head_views:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    fast = fl.linear_attention(q, k, v, eps=eps, normalizer=normalizer)
    A = analysis.linear_attention_matrix(q, k, eps=eps, normalizer=normalizer)
    assert A.shape == (case.B, case.h, case.N, case.n), f"{case}: A has shape {tuple(A.shape)}"
    check_close(fast, A @ v, case, f"{normalizer} eps={eps}: linear order vs N x n matrix")
    # and against the textbook formula written out here, Eq. 4 of the paper
    scores = q @ k.transpose(-2, -1)
    eps_ = eps * case.n if normalizer == "mean" else eps
    check_close(fast, scores @ v / (scores.sum(-1, keepdim=True) + eps_), case,
                f"{normalizer}: Eq. 4")


@pytest.mark.parametrize("normalizer", ["mean", "sum"])
def test_key_padding_mask_equals_the_explicit_matrix_of_the_real_keys(normalizer):
    """linear_attention(..., key_padding_mask): sequences of 6, 2, 4 and 0 real keys padded to 7
    with infinite keys and NaN values (padding may hold anything) give what the explicit N x n
    matrix of each sequence's real keys alone gives (analysis.linear_attention_matrix, whose mean
    normaliser counts those keys), gradients included (none for padding); no real key: zeros."""
    g = torch.Generator().manual_seed(11)
    lengths, n, h, N, d = (6, 2, 4, 0), 7, 2, 5, 3
    B = len(lengths)
    q = fl.focus(randn(g, B, h, N, d), 3.0).requires_grad_()
    k, v = fl.focus(randn(g, B, h, n, d), 3.0), randn(g, B, h, n, d + 1)
    mask = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]         # True: padding
    k = k.masked_fill(mask[:, None, :, None], float("inf")).requires_grad_()
    v = v.masked_fill(mask[:, None, :, None], float("nan")).requires_grad_()
    out = fl.linear_attention(q, k, v, normalizer=normalizer, key_padding_mask=mask)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    for b, L in enumerate(lengths):
        case = f"[{normalizer}, sequence {b} of {L} real keys padded to {n}, B={B} h={h} N={N} " \
               f"d={d} seed=11]"
        if L == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"{case}: not zeros"
            continue
        qb, kb, vb = (t[b:b + 1].detach().clone().requires_grad_() for t in (q, k[:, :, :L],
                                                                           v[:, :, :L]))
        ref = analysis.linear_attention_matrix(qb, kb, normalizer=normalizer) @ vb
        assert_close(out[b:b + 1], ref, f"{case} output", 1e-12, 1e-13)
        refs = torch.autograd.grad(ref.square().sum(), (qb, kb, vb))
        for name, got, want in (("q", gq[b:b + 1], refs[0]), ("k", gk[b:b + 1, :, :L], refs[1]),
                                ("v", gv[b:b + 1, :, :L], refs[2])):
            assert_close(got, want, f"{case} d/d{name}", 1e-10, 1e-12)
    padded = mask[:, None, :, None].expand_as(gk)
    assert (gk[padded] == 0).all() and (gv[padded[..., :1].expand_as(gv)] == 0).all(), \
        f"[{normalizer}, seed=11] a padding key or value gets a gradient"


def test_key_padding_mask_of_one_row_applies_to_every_sample():
    """A (1, n) mask broadcasts over the batch, as (B, h) do: two samples whose last 3 of 7 keys
    are padding give what their first 4 keys alone give (no mask at all)."""
    g = torch.Generator().manual_seed(12)
    q, k, v = fl.focus(randn(g, 2, 2, 5, 3), 3.0), fl.focus(randn(g, 2, 2, 7, 3), 3.0), \
        randn(g, 2, 2, 7, 4)
    mask = (torch.arange(7) >= 4)[None]                                         # (1, 7)
    out = fl.linear_attention(q, k, v, key_padding_mask=mask)
    ref = fl.linear_attention(q, k[:, :, :4], v[:, :, :4])
    assert_close(out, ref, "[B=2, mask (1, 7): 4 real keys, seed=12]", 1e-12, 1e-13)


@given(case=cases(max_sr=3, prefix=True), with_dwc=st.booleans())
@example(case=TRICKY, with_dwc=True)
@example(case=TRICKY_SR, with_dwc=True)
def test_module_equals_its_attention_map(case, with_dwc):
    """The layer's output is proj((A + M_c) v + bias) per head and channel (with the DWC) or
    proj(A v) (DWC zeroed), with A and M_c from attention_map: the whole module in both orders."""
    g = case.gen()
    layer = make_layer(case, g)
    if not with_dwc:
        with torch.no_grad():
            layer.dwc.weight.zero_()
            layer.dwc.bias.zero_()
    x = randn(g, case.B, case.N, case.C)
    with torch.no_grad():
        out = layer(x, case.H, case.W)
        src = kv_source(layer, x, case.H, case.W)
        v = heads(layer.kv(src)[..., case.C:], case.h)                           # (B, h, n, d)
        if with_dwc:
            maps = analysis.attention_map(layer, x, case.H, case.W, with_dwc=True)  # (B,h,d,N,n)
            assert maps.shape == (case.B, case.h, case.d, case.N, case.n), \
                f"{case}: {tuple(maps.shape)}"
            att = torch.einsum("bhcij,bhjc->bhic", maps, v)
            att[:, :, case.P:] += layer.dwc.bias                                 # patch tokens only
        else:
            A = analysis.attention_map(layer, x, case.H, case.W)
            assert A.shape == (case.B, case.h, case.N, case.n), f"{case}: {tuple(A.shape)}"
            att = A @ v
        ref = layer.proj(merge(att))
    check_close(out, ref, case, f"module vs attention_map (with_dwc={with_dwc})", 1e-10, 1e-12)


@given(case=cases(max_sr=3), normalizer=st.sampled_from(["mean", "sum"]))
@example(case=TRICKY_SR, normalizer="sum")
def test_module_equals_official_formulation(case, normalizer):
    """Ours (rescaled power, fused DWC) equals the official code op by op, in float64."""
    g = case.gen()
    layer = make_layer(case, g, normalizer=normalizer)
    x = randn(g, case.B, case.N, case.C)
    with torch.no_grad():
        ours = layer(x, case.H, case.W)
        official = fl.official_forward(layer, x, case.H, case.W, normalizer=normalizer)
    check_close(ours, official, case, f"module vs official_forward ({normalizer})", 1e-10, 1e-12)


# -----------------------------------------------------------------------------
# 2. The two official formulations: mean of k with n^-1/2 scaling vs the paper's sum form


@given(case=cases(max_sr=3), eps=st.sampled_from([1e-6, 1e-3, 1e-1]),
       log_scale=st.integers(-8, 1))
@example(case=TRICKY, eps=1e-6, log_scale=-6)
def test_mean_and_sum_forms(case, eps, log_scale):
    """With eps = 0 the forms are the same function. Otherwise, per query i, with
    s_i = q_i . sum_j k_j:  out_mean_i = out_sum_i * (s_i + eps) / (s_i + n eps), hence
    |out_mean_i - out_sum_i| = |out_sum_i| (n - 1) eps / (s_i + n eps) <= max|v| (n - 1) eps / s_i.
    Small q (log_scale) makes s_i small enough for the eps term to show."""
    g = case.gen()
    q = features(case, g, case.N, scale=10.0 ** log_scale)
    k = features(case, g, case.n)
    v = randn(g, case.B, case.h, case.n, case.d)
    n = case.n
    mean0 = fl.linear_attention(q, k, v, eps=0.0, normalizer="mean")
    sum0 = fl.linear_attention(q, k, v, eps=0.0, normalizer="sum")
    check_close(mean0, sum0, case, "eps=0: mean form vs sum form")
    mean, summ = (fl.linear_attention(q, k, v, eps=eps, normalizer=nz) for nz in ("mean", "sum"))
    s = q @ k.sum(-2, keepdim=True).transpose(-2, -1)                          # (B, h, N, 1)
    check_close(mean, summ * (s + eps) / (s + n * eps), case,
                f"eps={eps}: exact relation of the forms")
    bound = v.abs().amax((-2, -1), keepdim=True) * (n - 1) * eps / (s + n * eps)
    gap = (mean - summ).abs()
    assert (gap <= bound * (1 + 1e-9) + 1e-300).all(), \
        f"{case} eps={eps}: |mean - sum| exceeds max|v| (n-1) eps / (s + n eps) by " \
        f"{(gap - bound).max():.3g}"


# -----------------------------------------------------------------------------
# 3. A proper attention: non-negative rows summing to 1, convex combinations of V


@given(case=cases(max_sr=3), log_scale=st.integers(-3, 3))
@example(case=TRICKY, log_scale=0)
def test_attention_is_row_stochastic_and_convex(case, log_scale):
    g = case.gen()
    q = features(case, g, case.N, scale=10.0 ** log_scale)
    k = features(case, g, case.n)
    v = randn(g, case.B, case.h, case.n, case.d)
    A = analysis.linear_attention_matrix(q, k, eps=0.0)
    assert (A >= 0).all(), f"{case}: negative attention weight {A.min():.3g}"
    check_close(A.sum(-1), torch.ones_like(A.sum(-1)), case, "eps=0: row sums")
    out = fl.linear_attention(q, k, v, eps=0.0)
    lo, hi = v.amin(-2, keepdim=True), v.amax(-2, keepdim=True)
    tol = 1e-12 * (1 + v.abs().amax())
    assert ((out >= lo - tol) & (out <= hi + tol)).all(), \
        f"{case}: an output channel leaves that channel's range over V (not a convex combination)"
    const = torch.full_like(v, -2.5)
    check_close(fl.linear_attention(q, k, const, eps=0.0), torch.full_like(out, -2.5), case,
                "constant V reproduced")
    # with the module's eps = 1e-6 the rows are sub-stochastic: sums in (0, 1]
    rows = analysis.linear_attention_matrix(q, k).sum(-1)
    assert ((rows > 0) & (rows <= 1 + 1e-12)).all(), f"{case}: eps=1e-6 row sums outside (0, 1]"


@given(case=cases(max_sr=3, prefix=True))
@example(case=Case(B=1, h=1, d=1, H=2, W=2, sr=2, p=3.0, k=1, P=0, seed=0))
def test_layer_attention_map_is_substochastic(case):
    """A layer's rows are non-negative and sum to s_i / (s_i + n eps) <= 1 with
    s_i = q_i . sum_j k_j (module eps = 1e-6, 'mean' normaliser): about 1 for live queries,
    about 0 for a query token that ReLU zeroes (its features are the 1e-6 offset), whose
    attention output then vanishes."""
    g = case.gen()
    layer = make_layer(case, g)
    x = randn(g, case.B, case.N, case.C)
    A = analysis.attention_map(layer, x, case.H, case.W)
    with torch.no_grad():
        scale = F.softplus(layer.scale)
        src = kv_source(layer, x, case.H, case.W)
        q = heads(fl.focus(layer.q(x), case.p, scale), case.h)
        k = layer.kv(src)[..., :case.C] + layer.positional_encoding
        k = heads(fl.focus(k, case.p, scale), case.h)
    s = q @ k.sum(-2).unsqueeze(-1)                                            # (B, h, N, 1)
    assert (A >= 0).all(), f"{case}: negative attention weight {A.min():.3g}"
    check_close(A.sum(-1), (s / (s + case.n * 1e-6)).squeeze(-1), case, "row sums s / (s + n eps)")
    assert (A.sum(-1) <= 1).all(), f"{case}: a row sums above 1"


# -----------------------------------------------------------------------------
# 4. The focused kernel


@st.composite
def vectors(draw, max_tokens=6, max_dim=12):
    """(case, x): Gaussian rows (tokens, dim) times 10^e, some rows all negative (dead)."""
    seed, p = draw(SEEDS), draw(FOCUSING)
    T, D = draw(st.integers(1, max_tokens)), draw(st.integers(1, max_dim))
    e = draw(st.integers(-6, 6))
    case = Case(B=T, h=1, d=D, H=1, W=1, p=p, seed=seed)
    g = case.gen()
    x = randn(g, T, D, scale=10.0 ** e)
    dead = torch.rand(T, generator=g, dtype=F64) < 0.3
    x[dead] = -x[dead].abs()
    return case, x


@given(cx=vectors(), c=st.floats(1e-3, 1e3))
def test_focus_keeps_norm_and_is_positively_homogeneous(cx, c):
    case, x = cx
    phi = fl.focus(x, case.p, offset=0)
    check_close(torch.linalg.vector_norm(phi, dim=-1), torch.linalg.vector_norm(F.relu(x), dim=-1),
                case, "||phi_p(x)|| = ||ReLU(x)||", 1e-12, 0)
    assert (phi >= 0).all() and ((phi > 0) <= (x > 0)).all(), \
        f"{case}: phi_p left the support of ReLU(x)"
    # phi_p(c x) = c phi_p(x): a positive rescaling changes the norm, never the direction
    check_close(fl.focus(c * x, case.p, offset=0), c * phi, case,
                f"phi_p({c!r} x) = {c!r} phi_p(x)", 1e-12, 0)
    # a scalar scale (the module's softplus(scale)) is such a rescaling
    check_close(fl.focus(x, case.p, scale=torch.tensor(c, dtype=F64), offset=0), phi / c, case,
                "focus(x, scale=s) = phi_p(x) / s", 1e-12, 0)


@given(cx=vectors())
def test_focus_with_p_1_is_relu(cx):
    case, x = cx
    check_close(fl.focus(x, 1.0, offset=0), F.relu(x), case, "p = 1: phi_1 = ReLU", 1e-13, 0)
    # and by definition for any p: ||ReLU x|| (ReLU x)^p / ||(ReLU x)^p||, in float64 with x
    # rescaled to max 1 first (so the power cannot overflow)
    y = F.relu(x) / F.relu(x).amax(-1, keepdim=True).clamp_min(1e-300)
    yp = y ** case.p
    ref = torch.linalg.vector_norm(F.relu(x), dim=-1, keepdim=True) * yp / \
        torch.linalg.vector_norm(yp, dim=-1, keepdim=True).clamp_min(1e-300)
    check_close(fl.focus(x, case.p, offset=0), ref, case, "phi_p by definition", 1e-12, 0)


PS = [2.0 ** i for i in range(1, 13)]  # p = 2, 4, ..., 4096


@st.composite
def max_pairs(draw):
    """(case, x, y, m, n): non-negative x, y with unique maxima x_m = y_n = 1 (the others at most
    0.9) and some entries zeroed; same tells whether m = n."""
    seed, D = draw(SEEDS), draw(st.integers(2, 16))
    m = draw(st.integers(0, D - 1))
    n = m if draw(st.booleans()) else (m + draw(st.integers(1, D - 1))) % D
    zero_frac = draw(st.sampled_from([0.0, 0.3, 0.6]))
    case = Case(B=1, h=1, d=D, H=1, W=1, seed=seed)
    g = case.gen()
    x, y = (0.9 * torch.rand(D, generator=g, dtype=F64) for _ in range(2))
    x[torch.rand(D, generator=g, dtype=F64) < zero_frac] = 0
    y[torch.rand(D, generator=g, dtype=F64) < zero_frac] = 0
    x[m], y[n] = 1.0, 1.0
    return case, x, y, m, n


@given(pair=max_pairs())
def test_proposition_1(pair):
    """Paper, Proposition 1: same argmax -> some p > 1 raises <phi_p(x), phi_p(y)> above <x, y>;
    different argmax -> some p > 1 lowers it. It is an existence claim (the inner product is
    not monotone in p), checked over p = 2 .. 4096, for the inputs it holds on (see
    test_proposition_1_degenerate_cases): x, y not parallel when m = n, <x, y> > 0 when m != n."""
    case, x, y, m, n = pair
    base = float(x @ y)
    nx, ny = float(x.norm()), float(y.norm())
    if m == n:
        assume(nx * ny - base > 1e-9 * nx * ny)
    else:
        assume(base > 0)
    inner = [float(fl.focus(x, p, offset=0) @ fl.focus(y, p, offset=0)) for p in PS]
    if m == n:
        assert max(inner) > base, f"{case} m=n={m}: no p in 2..4096 raises {base:.6g}; got {inner}"
    else:
        assert min(inner) < base, \
            f"{case} m={m} n={n}: no p in 2..4096 lowers {base:.6g}; got {inner}"
    # the limit behind it: phi_p(x) -> ||x|| e_m (the other entries are <= 0.9, 0.9^4096 = 0)
    check_close(fl.focus(x, PS[-1], offset=0), nx * F.one_hot(torch.tensor(m), x.numel()).double(),
                case, "phi_p(x) -> ||x|| e_m", 1e-12, 1e-12)


@given(cx=vectors(max_tokens=1), c=st.floats(0.01, 100.0), p=st.floats(1.0, 64.0))
def test_proposition_1_degenerate_cases(cx, c, p):
    """Where Proposition 1 as stated does not hold: for parallel x and y = c x (same argmax)
    <phi_p(x), phi_p(y)> = <x, y> for every p, and for x, y of disjoint support (different
    argmax, <x, y> = 0) both sides stay 0. The strict inequalities need x, y not parallel and
    <x, y> > 0."""
    case, x = cx
    x = F.relu(x[0])
    assume(bool((x > 0).any()))
    lhs = float(fl.focus(x, p, offset=0) @ fl.focus(c * x, p, offset=0))
    rhs = float(x @ (c * x))
    assert math.isclose(lhs, rhs, rel_tol=1e-12), \
        f"{case} p={p!r}: parallel x, {c!r} x: {lhs!r} != {rhs!r}"
    other = torch.zeros(x.numel() + 1, dtype=F64)
    other[-1] = c
    xx = torch.cat([x, x.new_zeros(1)])
    focused = float(fl.focus(xx, p, offset=0) @ fl.focus(other, p, offset=0))
    assert focused == 0.0 == float(xx @ other), \
        f"{case} p={p!r}: disjoint supports give {focused!r} after focusing"


# -----------------------------------------------------------------------------
# 5. Rank


@given(case=cases(max_sr=2, max_d=4, max_side=9))
@example(case=Case(B=1, h=1, d=2, H=5, W=7, p=3.0, seed=3))
def test_linear_attention_rank_at_most_head_dim(case):
    g = case.gen()
    q, k = features(case, g, case.N), features(case, g, case.n)
    A = analysis.linear_attention_matrix(q, k)
    for b in range(case.B):
        for hh in range(case.h):
            r = numerical_rank(A[b, hh])
            assert 1 <= r <= case.d, f"{case} sample {b} head {hh}: rank {r} > head dim {case.d}"


@given(case=cases(max_side=9, max_d=4, kernels=(1, 3, 5, 7, 9)))
@example(case=TRICKY)
def test_dwc_is_its_sparse_matrix(case):
    g = case.gen()
    w = randn(g, case.d, 1, case.k, case.k)
    M = analysis.dwc_matrix(w, case.H, case.W)
    assert M.shape == (case.d, case.H * case.W, case.H * case.W), f"{case}: {tuple(M.shape)}"
    assert torch.equal(M, dwc_matrix_by_definition(w, case.H, case.W)), \
        f"{case}: dwc_matrix differs from the windowed definition (max |diff| " \
        f"{(M - dwc_matrix_by_definition(w, case.H, case.W)).abs().max():.3g})"
    v = randn(g, case.B, case.d, case.H, case.W)
    conv = F.conv2d(v, w, padding=case.k // 2, groups=case.d).flatten(2)
    check_close(torch.einsum("cij,bcj->bci", M, v.flatten(2)), conv, case, "M_dwc v vs conv2d")


@given(case=cases(max_sr=3, prefix=True, max_d=4))
@example(case=TRICKY_SR)
def test_layer_dwc_term_is_explicit_matrix(case):
    """attention_map(with_dwc) - attention_map = the DWC matrix (composed with the official 1-D
    interpolation when sr_ratio > 1), zero on class-token rows and columns."""
    g = case.gen()
    layer = make_layer(case, g)
    x = randn(g, case.B, case.N, case.C)
    A = analysis.attention_map(layer, x, case.H, case.W)
    full = analysis.attention_map(layer, x, case.H, case.W, with_dwc=True)
    M = dwc_matrix_by_definition(layer.dwc.weight.detach(), case.H, case.W)
    if case.sr > 1:
        M = M @ interpolation_matrix(case.n, case.H * case.W)
    expected = torch.zeros(case.d, case.N, case.n, dtype=F64)
    expected[:, case.P:, case.P:] = M
    check_close(full - A.unsqueeze(2), expected.expand_as(full), case, "DWC part of the map",
                1e-12, 1e-14)


@given(case=cases(max_sr=2, prefix=True, max_d=3, max_heads=2, max_batch=1))
@example(case=Case(B=1, h=1, d=2, H=5, W=7, k=3, seed=4))
def test_dwc_restores_rank(case):
    """Rank above d with the DWC: A + M_c has full rank on the patch grid on generic inputs.
    A class-token row has no DWC term, and its attention row is near zero when ReLU (or the
    focusing over all C channels, before the head split) leaves that head of its query near the
    1e-6 offset, so the class token may add nothing: rank >= min(N, n) - prefix, not min(N, n)."""
    full_rank = min(case.N, case.n)
    assume(full_rank - case.P > case.d)
    g = case.gen()
    layer = make_layer(case, g)
    x = randn(g, case.B, case.N, case.C)
    A = analysis.attention_map(layer, x, case.H, case.W)
    full = analysis.attention_map(layer, x, case.H, case.W, with_dwc=True)
    for hh in range(case.h):
        assert numerical_rank(A[0, hh]) <= case.d, f"{case} head {hh}: rank without DWC above d"
        for c in range(case.d):
            r = numerical_rank(full[0, hh, c])
            assert full_rank - case.P <= r <= full_rank and r > case.d, \
                f"{case} head {hh} channel {c}: rank {r} with the DWC, expected " \
                f"{full_rank - case.P}..{full_rank}"


# -----------------------------------------------------------------------------
# 6. Linear scaling, measured with counters (no timings)


def count_flops(fn, *args):
    """FLOPs torch.utils.flop_counter counts for fn(*args), without autograd."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves for backward during fn(*args)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
        total = sum(storages.values())
    del out
    return total


def grids(case):
    """(H, W), (H, 2W), (H, 4W): N, 2N, 4N tokens (W a multiple of sr, so n doubles too)."""
    return [(case.H, case.W * 2 ** i) for i in range(3)]


def second_difference(f):
    """f(4N) - 3 f(2N) + 2 f(N): zero iff f(4N) - f(2N) = 2 (f(2N) - f(N)), i.e. affine in N;
    6 c N^2 for f = a + b N + c N^2."""
    return f[2] - 3 * f[1] + 2 * f[0]


@st.composite
def scaling_cases(draw):
    sr = draw(st.integers(1, 3))
    base = draw(cases(max_side=5, max_sr=1, max_heads=2, max_d=8, max_batch=2, max_elems=10**6))
    j = draw(st.integers(1, 2))
    return Case(**{**base.__dict__, "sr": sr, "H": max(base.H, sr), "W": sr * j})


@settings(max_examples=max(2, settings().max_examples // 2))
@given(case=scaling_cases())
@example(case=Case(B=1, h=1, d=64, H=7, W=2, sr=1, k=5, seed=5))
def test_flops_linear_for_focused_quadratic_for_softmax(case):
    B, C, h, d, k, sr = case.B, case.C, case.h, case.d, case.k, case.sr
    g = case.gen()
    fla, smx = [], []
    for H, W in grids(case):
        layer = fl.FocusedLinearAttention(C, H * W, h, qkv_bias=True, sr_ratio=sr, kernel_size=k,
                                          grid_size=(H, W))
        soft = fl.SoftmaxAttention(C, h, qkv_bias=True, sr_ratio=sr, fused=False)
        x = randn(g, B, H * W, C, dtype=torch.float32)
        fla.append(count_flops(layer, x, H, W))
        smx.append(count_flops(soft, x, H, W))
    Ns = [H * W for H, W in grids(case)]
    assert second_difference(fla) == 0, \
        f"{case}: focused linear attention FLOPs {fla} at N = {Ns} are not affine in N"
    # softmax: exactly quadratic, the N^2 term being Q K^T and A V (2 * N * n * d each, per head)
    N, n = Ns[0], (case.H // sr) * (case.W // sr)
    assert second_difference(smx) == 6 * 4 * B * C * N * n, \
        f"{case}: softmax FLOPs {smx} at N = {Ns}: second difference {second_difference(smx)}, " \
        f"expected 6 c N^2 = {6 * 4 * B * C * N * n}"
    # the slope against the work written down: projections, K^T V, Q (K^T V), DWC, sr conv; the
    # normaliser may cost up to 2 h d (N + n) more (a ones column or a separate product)
    essential = 2 * B * (N * C * C + n * 2 * C * C + N * C * C + h * d * d * (n + N) + N * C * k * k
                         + (n * C * C * sr * sr if sr > 1 else 0))
    assert essential <= fla[0] <= essential + 2 * B * h * d * (N + n), \
        f"{case}: {fla[0]} FLOPs at N = {N}, the analytic count is {essential} (+ normaliser)"


@settings(max_examples=max(2, settings().max_examples // 2))
@given(case=scaling_cases())
def test_saved_memory_linear_for_focused_quadratic_for_softmax(case):
    B, C, h, k, sr = case.B, case.C, case.h, case.k, case.sr
    g = case.gen()
    fla, smx = [], []
    for H, W in grids(case):
        # built at another grid, so the positional encoding is resampled at all three sizes
        layer = fl.FocusedLinearAttention(C, (H + sr) * W, h, qkv_bias=True, sr_ratio=sr,
                                          kernel_size=k, grid_size=(H + sr, W))
        soft = fl.SoftmaxAttention(C, h, qkv_bias=True, sr_ratio=sr, fused=False)
        x = randn(g, B, H * W, C, dtype=torch.float32)
        fla.append(saved_bytes(layer, x, H, W))
        smx.append(saved_bytes(soft, x, H, W))
    Ns = [H * W for H, W in grids(case)]
    assert second_difference(fla) == 0, \
        f"{case}: bytes saved for backward {fla} at N = {Ns} are not affine in N"
    # softmax keeps at least the N x n attention matrix (float32) per head: quadratic
    N, n = Ns[0], (case.H // sr) * (case.W // sr)
    assert second_difference(smx) >= 6 * 4 * B * h * N * n, \
        f"{case}: softmax saved bytes {smx} at N = {Ns} do not grow quadratically"


# -----------------------------------------------------------------------------
# 7. Structure


@given(case=cases(max_sr=3, prefix=True, min_batch=2, max_batch=4))
def test_batch_independence(case):
    g = case.gen()
    layer = make_layer(case, g)
    x = randn(g, case.B, case.N, case.C)
    with torch.no_grad():
        stacked = layer(x, case.H, case.W)
        for b in range(case.B):
            check_close(stacked[b:b + 1], layer(x[b:b + 1], case.H, case.W), case,
                        f"sample {b} alone vs stacked", 1e-12, 1e-14)


@given(case=cases(prefix=True))
@example(case=Case(B=2, h=2, d=3, H=3, W=5, k=7, P=1, seed=8))
def test_token_permutation_equivariance_without_dwc_and_encoding(case):
    g = case.gen()
    layer = make_layer(case, g)
    with torch.no_grad():
        for name in ("dwc.weight", "dwc.bias", "positional_encoding"):
            layer.get_parameter(name).zero_()
    perm = torch.randperm(case.N - case.P, generator=g) + case.P
    perm = torch.cat([torch.arange(case.P), perm])  # class tokens stay first
    x = randn(g, case.B, case.N, case.C)
    with torch.no_grad():
        out = layer(x, case.H, case.W)
        check_close(layer(x[:, perm], case.H, case.W), out[:, perm], case,
                    f"permuted tokens {perm.tolist()}", 1e-12, 1e-14)


@given(case=cases(max_side=7, prefix=True, max_d=4),
       new=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_resample_grid_identity_and_constants(case, new):
    g = case.gen()
    table = randn(g, 1, case.N, case.C, dtype=torch.float32)
    hw = (case.H, case.W)
    same = fl.resample_grid(table, hw, hw, case.P)
    assert torch.equal(same, table), f"{case}: resampling to its own size changed the table"
    out = fl.resample_grid(table, hw, new, case.P)
    rows = case.P + new[0] * new[1]
    assert out.shape == (1, rows, case.C), f"{case} -> {new}: {tuple(out.shape)}"
    assert torch.equal(out[:, :case.P], table[:, :case.P]), \
        f"{case} -> {new}: class-token rows changed"
    const = torch.full((1, case.P + case.H * case.W, case.C), 0.75)
    check_close(fl.resample_grid(const, hw, new, case.P), torch.full((1, rows, case.C), 0.75),
                case, f"-> {new}: a constant table stays constant", 1e-6, 1e-6)


MODEL_KW = {"num_classes": 3}
MODELS = {
    "flatten_pvt_tiny": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 40, 64]},
    "flatten_pvt_v2_b0": {"depths": [1, 1, 1, 1]},
    "flatten_deit_tiny": {"depth": 1, "embed_dim": 48},
}
_built = {}


def tiny_model(name):
    if name not in _built:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _built[name] = fl.create_model(name, **MODELS[name], **MODEL_KW).eval()
    return _built[name]


def expected_maps(name, H, W):
    """Stage grids by the patch-embedding arithmetic, written out."""
    if name == "flatten_pvt_tiny":          # patch 4, then 2, 2, 2 (no padding)
        sizes = [(H // 4, W // 4)]
        for _ in range(3):
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    else:                                   # 7x7 stride 4 pad 3, then 3x3 stride 2 pad 1
        sizes = [((H - 1) // 4 + 1, (W - 1) // 4 + 1)]
        for _ in range(3):
            sizes.append(((sizes[-1][0] - 1) // 2 + 1, (sizes[-1][1] - 1) // 2 + 1))
    return sizes


@settings(max_examples=max(3, settings().max_examples // 2))
@given(name=st.sampled_from(sorted(MODELS)), B=st.integers(1, 2), H=st.integers(16, 97),
       W=st.integers(16, 97), seed=SEEDS)
def test_models_run_on_drawn_sizes(name, B, H, W, seed):
    model = tiny_model(name)
    if name == "flatten_pvt_tiny":
        H, W = max(H, 32), max(W, 32)   # one token in the last stage needs 32 x 32
    what = f"[{name} B={B} image {H}x{W} seed={seed}]"
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (B, 3) and torch.isfinite(out).all(), \
            f"{what}: logits {tuple(out.shape)}"
        if name == "flatten_deit_tiny":
            feats = model.forward_features(x)
            assert feats.shape == (B, 1 + (H // 16) * (W // 16), 48), \
                f"{what}: tokens {tuple(feats.shape)}"
        else:
            maps = model.forward_intermediates(x, intermediates_only=True)
            dims = model.cfg.embed_dims
            got = [tuple(t.shape) for t in maps]
            want = [(B, c, h, w) for c, (h, w) in zip(dims, expected_maps(name, H, W))]
            assert got == want, f"{what}: stage maps {got}, expected {want}"


# -----------------------------------------------------------------------------
# 8. Precision


@settings(max_examples=max(3, settings().max_examples // 2))
@given(case=cases(max_sr=2, max_d=16, max_heads=2, max_batch=2, max_elems=4000),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       how=st.sampled_from(["cast", "autocast"]), log_mag=st.integers(-2, 4),
       dead=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
@example(case=Case(B=2, h=2, d=16, H=6, W=9, sr=1, seed=6), dtype=torch.float16, how="cast",
         log_mag=4, dead=0.5)
@example(case=Case(B=2, h=2, d=16, H=6, W=9, sr=2, seed=6), dtype=torch.float16, how="cast",
         log_mag=0, dead=0.0)
@example(case=Case(B=2, h=2, d=16, H=7, W=5, sr=1, seed=6), dtype=torch.bfloat16, how="autocast",
         log_mag=2, dead=0.25)
def test_half_precision_finite_and_accurate(case, dtype, how, log_mag, dead):
    """bfloat16 / float16 stay finite for inputs up to 1e4 and for tokens ReLU zeroes in q and k;
    the error against float64 stays within about twice the official formulation's in the same
    precision (no bound where the official formulation is not finite)."""
    g = case.gen()
    layer = fl.FocusedLinearAttention(case.C, case.H * case.W, case.h, qkv_bias=True,
                                      sr_ratio=case.sr, focusing_factor=case.p,
                                      kernel_size=case.k, grid_size=(case.H, case.W))
    randomize(layer, g, std=0.05)
    x = randn(g, case.B, case.N, case.C, scale=10.0 ** log_mag, dtype=torch.float32)
    with torch.no_grad():
        # dead tokens: x = 0 and negative q / k biases, so ReLU zeroes the whole token
        layer.q.bias.copy_(-1 - randn(g, case.C, dtype=torch.float32).abs())
        layer.kv.bias[:case.C].copy_(-1 - randn(g, case.C, dtype=torch.float32).abs())
        x[:, torch.rand(case.N, generator=g) < dead] = 0
        if how == "cast":
            low, xl = copy.deepcopy(layer).to(dtype), x.to(dtype)
            # the reference: the same rounded weights and input, in float64
            ref_layer, xr = copy.deepcopy(low).double(), xl.double()
            ours = low(xl, case.H, case.W)
            plain = fl.official_forward(low, xl, case.H, case.W)
        else:
            ref_layer, xr = copy.deepcopy(layer).double(), x.double()
            with torch.autocast("cpu", dtype=dtype):
                ours = layer(x, case.H, case.W)
                plain = fl.official_forward(layer, x, case.H, case.W)
        ref = ref_layer(xr, case.H, case.W)
    what = f"{case} {dtype} {how} |x|~1e{log_mag} dead={dead}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite output"
    err = (ours.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    finite = "finite" if math.isfinite(plain_err) else "NOT finite"
    event(f"official formulation {finite} in {dtype}")
    if math.isfinite(plain_err):
        floor = torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * plain_err + floor, \
            f"{what}: error {err:.3g} vs official formulation {plain_err:.3g}"


# -----------------------------------------------------------------------------
# 9. Gradients


@given(case=cases(max_side=4, max_heads=2, max_d=4, max_batch=2, max_elems=60),
       p=st.one_of(FOCUSING, st.floats(0.3, 1.0)), offset=st.sampled_from([1e-6, 0.0]),
       per_channel=st.booleans())
def test_gradcheck_focus(case, p, offset, per_channel):
    """focus for any p > 0, with the module's offset (then with a token ReLU zeroes) and without
    it (the paper's phi_p; every token live here, see test_focus_gradient_on_dead_tokens), with
    a scalar or a per-channel scale, in float64."""
    g = case.gen()
    x = randn(g, case.B, case.h, case.N, case.d)
    if offset:
        x[..., 0, :] = -x[..., 0, :].abs() - 0.1                  # a token ReLU zeroes
    else:
        x[..., 0] = x[..., 0].abs() + 0.1                          # every token live
    scale = (0.5 + randn(g, case.d if per_channel else 1).abs()).requires_grad_()
    gradcheck(lambda t, s: fl.focus(t, p, s, offset), (x.requires_grad_(), scale),
              f"{case}: focus with p={p!r}, offset={offset}, per-channel scale {per_channel}")


@given(cx=vectors(), with_scale=st.booleans())
@example(cx=(Case(B=2, h=1, d=2, H=1, W=1, p=3.0, seed=0),
             torch.tensor([[-0.5, -0.3], [0.2, 0.4]], dtype=F64)), with_scale=True)
def test_focus_gradient_on_dead_tokens(cx, with_scale):
    """phi_p (offset 0) maps a token that ReLU zeroes to 0 and is constant around it, so its
    gradient there is 0; it must not be NaN, nor turn the shared scale's gradient into NaN."""
    case, x = cx
    dead = (x <= 0).all(-1)
    x = x.clone().requires_grad_()
    scale = torch.tensor([0.7], dtype=F64, requires_grad=True)
    fl.focus(x, case.p, scale if with_scale else None, offset=0).sum().backward()
    assert torch.isfinite(x.grad).all(), \
        f"{case}: d focus / dx is not finite on tokens {dead.nonzero().flatten().tolist()} " \
        "that ReLU zeroes"
    assert (x.grad[dead] == 0).all(), f"{case}: non-zero gradient on a dead token"
    if with_scale:
        assert torch.isfinite(scale.grad).all(), \
            f"{case}: d focus / d scale is {scale.grad.tolist()}"


@given(case=cases(max_side=4, max_sr=2, max_heads=2, max_d=3, max_batch=2, max_elems=60),
       normalizer=st.sampled_from(["mean", "sum"]))
def test_gradcheck_functional_core(case, normalizer):
    """linear_attention, linear_attention_matrix and dwc_matrix, in float64."""
    g = case.gen()
    q = (randn(g, case.B, case.h, case.N, case.d).abs() + 0.1).requires_grad_()
    k = (randn(g, case.B, case.h, case.n, case.d).abs() + 0.1).requires_grad_()
    v = randn(g, case.B, case.h, case.n, case.d).requires_grad_()
    gradcheck(lambda a, b, c: fl.linear_attention(a, b, c, normalizer=normalizer), (q, k, v),
              f"{case}: linear_attention ({normalizer})")
    gradcheck(lambda a, b: analysis.linear_attention_matrix(a, b, normalizer=normalizer), (q, k),
              f"{case}: linear_attention_matrix ({normalizer})")
    w = randn(g, case.d, 1, case.k, case.k).requires_grad_()
    gradcheck(lambda t: analysis.dwc_matrix(t, case.H, case.W), (w,), f"{case}: dwc_matrix",
              fast_mode=True)


def module_call(layer, case):
    """(fn, names, params): fn(x, *params) runs the layer with the given parameter tensors."""
    names = [nm for nm, _ in layer.named_parameters()]
    params = [prm.detach().clone().requires_grad_() for prm in layer.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, case.H, case.W))

    return fn, names, params


def kernel_inputs(layer, x, case):
    """The pre-activations the ReLU of the kernel sees: q and k (+ positional encoding)."""
    with torch.no_grad():
        k = layer.kv(kv_source(layer, x, case.H, case.W))[..., :case.C] + layer.positional_encoding
        return layer.q(x), k


@settings(max_examples=max(3, settings().max_examples // 2))
@given(case=cases(max_side=4, max_sr=2, prefix=True, max_heads=2, max_d=3, max_batch=2,
                  max_elems=60, kernels=(1, 3, 5)))
@example(case=Case(B=2, h=2, d=2, H=3, W=5, sr=2, p=3.0, k=5, seed=7))
def test_gradcheck_module(case):
    """The reference forward (fast paths off): d out / d x and d out / d every parameter of the
    layer, in float64: the full Jacobian for x and the learned scale, a random projection of it
    (fast mode) for all parameters at once (the full one costs about a minute per case). Finite
    differences need every pre-activation of the kernel 1e-4 away from ReLU's kink: within it
    the 1e-6 offset makes phi_p vary on a 1e-5 scale (those inputs are covered by
    test_reference_gradients_equal_official_autograd)."""
    g = case.gen()
    layer = make_layer(case, g, std=0.3)
    fn, names, params = module_call(layer, case)
    x = randn(g, case.B, case.N, case.C).requires_grad_()
    assume(all(t.abs().min() > 1e-4 for t in kernel_inputs(layer, x, case)))
    i = names.index("scale")
    with fast_path("off"):
        gradcheck(lambda x, s: fn(x, *params[:i], s, *params[i + 1:]), (x, params[i]),
                  f"{case}: FocusedLinearAttention, d/dx and d/dscale")
        gradcheck(fn, (x, *params), f"{case}: FocusedLinearAttention, all parameters (fast mode)",
                  fast_mode=True)


@given(case=cases(max_side=6, max_sr=2, prefix=True, max_heads=3, max_d=4, max_batch=2),
       normalizer=st.sampled_from(["mean", "sum"]))
@example(case=Case(B=1, h=1, d=2, H=2, W=2, sr=2, p=3.0, k=3, P=0, seed=384), normalizer="mean")
def test_reference_gradients_equal_official_autograd(case, normalizer):
    """Autograd through the reference forward (fast paths off: the kernel rescaled by the
    per-token maximum) equals autograd through official_forward (the official ops) for x and
    every parameter, in float64, on any input: also near ReLU's kink, where finite differences
    cannot go (the @example has a pre-activation of 1.6e-5), and on tokens that ReLU zeroes."""
    g = case.gen()
    layer = make_layer(case, g, std=0.3, normalizer=normalizer)
    layer.train()
    x = randn(g, case.B, case.N, case.C)
    x[:, torch.rand(case.N, generator=g) < 0.2] = 0            # with the biases: some dead tokens
    upstream = randn(g, case.B, case.N, case.C)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with fast_path("off"):
        ours = torch.autograd.grad((layer(xs[0], case.H, case.W) * upstream).sum(),
                                   [xs[0], *layer.parameters()])
    official = fl.official_forward(layer, xs[1], case.H, case.W, normalizer)
    ref = torch.autograd.grad((official * upstream).sum(), [xs[1], *layer.parameters()])
    scale = max(b.abs().max().item() for b in ref)  # gradients are compared relative to the largest
    for name, a, b in zip(["x"] + [nm for nm, _ in layer.named_parameters()], ours, ref):
        check_close(a / scale, b / scale, case, f"d out / d {name} ({normalizer}) / {scale:.3g}",
                    1e-7, 1e-9)
