"""timm's conventions, checked without timm: forward_intermediates with each of its arguments,
feature_info against the maps it describes, forward / backward / the classifier API as timm's
model tests run them; and FocusedLinearAttention2d, the attention on (B, C, H, W) maps.

The references are independent of the code under test: each stage's tokens are caught by a
forward hook on the module that feature_info names and laid out as maps by an explicit reshape;
the grids come from each family's strides written out by hand, at an odd, non-square input.
"""

import math

import pytest
import torch
from common import assert_close, randomize, seeded

import flatten as fl

pytestmark = pytest.mark.usefixtures("one_thread")

# one small model per family: FLatten-PVT, FLatten-PVTv2, FLatten-DeiT, FLatten-Swin, FLatten-CSwin,
# L2ViT
SMALL = {
    "flatten_pvt_tiny": dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)),
    "flatten_pvt_v2_b0": dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)),
    "flatten_deit_tiny": dict(embed_dim=48, depth=3),
    "flatten_swin_tiny": dict(embed_dim=12, depths=(1, 1, 2, 1)),
    "flatten_cswin_tiny": dict(embed_dim=16, depths=(1, 1, 1, 1)),
    "l2vit_tiny": dict(dims=(16, 32, 64, 128), depths=(2, 1, 2, 1), num_heads=(2, 4, 8, 16)),
}
NAMES = list(SMALL)
H, W = 43, 69           # odd and non-square: every floor and ceil of the strides shows
# the maps that norm=True normalises: the final norm's stage (Swin, CSwin), every block (DeiT)
NORMED = {"flatten_pvt_tiny": [], "flatten_pvt_v2_b0": [], "flatten_deit_tiny": [0, 1, 2],
          "flatten_swin_tiny": [3], "flatten_cswin_tiny": [3], "l2vit_tiny": [3]}


def grids(name: str, H: int, W: int):
    """Each map's grid, from the family's strides written out by hand."""
    def steps(first, later, n=4):
        out = [(first(H), first(W))]
        for _ in range(n - 1):
            out.append((later(out[-1][0]), later(out[-1][1])))
        return out
    half_up = lambda s: (s + 1) // 2                                          # noqa: E731
    return {"flatten_pvt_tiny": steps(lambda s: s // 4, lambda s: s // 2),   # no padding
            "flatten_pvt_v2_b0": steps(lambda s: (s - 1) // 4 + 1, half_up),  # 7/4 pad 3, 3/2 pad 1
            "flatten_deit_tiny": steps(lambda s: s // 16, lambda s: s, 3),    # 16 x 16 patches
            "flatten_swin_tiny": steps(lambda s: s // 4, half_up),            # merging pads
            "flatten_cswin_tiny": steps(lambda s: (s - 3) // 4 + 1, half_up),  # 7/4 pad 2
            "l2vit_tiny": steps(lambda s: -(-s // 4), half_up),              # pads to 4, then 2
            }[name]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: randomize(fl.create_model(name, num_classes=5, **kw), seed=3)
            for name, kw in SMALL.items()}


@pytest.fixture(scope="module")
def x():
    return seeded(2, 3, H, W, seed=5)


class Taps:
    """Forward hooks on the modules feature_info names: what each returned (tokens), in order."""

    def __init__(self, model):
        self.model, self.outputs, self.handles = model, {}, []
        for i, info in enumerate(model.feature_info):
            module = model.get_submodule(info["module"])
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, i=i: self.outputs.__setitem__(i, out)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def maps(self, name, normed=()):
        """The caught tokens as maps (B, C, h, w) by an explicit reshape, class token dropped;
        the final norm applied to the stages in `normed`."""
        out = []
        for i in sorted(self.outputs):
            h, w = grids(name, H, W)[i]
            t = self.outputs[i]
            t = self.model.norm(t) if i in normed else t
            t = t[:, 1:] if name == "flatten_deit_tiny" else t
            out.append(t.reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2))
        return out


def assert_maps_equal(got, expected, case):
    assert len(got) == len(expected), f"{case}: {len(got)} maps, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{case} map {i}: shape {tuple(g.shape)}, expected " \
                                   f"{tuple(e.shape)}"
        assert torch.equal(g, e), f"{case} map {i}: max |diff| {(g - e).abs().max():.3g}"


# -----------------------------------------------------------------------------
# forward_intermediates


@pytest.mark.parametrize("name", NAMES)
def test_maps_are_the_stage_outputs_and_final_is_forward_features(name, models, x):
    m = models[name]
    case = f"[{name} {SMALL[name]}, input 2x3x{H}x{W} seed=5]"
    with torch.no_grad(), Taps(m) as taps:
        final, maps = m.forward_intermediates(x)
        expected = taps.maps(name)
        assert_maps_equal(maps, expected, case)
        assert_close(final, m.forward_features(x), f"{case} final features vs forward_features",
                     1e-6, 1e-7)
        assert_close(m.forward_head(final), m(x), f"{case} forward_head(final) vs forward",
                     1e-6, 1e-7)
        only = m.forward_intermediates(x, intermediates_only=True)
    assert isinstance(only, list), f"{case}: intermediates_only gives a {type(only).__name__}"
    assert_maps_equal(only, expected, f"{case} intermediates_only")


@pytest.mark.parametrize("name", NAMES)
def test_indices(name, models, x):
    m = models[name]
    n = len(m.feature_info)
    case = f"[{name}, {n} {'blocks' if name == 'flatten_deit_tiny' else 'stages'}]"
    with torch.no_grad():
        every = m.forward_intermediates(x, intermediates_only=True)
        for indices, picked in [(None, range(n)), (2, [n - 2, n - 1]), (n, range(n)),
                                ([0, -1], [0, n - 1]), ([-1, 0], [0, n - 1]), ((1, 1), [1]),
                                (range(1, 3), [1, 2]), ([-n], [0])]:
            got = m.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert len(got) == len(picked), \
                f"{case} indices={indices!r}: {len(got)} maps, expected stages {list(picked)}"
            for g, i in zip(got, picked):
                assert_close(g, every[i], f"{case} indices={indices!r}: map of {i}", 1e-6, 1e-7)
    for bad in [0, n + 1, -1, [n], [-n - 1], [], True, 1.5, [0.5], "0", torch.tensor([0])]:
        with pytest.raises(ValueError, match="indices"):
            m.forward_intermediates(x, indices=bad)


@pytest.mark.parametrize("name", NAMES)
def test_norm(name, models, x):
    """norm=True: the final norm on the maps it is made for (the last stage of Swin and CSwin,
    every block of DeiT); PVT has no final norm and PVTv2's stage norms are part of its maps."""
    m = models[name]
    with torch.no_grad(), Taps(m) as taps:
        _, maps = m.forward_intermediates(x, norm=True)
        assert_maps_equal(maps, taps.maps(name, NORMED[name]), f"[{name} norm=True]")


@pytest.mark.parametrize("name", NAMES)
def test_stop_early(name, models, x):
    """stop_early runs nothing after the last index asked for; the final features are then that
    stage's tokens without the final norm (pyramids; DeiT: the final norm of that block, as in
    timm's ViT). The maps are those of a full run."""
    m = models[name]
    n = len(m.feature_info)
    case = f"[{name} indices=[1] stop_early=True]"
    with torch.no_grad():
        every = m.forward_intermediates(x, intermediates_only=True)
        with Taps(m) as taps:
            final, maps = m.forward_intermediates(x, indices=[1], stop_early=True, norm=True)
        assert sorted(taps.outputs) == [0, 1], f"{case}: ran stages {sorted(taps.outputs)}"
        tokens = taps.outputs[1]
        expected = m.norm(tokens) if name == "flatten_deit_tiny" else tokens
        assert torch.equal(final, expected), f"{case}: final features are not stage 1's tokens"
        expected_map = every[1] if 1 not in NORMED[name] else taps.maps(name, [1])[1]
        assert_close(maps[0], expected_map, f"{case} map", 1e-6, 1e-7)
        # a negative index counts from the end: [0, -(n - 1)] stops after stage 1, with its map
        _, maps = m.forward_intermediates(x, indices=[0, 1 - n], stop_early=True)
        assert len(maps) == 2 and torch.equal(maps[0], every[0]) and \
            torch.equal(maps[1], every[1]), \
            f"[{name} indices=[0, {1 - n}] stop_early=True] {len(maps)} maps, not stages 0 and 1"
        final, _ = m.forward_intermediates(x, indices=[n - 1], stop_early=True)
        assert_close(final, m.forward_features(x), f"[{name} stop_early at the last index] final",
                     1e-6, 1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_output_fmt(name, models, x):
    m = models[name]
    with torch.no_grad():
        nchw = m.forward_intermediates(x, intermediates_only=True)
        nhwc = m.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    for i, (a, b) in enumerate(zip(nchw, nhwc)):
        assert torch.equal(b, a.permute(0, 2, 3, 1)), f"[{name} map {i}] NHWC is not NCHW " \
                                                      f"permuted: {tuple(b.shape)}"
    for bad in ["NLC", "nchw", None]:
        with pytest.raises(ValueError, match="output_fmt"):
            m.forward_intermediates(x, output_fmt=bad)


@pytest.mark.parametrize("name", NAMES)
def test_maps_train(name, models, x):
    """The maps and final features carry gradients to the input, as a detector trains them."""
    m = models[name]
    xg = x.clone().requires_grad_()
    final, maps = m.forward_intermediates(xg)
    (final.mean() + sum(t.square().mean() for t in maps)).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0, \
        f"[{name}] input gradient through forward_intermediates is zero or not finite"


# -----------------------------------------------------------------------------
# feature_info


@pytest.mark.parametrize("size", [(H, W), (64, 48)], ids=[f"{H}x{W}", "64x48"])
@pytest.mark.parametrize("name", NAMES)
def test_feature_info_describes_the_maps(name, size, models):
    m = models[name]
    info = m.feature_info
    case = f"[{name} input 1x3x{size[0]}x{size[1]}]"
    with torch.no_grad():
        maps = m.forward_intermediates(seeded(1, 3, *size, seed=6), intermediates_only=True)
    assert len(info) == len(maps), f"{case}: {len(info)} feature_info entries, {len(maps)} maps"
    previous = 1
    for i, (d, fmap) in enumerate(zip(info, maps)):
        assert set(d) == {"num_chs", "reduction", "module"}, f"{case} entry {i}: keys {set(d)}"
        assert d["num_chs"] == fmap.shape[1], \
            f"{case} entry {i}: num_chs {d['num_chs']}, map {tuple(fmap.shape)}"
        r = d["reduction"]
        assert r >= previous, f"{case} entry {i}: reduction {r} after {previous}"
        previous = r
        for side, s in zip(size, fmap.shape[-2:]):
            assert side // r <= s <= math.ceil(side / r), \
                f"{case} entry {i}: reduction {r} but the map is {tuple(fmap.shape[-2:])}"
        m.get_submodule(d["module"])  # names a module of the model


def test_feature_info_names_the_last_block():
    cases = {"flatten_pvt_tiny": ["block1.1", "block2.1", "block3.1", "block4.1"],
             "flatten_pvt_v2_b0": ["norm1", "norm2", "norm3", "norm4"],
             "flatten_swin_tiny": ["layers.0.blocks.1", "layers.1.blocks.1", "layers.2.blocks.5",
                                   "layers.3.blocks.1"],
             "flatten_cswin_tiny": ["stage1.1", "stage2.3", "stage3.17", "stage4.0"],
             "l2vit_tiny": ["stages.0.1", "stages.1.1", "stages.2.5", "stages.3.1"]}
    for name, modules in cases.items():
        with torch.device("meta"):
            got = [d["module"] for d in fl.create_model(name).feature_info]
        assert got == modules, f"[{name}] feature_info modules {got}"
    with torch.device("meta"):
        deit = fl.create_model("flatten_deit_tiny")
    assert [(d["module"], d["reduction"], d["num_chs"]) for d in deit.feature_info] == \
        [(f"blocks.{i}", 16, 192) for i in range(12)], f"[flatten_deit_tiny] {deit.feature_info}"


# -----------------------------------------------------------------------------
# forward, backward and the classifier API, as timm's model tests run them


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    """timm's test_model_backward: num_classes=42, training, every parameter gets a gradient."""
    torch.manual_seed(1)
    m = fl.create_model(name, num_classes=42, **SMALL[name]).train()
    out = m(seeded(2, 3, H, W, seed=7))
    assert out.shape == (2, 42) and torch.isfinite(out).all(), f"[{name}] logits {out.shape}"
    out.mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"[{name} num_classes=42, training] no gradient for {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_classifier_api(name, models, x):
    """timm's default-cfg checks for token outputs: forward_features (B, N, num_features),
    forward_head(pre_logits=True) (B, num_features), and forward with no classifier
    (reset_classifier(0), num_classes=0) gives the same as pre_logits."""
    m = models[name]
    h, w = grids(name, H, W)[-1]
    tokens = h * w + (name == "flatten_deit_tiny")
    case = f"[{name}, input 2x3x{H}x{W}]"
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, tokens, m.num_features), f"{case}: features {feats.shape}"
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.num_features), f"{case}: pre_logits {tuple(pre.shape)}"
        headless = fl.create_model(name, num_classes=0, **SMALL[name])
        headless.load_state_dict({k: v for k, v in m.state_dict().items()
                                  if not k.startswith("head.")})
        assert_close(headless.eval()(x), pre, f"{case} num_classes=0 vs pre_logits", 1e-6, 1e-7)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224), f"{case}: {m.pretrained_cfg}"


def test_reset_classifier_keeps_device_and_dtype():
    m = fl.create_model("flatten_pvt_v2_b0", **SMALL["flatten_pvt_v2_b0"]).double()
    m.reset_classifier(3)
    assert m.head.weight.dtype == torch.float64, f"new head in {m.head.weight.dtype}"
    m.to("meta").reset_classifier(2)
    assert m.head.weight.device.type == "meta", f"new head on {m.head.weight.device}"


# -----------------------------------------------------------------------------
# FocusedLinearAttention2d: the attention on (B, C, H, W) maps


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_attention_on_feature_maps(sr_ratio):
    """The 2d form on (B, C, h, w) maps equals the token form on the same weights, laid out by
    hand, at an odd non-square grid other than the one it was built for."""
    torch.manual_seed(0)
    layer2d = randomize(fl.FocusedLinearAttention2d(32, 8 * 8, 4, qkv_bias=True,
                                                    sr_ratio=sr_ratio), seed=2)
    layer = randomize(fl.FocusedLinearAttention(32, 8 * 8, 4, qkv_bias=True, sr_ratio=sr_ratio),
                      seed=2)
    fmap = seeded(2, 32, 7, 11, seed=4)
    case = f"[FocusedLinearAttention2d sr_ratio={sr_ratio}, map 2x32x7x11 seed=4]"
    assert layer2d.state_dict().keys() == layer.state_dict().keys(), f"{case}: keys differ"
    with torch.no_grad():
        out = layer2d(fmap)
        tokens = fmap.permute(0, 2, 3, 1).reshape(2, 77, 32)
        ref = layer(tokens, 7, 11).reshape(2, 7, 11, 32).permute(0, 3, 1, 2)
    assert_close(out, ref, f"{case} vs the token form", 1e-6, 1e-7)
    g = fmap.clone().requires_grad_()
    layer2d.train()(g.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0, f"{case}: input gradient"


def test_attention_on_feature_maps_rejects_tokens():
    layer = fl.FocusedLinearAttention2d(16, 16, 2)
    for bad in [torch.randn(1, 16, 16), torch.randn(1, 8, 4, 4), "map"]:
        with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
            layer(bad)
    with pytest.raises(ValueError, match="class tokens"):
        fl.FocusedLinearAttention2d(16, 16, 2, num_prefix_tokens=1)
