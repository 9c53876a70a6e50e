"""FLatten-CSwin and CSWin: parity with the official code (the official micro fixture and the
four official FLatten-CSwin manifests in tests/data), any input size (every grid ceil(H/2) x
ceil(W/2) in __init__ and set_input_size), the padded stripe attention (padding keys at zero
weight) and the whole model off the trained size against references written here, the 224 ->
384 fine-tuning load, the released checkpoint format, training and an empty batch.

The micro fixture is the official CSWinTransformer with embed_dim 16, depths (2, 2, 2, 2), heads
(2, 4, 8, 16), split_size (1, 2, 7, 7), la_split_size '56-28-14-7', 'LLSS', 10 classes (stages
1 and 2: global focused linear attention; stage 3: stripes 14x7 and 7x14; stage 4: the whole
7x7 grid), run by the official code on a CPU in float32 at one thread. Its weights: every
parameter, in named_parameters() order, N(0, 0.2^2) from one generator seeded 1; its input
(2, 3, 224, 224): N(0, 1) from a generator seeded 2 (test_fixture_recipe makes both again). It
holds the logits, the pooled features, each stage's output (the last block of official stage i,
before the next merge), the float64 logits and the logits of the older official file the
released checkpoint was trained with (output_e743f01). Tolerance: rtol 1e-4, atol 1e-5.
The CSwin attention modules have no fast path: the tests that run with fast paths on and off
hold that the switch changes nothing here.
"""

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from common import (
    ATOL,
    DATA,
    RTOL,
    assert_close,
    check_manifest,
    check_odd_size,
    fast_path,
    image_of,
    load_fixture,
    official_micro,
    randomize,
    reference_focused_linear,
    resampled_table,
    seeded,
    tokens_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import flatten as fl

FIXTURE = "fixture_flatten_cswin_micro.pt"
# the micro fixture's architecture, in create_model's terms
MICRO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), num_classes=10)
# a small model for the tests that only need the architecture, not the official weights
SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), num_classes=5)
CASE = "[CSwin micro fixture, input 2x3x224x224]"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


def micro_model(d, dtype=torch.float32, **overrides):
    c = d["config"]
    assert (c["embed_dim"], tuple(c["depth"]), tuple(c["num_heads"]), tuple(c["split_size"]),
            c["la_split_size"], c["attn_type"], c["num_classes"], c["img_size"]) == \
        (16, (2, 2, 2, 2), (2, 4, 8, 16), (1, 2, 7, 7), "56-28-14-7", "LLSS", 10, 224), \
        f"[{FIXTURE}] config {c} is not the one these tests build"
    return official_micro(FIXTURE, "flatten_cswin_tiny", dtype, **MICRO, **overrides)[0]


def stage_tokens(m, x):
    """The four stage outputs as tokens (B, H*W, C_i), the fixture's `stages` layout."""
    maps = m.forward_intermediates(x, intermediates_only=True)
    return [fmap.flatten(2).transpose(1, 2) for fmap in maps]


# -----------------------------------------------------------------------------
# 1. The official micro fixture


def test_fixture_recipe(fixture):
    """Our parameters come in the official order, so the fixture's recipe run on our model
    gives the fixture's weights; and its input is seeded(..., seed=2)."""
    m = randomize(fl.create_model("flatten_cswin_tiny", **MICRO), seed=1, std=0.2)
    ours, official = m.state_dict(), fixture["state_dict"]
    assert list(ours) == list(official), f"{CASE}: state_dict keys differ from the official " \
        f"order: first {next((a, b) for a, b in zip(ours, official) if a != b)}"
    differ = [k for k in ours if not torch.equal(ours[k], official[k])]
    assert not differ, f"{CASE}: the recipe (seed 1, std 0.2) gives other weights for {differ}"
    assert torch.equal(seeded(2, 3, 224, 224, seed=2), fixture["input"]), \
        f"{CASE}: the input is not seeded(2, 3, 224, 224, seed=2)"


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths-on", "fast-paths-off"])
def test_matches_official_fixture(fixture, mode):
    d = fixture
    m = micro_model(d)
    x = d["input"]
    case = f"{CASE} (fast paths {mode})"
    with fast_path(mode), torch.no_grad():
        stages = stage_tokens(m, x)
        feats = m.forward_features(x)
        assert_close(m.forward_head(feats), d["output"], f"{case} logits")
        assert_close(m.forward_head(feats, pre_logits=True), d["forward_features"],
                     f"{case} pooled features (official forward_features)")
    assert len(stages) == len(d["stages"]) == 4, f"{case}: {len(stages)} stages"
    for i, (ours, ref) in enumerate(zip(stages, d["stages"]), start=1):
        assert_close(ours, ref, f"{case} output of official stage{i} (before the next merge)")


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths-on", "fast-paths-off"])
def test_matches_official_fixture_in_float64(fixture, mode):
    d = fixture
    m = micro_model(d, torch.float64)
    with fast_path(mode), torch.no_grad():
        out = m(d["input"].double())
    assert_close(out, d["output_fp64"], f"{CASE} float64 logits (fast paths {mode})",
                 rtol=1e-9, atol=1e-11)


def test_sum_normalizer_matches_the_code_of_the_released_checkpoint(fixture):
    """normalizer="sum" is the official file the released FLatten-CSwin-T was trained with
    (output_e743f01); its stages 1 and 2 differ from the current code's beyond the tolerance,
    so the setting reaches every linear branch."""
    d = fixture
    m = micro_model(d, normalizer="sum")
    with torch.no_grad():
        out = m(d["input"])
        stages = stage_tokens(m, d["input"])
    assert_close(out, d["output_e743f01"], f"{CASE} normalizer='sum' logits vs e743f01")
    for i in (1, 2):
        assert not torch.allclose(stages[i - 1], d["stages"][i - 1], rtol=RTOL, atol=ATOL), \
            f"{CASE} normalizer='sum': stage {i} equals the mean normaliser's"


def _zero(suffix, stages=(1, 2, 3, 4)):
    def mutate(m):
        hit = 0
        with torch.no_grad():
            for key, p in m.named_parameters():
                if key.endswith(suffix) and int(key[len("stage")]) in stages:
                    p.zero_()
                    hit += 1
        assert hit, f"no parameter {suffix} in stages {stages}"
    return mutate


def _focusing_factor_2(m):
    for layer in m.modules():
        if isinstance(layer, fl.CSwinLinearAttention):
            layer.focusing_factor = 2.


# (what is removed, how, the stages (1-4) it must move; the others must not move at all)
MUTATIONS = [
    ("positional encodings", _zero("positional_encoding"), (1, 2, 3, 4)),
    ("scales (softplus -> 0.693)", _zero("attns.0.scale"), (1, 2, 3, 4)),
    ("DWC weights", _zero("dwc.weight"), (1, 2, 3, 4)),
    ("LePE of the linear stages 1-2", _zero("get_v.weight", (1, 2)), (1, 2, 3, 4)),
    ("LePE of the softmax stages 3-4", _zero("get_v.weight", (3, 4)), (3, 4)),
    ("focusing factor 3 -> 2", _focusing_factor_2, (1, 2, 3, 4)),
]


@pytest.mark.parametrize("what,mutate,moved", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_fixture_pins_every_part(fixture, what, mutate, moved):
    """Removing a part moves the stage outputs beyond the fixture tolerance: the parity test
    above would fail if that part were missing or mishandled."""
    d = fixture
    m = micro_model(d)
    mutate(m)
    with torch.no_grad():
        stages = stage_tokens(m, d["input"])
    for i, (ours, ref) in enumerate(zip(stages, d["stages"]), start=1):
        change = (ours - ref).abs().max().item()
        if i in moved:
            assert not torch.allclose(ours, ref, rtol=RTOL, atol=ATOL), \
                f"{CASE} without the {what}: stage {i} moves by only {change:.3g} " \
                f"(of {ref.abs().max().item():.3g}), within the tolerance"
        else:
            assert_close(ours, ref, f"{CASE} without the {what}: stage {i} (before it)")


# -----------------------------------------------------------------------------
# 2. The official manifests: keys, shapes, parameter counts, GMACs

CSWIN_MANIFESTS = ["tiny", "small", "base", "base_384"]


def read_manifest(size):
    return json.loads((DATA / f"manifest_flatten_cswin_{size}.json").read_text())


@pytest.mark.parametrize("size", CSWIN_MANIFESTS)
def test_official_manifest_loads_with_exact_parameters_and_gmacs(size):
    """Built on the meta device; load_pretrained checks every key and shape strictly all the
    same."""
    man = read_manifest(size)
    name = man["model"]
    assert name == f"flatten_cswin_{size}", f"[manifest {size}] names model {name!r}"
    with torch.device("meta"):
        m = fl.create_model(name)
    keys = [key for key, _, _ in man["state_dict"]]
    assert list(m.state_dict()) == keys, f"[{name}] state_dict keys differ from the manifest's"
    check_manifest(m, man, f"[{name}]", man["config"]["img_size"])


def test_softmax_cswin_has_the_official_cswin_layout(untruncated_init):
    """cswin_small (CSWin-S: the depths and heads of FLatten-CSwin-S) has FLatten-CSwin-S's keys
    but for the attention: no focused linear parameters, and stages 1 and 2 in two stripe
    branches of C/2 channels, as the official CSWin code builds them."""
    man = read_manifest("small")
    expected = {}
    for key, shape, _ in man["state_dict"]:
        if key.endswith(("scale", "positional_encoding", "dwc.weight", "dwc.bias")):
            continue
        if key.startswith(("stage1.", "stage2.")) and ".attns.0.get_v." in key:
            half = [shape[0] // 2] + shape[1:]
            for branch in (0, 1):
                expected[key.replace("attns.0", f"attns.{branch}")] = half
            continue
        expected[key] = shape
    m = fl.create_model("cswin_small")
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert ours == expected, f"[cswin_small] keys or shapes differ: " \
        f"{sorted(set(ours.items()) ^ set(expected.items()), key=str)[:6]}"
    for name, depths in (("cswin_tiny", (1, 2, 21, 1)), ("cswin_base", (2, 4, 32, 2))):
        cfg = fl.create_model(name, depths=(1, 1, 1, 1)).cfg
        assert (cfg.attn_type, cfg.split_size) == ("SSSS", (1, 2, 7, 7)) and \
            fl.MODELS[name][1]["depths"] == depths, f"[{name}] config {cfg}"


# -----------------------------------------------------------------------------
# 3. Any input size, H != W

SIZES = [(224, 224), (256, 256), (384, 384), (512, 512), (1024, 1024), (224, 320), (800, 1216),
         (100, 132)]


@pytest.fixture
def resample_calls(monkeypatch):
    """Every resample_grid call: (old grid, new grid, whether it returned the table itself)."""
    calls = []
    real = fl.resample_grid

    def spy(table, old_hw, new_hw, *args, **kwargs):
        out = real(table, old_hw, new_hw, *args, **kwargs)
        calls.append((tuple(old_hw), tuple(new_hw), out is table))
        return out
    monkeypatch.setattr(fl, "resample_grid", spy)
    return calls


def stage_grids(H, W):
    h, w = (H - 3) // 4 + 1, (W - 3) // 4 + 1                 # the 7x7 stride-4 stem, padding 2
    grids = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        grids.append((h, w))
    return grids


@pytest.mark.parametrize("H,W", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"], ids=["flatten-cswin", "cswin"])
def test_any_size(attn_type, H, W, resample_calls):
    torch.manual_seed(0)
    m = fl.create_model("flatten_cswin_tiny", attn_type=attn_type, **SMALL).eval()
    case = f"[{attn_type} embed 16 depths {SMALL['depths']}, input 1x3x{H}x{W} seed=4]"
    with torch.no_grad():
        x = seeded(1, 3, H, W, seed=4)
        maps = m.forward_intermediates(x, intermediates_only=True)
        out = m(x)
    assert out.shape == (1, 5) and torch.isfinite(out).all(), f"{case}: logits {out}"
    grids = stage_grids(H, W)
    assert [tuple(t.shape) for t in maps] == [(1, 16 * 2 ** i, *grids[i]) for i in range(4)], \
        f"{case}: maps {[tuple(t.shape) for t in maps]}, grids {grids}"
    assert all(torch.isfinite(t).all() for t in maps), f"{case}: a stage map is not finite"
    if attn_type == "SSSS":
        assert not resample_calls, f"{case}: softmax CSWin resampled {resample_calls}"
        return
    # the linear stages (1 and 2) look up their encodings at their own grid, every call
    expected = {(56, 56): grids[0], (28, 28): grids[1]}
    assert {old for old, _, _ in resample_calls} == set(expected), \
        f"{case}: resample_grid calls {resample_calls}"
    for old, new, same in resample_calls:
        assert new == expected[old], f"{case}: encoding of grid {old} resampled to {new}"
        assert same == (old == new), \
            f"{case}: grid {old} -> {new} returned {'the table itself' if same else 'a copy'}"


def test_odd_sizes_every_grid_is_ceil_in_init_and_set_input_size():
    """227 x 101: the stem gives 57 x 25 ((H - 3) // 4 + 1: not H // 4, not ceil(H / 4)), then
    29 x 13, 15 x 7, 8 x 4 (ceil at every merge, non-square). Every stage linear ('LLLL'), so
    that each stage's position tables show its construction grid."""
    check_odd_size("flatten_cswin_tiny", (227, 101), stage_grids(227, 101),
                   lambda m: [[b.attns[0] for b in getattr(m, f"stage{i}")] for i in range(1, 5)],
                   attn_type="LLLL", **SMALL)


def test_set_input_size_in_place_equals_resampling_on_the_fly():
    m = randomize(fl.create_model("flatten_cswin_tiny", **SMALL), seed=3)
    tables = {n: p for n, p in m.named_parameters() if n.endswith("positional_encoding")}
    frozen = sorted(tables)[::2]
    for n in frozen:
        tables[n].requires_grad_(False)
    ids = {n: id(p) for n, p in m.named_parameters()}
    x = seeded(1, 3, 96, 128, seed=5)
    case = "[flatten_cswin embed 16 built at 224, set_input_size((96, 128)), input 1x3x96x128 " \
           "seed=5]"
    with torch.no_grad():
        dynamic = m(x)
        m.set_input_size((96, 128))
        fixed = m(x)
    replaced = sorted(n for n, p in m.named_parameters() if ids[n] != id(p))
    assert not replaced, f"{case}: new Parameter objects for {replaced}"
    flipped = sorted(n for n in tables if m.get_parameter(n).requires_grad == (n in frozen))
    assert not flipped, f"{case}: requires_grad changed for {flipped}"
    rows = {n: m.get_parameter(n).shape[1] for n in tables}
    assert rows == {n: 24 * 32 if n.startswith("stage1") else 12 * 16 for n in tables}, \
        f"{case}: table rows {rows}"
    assert torch.equal(dynamic, fixed), f"{case}: max |diff| {(dynamic - fixed).abs().max():.3g}"
    assert m.cfg.img_size == (96, 128), f"{case}: cfg.img_size {m.cfg.img_size}"


# -----------------------------------------------------------------------------
# 4. The stripe attention against a reference written here


def reference_stripe_block(blk, x, H, W, split):
    """A CSwinBlock with two stripe branches, written without padding: a query attends with a
    softmax to the tokens of its own stripe (attns.0: the columns [s*floor(j/s), s*floor(j/s)+s)
    of the grid, attns.1: the same rows), and its LePE is get_v run on its stripe alone, cut
    out of the grid (a last stripe narrower than s is an image of its own width)."""
    B, N, C = x.shape
    c = C // 2
    i, j = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)   # row-major tokens
    q, k, v = blk.qkv(blk.norm1(x)).split(C, dim=-1)
    outs = []
    for branch, (attn, cell) in enumerate(zip(blk.attns, (j // split, i // split))):
        h = attn.num_heads
        sl = slice(branch * c, (branch + 1) * c)
        qb, kb, vb = (t[..., sl].reshape(B, N, h, c // h).transpose(1, 2) for t in (q, k, v))
        allowed = cell[:, None] == cell[None, :]                                 # (N, N)
        logits = qb @ kb.transpose(-2, -1) / math.sqrt(c // h)
        out = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ vb)
        out = out.transpose(1, 2).reshape(B, N, c)
        image = v[..., sl].transpose(1, 2).reshape(B, c, H, W)
        lepe = torch.zeros_like(image)
        for start in range(0, W if branch == 0 else H, split):
            cut = (slice(None), slice(None), slice(None), slice(start, start + split)) \
                if branch == 0 else (slice(None), slice(None), slice(start, start + split))
            lepe[cut] = attn.get_v(image[cut])
        outs.append(out + lepe.flatten(2).transpose(1, 2))
    y = x + blk.proj(torch.cat(outs, dim=-1))
    return y + blk.mlp(blk.norm2(y), H, W)


def stripe_block(dim, heads, split, seed):
    blk = fl.CSwinBlock(dim, heads, (8, 8), split, 2., attn_type="S", last=False, qkv_bias=True,
                        drop=0., attn_drop=0., drop_path=0., focusing_factor=3, kernel_size=5,
                        normalizer="mean")
    return randomize(blk, seed=seed).double()


def check_stripe_block(H, W, split, heads, seed):
    dim = 4 * heads
    blk = stripe_block(dim, heads, split, seed)
    x = seeded(2, H * W, dim, seed=seed, dtype=torch.float64)
    case = f"[grid {H}x{W} split {split} heads {heads} dim {dim} seed={seed}]"
    with torch.no_grad():
        assert_close(blk(x, H, W), reference_stripe_block(blk, x, H, W, split),
                     f"{case} CSwinBlock (padded, masked stripes) vs unpadded reference",
                     rtol=1e-10, atol=1e-12)


STRIPE_CASES = [(14, 14, 7), (16, 16, 7), (7, 9, 7), (13, 17, 2), (7, 9, 4), (4, 6, 7),
                (25, 33, 1), (1, 1, 7), (1, 5, 2)]


@pytest.mark.parametrize("H,W,split", STRIPE_CASES,
                         ids=[f"{h}x{w}-split{s}" for h, w, s in STRIPE_CASES])
def test_stripe_attention_equals_reference(H, W, split):
    check_stripe_block(H, W, split, heads=2, seed=H * 100 + W)


@settings(max_examples=25)
@given(H=st.integers(1, 15), W=st.integers(1, 15), split=st.integers(1, 8),
       heads=st.sampled_from([2, 4]), seed=st.integers(0, 2 ** 16))
def test_stripe_attention_equals_reference_property(H, W, split, heads, seed):
    check_stripe_block(H, W, split, heads, seed)


def test_whole_grid_attention_is_plain_softmax_with_lepe():
    """The last stage's one branch: softmax over all tokens plus get_v over the whole grid."""
    H, W, C, h = 5, 6, 16, 4
    attn = randomize(fl.StripeAttention(C, h, (None, None)), seed=4).double()
    q, k, v = (seeded(2, H * W, C, seed=s, dtype=torch.float64) for s in (5, 6, 7))
    qh, kh, vh = (t.reshape(2, H * W, h, C // h).transpose(1, 2) for t in (q, k, v))
    ref = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(C // h), -1) @ vh
    lepe = attn.get_v(v.transpose(1, 2).reshape(2, C, H, W)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        assert_close(attn(q, k, v, H, W), ref.transpose(1, 2).reshape(2, H * W, C) + lepe,
                     f"[whole grid {H}x{W}, C {C}, {h} heads, seeds 4-7] StripeAttention",
                     rtol=1e-10, atol=1e-12)


def test_two_branches_at_grid_equal_to_split_are_one_branch():
    """Where the grid side equals the split size the official code builds one branch on all
    channels; ours keeps two (the same keys at every size): the same function, with get_v of
    the one branch the two halves' kernels stacked."""
    blk = stripe_block(16, 4, 7, seed=8)
    one = fl.StripeAttention(16, 4, (None, None)).double()
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(one.get_v, name).copy_(torch.cat([getattr(a.get_v, name) for a in blk.attns]))
        q, k, v = (seeded(2, 49, 16, seed=s, dtype=torch.float64) for s in (9, 10, 11))
        halves = [t.chunk(2, dim=-1) for t in (q, k, v)]
        two = torch.cat([a(*(t[i] for t in halves), 7, 7) for i, a in enumerate(blk.attns)], -1)
        assert_close(two, one(q, k, v, 7, 7), "[grid 7x7 split 7, C 16, 4 heads, seeds 8-11] "
                     "two half branches vs one branch", rtol=1e-10, atol=1e-12)


PADDED_STRIPES = [(7, 9, 4), (13, 17, 2), (4, 6, 4), (5, 3, 2)]


@pytest.mark.parametrize("H,W,split", PADDED_STRIPES,
                         ids=[f"{h}x{w}-split{s}" for h, w, s in PADDED_STRIPES])
def test_padded_keys_get_exactly_zero_weight_in_stripes(H, W, split):
    """Logits of -1e5 and below between real tokens and 0 for the padding keys (zeros: k = 0):
    a finite padding mask such as -100 (or -1e4) would give the padding nearly all the weight.
    The block (norm1 left out, so that the tokens stay positive) equals the unpadded reference,
    and its gradient is finite (no softmax row without a key)."""
    blk = stripe_block(8, 2, split, seed=H * 100 + W)
    blk.norm1 = torch.nn.Identity()
    C = 8
    with torch.no_grad():
        blk.qkv.weight[:C].zero_()                              # q = 100 in every channel
        blk.qkv.bias[:C].fill_(100.)
        blk.qkv.weight[C:2 * C].fill_(-100.)                    # k = -100 sum(x) in every channel
        blk.qkv.bias[C:2 * C].zero_()
    x = (0.5 + torch.rand(2, H * W, C, generator=torch.Generator().manual_seed(H * W),
                          dtype=torch.float64)).requires_grad_()     # sum(x) > 0: logits << 0
    case = f"[grid {H}x{W} split {split}, logits <= -1e5, dim 8, seed={H * W}]"
    out = blk(x, H, W)
    with torch.no_grad():
        expected = reference_stripe_block(blk, x, H, W, split)
    assert_close(out, expected, f"{case} CSwinBlock vs unpadded reference", rtol=1e-10,
                 atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), f"{case}: the gradient is not finite"


def reference_linear_block(blk, x, H, W):
    """A FLatten-CSwin linear block, global over H x W: focused linear attention with the DWC
    (common.reference_focused_linear), the encoding resampled to H x W, and the LePE get_v on
    the raw v as one H x W image."""
    attn = blk.attns[0]
    C = x.shape[-1]
    q, k, v = blk.qkv(blk.norm1(x)).split(C, dim=-1)
    k = k + resampled_table(attn.positional_encoding, attn.grid_size, H, W)
    out = reference_focused_linear(q, k, v, H, W, attn.num_heads, attn.scale,
                                   attn.focusing_factor, attn.dwc, attn.normalizer)
    lepe = F.conv2d(image_of(v, H, W), attn.get_v.weight, attn.get_v.bias, padding=1, groups=C)
    y = x + blk.proj(out + tokens_of(lepe))
    return y + blk.mlp(blk.norm2(y), H, W)


def reference_global_block(blk, x, H, W):
    """The last stage's block: softmax over every token of the grid, per head, plus get_v on
    the whole H x W image (the released la_split: one window, the whole grid)."""
    attn = blk.attns[0]
    B, N, C = x.shape
    h = attn.num_heads
    q, k, v = blk.qkv(blk.norm1(x)).split(C, dim=-1)
    qh, kh, vh = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))
    out = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(C // h), -1) @ vh
    lepe = F.conv2d(image_of(v, H, W), attn.get_v.weight, attn.get_v.bias, padding=1, groups=C)
    y = x + blk.proj(out.transpose(1, 2).reshape(B, N, C) + tokens_of(lepe))
    return y + blk.mlp(blk.norm2(y), H, W)


def reference_cswin(m, x):
    """The whole model written here: the stem and merges as convolutions of images in the
    layout image_of / tokens_of, then per stage the references above (stripes: the unpadded
    reference_stripe_block). Returns the logits and each stage's (tokens, H, W)."""
    stem = m.stage1_conv_embed
    image = F.conv2d(x, stem[0].weight, stem[0].bias, stride=4, padding=2)
    H, W = image.shape[-2:]
    t = stem[2](tokens_of(image))
    stages = []
    for i in range(1, 5):
        if i > 1:
            merge = getattr(m, f"merge{i - 1}")
            image = F.conv2d(image_of(t, H, W), merge.conv.weight, merge.conv.bias, stride=2,
                             padding=1)
            H, W = image.shape[-2:]
            t = merge.norm(tokens_of(image))
        for blk in getattr(m, f"stage{i}"):
            if m.cfg.attn_type[i - 1] == "L":
                t = reference_linear_block(blk, t, H, W)
            elif i == 4:
                t = reference_global_block(blk, t, H, W)
            else:
                t = reference_stripe_block(blk, t, H, W, m.cfg.split_size[i - 1])
        stages.append((t, H, W))
    return m.head(m.norm(t).mean(dim=1)), stages


@pytest.fixture(scope="module")
def cswin_f64():
    """FLatten-CSwin (embed 16, one block a stage) built at 224, random weights, float64."""
    m = fl.create_model("flatten_cswin_tiny", embed_dim=16, depths=(1, 1, 1, 1),
                        num_heads=(2, 2, 4, 8), num_classes=5)
    return randomize(m, seed=21).double()


OFF_SIZE = [(320, 320), (224, 320), (225, 97), (227, 101)]


@pytest.mark.parametrize("H,W", OFF_SIZE, ids=[f"{h}x{w}" for h, w in OFF_SIZE])
def test_cswin_off_the_trained_size_equals_a_reference(cswin_f64, H, W):
    """Where a stripe is not the whole grid (stage 3 at 20x20, 14x20, 14x6, 15x7 against split
    7) and the grids are not square: the linear stages global with their DWC and LePE images
    H x W (not W x H), the stripes padded and masked as the unpadded reference, the last stage
    global over its grid (10x10, 7x10, 7x3, 8x4: more than one 7 x 7 window), and every grid
    ceil(H/2) x ceil(W/2) of the one before."""
    m = cswin_f64
    x = seeded(1, 3, H, W, seed=H + W, dtype=torch.float64)
    case = f"[flatten_cswin embed 16 built at 224, float64, input 1x3x{H}x{W} seed={H + W}]"
    with torch.no_grad():
        ours = list(m._stages(x))
        logits = m.forward_head(m.norm(ours[-1][0]))
        ref_logits, ref = reference_cswin(m, x)
    grids = stage_grids(H, W)
    assert [(h, w) for _, h, w in ours] == [(h, w) for _, h, w in ref] == grids, \
        f"{case}: stage grids {[(h, w) for _, h, w in ours]}, expected {grids}"
    for i, ((t, _, _), (r, _, _)) in enumerate(zip(ours, ref), start=1):
        assert_close(t, r, f"{case} stage {i} ({grids[i - 1][0]}x{grids[i - 1][1]}) vs the "
                     "reference", rtol=1e-9, atol=1e-11)
    assert_close(logits, ref_logits, f"{case} logits vs the reference", rtol=1e-9, atol=1e-11)


# -----------------------------------------------------------------------------
# 5. Checkpoints: 224 -> 384 (and 1024) with the official recipe; the released file format


def official_resize_encoding(table, side):
    """(1, L, C) on a square grid -> (1, side^2, C), as the official fine-tuning recipe does."""
    _, L, C = table.shape
    s = math.isqrt(L)
    grid = table.permute(0, 2, 1).reshape(1, C, s, s)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.reshape(1, C, side * side).permute(0, 2, 1)


@pytest.mark.parametrize("img", [384, 1024])
def test_224_checkpoint_loads_at_a_larger_size(fixture, img, resample_calls):
    sd = fixture["state_dict"]
    m = fl.create_model("flatten_cswin_base_384", img_size=img, **MICRO)
    fl.load_pretrained(m, sd)
    case = f"[official micro 224 checkpoint -> {img}, split (1, 2, 12, 12)]"
    loaded = m.state_dict()
    assert loaded.keys() == sd.keys(), f"{case}: keys differ"
    resized = 0
    for key, value in sd.items():
        expected = value
        if key.endswith("positional_encoding"):
            expected = official_resize_encoding(value, img // 4 if key.startswith("stage1")
                                                else img // 8)
            resized += 1
        assert loaded[key].shape == expected.shape, \
            f"{case} {key}: {tuple(loaded[key].shape)} vs official recipe {tuple(expected.shape)}"
        assert torch.equal(loaded[key], expected), \
            f"{case} {key}: max |diff| {(loaded[key] - expected).abs().max().item():.3g} from " \
            f"the official recipe"
    assert resized == 4, f"{case}: {resized} encodings resized"
    if img == 384:
        resample_calls.clear()
        with torch.no_grad():
            out = m.eval()(seeded(1, 3, 384, 384, seed=8))
        assert out.shape == (1, 10) and torch.isfinite(out).all(), f"{case} at 384: {out}"
        assert all(same for _, _, same in resample_calls), \
            f"{case}: the 384 model resampled at 384: {resample_calls}"


def test_released_checkpoint_format_loads(fixture, tmp_path):
    """The released FLatten-CSwin-T file: the weights under 'model', an EMA copy under
    'state_dict_ema' (ignored), training state and a pickled config object (a yacs CfgNode,
    of a module the loading side lacks: loaded as inert data)."""
    name = "yacs_like_config_for_cswin_tests"
    module = types.ModuleType(name)

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = name, "CfgNode"
    module.CfgNode = CfgNode
    sd = fixture["state_dict"]
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "flatten_cswin_tiny.pth"
    sys.modules[name] = module
    try:
        torch.save({"model": sd, "state_dict_ema": ema, "optimizer": {"state": {}},
                    "lr_scheduler": {"last_epoch": 300}, "max_accuracy": 83.1,
                    "max_accuracy_e": 83.0, "epoch": 299,
                    "config": CfgNode(MODEL=CfgNode(TYPE="flatten_cswin"))}, path)
    finally:
        del sys.modules[name]
    for how in ("load_pretrained", "create_model"):
        case = f"[official-style FLatten-CSwin file with 'state_dict_ema' and a config, {how}]"
        with pytest.warns(UserWarning, match='normalizer="sum"'):  # its layers use "mean"
            if how == "load_pretrained":
                m = fl.create_model("flatten_cswin_tiny", **MICRO)
                fl.load_pretrained(m, path)
            else:
                m = fl.create_model("flatten_cswin_tiny", **MICRO, checkpoint=path)
        differ = [k for k, v in m.state_dict().items() if not torch.equal(v, sd[k])]
        assert not differ, f"{case}: not the 'model' weights: {differ[:5]}"
    assert name not in sys.modules, f"loading imported {name}"


# -----------------------------------------------------------------------------
# 6. Training, an empty batch, the API


@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"], ids=["flatten-cswin", "cswin"])
def test_one_training_step_at_odd_size(attn_type):
    """100 x 132: stage grids 25x33, 13x17, 7x9, 4x5; split (1, 2, 4, 7) pads and masks both
    stripe branches of stage 3 (and in CSWin the height-2 stripes of stage 2). Every parameter
    gets a finite gradient and SGD moves it."""
    torch.manual_seed(0)
    m = fl.create_model("flatten_cswin_tiny", attn_type=attn_type, split_size=(1, 2, 4, 7),
                        embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8),
                        num_classes=5).train()
    x, target = seeded(2, 3, 100, 132, seed=11), torch.tensor([1, 3])
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    case = f"[{attn_type} embed 16 split (1, 2, 4, 7), input 2x3x100x132 seed=11]"
    loss = F.cross_entropy(m(x), target)
    loss.backward()
    assert torch.isfinite(loss), f"{case}: loss {loss}"
    unused = [k for k, p in m.named_parameters() if p.grad is None]
    assert not unused, f"{case}: parameters without a gradient: {unused}"
    bad = [k for k, p in m.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{case}: non-finite gradients: {bad}"
    opt.step()
    still = [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    assert not still, f"{case}: SGD left unchanged: {still}"


@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"], ids=["flatten-cswin", "cswin"])
def test_empty_batch(attn_type):
    m = fl.create_model("flatten_cswin_tiny", attn_type=attn_type, **SMALL)
    case = f"[{attn_type} embed 16, input 0x3x100x132]"
    x = torch.zeros(0, 3, 100, 132)
    out = m.train()(x)
    assert out.shape == (0, 5), f"{case} training: logits {tuple(out.shape)}"
    out.sum().backward()
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (0, 5), f"{case} eval: logits {tuple(m(x).shape)}"
        maps = [tuple(t.shape) for t in m.forward_intermediates(x, intermediates_only=True)]
    expected = [(0, 16 * 2 ** i, *g) for i, g in enumerate(stage_grids(100, 132))]
    assert maps == expected, f"{case}: forward_intermediates {maps}, expected {expected}"


def test_model_api(capfd):
    m = fl.create_model("flatten_cswin_tiny", num_classes=0, depths=(1, 1, 1, 1),
                        embed_dim=16, drop_path_rate=0.1, focusing_factor=2, kernel_size=3)
    assert capfd.readouterr() == ("", ""), "[flatten_cswin_tiny] construction printed"
    attn = m.stage1[0].attns[0]
    assert (attn.focusing_factor, attn.kernel_size, attn.normalizer) == (2, 3, "mean"), \
        f"[flatten_cswin_tiny focusing_factor=2 kernel_size=3]: {attn.focusing_factor}, " \
        f"{attn.kernel_size}, {attn.normalizer}"
    x = seeded(2, 3, 64, 96)
    case = "[flatten_cswin_tiny embed 16 num_classes=0, input 2x3x64x96 seed=0]"
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 128), f"{case}: forward {tuple(out.shape)}"
        feats = m.forward_features(x)
        assert feats.shape == (2, 2 * 3, 128), f"{case}: forward_features {tuple(feats.shape)}"
        assert torch.equal(m.forward_head(feats, pre_logits=True), out), \
            f"{case}: forward_head(pre_logits=True) differs from forward"
    m.reset_classifier(11)
    assert m(x).shape == (2, 11), f"{case}: after reset_classifier(11) {tuple(m(x).shape)}"
    assert {"flatten_cswin_tiny", "flatten_cswin_small", "flatten_cswin_base",
            "flatten_cswin_base_384", "cswin_tiny", "cswin_small", "cswin_base"} \
        == set(fl.list_models("cswin")), f"list_models('cswin') = {fl.list_models('cswin')}"


BAD_CONFIG = [
    ("split_size-length", dict(split_size=(1, 2, 7)), r"split_size needs 4 entries"),
    ("split_size-zero", dict(split_size=(1, 2, 0, 7)), r"split_size entries must be positive"),
    ("attn_type-letter", dict(attn_type="LLXS"), r"attn_type needs 4 letters 'L' or 'S'"),
    ("odd-heads-in-a-stripe-stage", dict(num_heads=(2, 4, 3, 16), embed_dim=24),
     r"num_heads must be even, got 3"),
    ("normalizer", dict(normalizer="max"), r"normalizer must be 'mean' or 'sum'"),
    ("kernel-even", dict(kernel_size=4), r"kernel_size must be an odd positive int"),
    ("focusing_factor", dict(focusing_factor=0), r"focusing_factor must be a finite number"),
    ("img_size", dict(img_size=2), r"below the smallest input, 3x3"),
    ("embed_dim", dict(embed_dim=0), r"embed_dim must be a positive int, got 0"),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in BAD_CONFIG],
                         ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_raises_a_value_error_saying_what_was_expected(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        fl.create_model("flatten_cswin_tiny", **{"depths": (1, 1, 1, 1), **overrides})


def test_bad_input_raises_a_value_error_saying_what_was_expected():
    m = fl.create_model("flatten_cswin_tiny", **SMALL)
    for x, expected in ((torch.zeros(1, 3, 2, 64), r"at least 3x3"),
                        (torch.zeros(1, 1, 64, 64), r"3 input channels"),
                        (torch.zeros(3, 64, 64), r"expects images")):
        with pytest.raises(ValueError, match=expected):
            m(x)
    with pytest.raises(ValueError, match=r"img_size must be a positive int"):
        m.set_input_size((224,))
