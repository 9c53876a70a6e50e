"""Tests of flatten.py: equivalence with the official code, the model API, any resolution,
checkpoints, precision, bad input and torch.compile.

Fixtures of the official code are read from tests/data/ (copies of ../shared/reference/official).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flatten as fl

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
RTOL, ATOL = 1e-4, 1e-5  # the fixtures' tolerance (official/README.md)


def load_fixture(name):
    return torch.load(DATA / name, weights_only=True)


def seeded(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def randomize(module, seed=1, std=0.2):
    """Every parameter <- N(0, std): makes each part (scales, encodings, DWC) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    diff = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol), \
        f"{what}: max |diff| = {diff:.3g} (shape {tuple(actual.shape)})"


# -----------------------------------------------------------------------------
# The attention module against the official fixture


def fla_from_fixture():
    d = load_fixture("fixture_fla_sr1.pt")
    c = d["config"]
    m = fl.FocusedLinearAttention(c["dim"], c["num_patches"], c["num_heads"], qkv_bias=True,
                                  sr_ratio=c["sr_ratio"], focusing_factor=c["focusing_factor"],
                                  kernel_size=c["kernel_size"])
    m.load_state_dict(d["state_dict"], strict=True)
    return m.eval(), d


def test_fla_matches_official_fixture():
    m, d = fla_from_fixture()
    x = d["input"]
    with torch.no_grad():  # the inference path
        assert_close(m(x, d["H"], d["W"]), d["output"], "ours (inference) vs official output")
        assert_close(fl.official_forward(m, x, d["H"], d["W"]), d["output"],
                     "official_forward vs official output")
    out = m(x.clone().requires_grad_(), d["H"], d["W"])  # the autograd path
    assert_close(out.detach(), d["output"], "ours (autograd) vs official output")


def test_fla_matches_official_fixture_in_float64():
    m, d = fla_from_fixture()
    with torch.no_grad():
        out = m.double()(d["input"].double(), d["H"], d["W"])
    assert_close(out, d["output_fp64"], "float64 output", rtol=1e-10, atol=1e-12)


def test_fla_sum_normalizer_matches_code_of_released_checkpoints():
    m, d = fla_from_fixture()
    m.normalizer = "sum"
    with torch.no_grad():
        out = m(d["input"], d["H"], d["W"])
    assert_close(out, d["output_e743f01"], "normalizer='sum' vs commit e743f01")
    # the fixture tells the two forms apart: the other form is over 10x farther away
    to_legacy = (out - d["output_e743f01"]).abs().max()
    assert (out - d["output"]).abs().max() > 10 * to_legacy


def test_fixture_pins_every_part():
    """Zeroing the positional encoding, the scale or the DWC changes the output: the fixture
    test above could fail if any of them were mishandled."""
    for name in ("positional_encoding", "scale", "dwc.weight"):
        m, d = fla_from_fixture()
        with torch.no_grad():
            m.get_parameter(name).zero_()
            out = m(d["input"], d["H"], d["W"])
        assert (out - d["output"]).abs().max() > 1e-2, name


@pytest.mark.parametrize("sr_ratio,H,W", [(2, 8, 8), (4, 8, 12), (2, 7, 9), (3, 6, 6)])
def test_fla_spatial_reduction_matches_official_formulation(sr_ratio, H, W):
    m = randomize(fl.FocusedLinearAttention(32, H * W, 4, qkv_bias=True, sr_ratio=sr_ratio, grid_size=(H, W)))
    x = seeded(2, H * W, 32, seed=3)
    with torch.no_grad():
        ours, ref = m(x, H, W), fl.official_forward(m, x, H, W)
    assert m.positional_encoding.shape[1] == (H // sr_ratio) * (W // sr_ratio)
    assert_close(ours, ref, f"sr_ratio={sr_ratio} grid {H}x{W}")


def test_fla_state_dict_layout_is_official():
    m, d = fla_from_fixture()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in d["state_dict"].items()}
    sr = fl.FocusedLinearAttention(64, 3136, 1, sr_ratio=8)
    assert tuple(sr.positional_encoding.shape) == (1, 49, 64)
    assert {"sr.weight", "sr.bias", "norm.weight", "norm.bias"} <= set(sr.state_dict())


# -----------------------------------------------------------------------------
# Functional core: the linear order equals the explicit matrices


@pytest.mark.parametrize("normalizer", ["mean", "sum"])
def test_linear_order_equals_explicit_matrix(normalizer):
    q = fl.focus(seeded(2, 3, 17, 8, seed=1, dtype=torch.float64))
    k = fl.focus(seeded(2, 3, 11, 8, seed=2, dtype=torch.float64))
    v = seeded(2, 3, 11, 5, seed=3, dtype=torch.float64)
    fast = fl.linear_attention(q, k, v, normalizer=normalizer)
    A = fl.linear_attention_matrix(q, k, normalizer=normalizer)
    assert A.shape == (2, 3, 17, 11)
    assert_close(fast, A @ v, f"{normalizer}: linear order vs N x n matrix", rtol=1e-12, atol=1e-13)


def test_dwc_matrix_equals_convolution():
    w = seeded(6, 1, 5, 5, seed=4, dtype=torch.float64)
    H, W = 7, 9
    v = seeded(6, H, W, seed=5, dtype=torch.float64)
    conv = F.conv2d(v[None], w, padding=2, groups=6)[0].reshape(6, -1)
    M = fl.dwc_matrix(w, H, W)
    assert M.shape == (6, H * W, H * W)
    assert_close(torch.einsum("cij,cj->ci", M, v.reshape(6, -1)), conv, "M_dwc v vs conv", 1e-12, 1e-13)


def test_attention_map_reproduces_the_layer():
    """(A + M_c) v + dwc bias, merged and projected, is the layer's output."""
    m = randomize(fl.FocusedLinearAttention(16, 30, 2, qkv_bias=True, grid_size=(5, 6))).double()
    x = seeded(1, 30, 16, seed=6, dtype=torch.float64)
    maps = fl.attention_map(m, x, 5, 6, with_dwc=True)                      # (B, h, d, N, N)
    v = m.kv(x)[..., 16:].reshape(1, 30, 2, 8).permute(0, 2, 3, 1)          # (B, h, d, N)
    out = torch.einsum("bhcij,bhcj->bhci", maps, v) + m.dwc.bias[None, None, :, None]
    out = m.proj(out.permute(0, 3, 1, 2).reshape(1, 30, 16))
    with torch.no_grad():
        assert_close(out, m(x, 5, 6), "attention_map with DWC", 1e-10, 1e-12)
    A = fl.attention_map(m, x, 5, 6)
    assert A.shape == (1, 2, 30, 30)
    assert (A >= 0).all() and (A.sum(-1) <= 1).all(), "A is a (sub-)stochastic matrix"


# -----------------------------------------------------------------------------
# Softmax baseline and comparators


@pytest.mark.parametrize("sr_ratio,P", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_softmax_fused_equals_explicit(sr_ratio, P):
    H, W = 6, 8
    fused = randomize(fl.SoftmaxAttention(32, 4, qkv_bias=True, sr_ratio=sr_ratio, num_prefix_tokens=P))
    explicit = randomize(fl.SoftmaxAttention(32, 4, qkv_bias=True, sr_ratio=sr_ratio, fused=False,
                                             num_prefix_tokens=P))
    x = seeded(2, P + H * W, 32, seed=7)
    with torch.no_grad():
        assert_close(fused(x, H, W), explicit(x, H, W), f"SDPA vs explicit, sr={sr_ratio}, prefix={P}")


def test_softmax_explicit_is_textbook_attention():
    m = randomize(fl.SoftmaxAttention(16, 2, qkv_bias=True, fused=False)).double()
    x = seeded(1, 12, 16, seed=8, dtype=torch.float64)
    q = m.q(x).reshape(1, 12, 2, 8).transpose(1, 2)
    k, v = m.kv(x).reshape(1, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1) @ v
    ref = m.proj(ref.transpose(1, 2).reshape(1, 12, 16))
    with torch.no_grad():
        assert_close(m(x, 3, 4), ref, "explicit softmax", 1e-12, 1e-13)


def test_vanilla_and_l2vit_attention():
    H, W = 4, 5
    x = seeded(2, H * W, 16, seed=9, dtype=torch.float64)
    van = randomize(fl.VanillaLinearAttention(16, 2, qkv_bias=True)).double()
    q = F.relu(van.q(x)).reshape(2, 20, 2, 8).transpose(1, 2)
    k, v = van.kv(x).reshape(2, 20, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k = F.relu(k)
    A = (q @ k.transpose(-2, -1))
    ref = van.proj(((A @ v) / (A.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2).reshape(2, 20, 16))
    with torch.no_grad():
        assert_close(van(x, H, W), ref, "vanilla linear attention", 1e-10, 1e-12)
    l2 = randomize(fl.L2ViTLinearAttention(16, 2, qkv_bias=True)).double()
    with torch.no_grad():
        out = l2(x, H, W)
        q = F.relu(l2.q(x)).reshape(2, 20, 2, 8).transpose(1, 2)
        k, v = l2.kv(x).reshape(2, 20, 2, 2, 8).permute(2, 0, 3, 1, 4)
        k = F.relu(k)
        A = q @ k.transpose(-2, -1)
        a = (A @ v) * l2.temperature / (A.sum(-1, keepdim=True)).clamp_min(100)
        a = l2.proj(a.transpose(1, 2).reshape(2, 20, 16))
        lcm = l2.lcm(l2.lcm_norm(x + a).transpose(1, 2).reshape(2, 16, H, W)).flatten(2).transpose(1, 2)
    assert_close(out, a + lcm, "L2ViT attention + LCM", 1e-10, 1e-12)


# -----------------------------------------------------------------------------
# Backbones against the official fixtures and manifests


def micro_model(version):
    name = "fixture_flatten_pvt_micro.pt" if version == 1 else "fixture_flatten_pvt_v2_micro.pt"
    d = load_fixture(name)
    c = d["config"]
    m = fl.create_model("flatten_pvt_tiny" if version == 1 else "flatten_pvt_v2_b1",
                        img_size=c["img_size"], embed_dims=c["embed_dims"], depths=c["depths"],
                        num_classes=c["num_classes"])
    fl.load_pretrained(m, d["state_dict"])
    return m.eval(), d


@pytest.mark.parametrize("version", [1, 2])
def test_pvt_matches_official_fixture(version):
    m, d = micro_model(version)
    with torch.no_grad():
        assert_close(m(d["input"]), d["output"], f"v{version} logits")
        assert_close(m.forward_features(d["input"]).mean(1), d["forward_features"], f"v{version} pooled")
        maps = m.forward_intermediates(d["input"])
    for i, (fmap, ref) in enumerate(zip(maps, d["intermediates"].values()), start=1):
        if version == 2:  # the fixture holds the blocks' output; the stage map is after norm{i}
            ref = getattr(m, f"norm{i}")(ref)
        B, C, H, W = fmap.shape
        assert H * W == ref.shape[1] and C == ref.shape[2], f"stage {i}: {fmap.shape} vs {ref.shape}"
        assert_close(fmap.flatten(2).transpose(1, 2), ref, f"v{version} stage {i} map")


def test_pvt_float64_matches_official_float64():
    m, d = micro_model(1)
    with torch.no_grad():
        out = m.double()(d["input"].double())
    assert_close(out, d["output_fp64"], "v1 float64 logits", 1e-9, 1e-11)


MANIFESTS = sorted(p.name for p in DATA.glob("manifest_*.json"))


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_official_state_dict_loads_with_exact_parameter_count(manifest):
    man = json.loads((DATA / manifest).read_text())
    m = fl.create_model(man["model"])
    official = {k: torch.zeros(v["shape"]) for k, v in man["state_dict"].items()}
    fl.load_pretrained(m, {"model": official})
    ours = sum(p.numel() for p in m.parameters())
    dead = sum(official[k].numel() for k in official if k.startswith("norm."))  # v1's unused norm
    assert ours + dead == man["num_parameters"], f"{man['model']}: {ours} + {dead} != {man['num_parameters']}"
    if man["model"].startswith("flatten_pvt_v2"):
        assert set(m.state_dict()) == set(official)
    else:
        assert set(m.state_dict()) == set(official) - {"norm.weight", "norm.bias"}


def test_flops_match_official_counts():
    from torch.utils.flop_counter import FlopCounterMode
    for name in ("flatten_pvt_tiny", "flatten_pvt_v2_b0"):
        man = json.loads((DATA / f"manifest_{name}.json").read_text())
        m = fl.create_model(name).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.zeros(1, 3, 224, 224))
        assert counter.get_total_flops() == man["flops_224"]["flopcountermode_total"], name


def test_no_unused_parameters():
    """Every parameter gets a gradient: DistributedDataParallel needs no find_unused_parameters."""
    for name, kw in (("flatten_pvt_tiny", {}), ("flatten_pvt_v2_b0", {}), ("flatten_deit_tiny", dict(depth=2)),
                     ("pvt_tiny", {}), ("deit_tiny", dict(depth=2))):
        m = fl.create_model(name, img_size=64, num_classes=5, **kw)
        m(seeded(2, 3, 64, 64)).square().sum().backward()
        unused = [n for n, p in m.named_parameters() if p.grad is None]
        assert not unused, f"{name}: unused {unused}"


def test_softmax_counterparts_and_deit():
    counts = {n: sum(p.numel() for p in fl.create_model(n).parameters())
              for n in ("pvt_tiny", "deit_tiny", "flatten_deit_tiny")}
    assert counts["deit_tiny"] == 5_717_416                     # DeiT-T, as timm counts it
    assert round(counts["pvt_tiny"] / 1e6, 1) == 13.2           # PVT-T, paper: 13.2M
    assert counts["flatten_deit_tiny"] == 6_193_576             # paper: 6.1M (see README)
    m = fl.create_model("pvt_tiny")
    assert isinstance(m.block1[0].attn, fl.SoftmaxAttention) and m.block1[0].attn.sr_ratio == 8
    assert [getattr(m, f"block{i}")[0].attn.sr_ratio for i in range(1, 5)] == [8, 4, 2, 1]


def test_deit_class_token_has_no_dwc_term():
    layer = randomize(fl.FocusedLinearAttention(24, 16, 3, qkv_bias=True, num_prefix_tokens=1))
    x = seeded(2, 17, 24, seed=10)
    with torch.no_grad():
        before = layer(x, 4, 4)
        layer.dwc.weight.add_(1.0)
        after = layer(x, 4, 4)
    assert torch.equal(before[:, 0], after[:, 0]), "class token output changed with the DWC"
    assert (before[:, 1:] - after[:, 1:]).abs().max() > 1e-3, "patch tokens ignore the DWC"


# -----------------------------------------------------------------------------
# Any resolution

SIZES = [(224, 224), (256, 256), (512, 512), (1024, 1024), (224, 320), (512, 1024)]
FAMILIES = ["flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_deit_tiny", "pvt_tiny", "pvt_v2_b0", "deit_tiny"]


@pytest.fixture(scope="module")
def models_224():
    return {n: randomize(fl.create_model(n, num_classes=7), std=0.02) for n in FAMILIES}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_models_run_at_any_size(models_224, name, size):
    if size == (1024, 1024) and name in ("pvt_tiny", "pvt_v2_b0"):
        pytest.skip("softmax at 1024^2 is covered by the FLatten models; saves CI time")
    with torch.no_grad():
        out = models_224[name](seeded(1, 3, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all(), f"{name} at {size}"


def test_fla_runs_at_other_grids_and_is_untouched_at_its_own():
    m = randomize(fl.FocusedLinearAttention(16, 64, 2, qkv_bias=True))

    class NoResample(fl.FocusedLinearAttention):
        def _positional_encoding(self, kh, kw):
            return self.positional_encoding

    raw = NoResample(16, 64, 2, qkv_bias=True)
    raw.load_state_dict(m.state_dict())
    x = seeded(2, 64, 16, seed=11)
    with torch.no_grad():
        assert torch.equal(m(x, 8, 8), raw.eval()(x, 8, 8))
        for H, W in ((5, 7), (16, 16), (3, 20), (1, 1)):
            out = m(seeded(2, H * W, 16, seed=H), H, W)
            assert out.shape == (2, H * W, 16) and torch.isfinite(out).all(), (H, W)


def test_resample_grid():
    t = seeded(1, 2 + 6 * 8, 4, seed=12)
    assert fl.resample_grid(t, (6, 8), (6, 8), 2) is t
    out = fl.resample_grid(t, (6, 8), (9, 5), 2)
    assert out.shape == (1, 2 + 45, 4) and torch.equal(out[:, :2], t[:, :2])
    ref = F.interpolate(t[:, 2:].reshape(1, 6, 8, 4).permute(0, 3, 1, 2), size=(9, 5), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).reshape(1, 45, 4)
    assert_close(out[:, 2:], ref, "bicubic grid resampling")
    half = fl.resample_grid(t.half(), (6, 8), (9, 5), 2)
    assert half.dtype == torch.float16
    const = torch.full((1, 12, 3), 0.5)
    assert_close(fl.resample_grid(const, (3, 4), (7, 7)), torch.full((1, 49, 3), 0.5), "constant table")


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_deit_tiny"])
def test_set_input_size_equals_on_the_fly_resampling(name):
    m = randomize(fl.create_model(name, num_classes=3), std=0.02)
    x = seeded(1, 3, 96, 128, seed=13)
    with torch.no_grad():
        dynamic = m(x)
        m.set_input_size((96, 128))
        fixed = m(x)
    assert torch.equal(dynamic, fixed)
    assert m.cfg.img_size == (96, 128)


def test_official_weights_at_224_run_at_1024():
    m224 = randomize(fl.create_model("flatten_pvt_tiny"), std=0.02)
    m1024 = fl.create_model("flatten_pvt_tiny", img_size=1024)
    fl.load_pretrained(m1024, {"model": m224.state_dict()})
    x = seeded(1, 3, 1024, 1024, seed=14)
    with torch.no_grad():
        assert torch.equal(m1024.eval()(x), m224(x))


# -----------------------------------------------------------------------------
# Checkpoints


def official_like_state_dict(model):
    """Our state dict with the official v1 extras: the never-applied final norm."""
    sd = dict(model.state_dict())
    if isinstance(model, fl.PyramidVisionTransformer) and model.cfg.version == 1:
        sd["norm.weight"] = torch.ones(model.num_features)
        sd["norm.bias"] = torch.zeros(model.num_features)
    return sd


@pytest.fixture
def yacs_like_checkpoint(tmp_path):
    """A file like the released ones: weights under 'model' next to optimizer state and a
    pickled config object of a package the loading machine does not have."""
    mod = types.ModuleType("fakeyacs_config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "fakeyacs_config", "CfgNode"
    mod.CfgNode = CfgNode
    sys.modules["fakeyacs_config"] = mod
    model = randomize(fl.create_model("flatten_pvt_tiny", img_size=64, num_classes=4))
    cfg = CfgNode(MODEL=CfgNode(TYPE="flatten_pvt_tiny"))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": official_like_state_dict(model), "config": cfg, "epoch": 299,
                "args": argparse.Namespace(lr=1e-3), "optimizer": {"state": {}, "param_groups": []}}, path)
    del sys.modules["fakeyacs_config"]
    return model, path


def test_load_official_like_file_without_running_pickled_code(yacs_like_checkpoint):
    model, path = yacs_like_checkpoint
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what users hit with the released files
    m = fl.create_model("flatten_pvt_tiny", img_size=64, num_classes=4)
    fl.load_pretrained(m, path)
    x = seeded(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), model(x))
    assert "fakeyacs_config" not in sys.modules


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="refused to load"):
        fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0"), path)
    assert not marker.exists()


def test_containers_and_prefixes():
    src = randomize(fl.create_model("flatten_pvt_v2_b0", num_classes=5))
    sd = src.state_dict()
    for ckpt in ({"model": sd}, {"state_dict": sd}, sd, {"model": {f"module.{k}": v for k, v in sd.items()}}):
        m = fl.create_model("flatten_pvt_v2_b0", num_classes=5)
        fl.load_pretrained(m, ckpt)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def test_mismatch_lists_missing_and_unexpected_keys():
    sd = dict(fl.create_model("flatten_pvt_v2_b0").state_dict())
    sd.pop("block1.0.attn.q.weight")
    sd["block9.0.foo"] = torch.zeros(1)
    sd["patch_embed1.proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0"), sd)
    msg = str(err.value)
    assert "missing keys (1): block1.0.attn.q.weight" in msg
    assert "unexpected keys (1): block9.0.foo" in msg
    assert "patch_embed1.proj.bias: checkpoint (7,) vs model (32,)" in msg


def test_head_dropped_for_other_num_classes():
    src = randomize(fl.create_model("flatten_pvt_v2_b0"))
    for nc in (0, 10):
        m = fl.create_model("flatten_pvt_v2_b0", num_classes=nc)
        own_head = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("head.")}
        fl.load_pretrained(m, src.state_dict())
        loaded = m.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in own_head.items()), f"num_classes={nc}: head replaced"
        assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items() if not k.startswith("head.")), nc


# -----------------------------------------------------------------------------
# Model API


def test_model_api():
    names = fl.list_models()
    assert {"flatten_pvt_tiny", "flatten_pvt_v2_b5", "flatten_deit_base", "pvt_large", "pvt_v2_b0",
            "deit_small"} <= set(names)
    assert fl.list_models("deit") == [n for n in names if "deit" in n]
    m = fl.create_model("flatten_pvt_v2_b0", num_classes=0, depths=[1, 1, 1, 1], focusing_factor=2, kernel_size=3,
                             drop_path_rate=0.1)
    assert m.block1[0].attn.focusing_factor == 2 and m.block1[0].attn.kernel_size == 3
    x = seeded(2, 3, 64, 96)
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 256)
        feats = m.forward_features(x)
        assert feats.shape == (2, 2 * 3, 256)
        assert torch.equal(m.forward_head(feats, pre_logits=True), m(x))
        maps = m.forward_intermediates(x)
    assert [tuple(t.shape) for t in maps] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
    m.reset_classifier(11)
    assert m(x).shape == (2, 11)
    d = fl.create_model("flatten_deit_tiny", depth=2, num_classes=0)
    assert d.eval()(seeded(1, 3, 48, 64)).shape == (1, 192)
    d.reset_classifier(4)
    assert d(seeded(1, 3, 48, 64)).shape == (1, 4)


def test_nothing_printed():
    """A fresh interpreter: importing, building a model and a layer print nothing."""
    import subprocess
    code = ("import flatten; flatten.create_model('flatten_pvt_tiny'); "
            "flatten.FocusedLinearAttention(64, 3136, 1)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)


# -----------------------------------------------------------------------------
# Precision


def stage1_layer():
    """A FLatten-PVT stage-1 layer (C = 64, 1 head) with trained-like weights."""
    torch.manual_seed(0)
    return fl.FocusedLinearAttention(64, 3136, 1, qkv_bias=True).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["cast", "autocast"])
def test_half_precision_finite_at_1024(dtype, how):
    layer = stage1_layer()
    H = W = 256  # stage 1 of a 1024 x 1024 image
    big = seeded(1, H * W, 64, seed=15, scale=1e4)
    dead = -seeded(1, H * W, 64, seed=16).abs()          # ReLU zeroes whole tokens of q and k
    with torch.no_grad():
        layer.q.bias.fill_(-50.)
        for x in (big, dead, torch.cat([big[:, : H * W // 2], dead[:, H * W // 2:]], 1)):
            if how == "cast":
                out = layer.to(dtype)(x.to(dtype), H, W)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    out = layer.float()(x, H, W)
            assert torch.isfinite(out).all(), f"{dtype} {how}: non-finite output"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_not_worse_than_plain(dtype):
    layer = randomize(fl.FocusedLinearAttention(64, 1024, 2, qkv_bias=True), std=0.1)
    x = seeded(2, 1024, 64, seed=17)
    with torch.no_grad():
        ref = layer.double()(x.double(), 32, 32)
        low = layer.to(dtype)
        ours = (low(x.to(dtype), 32, 32).double() - ref).abs().max()
        plain = (fl.official_forward(low, x.to(dtype), 32, 32).double() - ref).abs().max()
    assert ours <= 2 * plain, f"{dtype}: ours {ours:.3g} vs plain {plain:.3g}"


# -----------------------------------------------------------------------------
# Bad input


def test_bad_input_errors():
    m = fl.FocusedLinearAttention(32, 64, 2)
    cases = [
        (lambda: m(torch.zeros(2, 64), 8, 8), "must be a (B, N, C) tensor"),
        (lambda: m(torch.zeros(2, 63, 32), 8, 8), "63 tokens but H*W"),
        (lambda: m(torch.zeros(2, 64, 16), 8, 8), "16 channels"),
        (lambda: fl.FocusedLinearAttention(30, 64, 4), "divisible by num_heads"),
        (lambda: fl.FocusedLinearAttention(32, 64, 2, kernel_size=4), "odd"),
        (lambda: fl.FocusedLinearAttention(32, 64, 2, focusing_factor=0), "focusing_factor"),
        (lambda: fl.FocusedLinearAttention(32, 60, 2), "not a positive square"),
        (lambda: fl.SoftmaxAttention(30, 4), "divisible by num_heads"),
        (lambda: fl.create_model("flatten_pvt_tiny")(torch.zeros(1, 3, 16, 16)), "at least 32x32"),
        (lambda: fl.create_model("flatten_deit_tiny")(torch.zeros(1, 3, 8, 64)), "at least 16x16"),
        (lambda: fl.create_model("flatten_pvt_v2_b0")(torch.zeros(1, 1, 64, 64)), "3 input channels"),
        (lambda: fl.create_model("flatten_pvt_v2_b0")(torch.zeros(3, 64, 64)), "expects images"),
        (lambda: fl.create_model("flatten_pvt_huge"), "unknown model"),
        (lambda: fl.create_model("flatten_pvt_tiny", embed_dim=3), "no config field embed_dim"),
        (lambda: fl.focus(torch.zeros(3), -1.0), "focusing_factor"),
    ]
    for fn, expected in cases:
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            fn()


# -----------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_no_graph_break():
    m = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True))
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # fullgraph: a break is an error
    for H, W in ((8, 8), (6, 10)):
        x = seeded(2, H * W, 32, seed=H)
        with torch.no_grad():
            assert_close(compiled(x, H, W), m(x, H, W), f"compiled at {H}x{W}")


def test_compile_fullgraph_with_gradients():
    """The backward passes too: no strided out= under the compiler (it rejects them)."""
    m = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True, num_prefix_tokens=1))
    x = seeded(2, 65, 32, seed=53)
    grads = []
    for fn in (torch.compile(m, fullgraph=True, backend="eager"), m):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi, 8, 8).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, "gradients, compiled and eager", 1e-5, 1e-6 * b.abs().max().item())


@pytest.mark.slow
def test_compile_inductor():
    m = randomize(fl.FocusedLinearAttention(32, 64, 2, qkv_bias=True))
    compiled = torch.compile(m, fullgraph=True)
    x = seeded(2, 64, 32)
    with torch.no_grad():
        assert_close(compiled(x, 8, 8), m(x, 8, 8), "inductor")
