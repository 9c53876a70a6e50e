"""The models and the API: the softmax and linear comparators, the backbones and their
softmax counterparts, the DeiT design, any input size (H != W too), set_input_size, sr_ratio
tables on the key grid, the timm-style API, an empty batch, the normaliser, the config checks
(stages of 0 blocks), autocast, half precision, bad input and torch.compile.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from common import (
    ROOT,
    assert_close,
    fast_path,
    image_of,
    randomize,
    reference_focused_linear,
    resampled_table,
    seeded,
    tokens_of,
)

import flatten as fl

# every family: FLatten-PVT, FLatten-PVTv2, FLatten-DeiT and their softmax counterparts
FAMILIES = ["flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_deit_tiny",
            "pvt_tiny", "pvt_v2_b0", "deit_tiny"]
SOFTMAX_FAMILIES = {"pvt_tiny", "pvt_v2_b0", "deit_tiny"}


def fla_layers(model):
    return [m for m in model.modules() if isinstance(m, fl.FocusedLinearAttention)]


# -----------------------------------------------------------------------------
# Comparators: softmax, vanilla linear and L2ViT attention


@pytest.mark.parametrize("sr_ratio,P", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_softmax_fused_equals_explicit(sr_ratio, P):
    H, W = 6, 8
    kw = {"qkv_bias": True, "sr_ratio": sr_ratio, "num_prefix_tokens": P}
    fused = randomize(fl.SoftmaxAttention(32, 4, **kw))
    explicit = randomize(fl.SoftmaxAttention(32, 4, fused=False, **kw))
    x = seeded(2, P + H * W, 32, seed=7)
    with torch.no_grad():
        assert_close(fused(x, H, W), explicit(x, H, W),
                     f"[sr_ratio={sr_ratio} prefix={P} grid {H}x{W} seed=7] SDPA vs explicit")


def test_softmax_explicit_is_textbook_attention():
    m = randomize(fl.SoftmaxAttention(16, 2, qkv_bias=True, fused=False)).double()
    x = seeded(1, 12, 16, seed=8, dtype=torch.float64)
    q = m.q(x).reshape(1, 12, 2, 8).transpose(1, 2)
    k, v = m.kv(x).reshape(1, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1) @ v
    ref = m.proj(ref.transpose(1, 2).reshape(1, 12, 16))
    with torch.no_grad():
        assert_close(m(x, 3, 4), ref, "[1x12x16, grid 3x4, seed=8] explicit softmax", 1e-12, 1e-13)


def test_vanilla_and_l2vit_attention():
    H, W = 4, 5
    x = seeded(2, H * W, 16, seed=9, dtype=torch.float64)
    case = f"[2x{H * W}x16, grid {H}x{W}, seed=9]"
    van = randomize(fl.VanillaLinearAttention(16, 2, qkv_bias=True)).double()
    with torch.no_grad():
        q = F.relu(van.q(x)).reshape(2, 20, 2, 8).transpose(1, 2)
        k, v = van.kv(x).reshape(2, 20, 2, 2, 8).permute(2, 0, 3, 1, 4)
        A = q @ F.relu(k).transpose(-2, -1)
        ref = (A @ v) / (A.sum(-1, keepdim=True) + 1e-6)
        ref = van.proj(ref.transpose(1, 2).reshape(2, 20, 16))
        assert_close(van(x, H, W), ref, f"{case} vanilla linear attention", 1e-10, 1e-12)
    l2 = randomize(fl.L2ViTLinearAttention(16, 2, qkv_bias=True)).double()
    with torch.no_grad():
        out = l2(x, H, W)
        q, k, v = l2.attn.qkv(x).reshape(2, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
        A = F.relu(q) @ F.relu(k).transpose(-2, -1)
        a = (A @ v) * l2.attn.temperature / A.sum(-1, keepdim=True).clamp_min(100)
        a = l2.attn.proj(a.transpose(1, 2).reshape(2, 20, 16))
        grid = l2.lcm_norm(x + a).transpose(1, 2).reshape(2, 16, H, W)
        lcm = l2.lcm(grid).flatten(2).transpose(1, 2)
    assert_close(out, a + lcm, f"{case} L2ViT attention + LCM", 1e-10, 1e-12)


# -----------------------------------------------------------------------------
# The backbones, their softmax counterparts and the DeiT design


def test_softmax_counterparts_and_deit():
    counts = {n: sum(p.numel() for p in fl.create_model(n).parameters())
              for n in ("pvt_tiny", "deit_tiny", "flatten_deit_tiny")}
    assert counts["deit_tiny"] == 5_717_416, f"deit_tiny: {counts}"                 # timm's DeiT-T
    assert round(counts["pvt_tiny"] / 1e6, 1) == 13.2, f"pvt_tiny: {counts}"       # paper: 13.2M
    assert counts["flatten_deit_tiny"] == 6_193_576, f"flatten_deit_tiny: {counts}"
    m = fl.create_model("pvt_tiny")
    attn = [getattr(m, f"block{i}")[0].attn for i in range(1, 5)]
    assert all(isinstance(a, fl.SoftmaxAttention) for a in attn), \
        f"pvt_tiny: {[type(a).__name__ for a in attn]}"
    assert [a.sr_ratio for a in attn] == [8, 4, 2, 1], f"pvt_tiny: {[a.sr_ratio for a in attn]}"


def test_deit_class_token_has_no_dwc_term():
    layer = randomize(fl.FocusedLinearAttention(24, 16, 3, qkv_bias=True, num_prefix_tokens=1))
    x = seeded(2, 17, 24, seed=10)
    with torch.no_grad():
        before = layer(x, 4, 4)
        layer.dwc.weight.add_(1.0)
        after = layer(x, 4, 4)
    case = "[2x(1+16)x24, grid 4x4, seed=10]"
    assert torch.equal(before[:, 0], after[:, 0]), \
        f"{case}: the class token's output changed with the DWC"
    change = (before[:, 1:] - after[:, 1:]).abs().max().item()
    assert change > 1e-3, \
        f"{case}: the patch tokens' output changes by {change:.3g} only with the DWC"


# -----------------------------------------------------------------------------
# Any input size (the properties run small models on drawn sizes; these are the real models)

SIZES = [(224, 224), (224, 320), (320, 224), (512, 1024), (1024, 1024)]


@pytest.fixture(scope="module")
def models_224():
    """Each family at its default size, 7 classes, random weights (std 0.02), in eval mode."""
    return {n: randomize(fl.create_model(n, num_classes=7), std=0.02) for n in FAMILIES}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_models_run_at_any_size(models_224, name, size):
    if size[0] * size[1] > 512 * 512 and name in SOFTMAX_FAMILIES:
        pytest.skip("the softmax models' quadratic cost: 224 and 320 sides cover them")
    with torch.no_grad():
        out = models_224[name](seeded(1, 3, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all(), \
        f"[{name} built at 224, input 1x3x{size[0]}x{size[1]} seed=0] logits {tuple(out.shape)}, " \
        f"finite: {bool(torch.isfinite(out).all())}"


def test_layer_runs_at_other_grids_and_is_untouched_at_its_own():
    m = randomize(fl.FocusedLinearAttention(16, 64, 2, qkv_bias=True))

    class NoResample(fl.FocusedLinearAttention):
        def _positional_encoding(self, kh, kw):
            return self.positional_encoding

    raw = NoResample(16, 64, 2, qkv_bias=True)
    raw.load_state_dict(m.state_dict())
    x = seeded(2, 64, 16, seed=11)
    with torch.no_grad():
        assert torch.equal(m(x, 8, 8), raw.eval()(x, 8, 8)), \
            "[built at 8x8, input 2x64x16 seed=11]: the table was changed at its own grid"
        for H, W in ((5, 7), (16, 16), (3, 20), (1, 1)):
            out = m(seeded(2, H * W, 16, seed=H), H, W)
            assert out.shape == (2, H * W, 16) and torch.isfinite(out).all(), \
                f"[built at 8x8, grid {H}x{W} seed={H}]: output {tuple(out.shape)}"


def test_resample_grid_is_bicubic_and_keeps_the_dtype():
    """The grid rows are F.interpolate's bicubic (align_corners=False) image resampling, and a
    half-precision table stays half (identity and constants: test_flatten.py)."""
    t = seeded(1, 2 + 6 * 8, 4, seed=12)
    out = fl.resample_grid(t, (6, 8), (9, 5), 2)
    grid = t[:, 2:].reshape(1, 6, 8, 4).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(9, 5), mode="bicubic", align_corners=False)
    assert_close(out[:, 2:], ref.permute(0, 2, 3, 1).reshape(1, 45, 4),
                 "[(1, 2 + 6x8, 4) -> 9x5, seed=12] grid rows vs bicubic F.interpolate")
    half = fl.resample_grid(t.half(), (6, 8), (9, 5), 2)
    assert half.dtype == torch.float16, f"[float16 (1, 2 + 6x8, 4) -> 9x5]: came back {half.dtype}"


# -----------------------------------------------------------------------------
# set_input_size: fine-tuning at another size


def position_tables(model):
    return {n: p for n, p in model.named_parameters()
            if n.startswith("pos_embed") or n.endswith("positional_encoding")}


def rows_at_128(name, table):
    """Rows of a position table at 128 x 128: PVT stage i has a (32 / 2^(i-1))^2 grid, DeiT a
    class token and an 8 x 8 grid."""
    if "deit" in name:
        return 1 + 8 * 8
    stage = int(table[len("pos_embed")] if table.startswith("pos_embed") else table[len("block")])
    return (32 >> (stage - 1)) ** 2


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_deit_tiny"])
def test_set_input_size_keeps_the_position_tables_in_training(name):
    """After set_input_size the position tables are the same Parameter objects (an optimizer
    built before the call holds them) with the same requires_grad, frozen ones stay frozen
    through a training step, and the outputs equal resampling on the fly."""
    m = randomize(fl.create_model(name, num_classes=3), std=0.02)
    tables = position_tables(m)
    frozen = sorted(tables)[::2]           # every other table, pos_embed and layers alike
    for n in frozen:
        tables[n].requires_grad_(False)
    ids = {n: id(p) for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = seeded(2, 3, 128, 128, seed=13)
    case = f"[{name} built at 224, set_input_size(128), input 2x3x128x128 seed=13]"
    with torch.no_grad():
        dynamic = m(x)
    m.set_input_size(128)
    after = dict(m.named_parameters())
    replaced = sorted(n for n, p in after.items() if ids.get(n) != id(p))
    assert not replaced, f"{case}: new Parameter objects for {replaced}"
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    lost = sorted(n for n, p in after.items() if id(p) not in held)
    assert not lost, f"{case}: the optimizer built before the call does not hold {lost}"
    flipped = sorted(n for n in tables if after[n].requires_grad == (n in frozen))
    assert not flipped, f"{case}: requires_grad changed for {flipped} (frozen: {frozen})"
    rows = {n: t.shape[1] for n, t in position_tables(m).items()}
    expected = {n: rows_at_128(name, n) for n in rows}
    assert rows == expected, f"{case}: table rows {rows}, expected {expected}"
    with torch.no_grad():
        fixed = m(x)
    assert torch.equal(dynamic, fixed), \
        f"{case}: max |diff| {(dynamic - fixed).abs().max():.3g} against resampling on the fly"
    before = {n: after[n].detach().clone() for n in frozen}
    m.train()
    m(x).square().mean().backward()
    opt.step()
    moved = sorted(n for n in frozen if not torch.equal(after[n], before[n]))
    assert not moved, f"{case}: a training step changed the frozen tables {moved}"
    no_grad = sorted(n for n in tables if n not in frozen and after[n].grad is None)
    assert not no_grad, f"{case}: trainable tables without a gradient: {no_grad}"


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_deit_tiny"])
def test_set_input_size_non_square_equals_on_the_fly_resampling(name):
    m = randomize(fl.create_model(name, num_classes=3), std=0.02)
    x = seeded(1, 3, 96, 128, seed=13)
    with torch.no_grad():
        dynamic = m(x)
        m.set_input_size((96, 128))
        fixed = m(x)
    case = f"[{name} built at 224, set_input_size((96, 128)), input 1x3x96x128 seed=13]"
    assert torch.equal(dynamic, fixed), f"{case}: max |diff| {(dynamic - fixed).abs().max():.3g}"
    assert m.cfg.img_size == (96, 128), f"{case}: cfg.img_size {m.cfg.img_size}"


def reference_sr_layer(m, x, H, W, table_grid):
    """FocusedLinearAttention with sr_ratio > 1, written out: keys and values from the strided
    conv's grid floor(H / sr) x floor(W / sr) (then LayerNorm), the table, on table_grid, resampled
    to that key grid (common.resampled_table), the focused attention and the DWC of v brought
    back to H*W tokens (common.reference_focused_linear), proj."""
    image = F.conv2d(image_of(x, H, W), m.sr.weight, m.sr.bias, stride=m.sr_ratio)
    kh, kw = image.shape[-2:]
    k, v = m.kv(m.norm(tokens_of(image))).chunk(2, dim=-1)
    k = k + resampled_table(m.positional_encoding, table_grid, kh, kw)
    out = reference_focused_linear(m.q(x), k, v, H, W, m.num_heads, m.scale,
                                   m.focusing_factor, m.dwc, m.normalizer)
    return m.proj(out)


def test_sr_ratio_tables_are_on_the_key_grid():
    """sr_ratio 2 built on 9 x 13: its keys lie on floor(9/2) x floor(13/2) = 4 x 6 (the strided
    conv's grid), and so does its table, used as it is there; at 10 x 15 (keys 5 x 7) it is
    resampled from 4 x 6; set_grid_size((10, 15)) resamples it once, to 5 x 7."""
    m = randomize(fl.FocusedLinearAttention(16, 9 * 13, 2, qkv_bias=True, sr_ratio=2,
                                            grid_size=(9, 13)), seed=17).double()
    case = "[FocusedLinearAttention(16, 2 heads, sr_ratio 2) built on 9x13, float64, seed=17]"
    assert m.positional_encoding.shape == (1, 4 * 6, 16), \
        f"{case}: table {tuple(m.positional_encoding.shape)}, expected the 4x6 key grid's 24 rows"
    with fast_path("off"), torch.no_grad():
        for H, W in ((9, 13), (10, 15), (5, 4)):
            x = seeded(2, H * W, 16, seed=H * W, dtype=torch.float64)
            assert_close(m(x, H, W), reference_sr_layer(m, x, H, W, (4, 6)),
                         f"{case} at {H}x{W} (keys {H // 2}x{W // 2})", rtol=1e-10, atol=1e-12)
        before = m.positional_encoding.detach().clone()
        m.set_grid_size((10, 15))
        assert m.positional_encoding.shape == (1, 5 * 7, 16), \
            f"{case} set_grid_size((10, 15)): table {tuple(m.positional_encoding.shape)}, " \
            "expected the 5x7 key grid's 35 rows"
        assert_close(m.positional_encoding, resampled_table(before, (4, 6), 5, 7),
                     f"{case} set_grid_size((10, 15)): table vs 4x6 -> 5x7 bicubic", rtol=0, atol=0)
        x = seeded(2, 150, 16, seed=150, dtype=torch.float64)
        assert_close(m(x, 10, 15), reference_sr_layer(m, x, 10, 15, (5, 7)),
                     f"{case} set_grid_size((10, 15)), at 10x15", rtol=1e-10, atol=1e-12)


# -----------------------------------------------------------------------------
# The timm-style API


SWIN = ["flatten_swin_base", "flatten_swin_base_384", "flatten_swin_small", "flatten_swin_tiny",
        "swin_base", "swin_small", "swin_tiny"]
CSWIN = ["cswin_base", "cswin_small", "cswin_tiny", "flatten_cswin_base", "flatten_cswin_base_384",
         "flatten_cswin_small", "flatten_cswin_tiny"]


@pytest.mark.parametrize("pattern, expected", [
    ("swin", SWIN),                                   # a whole word: not CSwin
    ("cswin", CSWIN),
    ("*swin*", sorted(SWIN + CSWIN)),                 # timm's wildcards match whole names
    ("flatten_swin_*", SWIN[:4]),
    ("swin_tiny", ["flatten_swin_tiny", "swin_tiny"]),
    ("flatten_*_base_38?", ["flatten_cswin_base_384", "flatten_swin_base_384"]),
    ("[cs]win_tiny", ["swin_tiny"]),
    ("sw", []),                                       # part of a word: nothing
    ("swin_tiny_x", []),
    ("pvt.v2_b0", []),                                # literal: no regular expression
    ("swin|deit", []),
    ("(", []),
])
def test_list_models_patterns(pattern, expected):
    assert fl.list_models(pattern) == expected, f"list_models({pattern!r})"


def test_list_models_everything_and_bad_patterns():
    names = fl.list_models()
    assert names == sorted(fl.MODELS) == fl.list_models("*"), "list_models() / ('*')"
    assert fl.list_models("tiny") == [n for n in names if n.endswith("_tiny")], "tiny"
    with pytest.raises(ValueError, match="pattern must be a string, got list"):
        fl.list_models(["swin"])


def test_model_api():
    names = fl.list_models()
    expected = {"flatten_pvt_tiny", "flatten_pvt_v2_b5", "flatten_deit_base", "pvt_large",
                "pvt_v2_b0", "deit_small"}
    assert expected <= set(names), f"list_models() lacks {expected - set(names)}"
    assert fl.list_models("deit") == [n for n in names if "deit" in n], fl.list_models("deit")
    m = fl.create_model("flatten_pvt_v2_b0", num_classes=0, depths=[1, 1, 1, 1],
                        focusing_factor=2, kernel_size=3, drop_path_rate=0.1)
    attn = m.block1[0].attn
    assert (attn.focusing_factor, attn.kernel_size) == (2, 3), \
        f"[flatten_pvt_v2_b0 focusing_factor=2 kernel_size=3]: {attn.focusing_factor}, " \
        f"{attn.kernel_size}"
    x = seeded(2, 3, 64, 96)
    case = "[flatten_pvt_v2_b0 num_classes=0, input 2x3x64x96 seed=0]"
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 256), f"{case}: forward {tuple(out.shape)}"
        feats = m.forward_features(x)
        assert feats.shape == (2, 2 * 3, 256), f"{case}: forward_features {tuple(feats.shape)}"
        assert torch.equal(m.forward_head(feats, pre_logits=True), out), \
            f"{case}: forward_head(pre_logits=True) differs from forward"
        maps = [tuple(t.shape) for t in m.forward_intermediates(x, intermediates_only=True)]
    assert maps == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)], \
        f"{case}: forward_intermediates {maps}"
    m.reset_classifier(11)
    assert m(x).shape == (2, 11), f"{case}: after reset_classifier(11) {tuple(m(x).shape)}"
    d = fl.create_model("flatten_deit_tiny", depth=2, num_classes=0).eval()
    x = seeded(1, 3, 48, 64)
    case = "[flatten_deit_tiny depth=2 num_classes=0, input 1x3x48x64 seed=0]"
    assert d(x).shape == (1, 192), f"{case}: forward {tuple(d(x).shape)}"
    d.reset_classifier(4)
    assert d(x).shape == (1, 4), f"{case}: after reset_classifier(4) {tuple(d(x).shape)}"


def test_nothing_printed():
    """A fresh interpreter: importing, building a model and a layer print nothing."""
    code = ("import flatten; flatten.create_model('flatten_pvt_tiny'); "
            "flatten.FocusedLinearAttention(64, 3136, 1)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"import and construction failed: {run.stderr}"
    assert run.stdout == "" and run.stderr == "", \
        f"import and construction printed: stdout {run.stdout!r}, stderr {run.stderr!r}"


# -----------------------------------------------------------------------------
# An empty batch


def small(name: str) -> dict:
    """Overrides that make the registered model `name` small (64 x 64 input, at most 2 blocks a
    stage, 7 classes) while keeping what makes it that model: its family, widths, heads, windows
    and attention types."""
    cfg_cls, base = fl.MODELS[name]
    cfg = cfg_cls(**base)
    kw = {"img_size": 64, "num_classes": 7}
    if hasattr(cfg, "depths"):
        kw["depths"] = tuple(min(d, 2) for d in cfg.depths)
    else:
        kw["depth"] = 2
    return kw


@pytest.mark.parametrize("name", fl.list_models())
def test_every_registered_model_takes_an_empty_batch(name, untruncated_init):
    """B = 0 gives (0, num_classes), in training with autograd (and a backward) as in eval, and
    forward_intermediates gives empty maps."""
    kw = small(name)
    m = fl.create_model(name, **kw)
    case = f"[{name} {kw}, input 0x3x64x64]"
    x = torch.randn(0, 3, 64, 64)
    out = m.train()(x)
    assert out.shape == (0, 7), f"{case} training: logits {tuple(out.shape)}"
    out.sum().backward()
    with torch.no_grad():
        out = m.eval()(x)
        assert out.shape == (0, 7), f"{case} eval: logits {tuple(out.shape)}"
        if hasattr(m, "forward_intermediates"):
            maps = m.forward_intermediates(x, intermediates_only=True)
            assert maps and all(t.dim() == 4 and t.shape[0] == 0 for t in maps), \
                f"{case}: forward_intermediates {[tuple(t.shape) for t in maps]}"


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "with-grad"])
def test_layer_takes_an_empty_batch(grad):
    layer = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True))
    x = torch.zeros(0, 64, 32, requires_grad=grad)
    case = f"[FocusedLinearAttention(32, 64, 2), input 0x64x32, grad={grad}]"
    with torch.set_grad_enabled(grad):
        out = layer(x, 8, 8)
    assert out.shape == (0, 64, 32), f"{case}: output {tuple(out.shape)}"
    if grad:
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == (0, 64, 32), f"{case}: d/dx {x.grad}"
        bad = [n for n, p in layer.named_parameters()
               if p.grad is not None and not torch.equal(p.grad, torch.zeros_like(p))]
        assert not bad, f"{case}: non-zero gradients from no samples: {bad}"


@pytest.mark.parametrize("cls", [fl.SoftmaxAttention, fl.VanillaLinearAttention,
                                 fl.L2ViTLinearAttention], ids=lambda c: c.__name__)
def test_comparators_take_an_empty_batch(cls):
    layer = cls(32, 2).eval()
    with torch.no_grad():
        out = layer(torch.zeros(0, 64, 32), 8, 8)
    assert out.shape == (0, 64, 32), f"[{cls.__name__}(32, 2), input 0x64x32]: {tuple(out.shape)}"


# -----------------------------------------------------------------------------
# The normaliser of the released checkpoints


@pytest.mark.parametrize("name", FAMILIES)
def test_create_model_sets_the_normalizer(name):
    small = {"depth": 1} if "deit" in name else {"depths": (1, 1, 1, 1)}
    m = fl.create_model(name, normalizer="sum", num_classes=3, **small).eval()
    layers = fla_layers(m)
    assert m.cfg.normalizer == "sum", \
        f"[{name} normalizer='sum']: cfg.normalizer {m.cfg.normalizer!r}"
    assert bool(layers) == (name not in SOFTMAX_FAMILIES), f"[{name}]: {len(layers)} FLatten layers"
    wrong = [(i, layer.normalizer) for i, layer in enumerate(layers) if layer.normalizer != "sum"]
    assert not wrong, f"[{name} normalizer='sum']: layers with another normaliser {wrong}"
    with torch.no_grad():
        out = m(seeded(1, 3, 64, 64))
    assert out.shape == (1, 3) and torch.isfinite(out).all(), \
        f"[{name} normalizer='sum', input 1x3x64x64 seed=0]: logits {out}"


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in SOFTMAX_FAMILIES])
@pytest.mark.parametrize("value", ["max", "Sum", None, 1])
def test_create_model_rejects_an_invalid_normalizer(name, value):
    with pytest.raises(ValueError, match=r"normalizer must be 'mean' or 'sum'") as err:
        fl.create_model(name, normalizer=value, depths=(1, 1, 1, 1)) if "pvt" in name else \
            fl.create_model(name, normalizer=value, depth=1)
    assert repr(value) in str(err.value), f"[{name} normalizer={value!r}]: {err.value}"


RATES = ("drop_rate", "attn_drop_rate", "drop_path_rate")
RATE_FAMILIES = {"flatten_pvt_tiny": {"depths": (1, 1, 1, 1)},          # PVTConfig
                 "flatten_deit_tiny": {"depth": 1},                     # DeiTConfig
                 "flatten_swin_tiny": {"depths": (1, 1, 1, 1)},        # SwinConfig
                 "flatten_cswin_tiny": {"depths": (1, 1, 1, 1)}}       # CSwinConfig


@pytest.mark.parametrize("name", list(RATE_FAMILIES))
@pytest.mark.parametrize("field", RATES)
@pytest.mark.parametrize("value", [1.0, 2.0, -0.5, float("nan"), float("inf"), True, "0.1", None])
def test_rates_outside_0_1_raise_at_construction(name, field, value):
    """drop_path_rate=1.0 used to give all-NaN logits in training; 2.0 or -0.5 failed deep inside
    bernoulli_ at the first training forward: now a ValueError when the model is built."""
    with pytest.raises(ValueError, match=rf"{field} must be a number in \[0, 1\)") as err:
        fl.create_model(name, **{field: value}, **RATE_FAMILIES[name])
    assert repr(value) in str(err.value), f"[{name} {field}={value!r}]: {err.value}"


@pytest.mark.parametrize("name", list(RATE_FAMILIES))
@pytest.mark.parametrize("field,value,expected", [
    ("depths", (1, -1, 1, 1), "block counts"), ("depths", (1, 1.0, 1, 1), "block counts"),
    ("mlp_ratio", -1.0, "MLP ratios"), ("mlp_ratio", float("nan"), "MLP ratios"),
    ("mlp_ratio", 0, "MLP ratios"), ("mlp_ratio", 0.0, "MLP ratios"),
    ("mlp_ratio", float("inf"), "MLP ratios")])
def test_block_counts_and_mlp_ratios_are_checked(name, field, value, expected):
    """A negative block count used to build an empty stage silently, a float one failed inside
    torch.linspace, a negative MLP ratio inside nn.Linear; a ratio of 0 would build MLPs of no
    hidden units (a block without its MLP), inf fails inside int()."""
    kw = dict(RATE_FAMILIES[name])
    if field == "depths" and "depth" in kw:
        field, value = "depth", value[1]
    if field == "mlp_ratio" and name.startswith("flatten_pvt"):
        field, value = "mlp_ratios", (4, value, 4, 4)
    kw[field] = value
    with pytest.raises(ValueError, match=expected) as err:
        fl.create_model(name, **kw)
    assert repr(value)[:4] in str(err.value), f"[{name} {field}={value!r}]: {err.value}"


# (the field, its value with one block and with none in stage 2, that block's keys, small widths)
ZERO_BLOCKS = {
    "flatten_pvt_tiny": ("depths", (1, 1, 1, 1), (1, 0, 1, 1), "block2.0.",
                         dict(embed_dims=(16, 32, 40, 64))),
    "flatten_deit_tiny": ("depth", 1, 0, "blocks.0.", dict(embed_dim=48)),
    "flatten_swin_tiny": ("depths", (1, 1, 1, 1), (1, 0, 1, 1), "layers.1.blocks.0.",
                          dict(embed_dim=16, num_heads=(1, 2, 4, 8))),
    "flatten_cswin_tiny": ("depths", (1, 1, 1, 1), (1, 0, 1, 1), "stage2.0.",
                           dict(embed_dim=16, num_heads=(2, 2, 4, 8)))}


@pytest.mark.parametrize("name", list(ZERO_BLOCKS))
def test_a_stage_of_zero_blocks_is_allowed_and_is_its_downsampling_only(name):
    """Block counts are ints >= 0 (documented in the configs and the README): a stage of 0
    blocks (a DeiT of depth 0) computes what the model with one block there computes when that
    block's residual branches are zero (its attention's proj and its fc2): exactly, as x + 0 is x.
    A negative count is refused (test_block_counts_and_mlp_ratios_are_checked)."""
    field, with_one, with_none, block, widths = ZERO_BLOCKS[name]
    one, zero = ({field: v, "num_classes": 3, **widths} for v in (with_one, with_none))
    ref = randomize(fl.create_model(name, **one), seed=8)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key.startswith(block) and key.endswith(("proj.weight", "proj.bias", "fc2.weight",
                                                       "fc2.bias")):
                p.zero_()
    m = fl.create_model(name, **zero).eval()
    result = m.load_state_dict(ref.state_dict(), strict=False)
    case = f"[{name} {field}={zero[field]}]"
    assert not result.missing_keys and all(k.startswith(block) for k in result.unexpected_keys), \
        f"{case}: {result}"
    x = seeded(1, 3, 64, 64, seed=9)
    with torch.no_grad():
        out, expected = m(x), ref(x)
    assert torch.equal(out, expected), f"{case}, input 1x3x64x64 seed=9: max |diff| " \
        f"{(out - expected).abs().max().item():.3g} from the one-block model with zero branches"


@pytest.mark.parametrize("name", list(RATE_FAMILIES))
def test_rates_may_be_numpy_numbers(name):
    import numpy as np
    m = fl.create_model(name, drop_path_rate=np.float32(0.1), num_classes=3, **RATE_FAMILIES[name])
    assert m(seeded(1, 3, 64, 64)).shape == (1, 3), f"[{name} drop_path_rate=np.float32(0.1)]"


@pytest.mark.parametrize("name", list(RATE_FAMILIES))
def test_rates_inside_0_1_train(name):
    torch.manual_seed(0)
    m = fl.create_model(name, num_classes=3, drop_rate=0, attn_drop_rate=0.5,
                        drop_path_rate=0.99, **RATE_FAMILIES[name]).train()
    out = m(seeded(2, 3, 64, 64, seed=3))
    assert out.shape == (2, 3) and torch.isfinite(out).all(), \
        f"[{name} attn_drop_rate=0.5 drop_path_rate=0.99, input 2x3x64x64 seed=3]: {out}"


@pytest.mark.parametrize("name", list(ZERO_BLOCKS))
def test_under_autocast_an_image_of_another_dtype_is_accepted(name):
    """float32 weights under torch.autocast (CPU, bfloat16): bfloat16 and float16 images run, and
    exactly as the same values in float32 (autocast casts every one of them for the first
    convolution). Autocast casts no float64 tensor: float64 images, or weights, get a ValueError
    that says so (not torch's dtype error from inside the convolution)."""
    field, one, _, _, widths = ZERO_BLOCKS[name]
    m = fl.create_model(name, **{field: one}, num_classes=3, **widths).eval()
    for dtype in (torch.bfloat16, torch.float16):
        x = seeded(1, 3, 64, 64, seed=10).to(dtype)
        case = f"[{name} float32 weights, {dtype} image 1x3x64x64 seed=10, autocast bfloat16]"
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = m(x), m(x.float())
        assert torch.equal(out, expected), \
            f"{case}: max |diff| {(out - expected).float().abs().max().item():.3g} from the " \
            "float32 image"
    for weights, images in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        m.to(weights)
        with pytest.raises(ValueError, match=rf"{weights} weights but the images are {images}.*"
                                             r"autocast leaves float64 alone"), \
                torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(seeded(1, 3, 64, 64, seed=10).to(images))


# -----------------------------------------------------------------------------
# Precision


def stage1_layer():
    """A FLatten-PVT stage-1 layer (C = 64, 1 head) at PyTorch's default initialisation."""
    torch.manual_seed(0)
    return fl.FocusedLinearAttention(64, 3136, 1, qkv_bias=True).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["cast", "autocast"])
def test_half_precision_finite_at_1024(dtype, how):
    """Stage 1 of a 1024 x 1024 image, 65536 tokens, where the normaliser's sums overflow
    float16 (the properties draw small grids): tokens ReLU zeroes, then half of them up to 1e4
    (whose features alone overflow float16) and half zeroed."""
    layer = stage1_layer()
    H = W = 256
    big = seeded(1, H * W, 64, seed=15, scale=1e4)
    dead = -seeded(1, H * W, 64, seed=16).abs()          # ReLU zeroes whole tokens of q and k
    mixed = torch.cat([big[:, : H * W // 2], dead[:, H * W // 2:]], 1)
    with torch.no_grad():
        layer.q.bias.fill_(-50.)
        for what, x in (("dead tokens (seed=16)", dead),
                        ("half |x| ~ 1e4 (seed=15), half dead (seed=16)", mixed)):
            if how == "cast":
                out = layer.to(dtype)(x.to(dtype), H, W)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    out = layer.float()(x, H, W)
            assert torch.isfinite(out).all(), \
                f"[{dtype} {how}, grid {H}x{W}, {what}]: {int((~torch.isfinite(out)).sum())} " \
                "non-finite outputs"


# -----------------------------------------------------------------------------
# Bad input: one ValueError that says what was expected


def layer32():
    return fl.FocusedLinearAttention(32, 64, 2)


def autocast_bf16(call):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return call()


BAD_FOCUSING = [float("nan"), float("inf"), 0, -1, "3"]
BAD_INPUT = [
    # (id, call, a regular expression the message must match)
    ("not-BNC", lambda: layer32()(torch.zeros(2, 64), 8, 8), r"must be a \(B, N, C\) tensor"),
    ("tokens", lambda: layer32()(torch.zeros(2, 63, 32), 8, 8), r"63 tokens but H\*W"),
    ("channels", lambda: layer32()(torch.zeros(2, 64, 16), 8, 8), r"16 channels"),
    ("H=W=0", lambda: layer32()(torch.zeros(2, 0, 32), 0, 0), r"H and W must be positive ints"),
    ("H=W=0-64-tokens", lambda: layer32()(torch.zeros(2, 64, 32), 0, 0),
     r"H and W must be positive ints"),
    ("H<0", lambda: layer32()(torch.zeros(2, 64, 32), -8, -8), r"H and W must be positive ints"),
    ("W<0", lambda: layer32()(torch.zeros(2, 64, 32), 8, -8), r"H and W must be positive ints"),
    ("H-float", lambda: layer32()(torch.zeros(2, 64, 32), 8.0, 8),
     r"H and W must be positive ints"),
    ("integer-tokens", lambda: layer32()(torch.zeros(2, 64, 32, dtype=torch.long), 8, 8),
     r"floating-point"),
    ("integer-images", lambda: fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1))(
        torch.zeros(1, 3, 64, 64, dtype=torch.uint8)), r"floating-point"),
    ("heads-divide", lambda: fl.FocusedLinearAttention(30, 64, 4), r"divisible by num_heads"),
    ("num_heads=0", lambda: fl.FocusedLinearAttention(32, 64, 0),
     r"num_heads must be a positive int"),
    ("num_heads=0-softmax", lambda: fl.SoftmaxAttention(32, 0),
     r"num_heads must be a positive int"),
    ("num_heads=0-model", lambda: fl.create_model("flatten_deit_tiny", num_heads=0),
     r"num_heads must be a positive int"),
    ("softmax-heads-divide", lambda: fl.SoftmaxAttention(30, 4), r"divisible by num_heads"),
    ("kernel-even", lambda: fl.FocusedLinearAttention(32, 64, 2, kernel_size=4), r"odd"),
    ("num_patches", lambda: fl.FocusedLinearAttention(32, 60, 2), r"not a positive square"),
    ("reset_classifier(-1)", lambda: fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1))
     .reset_classifier(-1), r"num_classes must be an int >= 0"),
    ("reset_classifier(2.5)", lambda: fl.create_model("flatten_deit_tiny", depth=1)
     .reset_classifier(2.5), r"num_classes must be an int >= 0"),
    ("pvt-too-small", lambda: fl.create_model("flatten_pvt_tiny")(torch.zeros(1, 3, 16, 16)),
     r"at least 32x32"),
    ("deit-too-small", lambda: fl.create_model("flatten_deit_tiny")(torch.zeros(1, 3, 8, 64)),
     r"at least 16x16"),
    ("in_chans", lambda: fl.create_model("flatten_pvt_v2_b0")(torch.zeros(1, 1, 64, 64)),
     r"3 input channels"),
    ("not-BCHW", lambda: fl.create_model("flatten_pvt_v2_b0")(torch.zeros(3, 64, 64)),
     r"expects images"),
    ("dtype", lambda: fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1))(
        torch.zeros(1, 3, 64, 64, dtype=torch.float64)), r"float32 weights but the images are "
     r"torch.float64: cast one to the other"),
    ("dtype-layer", lambda: layer32()(torch.zeros(2, 64, 32, dtype=torch.float64), 8, 8),
     r"FocusedLinearAttention has torch.float32 weights but x is torch.float64: cast one to the "
     r"other \(layer.to\(torch.float64\) or x.to\(torch.float32\)\)"),
    ("dtype-layer-bfloat16", lambda: layer32().bfloat16()(torch.zeros(2, 64, 32), 8, 8),
     r"torch.bfloat16 weights but x is torch.float32: .*, or run under torch.autocast"),
    ("dtype-layer-autocast-float64", lambda: autocast_bf16(
        lambda: layer32()(torch.zeros(2, 64, 32, dtype=torch.float64), 8, 8)),
     r"x is torch.float64: .*torch.autocast leaves float64 alone"),
    ("dtype-model-autocast-float64", lambda: autocast_bf16(
        lambda: fl.create_model("flatten_deit_tiny", depth=1)(torch.zeros(1, 3, 32, 32,
                                                                         dtype=torch.float64))),
     r"images are torch.float64: .*torch.autocast leaves float64 alone"),
    ("dtype-softmax", lambda: fl.SoftmaxAttention(32, 2)(
        torch.zeros(2, 64, 32, dtype=torch.float64), 8, 8), r"SoftmaxAttention has torch.float32"),
    ("dtype-vanilla", lambda: fl.VanillaLinearAttention(32, 2)(
        torch.zeros(2, 64, 32, dtype=torch.float64), 8, 8), r"VanillaLinearAttention has torch"),
    ("dtype-l2vit", lambda: fl.L2ViTLinearAttention(32, 2)(
        torch.zeros(2, 64, 32, dtype=torch.float64), 8, 8), r"L2ViTLinearAttention has torch"),
    ("use_ema-without-checkpoint", lambda: fl.create_model("flatten_pvt_tiny", use_ema=True),
     r"use_ema=True loads the EMA weights of a checkpoint: pass checkpoint="),
    ("2d-not-a-tensor", lambda: fl.FocusedLinearAttention2d(32, 64, 2)([1, 2]),
     r"expected feature maps \(B, 32, H, W\), got list"),
    ("unknown-model", lambda: fl.create_model("flatten_pvt_huge"), r"unknown model"),
    ("typo-model", lambda: fl.create_model("flatten_pvt_tinny"),
     r"unknown model 'flatten_pvt_tinny'; did you mean flatten_pvt_tiny"),
    ("pretrained", lambda: fl.create_model("flatten_pvt_tiny", pretrained=True),
     r"no config field pretrained \(weights: checkpoint=path\)"),
    ("softmax-pvt-below-its-reduction", lambda: fl.create_model("pvt_v2_b0", depths=(1, 1, 1, 1))(
        torch.zeros(1, 3, 16, 16)), r"at least 29x29 pixels"),
    # stage 1 without blocks reduces nothing: 25 leaves stage 2 its 4x4 for sr_ratio 4 (by hand:
    # 25 -> 7 -> 4 -> 2 -> 1; 24 -> 6 -> 3)
    ("softmax-pvt-empty-stage-1", lambda: fl.create_model("pvt_v2_b0", depths=(0, 1, 1, 1))(
        torch.zeros(1, 3, 24, 24)), r"at least 25x25 pixels"),
    ("unknown-field", lambda: fl.create_model("flatten_pvt_tiny", embed_dim=3),
     r"no config field embed_dim"),
] + [
    (f"{where}-focusing_factor={p!r}", call, r"focusing_factor must be a finite number > 0")
    for p in BAD_FOCUSING for where, call in (
        ("module", lambda p=p: fl.FocusedLinearAttention(32, 64, 2, focusing_factor=p)),
        ("focus", lambda p=p: fl.focus(torch.zeros(3, 4), p)),
        ("create_model", lambda p=p: fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1),
                                                     focusing_factor=p)))
] + [
    (f"{name}-set_input_size({size!r})",
     lambda name=name, small=small, size=size: fl.create_model(name, **small).set_input_size(size),
     r"img_size must be a positive int or \(height, width\)")
    for name, small in (("flatten_pvt_v2_b0", {"depths": (1, 1, 1, 1)}),
                        ("flatten_deit_tiny", {"depth": 1}))
    for size in (0, -5, (224,))
] + [
    ("focus-integer-x", lambda: fl.focus(torch.arange(8).view(2, 4)),
     r"focus: x must be a floating-point tensor \(\.\.\., C\) with C >= 1, got torch.int64"),
    ("focus-0-dim-x", lambda: fl.focus(torch.tensor(1.)),
     r"focus: x must be .*got torch.float32 \(\)"),
    ("focus-scale-number", lambda: fl.focus(torch.ones(2, 4), 3, 2.0),
     r"focus: scale must be a tensor of positive numbers"),
    ("focus-scale-shape", lambda: fl.focus(torch.ones(2, 4), 3, torch.ones(5)),
     r"focus: scale of shape \(5,\) does not broadcast to x of shape \(2, 4\); expected e.g. "
     r"\(4,\)"),
    ("focus-scale-grows-x", lambda: fl.focus(torch.ones(2, 4), 3, torch.ones(3, 2, 4)),
     r"focus: scale of shape \(3, 2, 4\) does not broadcast to x"),
] + [
    (f"focus-scale-{name}", lambda bad=bad: fl.focus(torch.ones(2, 4), 3,
                                                     torch.tensor([1., bad, 2., 1.])),
     rf"focus: scale must be positive and finite .*, got values from {low} to {high}")
    for name, bad, low, high in (("zero", 0., 0, 2), ("negative", -3., -3, 2),
                                 ("inf", float("inf"), 1, "inf"),
                                 ("nan", float("nan"), "nan", "nan"))
] + [
    ("linear_attention-no-keys", lambda: fl.linear_attention(
        torch.ones(1, 1, 3, 4), torch.ones(1, 1, 0, 4), torch.ones(1, 1, 0, 2)),
     r"k and v hold no keys \(n = 0, k \(1, 1, 0, 4\)\)"),
    ("linear_attention-d=0", lambda: fl.linear_attention(
        torch.ones(1, 1, 3, 0), torch.ones(1, 1, 2, 0), torch.ones(1, 1, 2, 2)),
     r"expected q \(B, h, N, d\), k \(B, h, n, d\), v \(B, h, n, dv\) with d >= 1"),
] + [
    (f"linear_attention-mask-{name}", lambda mask=mask: fl.linear_attention(
        torch.ones(2, 1, 3, 4), torch.ones(2, 1, 5, 4), torch.ones(2, 1, 5, 2),
        key_padding_mask=mask),
     r"key_padding_mask must be a bool tensor \(B, n\) = \(2, 5\), True where a key is padding")
    for name, mask in (("float", torch.zeros(2, 5)), ("n", torch.zeros(2, 4, dtype=torch.bool)),
                       ("B", torch.zeros(3, 5, dtype=torch.bool)),
                       ("3-dim", torch.zeros(2, 1, 5, dtype=torch.bool)))
]


@pytest.mark.parametrize("call,expected", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_a_value_error_saying_what_was_expected(call, expected):
    with pytest.raises(ValueError, match=expected):
        call()


def test_focus_reads_scale_values_only_where_it_costs_no_wait():
    """A zero scale is refused on the CPU (a few microseconds), but not read where that waits for
    a device or breaks a graph: on the meta device and fake tensors (no values; the GMAC counts
    of the models run on fake tensors) and under torch.func."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    zero = torch.tensor([1., 0., 1., 1.])
    with pytest.raises(ValueError, match="scale must be positive"):
        fl.focus(torch.ones(2, 4), 3, zero)
    out = fl.focus(torch.ones(2, 4, device="meta"), 3, zero.to("meta"))
    assert out.shape == (2, 4) and out.device.type == "meta", "[meta device] focus"
    with FakeTensorMode():
        out = fl.focus(torch.ones(2, 4), 3, torch.tensor([1., 0., 1., 1.]))
    assert out.shape == (2, 4), "[fake tensors] focus"
    out = torch.func.vmap(lambda t: fl.focus(t, 3, zero))(torch.ones(2, 4))
    assert out.shape == (2, 4), "[torch.func.vmap] focus"


@pytest.mark.parametrize("weights,tokens", [(torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float16, torch.float32)])
def test_layer_takes_another_dtype_under_autocast(weights, tokens):
    """Under torch.autocast (which casts both) x may have another dtype than the weights; the
    output is autocast's dtype and close to the float32 layer's (2e-2 of its largest entry)."""
    m = randomize(fl.FocusedLinearAttention(32, 16, 2, qkv_bias=True))
    x = seeded(2, 16, 32, seed=71)
    with torch.no_grad():
        ref = m(x, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.to(weights)(x.to(tokens), 4, 4)
    case = f"[autocast bfloat16, {weights} weights, {tokens} x, 2x16x32 seed=71]"
    assert out.dtype == torch.bfloat16, f"{case}: output {out.dtype}"
    assert_close(out.float(), ref, case, 0, 2e-2 * ref.abs().max().item())


# -----------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_no_graph_break(fresh_dynamo):
    m = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True))
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # fullgraph: a break is an error
    for H, W in ((8, 8), (6, 10)):
        x = seeded(2, H * W, 32, seed=H)
        with torch.no_grad():
            assert_close(compiled(x, H, W), m(x, H, W),
                         f"[grid {H}x{W} seed={H}] compiled vs eager")


@pytest.mark.slow
def test_compile_inductor(fresh_dynamo):
    m = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True))
    compiled = torch.compile(m, fullgraph=True)
    x = seeded(2, 64, 32)
    with torch.no_grad():
        assert_close(compiled(x, 8, 8), m(x, 8, 8), "[2x64x32 grid 8x8 seed=0] inductor vs eager")


@pytest.mark.slow
def test_compile_recompiles_where_the_readme_says(fresh_dynamo):
    """README, torch.compile: the second size recompiles with dynamic sizes, later sizes reuse
    that graph, but the size the model was built for (position tables used as they are) and
    train mode compile graphs of their own. FLatten-PVTv2-b0 built at 64, sizes small enough
    to stay below torch's convolution thresholds, one FLatten block (stage 1's; the other stages
    their patch embeddings alone: what is counted is the same, the tracing a quarter); graphs
    counted by the backend."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    m = fl.create_model("flatten_pvt_v2_b0", depths=(1, 0, 0, 0), num_classes=3, img_size=64)
    compiled = torch.compile(m.eval(), backend=counting_backend)
    expected = [((72, 72), 1), ((88, 88), 2), ((80, 96), 2), ((64, 64), 3), ((72, 72), 3)]
    for (H, W), count in expected:
        with torch.no_grad():
            compiled(seeded(1, 3, H, W, seed=H))
        assert len(graphs) == count, f"[input 1x3x{H}x{W} seed={H}] {len(graphs)} graphs, " \
            f"expected {count} (sizes so far {[s for s, _ in expected]})"
    m.train()
    with torch.no_grad():
        compiled(seeded(1, 3, 80, 80, seed=80))
    assert len(graphs) == 4, f"[train mode, input 1x3x80x80 seed=80] {len(graphs)} graphs"


@pytest.mark.slow
def test_compile_at_two_sizes_in_training_and_inference(fresh_dynamo):
    """torch.compile with its defaults, called at a second size as multi-scale training does:
    the recompile makes H and W dynamic, where inductor's channels-last depthwise convolution
    fails ("cannot determine truth value of Relational"); under the compiler the tokens reach
    the convolutions as NCHW images (flatten._image). Training then inference at 4x4 and 6x5
    on the convolution every FLatten layer and PVTv2 MLP runs, against eager."""
    torch.manual_seed(0)
    conv = fl.DWConv(8)
    compiled = torch.compile(conv)
    for H, W in ((4, 4), (6, 5)):
        x = seeded(2, H * W, 8, seed=H * W).requires_grad_()
        out = compiled(x, H, W)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        ref = conv(x, H, W)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
        assert_close(out, ref, f"[{H}x{W} seed={H * W}] compiled vs eager, training")
        assert_close(grad, ref_grad, f"[{H}x{W} seed={H * W}] d/dx compiled vs eager")
        with torch.no_grad():
            assert_close(compiled(x, H, W), ref, f"[{H}x{W} seed={H * W}] inference")


@pytest.mark.slow
def test_compile_training_keeps_the_dwc_graph_across_sizes(fresh_dynamo):
    """README, torch.compile in training: inductor's backward of a convolution whose input needs
    a gradient guards on the input's exact size (a graph per token count); under the compiler
    with gradients the DWC is the sum of its shifted copies instead, so one dynamic graph serves
    every size. Inductor itself (the guard is its own) on the DWC of a tiny layer, dynamic=True,
    graphs counted by torch._dynamo's counters; without inductor's caches, whose entries bring
    the guards of other runs. A 1 x 1 kernel: a convolution guards alike at any kernel size,
    and a 3 x 3 compiles three times as long. (The whole layer under the compiler, its DWC's
    shifts at kernels 3 and 5 included, is held to the reference by tests/test_fast_paths.py.)"""
    from torch._dynamo.utils import counters

    m = randomize(fl.FocusedLinearAttention(4, 4, 1, kernel_size=1, grid_size=(2, 2)), std=0.3)
    before = counters["stats"]["unique_graphs"]
    compiled = torch.compile(lambda t, H, W: m._dwc(t, H, W), dynamic=True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for H, W in ((3, 3), (4, 5), (6, 4)):
            x = seeded(1, H * W, 4, seed=H * W).requires_grad_()
            (grad,) = torch.autograd.grad(compiled(x, H, W).square().sum(), x)
            (ref,) = torch.autograd.grad(m._dwc(x, H, W).square().sum(), x)
            assert_close(grad, ref, f"[DWC {H}x{W} seed={H * W}] d/dx compiled vs eager")
            graphs = counters["stats"]["unique_graphs"] - before
            assert graphs == 1, f"[DWC, training, grid {H}x{W}] {graphs} graphs compiled, " \
                "expected 1 (a convolution's backward guards on the token count)"
