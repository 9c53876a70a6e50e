"""Parity with the official code: the official fixtures in tests/data (outputs of the official
module and backbones on fixed weights and inputs) and the official state_dict manifests
(every key, shape and parameter count; FLOPs at 224 x 224).

official_forward is flatten.py's op-by-op rewrite of the official forward: it is held to the
fixtures here as well, since the other tests and bench.py use it as the official baseline.
"""

import json

import pytest
import torch
from common import (
    ATOL,
    DATA,
    RTOL,
    assert_close,
    fast_path,
    load_fixture,
    official_micro,
    randomize,
    seeded,
)
from torch.utils.flop_counter import FlopCounterMode

import flatten as fl

# -----------------------------------------------------------------------------
# The attention module against the official fixture

FLA_FIXTURE = "fixture_fla_sr1.pt"
# the fixtures' key for the output of the code the released checkpoints were trained with
SUM_OUTPUT = "output_e743f01"
# (fixture key, dtype, normaliser, rtol, atol): the official output in float32 and float64 and
# the output of the code the released checkpoints were trained with (the 'sum' normaliser)
OUTPUTS = [
    ("output", torch.float32, "mean", RTOL, ATOL),
    ("output_fp64", torch.float64, "mean", 1e-10, 1e-12),
    (SUM_OUTPUT, torch.float32, "sum", RTOL, ATOL),
]
OUTPUT_IDS = ["float32", "float64", "sum-normalizer"]


def fla_from_fixture(dtype=torch.float32, normalizer="mean"):
    d = load_fixture(FLA_FIXTURE)
    c = d["config"]
    m = fl.FocusedLinearAttention(c["dim"], c["num_patches"], c["num_heads"], qkv_bias=True,
                                  sr_ratio=c["sr_ratio"], focusing_factor=c["focusing_factor"],
                                  kernel_size=c["kernel_size"], normalizer=normalizer)
    m.load_state_dict(d["state_dict"], strict=True)
    return m.to(dtype).eval(), d


def fixture_case(d, key):
    return f"[official fixture {key}: input {tuple(d['input'].shape)}, grid {d['H']}x{d['W']}]"


# The module's forward on the reference code (fast paths off) and on the path it takes by
# default without and with autograd: every one of them must give the official output.
PATHS = [("off", False), ("auto", False), ("auto", True)]
PATH_IDS = ["reference", "default-no-grad", "default-with-grad"]


@pytest.mark.parametrize("mode,grad", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("key,dtype,normalizer,rtol,atol", OUTPUTS, ids=OUTPUT_IDS)
def test_module_matches_official_fixture(key, dtype, normalizer, rtol, atol, mode, grad):
    m, d = fla_from_fixture(dtype, normalizer)
    x = d["input"].to(dtype).requires_grad_(grad)
    with fast_path(mode), torch.set_grad_enabled(grad):
        path = m.forward_path(x)
        out = m(x, d["H"], d["W"])
    assert_close(out, d[key], f"{fixture_case(d, key)} module ({path} path) vs official",
                 rtol, atol)


@pytest.mark.parametrize("key,dtype,normalizer,rtol,atol", OUTPUTS, ids=OUTPUT_IDS)
def test_official_forward_matches_official_fixture(key, dtype, normalizer, rtol, atol):
    m, d = fla_from_fixture(dtype)
    with torch.no_grad():
        out = fl.official_forward(m, d["input"].to(dtype), d["H"], d["W"], normalizer=normalizer)
    assert_close(out, d[key], f"{fixture_case(d, key)} official_forward vs official", rtol, atol)


def test_fixture_tells_the_normalizers_apart():
    """The 'sum' output is over 10x closer to its own fixture than to the 'mean' one: the
    normaliser test above could not pass with the wrong form."""
    m, d = fla_from_fixture(normalizer="sum")
    with torch.no_grad():
        out = m(d["input"], d["H"], d["W"])
    to_sum = (out - d[SUM_OUTPUT]).abs().max().item()
    to_mean = (out - d["output"]).abs().max().item()
    assert to_mean > 10 * to_sum, \
        f"{fixture_case(d, 'output')}: the 'sum' output is {to_sum:.3g} from its fixture, " \
        f"{to_mean:.3g} from the 'mean' one"


@pytest.mark.parametrize("name", ["positional_encoding", "scale", "dwc.weight"])
def test_fixture_pins_every_part(name):
    """Zeroing the positional encoding, the scale or the DWC changes the output: the fixture
    tests above would fail if any of them were mishandled."""
    m, d = fla_from_fixture()
    with torch.no_grad():
        m.get_parameter(name).zero_()
        out = m(d["input"], d["H"], d["W"])
    change = (out - d["output"]).abs().max().item()
    assert change > 1e-2, \
        f"{fixture_case(d, 'output')}: zeroing {name} changes the output by {change:.3g}"


@pytest.mark.parametrize("sr_ratio,H,W,dim,heads", [(4, 8, 12, 32, 4), (8, 56, 56, 64, 1)],
                         ids=["sr4-8x12", "sr8-56x56-pvt-stage1"])
def test_spatial_reduction_matches_official_formulation(sr_ratio, H, W, dim, heads):
    """The fixture has sr_ratio 1; spatial reduction is held to official_forward in float32, on
    a grid sr_ratio does not divide and at the official PVT's stage 1 (the properties draw
    sr_ratio up to 3 in float64)."""
    m = randomize(fl.FocusedLinearAttention(dim, H * W, heads, qkv_bias=True, sr_ratio=sr_ratio,
                                            grid_size=(H, W)))
    x = seeded(2, H * W, dim, seed=3)
    case = f"[sr_ratio={sr_ratio} grid {H}x{W} C={dim} h={heads} seed=3]"
    assert m.positional_encoding.shape == (1, (H // sr_ratio) * (W // sr_ratio), dim), \
        f"{case}: positional_encoding {tuple(m.positional_encoding.shape)}"
    with torch.no_grad():
        assert_close(m(x, H, W), fl.official_forward(m, x, H, W),
                     f"{case} module vs official_forward")


def test_state_dict_layout_is_official():
    m, d = fla_from_fixture()
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    official = {k: tuple(v.shape) for k, v in d["state_dict"].items()}
    assert ours == official, f"[{FLA_FIXTURE}] state_dict {ours} vs official {official}"
    sr = fl.FocusedLinearAttention(64, 3136, 1, sr_ratio=8)
    assert tuple(sr.positional_encoding.shape) == (1, 49, 64), \
        f"[dim 64, 56x56, sr_ratio 8]: positional_encoding {tuple(sr.positional_encoding.shape)}"
    keys = {"sr.weight", "sr.bias", "norm.weight", "norm.bias"}
    assert keys <= set(sr.state_dict()), \
        f"[dim 64, 56x56, sr_ratio 8]: no {keys - set(sr.state_dict())}"


# -----------------------------------------------------------------------------
# The backbones against the official micro fixtures


def micro_model(version, normalizer="mean"):
    fixture = "fixture_flatten_pvt_micro.pt" if version == 1 else "fixture_flatten_pvt_v2_micro.pt"
    c = load_fixture(fixture)["config"]
    return official_micro(fixture, "flatten_pvt_tiny" if version == 1 else "flatten_pvt_v2_b1",
                          img_size=c["img_size"], embed_dims=c["embed_dims"], depths=c["depths"],
                          num_classes=c["num_classes"], normalizer=normalizer)


@pytest.mark.parametrize("mode", ["auto", "off"], ids=["fast-paths", "reference"])
@pytest.mark.parametrize("version", [1, 2])
def test_pvt_matches_official_fixture(version, mode):
    m, d = micro_model(version)
    case = f"[PVT v{version} micro fixture, input {tuple(d['input'].shape)}, {mode}]"
    with torch.no_grad(), fast_path(mode):
        assert_close(m(d["input"]), d["output"], f"{case} logits")
        assert_close(m.forward_features(d["input"]).mean(1), d["forward_features"],
                     f"{case} pooled")
        maps = m.forward_intermediates(d["input"], intermediates_only=True)
        for i, (fmap, ref) in enumerate(zip(maps, d["intermediates"].values()), start=1):
            if version == 2:  # the fixture holds the blocks' output; the stage map is after norm{i}
                ref = getattr(m, f"norm{i}")(ref)
            assert_close(fmap.flatten(2).transpose(1, 2), ref, f"{case} stage {i} map")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("key,dtype,normalizer,rtol,atol",
                         [("output_fp64", torch.float64, "mean", 1e-9, 1e-11),
                          (SUM_OUTPUT, torch.float32, "sum", RTOL, ATOL)],
                         ids=["float64", "sum-normalizer"])
def test_pvt_matches_official_fixture_in_float64_and_with_sum(version, key, dtype, normalizer,
                                                              rtol, atol):
    m, d = micro_model(version, normalizer)
    with torch.no_grad():
        out = m.to(dtype)(d["input"].to(dtype))
    assert_close(out, d[key], f"[PVT v{version} micro fixture {key}] logits", rtol, atol)


# -----------------------------------------------------------------------------
# The official manifests: every state_dict key and shape, parameter counts, FLOPs

MANIFESTS = sorted(p.name for p in DATA.glob("manifest_flatten_pvt*.json"))  # Swin: test_swin


def test_there_are_manifests():
    assert len(MANIFESTS) == 10, f"manifests in tests/data: {MANIFESTS}"


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_official_state_dict_loads_with_exact_parameter_count(manifest):
    """Built on the meta device; load_pretrained checks every key and shape strictly all the
    same."""
    man = json.loads((DATA / manifest).read_text())
    name = man["model"]
    with torch.device("meta"):
        m = fl.create_model(name)
    official = {k: torch.zeros(v["shape"], device="meta") for k, v in man["state_dict"].items()}
    fl.load_pretrained(m, {"model": official})  # strict: raises on any missing key or shape
    ours = sum(p.numel() for p in m.parameters())
    dead = sum(official[k].numel() for k in official if k.startswith("norm."))  # v1's unused norm
    assert ours + dead == man["num_parameters"], \
        f"[{name}] {ours} parameters + {dead} of the unused norm != {man['num_parameters']}"
    expected = set(official) if name.startswith("flatten_pvt_v2") else \
        set(official) - {"norm.weight", "norm.bias"}
    assert set(m.state_dict()) == expected, \
        f"[{name}] keys: ours only {sorted(set(m.state_dict()) - expected)}, " \
        f"official only {sorted(expected - set(m.state_dict()))}"


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_pvt_v2_b0"])
def test_flops_match_official_counts(name):
    man = json.loads((DATA / f"manifest_{name}.json").read_text())
    with torch.device("meta"):  # shapes only
        m = fl.create_model(name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.zeros(1, 3, 224, 224, device="meta"))
    ours, official = counter.get_total_flops(), man["flops_224"]["flopcountermode_total"]
    assert ours == official, f"[{name} at 1x3x224x224] {ours} FLOPs, official {official}"


@pytest.mark.parametrize("name,kw", [("flatten_pvt_tiny", {}), ("flatten_pvt_v2_b0", {}),
                                     ("flatten_deit_tiny", {"depth": 2}), ("pvt_tiny", {}),
                                     ("deit_tiny", {"depth": 2})],
                         ids=["flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_deit_tiny",
                              "pvt_tiny", "deit_tiny"])
def test_no_unused_parameters(name, kw):
    """Every parameter gets a gradient: DistributedDataParallel needs no find_unused_parameters."""
    m = fl.create_model(name, img_size=64, num_classes=5, **kw)
    m(seeded(2, 3, 64, 64)).square().sum().backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, f"[{name} input 2x3x64x64 seed=0] parameters without a gradient: {unused}"


def test_official_formulation_overflows_where_ours_does_not():
    """README, differences: the official q K^T V overflows float32 for large inputs (the small
    layer of the magnitude tests: finite at 1e11, not from 1e12), where ours stays finite."""
    m = randomize(fl.FocusedLinearAttention(32, 16, 2, qkv_bias=True), seed=81, std=0.3).eval()
    x = seeded(2, 16, 32, seed=82)
    with torch.no_grad():
        for s, finite in ((1e11, True), (1e12, False)):
            official = fl.official_forward(m, x * s, 4, 4)
            assert bool(torch.isfinite(official).all()) == finite, \
                f"[2x16x32 seed=82 times {s:g}] official output finite: {not finite}"
            assert torch.isfinite(m(x * s, 4, 4)).all(), f"[times {s:g}] ours not finite"
