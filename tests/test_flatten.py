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
    m = fl.flatten_pvt_v2_b0(num_classes=0, depths=[1, 1, 1, 1], focusing_factor=2, kernel_size=3,
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
        (lambda: m(torch.zeros(2, 64), 8, 8), "must be (B, N, C)"),
        (lambda: m(torch.zeros(2, 63, 32), 8, 8), "63 tokens but H*W"),
        (lambda: m(torch.zeros(2, 64, 16), 8, 8), "16 channels"),
        (lambda: fl.FocusedLinearAttention(30, 64, 4), "divisible by num_heads"),
        (lambda: fl.FocusedLinearAttention(32, 64, 2, kernel_size=4), "odd"),
        (lambda: fl.FocusedLinearAttention(32, 64, 2, focusing_factor=0), "focusing_factor"),
        (lambda: fl.FocusedLinearAttention(32, 60, 2), "not a square"),
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


# -----------------------------------------------------------------------------
# The fast path: hand-written backward passes, in-place inference, layouts


@pytest.mark.parametrize("p", [3.0, 1.0, 2.0, 0.5, 4.5])
@pytest.mark.parametrize("offset", [1e-6, 0.0])
def test_focus_gradcheck(p, offset):
    x = seeded(3, 4, 6, seed=20, dtype=torch.float64).requires_grad_()
    s = (torch.rand(6, generator=torch.Generator().manual_seed(21), dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: fl.focus(x, p, s, offset), (x, s)), f"p={p} offset={offset}"


def test_focus_equals_the_formula():
    x = seeded(5, 7, 16, seed=22, dtype=torch.float64)
    s = torch.rand(16, generator=torch.Generator().manual_seed(23), dtype=torch.float64) + 0.3
    y = (F.relu(x) + 1e-6) / s
    ref = y ** 3 / (y ** 3).norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)
    assert_close(fl.focus(x, 3, s), ref, "focus vs its formula", 1e-13, 1e-15)


@pytest.mark.parametrize("normalizer", ["mean", "sum"])
def test_linear_attention_gradcheck(normalizer):
    g = torch.Generator().manual_seed(24)
    q = (torch.rand(2, 3, 7, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    k = (torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    v = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: fl.linear_attention(q, k, v, normalizer=normalizer), (q, k, v))


# _head_matmul's thresholds for the shapes below (3 heads of d = 8, 64 tokens: 4,096 multiply-adds
# per head and product): one matmul (the default), a bmm per sample, a mm per (sample, head)
HEAD_LOOPS = [fl._HEAD_MATMUL_LOOP, 8192, 1]


@pytest.mark.parametrize("loop", HEAD_LOOPS)
def test_head_matmul_equals_matmul(monkeypatch, loop):
    monkeypatch.setattr(fl, "_HEAD_MATMUL_LOOP", loop)
    a, b = seeded(2, 64, 24, seed=26), seeded(2, 64, 24, seed=27)
    q, k = (t.view(2, 64, 3, 8).transpose(1, 2) for t in (a, b))   # (B, h, N, d) views, as the layer's
    kv = fl._head_matmul(k.transpose(-2, -1), q)
    assert_close(kv, k.transpose(-2, -1) @ q, "k^T q")
    out = torch.full_like(a, float("nan"))
    written = fl._head_matmul(q, kv, out=out.view(2, 64, 3, 8).transpose(1, 2))
    assert_close(out.view(2, 64, 3, 8).transpose(1, 2), q @ kv, "q kv into out")
    assert written.data_ptr() == out.data_ptr()
    assert_close(fl._head_matmul(q[:1], kv), q[:1] @ kv, "broadcast over the batch")


@pytest.mark.parametrize("P,sr,loop", [(0, 1, None), (1, 1, None), (0, 2, None)] + [(1, 1, n) for n in HEAD_LOOPS[1:]])
def test_module_gradients_equal_official_autograd(monkeypatch, P, sr, loop):
    """Our hand-written backward against autograd through the official formulation."""
    if loop is not None:
        monkeypatch.setattr(fl, "_HEAD_MATMUL_LOOP", loop)
    m = randomize(fl.FocusedLinearAttention(24, 64, 3, qkv_bias=True, sr_ratio=sr, num_prefix_tokens=P), std=0.3).double()
    x = seeded(2, P + 64, 24, seed=25, dtype=torch.float64).requires_grad_()
    grads = []
    for fn in (m, lambda x, H, W: fl.official_forward(m, x, H, W)):
        m.zero_grad()
        x.grad = None
        fn(x, 8, 8).square().sum().backward()
        grads.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}})
    for name in grads[1]:
        assert_close(grads[0][name], grads[1][name], f"grad of {name} (P={P}, sr={sr})", 1e-9, 1e-11)
    with torch.no_grad():  # and the inference path
        assert_close(m(x, 8, 8), fl.official_forward(m, x, 8, 8), f"no_grad forward (P={P}, sr={sr})", 1e-12, 1e-13)


def test_backward_under_autocast():
    """loss.backward() inside torch.autocast: our backward passes compute in float32 as chosen,
    not in the autocast dtype (dL/ds through a bfloat16 product would lose three digits)."""
    x = seeded(4, 9, 16, seed=40).requires_grad_()
    s = (torch.rand(16, generator=torch.Generator().manual_seed(41)) + 0.5).requires_grad_()
    g = seeded(4, 9, 16, seed=42)
    x64, s64 = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    fl.focus(x64, 3, s64).backward(g.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fl.focus(x, 3, s).backward(g)
    assert_close(s.grad, s64.grad, "dL/ds under autocast", 1e-5, 1e-6)
    assert_close(x.grad, x64.grad, "dL/dx under autocast", 1e-5, 1e-6)
    m = randomize(fl.FocusedLinearAttention(32, 16, 4, qkv_bias=True, num_prefix_tokens=1))
    xm = seeded(2, 17, 32, seed=43)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(xm, 4, 4).float().square().sum()
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_functional_core_runs_on_the_meta_device():
    """Shapes without data (the meta device has no autocast: the backward passes check for it)."""
    x = torch.randn(2, 5, 8, device="meta", requires_grad=True)
    s = torch.rand(8, device="meta", requires_grad=True)
    fl.focus(x, 3, s).sum().backward()
    assert x.grad.shape == x.shape and s.grad.shape == s.shape
    q = torch.rand(1, 2, 5, 4, device="meta", requires_grad=True)
    out = fl.linear_attention(q, q, q)
    out.sum().backward()
    assert out.shape == (1, 2, 5, 4) and q.grad.shape == q.shape
    assert fl.linear_attention_matrix(q, q).shape == (1, 2, 5, 5)


def test_double_backward_is_refused_with_a_clear_error():
    x = seeded(2, 5, 8, seed=44).requires_grad_()
    (gx,) = torch.autograd.grad(fl.focus(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gx.square().sum().backward()   # a gradient penalty
    q, k, v = (torch.rand(1, 2, 5, 4, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(3))
    (gq,) = torch.autograd.grad(fl.linear_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gq.square().sum().backward()
    x = seeded(1, 2, 4, 4, seed=51).requires_grad_()
    (gx,) = torch.autograd.grad(fl._depthwise_conv(x, seeded(2, 1, 3, 3, seed=52), None).square().sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gx.square().sum().backward()


@pytest.mark.parametrize("B,C,H,W,k,bias", [(2, 3, 4, 6, 5, True), (1, 4, 5, 5, 3, False),
                                             (3, 2, 1, 2, 5, True), (1, 2, 3, 3, 1, True)])
def test_depthwise_conv_gradcheck(B, C, H, W, k, bias):
    """The depthwise convolution's hand-written backward (the DWC term's), grids smaller than the
    kernel included; and it is the one autograd runs on CPU."""
    g = torch.Generator().manual_seed(46)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    out = fl._depthwise_conv(x, w, b)
    assert type(out.grad_fn).__name__ == "_DepthwiseConvBackward"
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda x, w, *b: fl._depthwise_conv(x, w, *(b or (None,))), inputs)


def test_depthwise_conv_equals_conv2d_autograd():
    """float32, channels-last input (as the module passes it): the gradients of F.conv2d's own
    backward, to float32 rounding of sums over 4,096 pixels."""
    v = seeded(2, 64 * 64, 48, seed=47).view(2, 64, 64, 48).permute(0, 3, 1, 2).requires_grad_()
    w = seeded(48, 1, 5, 5, seed=48).requires_grad_()
    b = seeded(48, seed=49).requires_grad_()
    g = seeded(2, 48, 64, 64, seed=50)
    ours = torch.autograd.grad(fl._depthwise_conv(v, w, b), (v, w, b), g)
    ref = torch.autograd.grad(F.conv2d(v, w, b, padding=2, groups=48), (v, w, b), g)
    for name, a, r in zip(("x", "weight", "bias"), ours, ref):
        assert_close(a, r, f"grad of {name}", 1e-5, 1e-5 * r.abs().max().item())


@pytest.mark.parametrize("shapes", [((3, 2), (1, 2), (1, 2)),     # keys and values shared by the batch
                                    ((1, 2), (3, 2), (3, 2)),     # queries shared
                                    ((3, 1), (3, 2), (1, 2))])    # queries shared by the heads, values by the batch
def test_linear_attention_with_operands_broadcast(shapes):
    """Leading (B, h) dims broadcast as in matmul: right outputs and gradients, no resize warning.
    (A broadcast q once gave an output of q's (B, h) with the other samples' rows: garbage.)"""
    g = torch.Generator().manual_seed(45)
    (bq, hq), (bk, hk), (bv, hv) = shapes
    q = (torch.rand(bq, hq, 6, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    k = (torch.rand(bk, hk, 5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    v = torch.randn(bv, hv, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fl.linear_attention(q, k, v)
        ours = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = fl.linear_attention_matrix(q, k) @ v
    assert_close(out, expected, "output", 1e-12, 1e-13)
    ref = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for name, a, b in zip("qkv", ours, ref):
        assert a.shape == b.shape
        assert_close(a, b, f"grad of {name}", 1e-12, 1e-13)


@pytest.mark.parametrize("shapes", [((2, 3, 6, 4), (2, 3, 5, 4), (2, 3, 4, 4)),   # n of k and v differ
                                    ((2, 3, 6, 4), (2, 3, 5, 8), (2, 3, 5, 4)),   # d of q and k differ
                                    ((2, 3, 6, 4), (2, 2, 5, 4), (2, 2, 5, 4)),   # heads 3 and 2
                                    ((3, 6, 4), (3, 5, 4), (3, 5, 4))])           # no head dimension
def test_linear_attention_rejects_mismatched_shapes(shapes):
    q, k, v = (torch.rand(*s) for s in shapes)
    with pytest.raises(ValueError, match=r"expected q \(B, h, N, d\)|must be equal or broadcast"):
        fl.linear_attention(q, k, v)


def test_module_gradcheck():
    m = randomize(fl.FocusedLinearAttention(12, 9, 2, qkv_bias=True, kernel_size=3, num_prefix_tokens=1), std=0.3).double()
    x = seeded(1, 10, 12, seed=26, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x, 3, 3), (x,))


INFERENCE_CASES = [  # dim, heads, class tokens, qkv_bias, p, normalizer, construction grid, H, W
    (32, 4, 1, True, 3.0, "mean", (8, 8), 8, 8),
    (32, 1, 0, False, 3.0, "mean", (8, 8), 8, 8),
    (24, 3, 2, True, 1.0, "sum", (4, 6), 4, 6),
    (16, 2, 0, True, 0.5, "mean", (6, 6), 5, 9),    # another grid: resampled positional encoding
    (48, 6, 1, True, 4.5, "sum", (7, 7), 7, 7),
]


@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_inference_path_equals_autograd_path(case):
    """Without autograd the layer folds 1/s into the q and k weights and focuses q and k in one
    pass (FocusedLinearAttention._forward_inference): the same function as the autograd path."""
    C, h, P, bias, p, normalizer, grid, H, W = case
    m = randomize(fl.FocusedLinearAttention(C, grid[0] * grid[1], h, qkv_bias=bias, focusing_factor=p,
                                            grid_size=grid, num_prefix_tokens=P, normalizer=normalizer))
    outputs = {}
    for dtype in (torch.float64, torch.float32):
        m = m.to(dtype)
        x = seeded(2, P + H * W, C, seed=27).to(dtype)
        with torch.no_grad():
            fast = m(x, H, W)
        slow = m(x.clone().requires_grad_(), H, W)
        assert slow.requires_grad and not fast.requires_grad
        outputs[dtype] = fast, slow.detach()
    fast, slow = outputs[torch.float64]
    assert_close(fast, slow, "inference vs autograd path, float64", 1e-12, 1e-13)
    # float32: both paths as close to the float64 result as each other
    errors = [(out.double() - fast).abs().max().item() for out in outputs[torch.float32]]
    assert errors[0] < 1e-5 and errors[0] < 3 * errors[1] + 1e-7, errors


def test_inference_path_is_taken_when_nothing_needs_a_gradient(monkeypatch):
    calls = []
    inference = fl.FocusedLinearAttention._forward_inference
    monkeypatch.setattr(fl.FocusedLinearAttention, "_forward_inference",
                        lambda self, *a: calls.append(1) or inference(self, *a))
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    x = seeded(1, 16, 16, seed=28)
    expect = [(torch.no_grad, True, x, 1),
              (torch.enable_grad, True, x, 0),                       # parameters need grads
              (torch.enable_grad, False, x, 1),                      # a frozen layer
              (torch.enable_grad, False, x.clone().requires_grad_(), 0)]
    for context, trainable, inp, taken in expect:
        calls.clear()
        with context():
            m.requires_grad_(trainable)(inp, 4, 4)
        assert len(calls) == taken, (context, trainable, inp.requires_grad)
    calls.clear()
    with torch.inference_mode():
        m(x, 4, 4)
    assert len(calls) == 1
    calls.clear()
    with torch.no_grad():  # not for sr_ratio > 1, nor under autocast, nor in half precision
        fl.FocusedLinearAttention(16, 16, 2, sr_ratio=2)(x, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x, 4, 4)
        m.to(torch.bfloat16)(x.bfloat16(), 4, 4)
    assert not calls


def test_inference_path_with_a_large_focusing_factor():
    """t = y / max(y) keeps a 1 in every token: nothing underflows at p = 40, where a token that
    ReLU flattens to the floor (q bias -100: every entry of q is 1e-6 / s) would give
    (1 / sqrt(C))^40 = 0 in float32 with t = y / ||y||."""
    m = randomize(fl.FocusedLinearAttention(256, 16, 4, qkv_bias=True, focusing_factor=40))
    with torch.no_grad():
        m.q.bias.fill_(-100.)
    x = seeded(1, 16, 256, seed=46)
    with torch.no_grad():
        fast = m(x, 4, 4)
    slow = m(x.clone().requires_grad_(), 4, 4).detach()
    assert torch.isfinite(fast).all()
    assert_close(fast, slow, "p = 40, inference vs autograd path", 1e-4, 1e-4)  # outputs up to ~20


@pytest.mark.parametrize("margin", [fl._NORM_SCALED_MARGIN, 10_000])  # t = y / ||y||, t = y / max(y)
def test_inference_path_where_the_eps_matters(monkeypatch, margin):
    """The inference path multiplies only the keys by their factor c = ||y|| / ||t^p|| and moves
    the queries' c into the eps (eps / c). Exact algebra, which this checks where the eps is a
    large share of the normaliser: queries that ReLU flattens to the floor 1e-6 / s."""
    monkeypatch.setattr(fl, "_NORM_SCALED_MARGIN", margin)
    m = randomize(fl.FocusedLinearAttention(32, 16, 4, qkv_bias=True, num_prefix_tokens=1)).double()
    with torch.no_grad():
        m.q.bias[:].fill_(-100.)
    x = seeded(2, 17, 32, seed=48, dtype=torch.float64)
    with torch.no_grad():
        fast = m(x, 4, 4)
        other_eps = fl.official_forward(m, x, 4, 4, normalizer="sum")
    slow = m(x.clone().requires_grad_(), 4, 4).detach()
    assert_close(fast, slow, "inference vs autograd path", 1e-12, 1e-13)
    # the test can fail: the eps moves the output (mean: n eps = 16e-6 against 1e-6 for sum)
    assert (other_eps - slow).abs().max() > 1e-2 * slow.abs().max()


@pytest.mark.parametrize("p", [16., 24., 25., 32.])  # at C = 64: 2^e y / ||y|| up to p = 24, max(y) beyond
def test_inference_path_at_the_scaling_threshold(p):
    """Tokens that ReLU flattens to the floor (q and k biases -100: y = 1e-6 / s everywhere) have
    t = 2^e C^(-1/2) in every channel, the smallest largest entry there is: at the threshold
    (p = 24, e = 1) the sum of squares behind ||t^p|| is 2^(2pe) C^(-p) = 2^-96 in float32, still
    normal. (A threshold set by C^(-p/2) let it underflow to 0 here, NaN outputs, at p = 32.)"""
    assert (fl._norm_scale_exponent(p, 64, torch.float32) is None) == (p > 24)
    m = randomize(fl.FocusedLinearAttention(64, 16, 1, qkv_bias=True, focusing_factor=p))
    with torch.no_grad():
        m.q.bias.fill_(-100.)
        m.kv.bias[:64].fill_(-100.)
    x = seeded(2, 16, 64, seed=49)
    with torch.no_grad():
        fast = m(x, 4, 4)
    slow = m(x.clone().requires_grad_(), 4, 4).detach()
    assert torch.isfinite(fast).all()
    assert_close(fast, slow, f"p = {p}, inference vs autograd path", 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_scale_exponent_keeps_the_sum_of_squares_in_range(dtype):
    """The e of t = 2^e y / ||y||: the sum of squares of t^p over C channels lies in
    [2^(2pe) C^(-p), 2^(2pe) C] (t <= 2^e, largest entry >= 2^e C^(-1/2)); both ends must stay
    _NORM_SCALED_MARGIN binary orders inside the normal range, e as large as that allows (so the
    small entries of t^p, of tokens near the ReLU floor, are not subnormal: slow on x86)."""
    fi, margin = torch.finfo(dtype), fl._NORM_SCALED_MARGIN
    top, bottom = math.log2(fi.max) - margin, math.log2(fi.tiny) + margin
    for C in (8, 32, 64, 192, 768):
        for p in (0.05, 0.5, 1., 2.5, 3., 8., 16., 24., 40., 200.):
            e, lc = fl._norm_scale_exponent(p, C, dtype), math.log2(C)
            fits = lambda e: 2 * p * e + lc <= top and 2 * p * e - p * lc >= bottom  # noqa: E731
            if e is None:
                assert not any(fits(e) for e in range(-200, fl._NORM_SCALE_MAX_EXPONENT + 1)), (C, p)
            else:
                assert fits(e) and e <= fl._NORM_SCALE_MAX_EXPONENT, (C, p, e)
                assert e == fl._NORM_SCALE_MAX_EXPONENT or not fits(e + 1), (C, p, e)
    assert fl._norm_scale_exponent(3., 192, torch.float32) == 15  # DeiT-T's C at the default p


def test_inference_path_leaves_no_subnormal_numbers_at_the_default_p(monkeypatch):
    """Keys and queries near the ReLU floor (1e-6 / s) next to entries of order 1: with t scaled
    by 1 / ||y|| alone, t^3 squared is ~1e-40 there, subnormal. Checked on t^p as the path
    computes it, captured from its second vector_norm."""
    seen = []
    norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda t, *a, **k: seen.append(t.clone()) or norm(t, *a, **k))
    m = randomize(fl.FocusedLinearAttention(192, 64, 3, qkv_bias=True, num_prefix_tokens=1))
    x = seeded(1, 65, 192, seed=50)
    with torch.no_grad():
        m(x, 8, 8)
    tp = seen[1]
    floor = tp.min()
    assert floor > 0 and (tp.square() >= torch.finfo(torch.float32).tiny).all(), floor
    assert (tp == 0).sum() == 0


def test_inference_path_with_large_values():
    """Values of 1e30: the inference path's queries are t^p of up to 2^(pe), so its keys take
    2^(-pe); without that q KV overflowed float32 from values of about 1e25, where the official
    formulation is still finite."""
    m = randomize(fl.FocusedLinearAttention(192, 16, 3, qkv_bias=True, num_prefix_tokens=1))
    with torch.no_grad():
        m.kv.weight[192:].mul_(1e30)
        m.kv.bias[192:].mul_(1e30)
        m.dwc.weight.mul_(1e-30)  # keep the DWC's share, and the output, of the same order
    x = seeded(1, 17, 192, seed=51)
    with torch.no_grad():
        fast = m(x, 4, 4)
        official = fl.official_forward(m, x, 4, 4)
    assert torch.isfinite(official).all()
    assert_close(fast, official, "values of 1e30", 1e-4, 1e-5 * official.abs().max().item())


def test_inference_path_with_a_tiny_focusing_factor():
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True, focusing_factor=1e-300))
    assert fl._norm_scale_exponent(1e-300, 16, torch.float32) == fl._NORM_SCALE_MAX_EXPONENT
    x = seeded(1, 16, 16, seed=52)
    with torch.no_grad():
        fast = m(x, 4, 4)
    assert_close(fast, m(x.clone().requires_grad_(), 4, 4).detach(), "p = 1e-300")


def test_inference_path_with_only_one_of_the_biases():
    for drop in ("q", "kv"):
        m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
        getattr(m, drop).bias = None
        x = seeded(1, 16, 16, seed=47)
        with torch.no_grad():
            assert_close(m(x, 4, 4), fl.official_forward(m, x, 4, 4), f"without the {drop} bias")


def test_empty_batch():
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True, num_prefix_tokens=1))
    x = torch.zeros(0, 17, 16)
    with torch.no_grad():
        assert m(x, 4, 4).shape == (0, 17, 16)
    out = m(x.requires_grad_(), 4, 4)
    out.sum().backward()
    assert out.shape == (0, 17, 16) and x.grad.shape == x.shape


def test_inference_path_sees_parameters_changed_in_place():
    """Nothing is cached between calls: a change through .data (which no version counter sees)
    shows in the next output."""
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    x = seeded(1, 16, 16, seed=29)
    with torch.no_grad():
        before = m(x, 4, 4)
        for p in m.parameters():
            p.data.mul_(1.5)
        after = m(x, 4, 4)
        expected = fl.official_forward(m, x, 4, 4)
    assert (after - before).abs().max() > 1e-2
    assert_close(after, expected, "after an in-place change")


# -----------------------------------------------------------------------------
# The Triton kernels of the CUDA inference path
#
# On a GPU they run as compiled; without one, in Triton's interpreter on CPU tensors
# (conftest.py sets TRITON_INTERPRET=1), with the layer told that the tensors are on CUDA.

TRITON_CASES = [  # C, h, P, sr_ratio, p, normalizer, construction grid, H, W, kernel_size, B
    (64, 1, 0, 1, 3.0, "mean", (8, 8), 8, 8, 5, 1),     # FLatten-PVT stage 1
    (192, 3, 1, 1, 3.0, "sum", (4, 4), 5, 7, 5, 2),     # DeiT-T with its class token, another grid
    (48, 2, 0, 1, 2.5, "mean", (6, 6), 6, 6, 3, 1),     # p not an integer, head_dim 24 (padded to 32)
    (48, 2, 0, 1, 0.1, "mean", (5, 7), 5, 7, 3, 1),     # p < 1: padding must stay 0, not tiny^p
    (64, 2, 0, 2, 3.0, "mean", (8, 8), 8, 10, 5, 1),    # sr_ratio 2: reduced keys, v interpolated
    (32, 1, 2, 1, 1.0, "mean", (3, 5), 3, 5, 5, 2),     # p = 1, two class tokens, grid < kernel
]


TRITON_FAILED = fl._triton_failed


@pytest.fixture
def triton_device(monkeypatch):
    """The device the kernels run on: CUDA, or the CPU through the interpreter. A kernel failure
    raises here instead of falling back to the torch path (which would compare the torch path
    with itself), and the fast path mode is restored after each test."""
    if fl.triton is None:
        pytest.skip("Triton is not installed (pip install triton)")
    monkeypatch.setattr(fl, "_fast_path_mode", "auto")
    monkeypatch.setattr(fl, "_triton_failures", set())

    def raise_it(key, error):
        raise error

    monkeypatch.setattr(fl, "_triton_failed", raise_it)
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    monkeypatch.setattr(fl, "_on_cuda", lambda x: True)
    return "cpu"


def triton_layer(case, device, dtype=torch.float32):
    C, h, P, sr, p, normalizer, grid, H, W, ks, B = case
    m = randomize(fl.FocusedLinearAttention(C, grid[0] * grid[1], h, qkv_bias=True, sr_ratio=sr,
                                            focusing_factor=p, kernel_size=ks, grid_size=grid,
                                            num_prefix_tokens=P, normalizer=normalizer), std=0.1)
    x = seeded(B, P + H * W, C, seed=31)
    return m.to(device, dtype), x.to(device, dtype), H, W


@pytest.mark.parametrize("tiles", [(64, 512), (16, 2)], ids=["one-tile-chunks", "multi-tile-chunks"])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_path_equals_the_torch_path(triton_device, monkeypatch, case, tiles):
    """float32: the kernels against the torch path of the same layer (inference path for
    sr_ratio 1, which the fixtures check against the official code); with 16-token tiles and two
    programs for the keys, every chunk sums several tiles."""
    monkeypatch.setattr(fl, "_TRITON_BLOCK_N", tiles[0])
    monkeypatch.setattr(fl, "_TRITON_PROGRAMS", tiles[1])
    m, x, H, W = triton_layer(case, triton_device)
    with torch.no_grad():
        assert m.kernel_path(x) == "triton"
        out = m(x, H, W)
        fl.set_fast_path("torch")
        assert m.kernel_path(x) == ("inference" if m.sr_ratio == 1 else "general")
        ref = m(x, H, W)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, "Triton vs torch path", rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_path_in_half_precision(triton_device, monkeypatch, dtype):
    """A half-precision layer: the GEMMs in its dtype, the rest in float32, as the torch path."""
    m, x, H, W = triton_layer(TRITON_CASES[1], triton_device, dtype)
    with torch.no_grad():
        assert m.kernel_path(x) == "triton"
        out = m(x, H, W)
        fl.set_fast_path("torch")
        ref = m(x, H, W)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert out.dtype == dtype
    assert_close(out, ref, f"Triton vs torch path, {dtype}", rtol=0, atol=2 * ulp)


@pytest.mark.parametrize("p, keys_at_floor", [(3.0, False), (32.0, True)])
def test_triton_path_on_tokens_at_the_floor(triton_device, p, keys_at_floor):
    """Queries that ReLU flattens to the floor 1e-6 / s: the eps (moved to eps / c) is a large
    share of their normaliser; with the keys there too and p = 32, t^p underflows but for the
    largest entries. Against the autograd path (float32, _Focus's max scaling)."""
    m = randomize(fl.FocusedLinearAttention(64, 16, 2, qkv_bias=True, focusing_factor=p,
                                            num_prefix_tokens=1), std=0.1)
    with torch.no_grad():
        m.q.bias.fill_(-100.)
        if keys_at_floor:
            m.kv.bias[:64].fill_(-100.)
    m, x = m.to(triton_device), seeded(2, 17, 64, seed=33).to(triton_device)
    with torch.no_grad():
        out = m(x, 4, 4)
        other_eps = fl.official_forward(m, x, 4, 4, normalizer="sum")
    ref = m(x.clone().requires_grad_(), 4, 4).detach()
    assert torch.isfinite(out).all()
    assert_close(out, ref, f"p = {p}, Triton vs autograd path", 1e-5, 1e-5 * ref.abs().max().item())
    if not keys_at_floor:  # the eps matters here (with p = 32 the official formulation is NaN)
        assert (other_eps - ref).abs().max() > 1e-2 * ref.abs().max()


def test_triton_path_catches_a_missing_dwc_and_positional_encoding(triton_device, monkeypatch):
    """The comparison above can fail: the kernels with the DWC's bias, or the positional
    encoding, left out differ from the torch path by far more than its tolerance."""
    m, x, H, W = triton_layer(TRITON_CASES[1], triton_device)
    with torch.no_grad():
        out = m(x, H, W)
        pe = m._positional_encoding
        monkeypatch.setattr(m, "_positional_encoding", lambda kh, kw: torch.zeros_like(pe(kh, kw)))
        assert (m(x, H, W) - out).abs().max() > 1e-3
        monkeypatch.undo()
        monkeypatch.setattr(fl, "_on_cuda", lambda x: True)
        m.dwc.bias.zero_()
        assert (m(x, H, W) - out).abs().max() > 1e-3


def test_triton_failure_falls_back_to_the_torch_path(triton_device, monkeypatch):
    """A kernel that fails to compile or launch (never run on this GPU or Triton version): a
    warning, the torch path's output, and the torch path from then on."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")
            return launch

    m, x, H, W = triton_layer(TRITON_CASES[1], triton_device)
    monkeypatch.setattr(fl, "_triton_failed", TRITON_FAILED)   # the fixture's raise_it undone
    monkeypatch.setattr(fl, "_flatten_queries_kernel", Broken())
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="Triton kernels failed.*PassManager"):
            out = m(x, H, W)
        assert fl.get_fast_path() == "auto" and m.kernel_path(x) == "inference"
        ref = m(x, H, W)
    assert torch.equal(out, ref)


def test_triton_path_lets_other_errors_through(triton_device, monkeypatch):
    """Only the kernels' own failures fall back: an error of the torch ops around them raises,
    and the kernels stay on."""
    m, x, H, W = triton_layer(TRITON_CASES[0], triton_device)

    def broken_projection(t):
        raise ValueError("not a kernel failure")

    monkeypatch.setattr(m.q, "forward", broken_projection)
    with torch.no_grad(), pytest.raises(ValueError, match="not a kernel failure"):
        m(x, H, W)
    assert fl.get_fast_path() == "auto" and not fl._triton_failures


AOT_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import flatten as fl

def compile_for_sm90(kernel, dtype, warps, **constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):  # the layer's tensors in its dtype, the kernels' own in float32
            sig[name] = "*" + (dtype if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else "fp32")
        else:
            sig[name] = "fp32" if name in ("offset", "p", "eps") else "i32"
    where = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(kernel, sig, constexprs=where)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))

for dtype, d, d_pad, p_int, warps in [("fp32", 64, 64, 3, 8), ("bf16", 64, 64, 0, 8), ("fp16", 24, 32, 3, 4)]:
    common = dict(H=3, D=d, D_PAD=d_pad, P_INT=p_int, BLOCK_N=64)
    compile_for_sm90(fl._flatten_keys_kernel, dtype, warps, **common)
    compile_for_sm90(fl._flatten_queries_kernel, dtype, warps, KS=5, **common)
    print("compiled", dtype, d, p_int, flush=True)
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_an_sm90_gpu(tmp_path):
    """No GPU needed: Triton compiles both kernels ahead of time, down to a cubin through its own
    ptxas, for an H100 / H200 (sm_90), in a process without the interpreter (float32, bfloat16
    with a non-integer p, float16 with a padded head_dim). Catches what only the compiler
    rejects (tl.dot's shapes and precision, loop-carried types, constexpr branches)."""
    if fl.triton is None:
        pytest.skip("Triton is not installed (pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh compile, not a cache hit
    res = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 3, res.stdout


def test_kernel_path_selection(monkeypatch):
    """Triton only on CUDA with nothing to differentiate; the CPU never takes it. (The checks
    need no GPU: Triton and the device test are stand-ins.)"""
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    x = seeded(1, 16, 16, seed=32)
    with torch.no_grad():
        assert m.kernel_path(x) == "inference"
    monkeypatch.setattr(fl, "triton", object())
    with torch.no_grad():
        assert m.kernel_path(x) == "inference"           # a CPU tensor
        monkeypatch.setattr(fl, "_on_cuda", lambda t: True)
        assert m.kernel_path(x) == "triton"
        assert m.double().kernel_path(x.double()) == "inference"  # the kernels compute in float32
        assert m.to(torch.bfloat16).kernel_path(x.bfloat16()) == "triton"
        m.float()
        fl.set_fast_path("torch")
        assert m.kernel_path(x) == "inference"
        fl.set_fast_path("off")
        assert m.kernel_path(x) == "general"
        fl.set_fast_path("auto")
        wide = fl.FocusedLinearAttention(256, 16, 2)     # head_dim 128: beyond the kernels' tiles
        assert wide.kernel_path(seeded(1, 16, 256)) == "inference"
    assert m.kernel_path(x) == "general"                  # parameters that need gradients
    assert m.requires_grad_(False).kernel_path(x.requires_grad_()) == "general"
