"""L2ViT: parity with the official code (the official micro fixture and the five official
manifests in tests/data), any input size against a reference written here, the released
checkpoint format (the EMA weights, the 22k head), training, an empty batch, the API and the
README's L2ViT claims.

The micro fixture is the official L2ViT class with dims (16, 32, 64, 128), depths (2, 2, 2, 2),
heads (2, 4, 8, 16) (head dim 8), MLP ratio 4, block type 'mix_local_enhanced_vit' (each stage a
window block, then a linear block with the LCM), the conv stem, window 7 and 10 classes, run by
the official code on a CPU in float32 at one thread. Its weights overwrite every state_dict
entry, the BatchNorm running statistics included: a temperature of its own per head, and the q
and k rows of the linear blocks scaled so that a third to a half of the denominators q . sum(k)
sit under the clamp at 100. Its input (2, 3, 224, 224) is N(0, 1) from a generator seeded 2. It
holds the logits (also in float64), the pooled features, each stage's output, each downsampling
layer's output and each block's output. Tolerance: rtol 1e-4, atol 1e-5.
"""

import argparse
import json
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from common import DATA, ROOT, assert_close, check_manifest, gmacs, official_micro, seeded

import bench
import flatten as fl

FIXTURE = "fixture_l2vit_micro.pt"
# the micro fixture's architecture, in create_model's terms
MICRO = dict(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), num_classes=10)
CASE = "[L2ViT micro fixture, input 2x3x224x224]"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def fixture():
    return torch.load(DATA / FIXTURE, weights_only=True)


def micro_model(d, dtype=torch.float32, **overrides):
    kw = d["config"]["kwargs"]
    assert (tuple(kw["dims"]), tuple(kw["depths"]), tuple(kw["num_heads"]), kw["num_classes"],
            kw["window_size"], kw["block_type"], kw["conv_stem"]) == \
        (*(MICRO[k] for k in ("dims", "depths", "num_heads", "num_classes")), 7,
         "mix_local_enhanced_vit", True), f"[{FIXTURE}] config {kw} is not the one built here"
    return official_micro(FIXTURE, "l2vit_tiny", dtype, **MICRO, **overrides)[0]


def traced(m, x):
    """logits, pooled features and the outputs the fixture holds: stages (tokens), downsample
    (each downsample_layers[i]'s tokens) and blocks (each block's tokens, in order)."""
    seen = {"downsample": [], "blocks": []}
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen["downsample"].append(out[0]))
             for layer in m.downsample_layers]
    hooks += [blk.register_forward_hook(lambda _m, _i, out: seen["blocks"].append(out))
              for stage in m.stages for blk in stage]
    try:
        with torch.no_grad():
            seen["stages"] = [t for t, _, _ in m._stages(x)]
            feats = m.forward_features(x)
            seen["forward_features"] = m.forward_head(feats, pre_logits=True)
            seen["output"] = m.forward_head(feats)
    finally:
        for h in hooks:
            h.remove()
    seen["downsample"], seen["blocks"] = seen["downsample"][:4], seen["blocks"][:8]
    return seen


# -----------------------------------------------------------------------------
# 1. The official micro fixture


def test_matches_official_fixture(fixture):
    d = fixture
    ours = traced(micro_model(d), d["input"])
    assert_close(ours["output"], d["output"], f"{CASE} logits")
    assert_close(ours["forward_features"], d["forward_features"],
                 f"{CASE} pooled features (official forward_features)")
    for what in ("stages", "downsample", "blocks"):
        assert len(ours[what]) == len(d[what]), f"{CASE}: {len(ours[what])} {what}"
        for i, (a, b) in enumerate(zip(ours[what], d[what])):
            assert_close(a, b, f"{CASE} {what}[{i}]")


def test_matches_official_fixture_in_float64(fixture):
    d = fixture
    with torch.no_grad():
        out = micro_model(d, torch.float64)(d["input"].double())
    assert_close(out, d["output_fp64"], f"{CASE} float64 logits", rtol=1e-9, atol=1e-11)


def _zero(*suffixes, block=None):
    """Zero the parameters whose key ends with one of suffixes; block 0 / 1: only in the window /
    linear blocks (stages.i.j with j even / odd)."""
    def mutate(m):
        hit = 0
        with torch.no_grad():
            for key, p in m.named_parameters():
                j = int(key.split(".")[2]) if key.startswith("stages.") else None
                if key.endswith(suffixes) and (block is None or j is not None and j % 2 == block):
                    p.zero_()
                    hit += 1
        assert hit, f"no parameter {suffixes} (block kind {block})"
    return mutate


# (what is removed, how): each must move every stage and the logits beyond the tolerance
MUTATIONS = [
    ("linear attention temperature", _zero("attn.temperature")),
    ("LCM (conv2)", _zero("local_mp.conv2.weight", "local_mp.conv2.bias")),
    ("every CPE", _zero("cpe.0.proj.weight", "cpe.0.proj.bias", "cpe.1.proj.weight",
                        "cpe.1.proj.bias")),
    ("window block's first CPE", _zero("cpe.0.proj.weight", "cpe.0.proj.bias", block=0)),
    ("window block's second CPE", _zero("cpe.1.proj.weight", "cpe.1.proj.bias", block=0)),
    ("linear block's CPE", _zero("cpe.0.proj.weight", "cpe.0.proj.bias", block=1)),
    ("window attention (its proj)", _zero("attn.proj.weight", "attn.proj.bias", block=0)),
]


@pytest.mark.parametrize("what,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_fixture_pins_every_part(fixture, what, mutate):
    """Removing a part moves the outputs far beyond the fixture tolerance: the parity test above
    would fail if that part were missing or mishandled."""
    d = fixture
    m = micro_model(d)
    mutate(m)
    with torch.no_grad():
        stages = [t for t, _, _ in m._stages(d["input"])]
        out = m(d["input"])
    for name, ours, ref in [*((f"stage {i}", a, b) for i, (a, b) in
                              enumerate(zip(stages, d["stages"]), start=1)),
                            ("logits", out, d["output"])]:
        change = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert change > 1e-2, f"{CASE} without the {what}: {name} moves by only {change:.3g} " \
            "of its largest value"


# -----------------------------------------------------------------------------
# 2. The official manifests: keys, shapes, parameter counts, GMACs

# manifest -> (create_model name, num_classes)
MANIFESTS = {"tiny": ("l2vit_tiny", 1000), "small": ("l2vit_small", 1000),
             "base": ("l2vit_base", 1000), "base_384": ("l2vit_base_384", 1000),
             "base_22k": ("l2vit_base", 21841)}


def read_manifest(size):
    return json.loads((DATA / f"manifest_l2vit_{size}.json").read_text())


@pytest.mark.parametrize("size", list(MANIFESTS))
def test_official_manifest_loads_with_exact_parameters_and_gmacs(size):
    """Built on the meta device (shapes without data: the full-size models in milliseconds);
    load_pretrained checks every key and shape strictly all the same."""
    man = read_manifest(size)
    name, num_classes = MANIFESTS[size]
    case = f"[{name} num_classes={num_classes}, manifest {size}]"
    with torch.device("meta"):
        m = fl.create_model(name, num_classes=num_classes)
    c = man["config"]
    assert (m.cfg.dims, m.cfg.depths, m.cfg.num_heads, m.cfg.mlp_ratios, m.cfg.window_size,
            m.cfg.num_classes, m.cfg.in_chans) == \
        (*(tuple(c[k]) for k in ("dims", "depths", "num_heads", "mlp_ratio")),
         c["window_size"], c["num_classes"], c["in_chans"]), f"{case}: config {m.cfg} vs {c}"
    keys = [key for key, _, _ in man["state_dict"]]
    assert list(m.state_dict()) == keys, f"{case}: state_dict keys differ from the official " \
        f"order: first {next((a, b) for a, b in zip(m.state_dict(), keys) if a != b)}"
    img = man["readme"]["resolution"]
    assert img == _side(m.cfg.img_size), f"{case}: img_size {m.cfg.img_size}, official {img}"
    check_manifest(m, man, case, img)


def _side(img_size):
    return img_size if isinstance(img_size, int) else img_size[0]


# -----------------------------------------------------------------------------
# 3. Any input size, against a reference written here
#
# The official function as it is described op by op (not our code): plain tensors of the
# state dict, NCHW images, the window blocks as an explicit loop over the windows of the grid
# zero-padded AFTER norm1 (the padding tokens stay in the softmax), the linear attention in its
# N x N form (q k^T first, row blocks) with the clamp at 100 on the row sums, the stem padding
# the image to a multiple of 4, the downsampling LayerNorm before its padding and 2x2 conv.


def ln(t, sd, key):
    return F.layer_norm(t, t.shape[-1:], sd[key + "weight"], sd[key + "bias"], eps=1e-5)


def bn(img, sd, key):
    """BatchNorm2d in eval mode, written out."""
    mean, var, w, b = (sd[key + n].view(1, -1, 1, 1) for n in
                       ("running_mean", "running_var", "weight", "bias"))
    return (img - mean) / torch.sqrt(var + 1e-5) * w + b


def dense(t, sd, key):
    return t @ sd[key + "weight"].T + sd[key + "bias"]


def gelu(t):
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def as_image(t, H, W):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H, W)


def as_tokens(img):
    return img.flatten(2).transpose(1, 2)


def depthwise(img, sd, key):
    k = sd[key + "weight"].shape[-1]
    return F.conv2d(img, sd[key + "weight"], sd[key + "bias"], padding=k // 2,
                    groups=img.shape[1])


def cpe(t, H, W, sd, key):
    return t + as_tokens(depthwise(as_image(t, H, W), sd, key + "proj."))


def mlp(t, sd, key):
    return dense(gelu(dense(t, sd, key + "fc1.")), sd, key + "fc2.")


def split_heads(t, h):
    B, N, C = t.shape
    return t.reshape(B, N, h, C // h).transpose(1, 2)                       # (B, h, N, d)


def ref_window_block(t, H, W, sd, key, h, ws):
    B, N, C = t.shape
    s = cpe(t, H, W, sd, key + "cpe.0.")
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    grid = t.new_zeros(B, Hp, Wp, C)
    grid[:, :H, :W] = ln(s, sd, key + "norm1.").reshape(B, H, W, C)
    out = torch.empty_like(grid)
    for y in range(0, Hp, ws):
        for x in range(0, Wp, ws):
            win = grid[:, y:y + ws, x:x + ws].reshape(B, ws * ws, C)
            q, k, v = (split_heads(z, h) for z in dense(win, sd, key + "attn.qkv.").split(C, -1))
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // h), -1) @ v
            a = dense(a.transpose(1, 2).reshape(B, ws * ws, C), sd, key + "attn.proj.")
            out[:, y:y + ws, x:x + ws] = a.reshape(B, ws, ws, C)
    t = s + out[:, :H, :W].reshape(B, N, C)          # the residual adds to the CPE's output
    t = cpe(t, H, W, sd, key + "cpe.1.")
    return t + mlp(ln(t, sd, key + "norm2."), sd, key + "mlp.")


def ref_linear_block(t, H, W, sd, key, h):
    B, N, C = t.shape
    t = cpe(t, H, W, sd, key + "cpe.0.")
    qkv = dense(ln(t, sd, key + "norm1."), sd, key + "attn.qkv.").split(C, -1)
    q, k, v = (split_heads(z, h) for z in qkv)
    q, k = q.clamp_min(0), k.clamp_min(0)
    tau = sd[key + "attn.temperature"].reshape(1, h, 1, 1)                   # one per head
    a = torch.empty_like(v)
    for i in range(0, N, 1024):
        A = q[:, :, i:i + 1024] @ k.transpose(-2, -1)                        # (B, h, rows, N)
        a[:, :, i:i + 1024] = (A @ v) * tau / A.sum(-1, keepdim=True).clamp_min(100.)
    t = t + dense(a.transpose(1, 2).reshape(B, N, C), sd, key + "attn.proj.")
    m = depthwise(as_image(ln(t, sd, key + "norm3."), H, W), sd, key + "local_mp.conv1.")
    m = depthwise(bn(gelu(m), sd, key + "local_mp.bn."), sd, key + "local_mp.conv2.")
    t = t + as_tokens(m)
    return t + mlp(ln(t, sd, key + "norm2."), sd, key + "mlp.")


def reference(sd, x, heads, ws):
    """(logits, [(stage tokens, H, W)]) of the official L2ViT with state dict sd."""
    H, W = x.shape[-2:]
    img = F.pad(x, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
    p = "downsample_layers.0.proj.proj."
    img = F.conv2d(img, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1)
    img = F.conv2d(F.relu(bn(img, sd, p + "1.")), sd[p + "3.weight"], sd[p + "3.bias"],
                   stride=2, padding=1)
    img = bn(img, sd, p + "4.")
    H, W = img.shape[-2:]
    t = ln(as_tokens(img), sd, "downsample_layers.0.norm.")
    stages = []
    for i, h in enumerate(heads):
        if i:
            key = f"downsample_layers.{i}."
            img = F.pad(as_image(ln(t, sd, key + "norm."), H, W), (0, W % 2, 0, H % 2))
            img = F.conv2d(img, sd[key + "proj.weight"], sd[key + "proj.bias"], stride=2)
            H, W = img.shape[-2:]
            t = as_tokens(img)
        j = 0
        while f"stages.{i}.{j}.norm1.weight" in sd:
            key = f"stages.{i}.{j}."
            t = ref_window_block(t, H, W, sd, key, h, ws) if j % 2 == 0 else \
                ref_linear_block(t, H, W, sd, key, h)
            j += 1
        stages.append((t, H, W))
    return dense(ln(t, sd, "norm.").mean(1), sd, "head."), stages


@pytest.fixture(scope="module")
def sd64(fixture):
    return {k: v.double() if v.is_floating_point() else v for k, v in
            fixture["state_dict"].items()}


def test_reference_matches_the_official_fixture(fixture, sd64):
    """The reference is the official function: the test below can trust it."""
    with torch.no_grad():
        logits, stages = reference(sd64, fixture["input"].double(), MICRO["num_heads"], 7)
    assert_close(logits, fixture["output_fp64"], f"{CASE} reference logits", 1e-9, 1e-11)
    for i, ((t, H, W), ref) in enumerate(zip(stages, fixture["stages"]), start=1):
        assert [H, W] == fixture["stage_sizes"][i - 1], f"{CASE} reference stage {i}: {H}x{W}"
        assert_close(t, ref, f"{CASE} reference stage {i}")


# (H, W, batch, window, the stage grids the official code gives)
SIZES = [(225, 333, 1, 7, [(57, 84), (29, 42), (15, 21), (8, 11)]),
         (240, 352, 1, 7, [(60, 88), (30, 44), (15, 22), (8, 11)]),
         (17, 45, 2, 7, [(5, 12), (3, 6), (2, 3), (1, 2)]),
         (1, 1, 2, 7, [(1, 1)] * 4),
         (225, 333, 1, 12, [(57, 84), (29, 42), (15, 21), (8, 11)]),
         (99, 38, 2, 3, [(25, 10), (13, 5), (7, 3), (4, 2)])]


@pytest.mark.parametrize("H,W,B,ws,grids", SIZES,
                         ids=[f"{h}x{w}-window{ws}" for h, w, _, ws, _ in SIZES])
def test_any_size_matches_the_reference(fixture, sd64, H, W, B, ws, grids):
    """Odd sizes, H != W, grids that are not multiples of the window (padded after norm1, not
    masked), grids smaller than a window, the smallest input: our model in float64 on the
    fixture's weights against the reference. (The weights do not depend on the window.)"""
    m = micro_model(fixture, torch.float64, window_size=ws)
    x = seeded(B, 3, H, W, seed=H + W, dtype=torch.float64)
    case = f"[L2ViT micro weights, window {ws}, input {B}x3x{H}x{W} seed={H + W}, float64]"
    with torch.no_grad():
        ours = list(m._stages(x))
        logits = m(x)
        ref_logits, ref = reference(sd64, x, MICRO["num_heads"], ws)
    assert [(h, w) for _, h, w in ours] == [(h, w) for _, h, w in ref] == grids, \
        f"{case}: stage grids {[(h, w) for _, h, w in ours]}, official {grids}"
    for i, ((a, _, _), (b, _, _)) in enumerate(zip(ours, ref), start=1):
        assert_close(a, b, f"{case} stage {i}", 1e-9, 1e-10)
    assert_close(logits, ref_logits, f"{case} logits", 1e-9, 1e-10)


# -----------------------------------------------------------------------------
# 4. The released files: 'model' by default, the EMA weights on request, the 22k head


def released_file(path, model_sd, ema_sd=None, epoch="best-ema"):
    """What the official utils.save_model writes: the weights under 'model' (and the EMA's under
    'model_ema' when trained with --model_ema true), training state and the argparse Namespace
    of main.py."""
    ckpt = {"model": model_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]},
            "epoch": epoch, "scaler": {"scale": 65536.0, "growth_factor": 2.0,
                                       "backoff_factor": 0.5, "growth_interval": 2000,
                                       "_growth_tracker": 0},
            "args": argparse.Namespace(model="L2ViT_Tiny", model_ema=ema_sd is not None,
                                       drop_path=0.3, input_size=224, data_path="/data")}
    if ema_sd is not None:
        ckpt["model_ema"] = ema_sd
    torch.save(ckpt, path)
    return path


def same_weights(model, sd):
    ours = model.state_dict()
    return ours.keys() == sd.keys() and all(torch.equal(ours[k], sd[k]) for k in sd)


def namespaces_built_from_now(monkeypatch) -> list:
    """The argparse.Namespace objects built from now on: unpickling a file's 'args' with the real
    class looks up argparse.Namespace, here a subclass that records each one built; loading with
    inert stand-ins builds none. (Call it after writing the file.)"""
    built = []

    class Watched(argparse.Namespace):
        def __new__(cls, *args, **kwargs):
            built.append(cls)
            return super().__new__(cls)
    monkeypatch.setattr(argparse, "Namespace", Watched)
    return built


def test_best_ema_file_loads_model_by_default_and_ema_on_request(fixture, tmp_path, monkeypatch):
    """An L2ViT-T-checkpoint-best-ema.pth-like file: 'model' (what the official evaluation
    loads) by default, 'model_ema' with use_ema=True, through load_pretrained and
    create_model; its pickled Namespace loads as inert data, nothing from it runs."""
    sd = fixture["state_dict"]
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    path = released_file(tmp_path / "L2ViT-Tiny-checkpoint-best-ema.pth", sd, ema)
    namespaces_built = namespaces_built_from_now(monkeypatch)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what users hit with the released files
    for use_ema, expected in ((False, sd), (True, ema)):
        case = f"[official-style best-ema file, use_ema={use_ema}]"
        m = fl.create_model("l2vit_tiny", **MICRO)
        fl.load_pretrained(m, path, use_ema=use_ema)
        assert same_weights(m, expected), f"{case} load_pretrained: not the expected weights"
        m = fl.create_model("l2vit_tiny", **MICRO, checkpoint=path, use_ema=use_ema)
        assert same_weights(m, expected), f"{case} create_model: not the expected weights"
    with torch.no_grad():
        out = fl.create_model("l2vit_tiny", **MICRO, checkpoint=path).eval()(fixture["input"])
    assert_close(out, fixture["output"], f"{CASE} logits of the file's 'model' weights")
    assert not namespaces_built, "loading the file built its argparse.Namespace"


def test_22k_pretrain_head_loads_into_21841_classes_and_is_kept_otherwise(fixture, tmp_path,
                                                                         monkeypatch):
    """The 22k pretrain file (no EMA, a 21,841-class head): into num_classes=21841 everything
    loads; into 1000 classes the body loads and the model keeps its own head."""
    body = {k: v for k, v in fixture["state_dict"].items() if not k.startswith("head.")}
    g = torch.Generator().manual_seed(5)
    head = {"head.weight": torch.randn(21841, 128, generator=g), "head.bias": torch.zeros(21841)}
    path = released_file(tmp_path / "L2ViT-Base-22k-pretrain-checkpoint-best.pth",
                         {**body, **head}, epoch="best")
    namespaces_built = namespaces_built_from_now(monkeypatch)
    m = fl.create_model("l2vit_tiny", **{**MICRO, "num_classes": 21841}, checkpoint=path)
    assert same_weights(m, {**body, **head}), "[22k file into num_classes=21841] weights differ"
    m = fl.create_model("l2vit_tiny", **{**MICRO, "num_classes": 1000})
    own = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("head.")}
    with pytest.warns(UserWarning, match=r"\(21841 classes\) does not fit L2ViT's "
                                         r"\(num_classes=1000\): the model keeps its own"):
        fl.load_pretrained(m, path)
    assert same_weights(m, {**body, **own}), \
        "[22k file into num_classes=1000] the body should load and the model's head stay"
    with pytest.raises(ValueError, match=r"use_ema=True but .* holds no EMA weights"):
        fl.load_pretrained(m, path, use_ema=True)
    assert not namespaces_built, "loading the file built its argparse.Namespace"


# -----------------------------------------------------------------------------
# 5. Training, an empty batch, the API

SMALL = dict(dims=(16, 32, 32, 64), depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), num_classes=5,
             window_size=3)


def test_drop_path_rises_over_the_blocks_as_officially():
    """Stochastic depth from 0 at the first block to drop_path_rate at the last, linearly over
    all blocks in stage order (the official torch.linspace(0, rate, sum(depths)))."""
    m = fl.create_model("l2vit_tiny", drop_path_rate=0.3, **SMALL)
    got = [blk.drop_path.drop_prob for stage in m.stages for blk in stage]
    expected = [0.3 * i / 7 for i in range(8)]
    assert got == pytest.approx(expected), f"[l2vit depths (2, 2, 2, 2), rate 0.3] {got}"


def test_one_training_step_at_odd_size():
    """50 x 70: stage grids 13x18, 7x9, 4x5, 2x3, none a multiple of the window 3. Every parameter
    gets a finite gradient and SGD moves it; the BatchNorm statistics update."""
    torch.manual_seed(0)
    m = fl.create_model("l2vit_tiny", drop_path_rate=0.1, **SMALL).train()
    x, target = seeded(2, 3, 50, 70, seed=11), torch.tensor([1, 3])
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    case = "[l2vit small dims (16, 32, 32, 64) window 3, input 2x3x50x70 seed=11]"
    loss = F.cross_entropy(m(x), target)
    loss.backward()
    assert torch.isfinite(loss), f"{case}: loss {loss}"
    bad = [k for k, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"{case}: parameters without a finite gradient: {bad}"
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    still = [k for k, v in m.state_dict().items() if torch.equal(v, before[k])]
    assert not still, f"{case}: left unchanged by the step: {still}"


def test_empty_batch():
    """The official model fails on B = 0 (its window reshape); here it gives empty outputs."""
    m = fl.create_model("l2vit_tiny", **SMALL)
    case = "[l2vit small, input 0x3x50x70]"
    x = torch.zeros(0, 3, 50, 70)
    out = m.train()(x)
    assert out.shape == (0, 5), f"{case} training: logits {tuple(out.shape)}"
    out.sum().backward()
    with torch.no_grad():
        assert m.eval()(x).shape == (0, 5), f"{case} eval: logits {tuple(m(x).shape)}"
        maps = [tuple(t.shape) for t in m.forward_intermediates(x, intermediates_only=True)]
    expected = [(0, 16, 13, 18), (0, 32, 7, 9), (0, 32, 4, 5), (0, 64, 2, 3)]
    assert maps == expected, f"{case}: forward_intermediates {maps}, expected {expected}"


def test_model_api(capfd):
    """forward_features is the last stage normalised by the final LayerNorm (B, N_4, C_4);
    num_classes=0 makes forward its mean over tokens; forward_intermediates gives the raw stage
    outputs as maps (no LayerNorm per stage, unlike the official detection backbone)."""
    m = fl.create_model("l2vit_tiny", **{**SMALL, "num_classes": 0}).eval()
    assert capfd.readouterr() == ("", ""), "[l2vit_tiny] construction printed"
    x = seeded(2, 3, 61, 95)
    case = "[l2vit small num_classes=0, input 2x3x61x95 seed=0]"
    with torch.no_grad():
        stages = list(m._stages(x))
        last, H, W = stages[-1]
        expected = {"forward_features": m.norm(last), "forward": m.norm(last).mean(1),
                    **{f"forward_intermediates[{i}]": t.transpose(1, 2).unflatten(2, (h, w))
                       for i, (t, h, w) in enumerate(stages)}}
        got = {"forward_features": m.forward_features(x), "forward": m(x),
               **{f"forward_intermediates[{i}]": t for i, t in
                  enumerate(m.forward_intermediates(x, intermediates_only=True))}}
    assert (H, W) == (2, 3), f"{case}: last grid {H}x{W}"
    for what, value in expected.items():
        assert torch.equal(got[what], value), f"{case}: {what} {tuple(got[what].shape)}"
    assert m.feature_info == [dict(num_chs=c, reduction=r, module=f"stages.{i}.1") for i, (c, r) in
                              enumerate(zip(SMALL["dims"], (4, 8, 16, 32)))], m.feature_info
    m.reset_classifier(11)
    with torch.no_grad():
        assert m(x).shape == (2, 11), f"{case}: after reset_classifier(11) {tuple(m(x).shape)}"
    m.set_input_size((96, 128))
    assert m.cfg.img_size == (96, 128), f"{case}: set_input_size: cfg {m.cfg}"
    assert fl.list_models("l2vit") == ["l2vit_base", "l2vit_base_384", "l2vit_small",
                                       "l2vit_tiny"], fl.list_models("l2vit")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_attention_in_half_precision_sums_in_float32(dtype):
    """q . sum_j k_j over 1024 tokens reaches ~1e6, past float16's 65504: the attention computes
    in float32 inside and returns the input's dtype, close to the float32 result."""
    attn = fl.L2ViTAttention(16, 2, qkv_bias=True).eval()
    with torch.no_grad():
        attn.qkv.weight.mul_(50)
    x = seeded(1, 1024, 16, seed=6)
    case = f"[L2ViTAttention(16, 2) with qkv x 50, input 1x1024x16 seed=6, {dtype}]"
    with torch.no_grad():
        ref = attn(x)
        out = attn.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{case}: {out.dtype}, not finite"
    assert_close(out, ref, f"{case} vs float32", rtol=5e-2, atol=5e-2 * ref.abs().max().item())


BAD_CONFIG = [
    ("dims-length", dict(dims=(16, 32, 64)), r"dims needs 4 entries"),
    ("dims-odd-stem", dict(dims=(15, 32, 64, 128)), r"the first even"),
    ("heads", dict(num_heads=(3, 4, 8, 16)), r"dim 16 must be divisible by num_heads 3"),
    ("window", dict(window_size=0), r"window_size must be a positive int, got 0"),
    ("depths", dict(depths=(2, -1, 2, 2)), r"block counts .* must be ints >= 0"),
    ("mlp", dict(mlp_ratios=(4, 4, 0, 4)), r"MLP ratios must be finite numbers > 0"),
    ("drop_path", dict(drop_path_rate=1.0), r"drop_path_rate must be a number in \[0, 1\)"),
    ("img_size", dict(img_size=0), r"img_size must be a positive int"),
    ("FLatten-field", dict(focusing_factor=3), r"l2vit_tiny has no config field focusing_factor"),
]


@pytest.mark.parametrize("case", BAD_CONFIG, ids=lambda case: case[0])
def test_bad_config_raises_a_value_error_saying_what_was_expected(case):
    _, overrides, message = case
    with pytest.raises(ValueError, match=message):
        fl.create_model("l2vit_tiny", **{**MICRO, "depths": (1, 1, 1, 1), **overrides})


def test_bad_input_raises_a_value_error_saying_what_was_expected():
    m = fl.create_model("l2vit_tiny", **SMALL)
    for x, expected in ((torch.zeros(1, 1, 32, 32), r"3 input channels"),
                        (torch.zeros(3, 32, 32), r"expects images"),
                        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), r"floating-point"),
                        (torch.zeros(1, 3, 32, 32, dtype=torch.float64), r"float32 weights")):
        with pytest.raises(ValueError, match=expected):
            m(x)


# -----------------------------------------------------------------------------
# 6. The README's L2ViT claims (and docs/benchmark.md's pair)


def flat(path):
    return " ".join((ROOT / path).read_text().split())


def numbers(text):
    return [float(n.replace(",", "")) for n in re.findall(r"[\d,]*\d\.?\d*", text)]


def test_readme_model_rows_and_counts_are_the_manifests():
    text = flat("README.md")
    mans = {size: read_manifest(size) for size in MANIFESTS}
    sizes = ("tiny", "small", "base", "base_384")
    gm = [mans[s][f"gmacs_{mans[s]['readme']['resolution']}"] for s in sizes]
    counts = [mans[s]["num_parameters"] for s in sizes]
    row = re.search(r"\| l2vit_tiny / small / base \(L²ViT\) \| ([^|]+)\| ([^|]+)\|", text)
    row384 = re.search(r"\| l2vit_base_384 \(L²ViT\) \| ([^|]+)\| ([^|]+)\|", text)
    assert row and row384, "README: the L2ViT model rows are missing"
    assert row.group(1).split() == [f"{c / 1e6:.2f}M" if c else "/" for c in
                                    (counts[0], 0, counts[1], 0, counts[2])], row.group(1)
    assert numbers(row.group(2)) == [round(g, 2) for g in gm[:3]], row.group(2)
    assert (row384.group(1).strip(), numbers(row384.group(2))) == \
        (f"{counts[3] / 1e6:.2f}M", [round(gm[3], 2)]), row384.groups()
    m = re.search(r"L²ViT-T / S / B have ([\d,]+) / ([\d,]+) / ([\d,]+) parameters.*?has "
                  r"([\d,]+)\)\. Their GMACs above, ([\d. /]+) to three places.*?README's "
                  r"([\d.G /]+) come from its own counter.*?\(([\d. /]+) GMACs by that counter",
                  text)
    assert m, "README: the L2ViT counts sentence is missing"
    assert numbers(" ".join(m.groups()[:4])) == counts[:3] + [mans["base_22k"]["num_parameters"]]
    assert numbers(m.group(5)) == [round(g, 3) for g in gm], m.group(5)
    assert m.group(6).split(" / ") == [mans[s]["readme"]["flops"] for s in sizes], m.group(6)
    official = [mans[s][f"official_counter_gmacs_{mans[s]['readme']['resolution']}"]
                for s in sizes]
    assert numbers(m.group(7)) == [round(g, 3) for g in official], m.group(7)


def test_readme_maps_the_six_released_files_to_models():
    section = (ROOT / "README.md").read_text().split("**The released L²ViT checkpoints.**")[1]
    rows = re.findall(r"^\| `(L2ViT-[\w-]+\.pth)` \| `(\w+)`(, `num_classes=(\d+)`)? [^|]*\| "
                      r"(\d+)² \| (yes|no) \|$", section, re.M)
    files = {f: (size, man) for size in MANIFESTS for man in [read_manifest(size)]
             for f in man["readme"]["files"]}
    assert sorted(r[0] for r in rows) == sorted(files) and len(files) == 6, \
        f"README: released files {[r[0] for r in rows]}, manifests {sorted(files)}"
    for file, name, _, classes, res, ema in rows:
        size, man = files[file]
        assert (name, int(classes or 1000)) == MANIFESTS[size], f"README: {file} -> {name}"
        assert int(res) == man["readme"]["resolution"], f"README: {file} at {res}"
        assert (ema == "yes") == ("best-ema" in file or "finetune" in file), f"README: {file}"


def test_readme_bench_command_and_the_pair_in_docs(untruncated_init):
    readme, docs = flat("README.md"), flat("docs/benchmark.md")
    # the canonical run's command, in a code block: its default methods include the L2ViT ones
    command = re.search(r"python bench\.py (--details [^`]+?)```", readme)
    assert command, "README: the canonical benchmark command is missing"
    args = bench.parse_args(command.group(1).replace("\\", " ").split())
    assert {"l2vit", "l2vit-official"} <= set(args.methods), args.methods
    assert {"l2vit_tiny", "swin_tiny"} <= set(args.models) and \
        bench.softmax_pair("l2vit_tiny") == "swin_tiny", args.models
    models = {n: fl.create_model(n).to("meta") for n in ("l2vit_tiny", "swin_tiny")}
    got = [round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for m in models.values()]
    got += [round(gmacs(m, 224)[0], 2) for m in models.values()]
    m = re.search(r"\(([\d.]+)M against ([\d.]+)M parameters, ([\d.]+) against ([\d.]+) GMACs "
                  r"at 224\)", docs)
    assert m and numbers(" ".join(m.groups())) == got, f"docs/benchmark.md: {m and m.groups()}"
