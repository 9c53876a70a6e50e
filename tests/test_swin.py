"""FLatten-Swin and Swin: parity with the official code (the official micro fixture in tests/data,
the four official FLatten-Swin manifests in tests/data/swin), any input size (every grid
ceil(H/2) x ceil(W/2) in __init__ and set_input_size, PatchMerging), the shifted and padded
window stages against a reference written here (padding keys at exactly zero weight), the
224 -> 384 fine-tuning load, and training.

The micro fixture is the official FLattenSwinTransformer with embed_dim 16, depths (2, 2, 2, 2),
heads (1, 2, 4, 8), window 56 (stages 1 and 2: global focused linear attention at 224), 'LLSS',
10 classes, on fixed large random weights and a (2, 3, 224, 224) input.
"""

import json
import math

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
    load_fixture,
    official_micro,
    randomize,
    seeded,
)
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import flatten as fl

FIXTURE = "fixture_flatten_swin_micro.pt"
# the micro fixture's architecture, in create_model's terms (window 7 in the softmax stages)
MICRO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)
# a small model for the tests that only need the architecture, not the official weights
SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


def micro_model(d, dtype=torch.float32):
    c = d["config"]
    assert (c["embed_dim"], tuple(c["depths"]), tuple(c["num_heads"]), c["attn_type"],
            c["num_classes"], c["img_size"]) == (16, (2, 2, 2, 2), (1, 2, 4, 8), "LLSS", 10, 224), \
        f"[{FIXTURE}] config {c} is not the one these tests build"
    return official_micro(FIXTURE, "flatten_swin_tiny", dtype, **MICRO)[0]


def official_stages(m, x):
    """The output of each official layers[i]: our stage tokens, after PatchMerging for i < 3."""
    out = []
    for i, (tokens, H, W) in enumerate(m._stages(x)):
        if m.layers[i].downsample is not None:
            tokens = m.layers[i].downsample(tokens, H, W)[0]
        out.append(tokens)
    return out


CASE = "[Swin micro fixture, input 2x3x224x224]"


# -----------------------------------------------------------------------------
# 1. The official micro fixture


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths-on", "fast-paths-off"])
def test_matches_official_fixture(fixture, mode):
    d = fixture
    m = micro_model(d)
    x = d["input"]
    with fast_path(mode), torch.no_grad():
        path = m.layers[0].blocks[0].attn.forward_path(m.patch_embed(x)[0])
        case = f"{CASE} ({path} path)"
        assert_close(m(x), d["output"], f"{case} logits")
        pooled = m.forward_head(m.forward_features(x), pre_logits=True)
        assert_close(pooled, d["forward_features"], f"{case} pooled features")
        stages = official_stages(m, x)
        assert len(stages) == len(d["stages"]) == 4, f"{case}: {len(stages)} stages"
        for i, (ours, ref) in enumerate(zip(stages, d["stages"]), start=1):
            assert_close(ours, ref, f"{case} output of official layers[{i - 1}] (stage {i})")


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths-on", "fast-paths-off"])
def test_matches_official_fixture_in_float64(fixture, mode):
    d = fixture
    m = micro_model(d, torch.float64)
    with fast_path(mode), torch.no_grad():
        out = m(d["input"].double())
    assert_close(out, d["output_fp64"], f"{CASE} float64 logits (fast paths {mode})",
                 rtol=1e-9, atol=1e-11)


def _zero(name):
    def mutate(m, monkeypatch):
        with torch.no_grad():
            for key, p in m.named_parameters():
                if key.endswith(name):
                    p.zero_()
    return mutate


def _no_shift_mask(m, monkeypatch):
    real = fl._window_mask
    monkeypatch.setattr(fl, "_window_mask", lambda *args: torch.zeros_like(real(*args)))


# (what is removed, how, the stages (1-4) it must move)
MUTATIONS = [
    ("positional encodings", _zero("attn.positional_encoding"), (1, 2, 3, 4)),
    ("relative position bias tables", _zero("attn.relative_position_bias_table"), (3, 4)),
    ("shift mask", _no_shift_mask, (3, 4)),
    ("DWC weights", _zero("attn.dwc.weight"), (1, 2, 3, 4)),
]


@pytest.mark.parametrize("what,mutate,moved", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_fixture_pins_every_part(fixture, monkeypatch, what, mutate, moved):
    """Removing a part moves the stage outputs beyond the fixture tolerance: the parity test
    above would fail if that part were missing or mishandled."""
    d = fixture
    m = micro_model(d)
    mutate(m, monkeypatch)
    with torch.no_grad():
        stages = official_stages(m, d["input"])
    for i in moved:
        ours, ref = stages[i - 1], d["stages"][i - 1]
        change = (ours - ref).abs().max().item()
        assert not torch.allclose(ours, ref, rtol=RTOL, atol=ATOL), \
            f"{CASE} without the {what}: stage {i} moves by only {change:.3g} " \
            f"(of {ref.abs().max().item():.3g}), within the tolerance"


# -----------------------------------------------------------------------------
# 2. The official manifests: keys, shapes, parameter counts, GMACs

SWIN_MANIFESTS = ["tiny", "small", "base", "base_384"]
MANIFEST_DIR = DATA  # their state_dict is a list of (key, shape, dtype), unlike the PVT ones


def read_manifest(size):
    return json.loads((MANIFEST_DIR / f"manifest_flatten_swin_{size}.json").read_text())


@pytest.mark.parametrize("size", SWIN_MANIFESTS)
def test_official_manifest_loads_with_exact_parameters_and_gmacs(size):
    """Built on the meta device; load_pretrained checks every key and shape strictly all the
    same."""
    man = read_manifest(size)
    name = man["model"]
    assert name == f"flatten_swin_{size}", f"[manifest {size}] names model {name!r}"
    with torch.device("meta"):
        m = fl.create_model(name)
    check_manifest(m, man, f"[{name}]", man["config"]["img_size"])


def test_softmax_swin_tiny_has_the_standard_parameter_count(untruncated_init):
    m = fl.create_model("swin_tiny")
    n = sum(p.numel() for p in m.parameters())
    assert n == 28_288_354, f"[swin_tiny, 1000 classes] {n:,} parameters, Swin-T has 28,288,354"


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


@pytest.mark.parametrize("H,W", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("attn_type", ["LLSS", "SSSS"], ids=["flatten-swin", "swin"])
def test_any_size(attn_type, H, W, resample_calls):
    torch.manual_seed(0)
    m = fl.create_model("flatten_swin_tiny", attn_type=attn_type, **SMALL).eval()
    case = f"[{attn_type} embed 16 depths {SMALL['depths']}, input 1x3x{H}x{W} seed=4]"
    with torch.no_grad():
        x = seeded(1, 3, H, W, seed=4)
        maps = m.forward_intermediates(x, intermediates_only=True)
        out = m(x)
    assert out.shape == (1, 5) and torch.isfinite(out).all(), f"{case}: logits {out}"
    assert len(maps) == 4, f"{case}: {len(maps)} maps"
    for i, fmap in enumerate(maps):
        hi, wi = math.ceil(H / 4 / 2 ** i), math.ceil(W / 4 / 2 ** i)
        assert fmap.shape == (1, 16 * 2 ** i, hi, wi), \
            f"{case}: stage {i + 1} map {tuple(fmap.shape)}, expected (1, {16 * 2 ** i}, " \
            f"{hi}, {wi})"
        assert torch.isfinite(fmap).all(), f"{case}: stage {i + 1} map is not finite"
    if attn_type == "SSSS":
        assert not resample_calls, f"{case}: softmax Swin resampled {resample_calls}"
        return
    # the linear stages (1 and 2) look up their encodings at their own grid, every call
    grids = {(56, 56): (math.ceil(H / 4), math.ceil(W / 4)),
             (28, 28): (math.ceil(H / 8), math.ceil(W / 8))}
    assert {old for old, _, _ in resample_calls} == set(grids), \
        f"{case}: resample_grid calls {resample_calls}"
    for old, new, same in resample_calls:
        assert new == grids[old], f"{case}: encoding of grid {old} resampled to {new}"
        assert same == (old == new), \
            f"{case}: grid {old} -> {new} returned {'the table itself' if same else 'a copy'}"


def test_construction_size_uses_the_encodings_as_they_are():
    """At 224 the forward is bit-identical with a model whose encodings went through the
    resampler from and to their own grid (which returns the table itself)."""
    m = randomize(fl.create_model("flatten_swin_tiny", **SMALL), seed=3)
    for blk in (b for stage in m.layers for b in stage.blocks if b.attn_type == "L"):
        table = blk.attn.positional_encoding
        grid = blk.attn.grid_size
        assert fl.resample_grid(table, grid, grid) is table, \
            f"[embed 16, 224, grid {grid}] resample_grid to the same grid made a copy"
    x = seeded(1, 3, 224, 224, seed=5)
    with torch.no_grad():
        before = m(x)
        m.set_input_size(224)
        after = m(x)
    assert torch.equal(before, after), \
        f"[embed 16, 1x3x224x224 seed=5] set_input_size(224) changed the logits by " \
        f"{(before - after).abs().max().item():.3g}"


def test_odd_sizes_every_grid_is_ceil_in_init_and_set_input_size():
    """230 x 94: patch 4 gives 57 x 23 (floor((230 - 4) / 4) + 1, not ceil), then 29 x 12 (an
    odd side beside an even one), 15 x 6, 8 x 3: ceil at every merge. Every stage linear
    ('LLLL'), so that each stage's position tables show its construction grid."""
    check_odd_size("flatten_swin_tiny", (230, 94), [(57, 23), (29, 12), (15, 6), (8, 3)],
                   lambda m: [[b.attn for b in stage.blocks] for stage in m.layers],
                   attn_type="LLLL", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                   num_classes=5)


MERGE_GRIDS = [(5, 8), (7, 7), (4, 9), (1, 1), (1, 6), (6, 4)]


@pytest.mark.parametrize("H,W", MERGE_GRIDS, ids=[f"{h}x{w}" for h, w in MERGE_GRIDS])
def test_patch_merging_gives_ceil_and_pads_with_zeros(H, W):
    """Output token (i, j) of a ceil(H/2) x ceil(W/2) grid concatenates the input tokens (2i, 2j),
    (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) (the official order), zeros past the grid; then the
    LayerNorm and the reduction. Exactly: the same numbers in the same order."""
    merge = randomize(fl.PatchMerging(4), seed=H * W)
    x = seeded(2, H * W, 4, seed=H * W)
    case = f"[PatchMerging(4), grid {H}x{W}, seed={H * W}]"
    with torch.no_grad():
        out, h, w = merge(x, H, W)
        grid = x.reshape(2, H, W, 4)

        def at(i, j):
            return grid[:, i, j] if i < H and j < W else torch.zeros(2, 4)

        rows = [torch.cat([at(2 * i, 2 * j), at(2 * i + 1, 2 * j), at(2 * i, 2 * j + 1),
                           at(2 * i + 1, 2 * j + 1)], dim=-1) for i in range(h) for j in range(w)]
        expected = merge.reduction(merge.norm(torch.stack(rows, dim=1)))
    assert (h, w) == (math.ceil(H / 2), math.ceil(W / 2)), f"{case}: grid {h}x{w}"
    assert torch.equal(out, expected), \
        f"{case}: max |diff| {(out - expected).abs().max().item():.3g} from the reference"


@pytest.mark.parametrize("value", [0, -7, 2.5, True])
def test_window_size_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"window_size must be a positive int") as err:
        fl.create_model("flatten_swin_tiny", window_size=value, depths=(1, 1, 1, 1))
    assert repr(value) in str(err.value), f"[flatten_swin_tiny window_size={value!r}]: {err.value}"


# -----------------------------------------------------------------------------
# 4. The window stages against a reference written here


def make_window_block(dim, heads, window, shifted, seed):
    blk = fl.SwinBlock(dim, heads, (8, 8), window, shifted, 2., attn_type="S", qkv_bias=True,
                       drop=0., attn_drop=0., drop_path=0., focusing_factor=3, kernel_size=5,
                       normalizer="mean")
    return randomize(blk, seed=seed).double()


def reference_window_attention(attn, x, H, W, w, shift):
    """Swin's attention written per token: a query at (i, j) of the H x W grid attends, with a
    softmax, to the real tokens that share its window of the grid padded to multiples of w and
    cyclically shifted by `shift` (padding tokens are not in the computation: exactly zero
    weight); the logit of a pair gets the relative position bias of its offset, and -100 (the
    official shift mask) when the two lie in different regions of the shift. Then the heads are
    joined and projected. x (B, H*W, C)."""
    B, N, C = x.shape
    h = attn.num_heads
    d = C // h
    Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
    i = torch.arange(H).repeat_interleave(W)          # row of each token, row-major
    j = torch.arange(W).repeat(H)
    a, b = (i - shift) % Hp, (j - shift) % Wp         # where the shift moves them

    def region(pos, size):  # Swin's three bands of the shifted grid along one axis
        if not shift:
            return torch.zeros_like(pos)
        return (pos >= size - w).long() + (pos >= size - shift).long()

    window = torch.stack([a // w, b // w], dim=1)                                  # (N, 2)
    same_window = (window[:, None, :] == window[None, :, :]).all(-1)               # (N, N)
    regions = torch.stack([region(a, Hp), region(b, Wp)], dim=1)
    same_region = (regions[:, None, :] == regions[None, :, :]).all(-1)
    allowed = same_window & same_region
    # the same pairs, said in the image's own coordinates: windows cut at shift + k * w
    cells = torch.stack([torch.div(i - shift, w, rounding_mode="floor"),
                         torch.div(j - shift, w, rounding_mode="floor")], dim=1)
    assert torch.equal(allowed, (cells[:, None] == cells[None, :]).all(-1)), \
        f"[grid {H}x{W} window {w} shift {shift}] the reference's two definitions differ"
    dy, dx = a[:, None] - a[None, :], b[:, None] - b[None, :]
    index = ((dy + w - 1) * (2 * w - 1) + dx + w - 1).clamp(0, (2 * w - 1) ** 2 - 1)
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)                # (h, N, N)

    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in (q, k, v))          # (B, h, N, d)
    logits = q @ k.transpose(-2, -1) / math.sqrt(d) + bias - 100. * ~same_region
    weights = logits.masked_fill(~same_window, float("-inf")).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


def check_window_block(H, W, window, shifted, heads, seed):
    dim = 4 * heads
    blk = make_window_block(dim, heads, window, shifted, seed)
    x = seeded(2, H * W, dim, seed=seed, dtype=torch.float64)
    shift = window // 2 if shifted and min(H, W) > window else 0
    case = f"[grid {H}x{W} window {window} shifted={shifted} (shift {shift}) heads {heads} " \
           f"dim {dim} seed={seed}]"
    with torch.no_grad():
        y = x + reference_window_attention(blk.attn, blk.norm1(x), H, W, window, shift)
        expected = y + blk.mlp(blk.norm2(y), H, W)
        out = blk(x, H, W)
    assert_close(out, expected, f"{case} SwinBlock vs per-token reference", rtol=1e-10,
                 atol=1e-12)


WINDOW_CASES = [(14, 14, 7), (10, 13, 7), (7, 7, 7), (5, 9, 7), (8, 21, 7), (15, 15, 4),
                (9, 6, 3), (1, 1, 7)]


@pytest.mark.parametrize("shifted", [False, True], ids=["regular", "shifted"])
@pytest.mark.parametrize("H,W,window", WINDOW_CASES,
                         ids=[f"{h}x{w}-window{s}" for h, w, s in WINDOW_CASES])
def test_window_attention_equals_reference(H, W, window, shifted):
    check_window_block(H, W, window, shifted, heads=2, seed=H * 100 + W)


@given(H=st.integers(1, 17), W=st.integers(1, 17), window=st.integers(2, 7),
       shifted=st.booleans(), heads=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_window_attention_equals_reference_property(H, W, window, shifted, heads, seed):
    check_window_block(H, W, window, shifted, heads, seed)


PADDED = [(5, 9, 4, True), (5, 9, 4, False), (10, 13, 7, True), (9, 6, 4, True), (3, 2, 7, False)]


@pytest.mark.parametrize("H,W,window,shifted", PADDED,
                         ids=[f"{h}x{w}-window{s}-{'shifted' if t else 'regular'}"
                              for h, w, s, t in PADDED])
def test_padded_keys_get_exactly_zero_weight(H, W, window, shifted):
    """Logits of -1e5 and below between real tokens and 0 for the padding keys (zeros: k = 0):
    a finite padding mask such as Swin's -100 (or -1e4) would give the padding nearly all the
    weight. The
    window attention equals the per-token reference, which has no padding tokens at all, and its
    gradient is finite (no row of the mask is all -inf)."""
    blk = make_window_block(8, 2, window, shifted, seed=H * 100 + W)
    C = 8
    with torch.no_grad():
        blk.attn.qkv.weight[:C].zero_()                         # q = 100 in every channel
        blk.attn.qkv.bias[:C].fill_(100.)
        blk.attn.qkv.weight[C:2 * C].fill_(-100.)               # k = -100 sum(x) in every channel
        blk.attn.qkv.bias[C:2 * C].zero_()
    x = (0.5 + torch.rand(2, H * W, C, generator=torch.Generator().manual_seed(H * W),
                          dtype=torch.float64)).requires_grad_()     # sum(x) > 0: logits << 0
    shift = window // 2 if shifted and min(H, W) > window else 0
    case = f"[grid {H}x{W} window {window} shift {shift}, logits <= -1e5, dim 8, seed={H * W}]"
    out = blk._window_attention(x, H, W)
    with torch.no_grad():
        expected = reference_window_attention(blk.attn, x, H, W, window, shift)
    assert_close(out, expected, f"{case} window attention vs per-token reference", rtol=1e-10,
                 atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), f"{case}: the gradient is not finite"


def test_no_row_of_a_window_mask_is_all_minus_infinity():
    """-inf for padding keys never leaves a query (real or padding) without a key: every window
    holds a real token, so no softmax row is 0/0."""
    for H in range(1, 13):
        for W in range(1, 13):
            for w in range(2, 6):
                Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
                for shift in {0, w // 2 if min(H, W) > w else 0}:
                    mask = fl._window_mask(Hp, Wp, H, W, w, shift, "cpu")
                    rows = torch.isfinite(mask).any(-1)
                    assert rows.all(), f"[grid {H}x{W} window {w} shift {shift}] " \
                        f"{int((~rows).sum())} rows of the mask are all -inf"


def test_masks_are_cached_per_grid_size(monkeypatch):
    built = []
    real = fl._window_mask

    def counting(*args):
        built.append(args[:6])
        return real(*args)
    monkeypatch.setattr(fl, "_window_mask", counting)
    blk = make_window_block(8, 2, 7, True, seed=0)
    grids = [(10, 13), (10, 13), (14, 14), (14, 14), (11, 13), (10, 13), (14, 14), (3, 4)]
    seen = []
    with torch.no_grad():
        for n, (H, W) in enumerate(grids):
            blk(seeded(1, H * W, 8, seed=H * W, dtype=torch.float64), H, W)
            if (H, W) not in seen:
                seen.append((H, W))
            case = f"[window 7 shifted, dim 8, grids {grids[:n + 1]}]"
            assert len(blk._masks) == len(built) == len(seen), \
                f"{case}: {len(blk._masks)} cached masks, {len(built)} built, " \
                f"{len(seen)} distinct grids"
    first = next(m for k, m in blk._masks.items() if k[2:4] == (10, 13))
    with torch.no_grad():
        blk(seeded(1, 130, 8, dtype=torch.float64), 10, 13)
    again = next(m for k, m in blk._masks.items() if k[2:4] == (10, 13))
    assert again is first and len(built) == len(seen), \
        f"[window 7 shifted, grid 10x13 once more] the mask was rebuilt ({len(built)} builds)"
    regular = make_window_block(8, 2, 7, False, seed=0)
    with torch.no_grad():
        regular(seeded(1, 196, 8, dtype=torch.float64), 14, 14)
    assert not regular._masks and len(built) == len(seen), \
        f"[window 7 not shifted, dim 8, grid 14x14] a mask was built: {list(regular._masks)}"


def test_a_traced_forward_caches_no_mask(fresh_dynamo):
    """A forward under FakeTensorMode (what a FLOP count on fake tensors runs) or under
    torch.compile builds its masks inside the trace: none may land in the cache, or the next
    real forward would compute with a fake mask."""
    blk = make_window_block(8, 2, 7, True, seed=0)
    x = seeded(1, 130, 8, seed=5, dtype=torch.float64)
    with torch.no_grad():
        ref = blk(x, 10, 13)
    blk._masks.clear()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        blk(torch.empty(1, 130, 8, dtype=torch.float64), 10, 13)
    assert not blk._masks, "[window 7 shifted, grid 10x13] a fake-mode forward cached a mask"
    with torch.no_grad():
        out = torch.compile(blk, backend="aot_eager", fullgraph=True)(x, 10, 13)
        assert not blk._masks, "[window 7 shifted, grid 10x13] a compiled forward cached a mask"
        assert_close(blk(x, 10, 13), ref, "[window 7 shifted, grid 10x13] after fake mode")
    assert_close(out, ref, "[window 7 shifted, grid 10x13] compiled")


def test_mask_equals_official_buffer(fixture):
    """At the micro config's construction size stage 3 is 14 x 14 with window 7, shift 3: the
    mask built and cached by the shifted block equals the official attn_mask buffer, and every
    window block's relative_position_index the official one."""
    d = fixture
    m = micro_model(d)
    with torch.no_grad():
        m(d["input"])
    official = {k: v for k, v in d["state_dict"].items() if k.endswith("attn_mask")}
    assert set(official) == {"layers.2.blocks.1.attn_mask"}, \
        f"{CASE}: official masks {sorted(official)}"
    masks = list(m.layers[2].blocks[1]._masks.values())
    ref = official["layers.2.blocks.1.attn_mask"]
    assert len(masks) == 1 and torch.equal(masks[0], ref), \
        f"{CASE} stage 3 block 2 (14x14, window 7, shift 3): {len(masks)} masks, " \
        f"first {tuple(masks[0].shape) if masks else None} vs official {tuple(ref.shape)}"
    for name, buf in m.named_buffers():
        if name.endswith("relative_position_index"):
            assert torch.equal(buf, d["state_dict"][name]), \
                f"{CASE} {name} differs from the official buffer"


# -----------------------------------------------------------------------------
# 5. 224 -> 384: the official fine-tuning load

SMALL_B = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)


def official_resize_encoding(table, side):
    """(1, L, C) on a square grid -> (1, side^2, C), as the official fine-tuning recipe does."""
    _, L, C = table.shape
    s = math.isqrt(L)
    grid = table.permute(0, 2, 1).reshape(1, C, s, s)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.reshape(1, C, side * side).permute(0, 2, 1)


def official_resize_bias(table, side):
    """(L, heads) on a square grid -> (side^2, heads), as the official fine-tuning recipe does."""
    L, h = table.shape
    s = math.isqrt(L)
    grid = table.permute(1, 0).reshape(1, h, s, s)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.reshape(h, side * side).permute(1, 0)


@pytest.mark.parametrize("source", ["ours", "official"])
def test_224_checkpoint_loads_at_384(source, fixture, resample_calls):
    if source == "official":
        sd = fixture["state_dict"]
    else:
        sd = randomize(fl.create_model("flatten_swin_base", **SMALL_B), seed=7).state_dict()
    m = fl.create_model("flatten_swin_base_384", **SMALL_B)
    fl.load_pretrained(m, sd)
    case = f"[{source} 224 checkpoint (embed 16, depths 2,2,2,2) -> 384, window 12]"
    loaded = m.state_dict()
    resized = {"positional_encoding": 0, "relative_position_bias_table": 0}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue                                  # official buffers: rebuilt, not loaded
        if key in loaded:
            got = loaded[key]
        else:                                         # an official fused qkv: our q and kv
            stem, _, leaf = key.rpartition(".qkv.")
            got = torch.cat([loaded[f"{stem}.q.{leaf}"], loaded[f"{stem}.kv.{leaf}"]])
        expected = value
        if key.endswith("positional_encoding"):
            expected = official_resize_encoding(value, 96 if key.startswith("layers.0") else 48)
            resized["positional_encoding"] += 1
        elif key.endswith("relative_position_bias_table"):
            assert value.shape[0] == 13 ** 2, f"{case} {key}: {tuple(value.shape)}"
            expected = official_resize_bias(value, 23)
            resized["relative_position_bias_table"] += 1
        assert got.shape == expected.shape, \
            f"{case} {key}: {tuple(got.shape)} vs official recipe {tuple(expected.shape)}"
        assert torch.equal(got, expected), \
            f"{case} {key}: max |diff| {(got - expected).abs().max().item():.3g} from the " \
            f"official recipe"
    assert resized == {"positional_encoding": 4, "relative_position_bias_table": 4}, \
        f"{case}: tables resized {resized}"
    resample_calls.clear()
    with torch.no_grad():
        out = m.eval()(seeded(1, 3, 384, 384, seed=8))
    assert out.shape == (1, 10) and torch.isfinite(out).all(), f"{case} at 1x3x384x384: {out}"
    assert all(same for _, _, same in resample_calls), \
        f"{case}: the 384 model resampled at 384: {resample_calls}"


def test_224_checkpoint_at_224_is_loaded_as_is():
    sd = randomize(fl.create_model("flatten_swin_base", **SMALL_B), seed=9).state_dict()
    a, b = fl.create_model("flatten_swin_base", **SMALL_B), \
        fl.create_model("flatten_swin_base", **SMALL_B)
    fl.load_pretrained(a, sd)
    b.load_state_dict(sd)
    case = "[224 checkpoint (embed 16, depths 2,2,2,2, seed 9) into the same 224 model]"
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{case} {key} differs from load_state_dict"
    x = seeded(1, 3, 224, 224, seed=10)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x)), f"{case} logits differ on 1x3x224x224"


# -----------------------------------------------------------------------------
# 6. Training


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths-on", "fast-paths-off"])
def test_one_training_step_at_odd_size(mode):
    """100 x 132: stage grids 25x33, 13x17, 7x9, 4x5 (odd, padded; window 3 shifts stages 3 and
    4). Every parameter gets a finite gradient and SGD moves it."""
    torch.manual_seed(0)
    m = fl.create_model("flatten_swin_tiny", embed_dim=16, depths=(2, 2, 2, 2),
                        num_heads=(1, 2, 4, 8), num_classes=5, window_size=3).train()
    x, target = seeded(2, 3, 100, 132, seed=11), torch.tensor([1, 3])
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    case = f"[flatten_swin embed 16 depths 2,2,2,2 window 3, input 2x3x100x132 seed=11, " \
           f"fast paths {mode}]"
    with fast_path(mode):
        path = m.layers[0].blocks[0].attn.forward_path(m.patch_embed(x)[0])
        loss = F.cross_entropy(m(x), target)
        loss.backward()
    assert torch.isfinite(loss), f"{case} ({path} path): loss {loss}"
    unused = [k for k, p in m.named_parameters() if p.grad is None]
    assert not unused, f"{case} ({path} path): parameters without a gradient: {unused}"
    bad = [k for k, p in m.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{case} ({path} path): non-finite gradients: {bad}"
    opt.step()
    still = [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    assert not still, f"{case} ({path} path): SGD left unchanged: {still}"
