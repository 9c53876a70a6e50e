"""Tests of the fast paths (flatten.py, section 5) against the reference forward (section 1).

One parametrized test holds every path equal to the reference on outputs and on every gradient:
the training path (hand-written backward passes), the inference path, the Triton kernels (in
Triton's interpreter on CPU tensors without a GPU; conftest.py sets TRITON_INTERPRET=1)
and torch.compile, over shapes with sr_ratio 1 and 2, class tokens, another grid than the
construction grid, half precision, and each focusing-factor branch of the kernels (p = 1, 2, 3,
4 and non-integer). The other tests pin what that one cannot: which path a call takes, the
switch, the numerically delicate corners, the fallback of a failing kernel.
"""

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from common import ROOT, assert_close, fast_path, randomize, seeded

import flatten as fl

CASES = [  # C, heads, class tokens, sr_ratio, p, normalizer, construction grid, H, W, kernel, B
    (64, 1, 0, 1, 3.0, "mean", (8, 8), 8, 8, 5, 1),    # a FLatten-PVT stage-1 layer
    (48, 3, 1, 1, 2.0, "sum", (4, 4), 5, 7, 5, 2),     # a class token; another grid (resampling)
    (48, 2, 0, 2, 3.0, "mean", (8, 8), 8, 10, 3, 2),   # sr_ratio 2: keys reduced, v interpolated
    (24, 2, 0, 1, 2.5, "mean", (6, 6), 6, 6, 3, 1),    # p not an integer; head dim 12 (padded)
    (32, 1, 2, 1, 1.0, "mean", (3, 5), 3, 5, 5, 2),    # p = 1; two class tokens; grid < kernel
    (32, 2, 0, 1, 4.0, "sum", (4, 4), 4, 4, 7, 1),     # p = 4
    (32, 2, 0, 2, 0.5, "mean", (6, 6), 6, 6, 3, 1),    # p < 1 (zeros must stay 0, not tiny^p)
]


def case_id(case) -> str:
    C, h, P, sr, p, norm, grid, H, W, k, B = case
    return f"C{C}h{h}P{P}sr{sr}p{p:g}{norm}{H}x{W}k{k}B{B}"


def layer_and_input(case, dtype, seed=31):
    C, h, P, sr, p, norm, grid, H, W, k, B = case
    m = fl.FocusedLinearAttention(C, grid[0] * grid[1], h, qkv_bias=True, sr_ratio=sr,
                                  focusing_factor=p, kernel_size=k, grid_size=grid,
                                  num_prefix_tokens=P, normalizer=norm)
    m = randomize(m, seed, std=0.3).to(dtype)
    return m, seeded(B, P + H * W, C, seed=seed).to(dtype), H, W


def outputs_and_gradients(fn, m, x, grad: bool):
    """fn(x): its output and, with grad, the gradients of <output, g> for a seeded g with respect
    to x and every parameter."""
    if not grad:
        with torch.no_grad():
            return fn(x), []
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    g = seeded(*out.shape, seed=7).to(out.dtype)
    return out, torch.autograd.grad(out, [x, *m.parameters()], g)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The kernels in Triton's interpreter, with the layer told that the tensors are on CUDA; a
    kernel failure raises instead of falling back to the torch path (which would compare the
    torch path with itself)."""
    if fl.triton is None:
        pytest.skip("Triton is not installed (pip install triton)")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1")
        monkeypatch.setattr(fl, "_on_cuda", lambda x: True)
    monkeypatch.setattr(fl, "_fast_path_mode", "auto")
    monkeypatch.setattr(fl, "_triton_failures", set())

    def raise_it(key, error):
        raise error

    monkeypatch.setattr(fl, "_triton_failed", raise_it)
    return "cuda" if torch.cuda.is_available() else "cpu"


F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
TRITON_FAILED = fl._triton_failed   # the fixture below replaces it
PARAMS = (  # path, case, dtype: every case where the path applies
    [("train", c, F64) for c in CASES] + [("train", CASES[1], BF16), ("train", CASES[2], F16)]
    + [("inference", c, F64) for c in CASES if c[3] == 1] + [("inference", CASES[1], F32)]
    + [("triton", c, F32) for c in CASES] + [("triton", CASES[1], BF16),
                                             ("triton", CASES[2], F16)]
    + [("compile", c, F64) for c in (CASES[4], CASES[6])])   # no resampling (float32)


@pytest.mark.parametrize("path, case, dtype", PARAMS,
                         ids=[f"{p}-{case_id(c)}-{str(d)[6:]}" for p, c, d in PARAMS])
def test_every_path_equals_the_reference(request, path, case, dtype):
    m, x, H, W = layer_and_input(case, dtype)
    grad = path in ("train", "compile")
    if path == "triton":
        device = request.getfixturevalue("triton_on_cpu")
        m, x = m.to(device), x.to(device)
    what = f"[{path} {case_id(case)} {dtype} seed=31]"
    with fast_path("off"):
        ref, ref_grads = outputs_and_gradients(lambda t: m(t, H, W), m, x, grad)
    if path == "compile":
        request.getfixturevalue("fresh_dynamo")
        fn = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    else:
        with torch.set_grad_enabled(grad):
            taken = m.forward_path(x.detach().clone().requires_grad_(grad))
        assert taken == path, f"{what} forward takes the {taken} path"
        fn = m
    out, grads = outputs_and_gradients(lambda t: fn(t, H, W), m, x, grad)
    # float64: rounding only; float32 and half: a few units in the last place of the output
    tol = {F64: 1e-10, F32: 2e-5, BF16: 2e-2, F16: 4e-3}[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert_close(out, ref, f"{what} output", rtol=tol, atol=tol * ref.abs().max().item())
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a, b, f"{what} d/d{name}", rtol=tol, atol=tol * b.abs().max().item())


SCALES = [10.0 ** e for e in range(-20, 21, 10)]


def on_path(request, path, m, x):
    """(m, its float64 copy on the CPU, x): on the Triton interpreter's device for "triton"."""
    m64 = copy.deepcopy(m).double()
    if path == "triton":
        device = request.getfixturevalue("triton_on_cpu")
        m, x = m.to(device), x.to(device)
    return m, m64, x


@pytest.mark.parametrize("path", ["reference", "train", "inference", "triton"])
def test_every_path_agrees_from_1e_minus_20_to_1e20(request, path):
    """Inputs scaled by 1e-20 to 1e20 in float32: the output within 1e-5 of its largest entry of
    the float64 reference's, and (training) the gradient w.r.t. x within 1e-4 of its largest
    entry, every parameter's from 1 up (below, the inputs vanish under the biases, and the
    gradients of scale, positional_encoding and q cancel to a few % of float32 rounding, the
    float32 reference's alike). At 1e15 the reference's q K^T V overflowed float32, at 1e20
    every path's K^T V: the focused kernel scales each token by its largest entry, linear
    attention the queries and keys by their largest entries."""
    m = randomize(fl.FocusedLinearAttention(32, 16, 2, qkv_bias=True, num_prefix_tokens=1),
                  seed=81, std=0.3)
    m, m64, x0 = on_path(request, path, m, seeded(2, 17, 32, seed=82))
    grad = path == "train"
    for s in SCALES if path != "triton" else SCALES[::2]:  # the interpreter: 1e-20, 1, 1e20
        what = f"[{path}, input 2x17x32 seed=82 times {s:g}, float32]"
        x = x0 * s
        with fast_path("off"):
            ref, ref_grads = outputs_and_gradients(lambda t: m64(t, 4, 4), m64, x.double(), grad)
        with torch.set_grad_enabled(grad):
            taken = m.forward_path(x.clone().requires_grad_(grad))
        assert taken == path or path == "reference", f"{what} forward takes the {taken} path"
        with fast_path("off") if path == "reference" else contextlib.nullcontext():
            out, grads = outputs_and_gradients(lambda t: m(t, 4, 4), m, x, grad)
        assert torch.isfinite(out).all(), f"{what} output not finite"
        assert_close(out, ref, f"{what} output", 0, 1e-5 * ref.abs().max().item())
        names = ["x"] + [n for n, _ in m.named_parameters()]
        for name, a, b in zip(names, grads, ref_grads):
            if name == "x" or s >= 1:
                assert_close(a, b, f"{what} d/d{name}", 0, 1e-4 * b.abs().max().item())


@pytest.mark.parametrize("path", ["reference", "train", "inference", "triton"])
def test_a_head_that_underflows_gives_zeros_not_nan(request, path):
    """Head 0's queries are ReLU's zeros (q's rows for it: weight 0, bias -1), so only the 1e-6
    offset is left there; at inputs of 1e10 to 1e20 its t^p underflows to exactly 0 in float32
    beside the live heads, and q . sum_j k_j = 0 in that head. Its output must be the float64
    reference's (about 0: the eps dominates), not 0 * inf (a reciprocal of a vanishing eps); at
    1e10 the training path's input gradient too."""
    m = randomize(fl.FocusedLinearAttention(32, 16, 4, qkv_bias=True, kernel_size=3), seed=83,
                  std=0.3)
    with torch.no_grad():
        m.q.weight[:8], m.q.bias[:8] = 0., -1.
    m, m64, x0 = on_path(request, path, m, seeded(2, 16, 32, seed=84))
    grad = path == "train"
    for s in (1e10, 1e17, 1e20):
        what = f"[{path}, head 0 dead, input 2x16x32 seed=84 times {s:g}, float32]"
        x = x0 * s
        with fast_path("off"):
            ref, ref_grads = outputs_and_gradients(lambda t: m64(t, 4, 4), m64,
                                                   x.double().cpu(), grad)
        with fast_path("off") if path == "reference" else contextlib.nullcontext():
            with torch.set_grad_enabled(grad):
                taken = m.forward_path(x.clone().requires_grad_(grad))
            assert taken == path, f"{what} forward takes the {taken} path"
            out, grads = outputs_and_gradients(lambda t: m(t, 4, 4), m, x, grad)
        assert torch.isfinite(out).all(), f"{what} output not finite"
        assert_close(out, ref, f"{what} output", 0, 1e-5 * ref.abs().max().item())
        if grad and s < 1e16:  # beyond, the float32 reference's gradients overflow too
            assert torch.isfinite(grads[0]).all(), f"{what} d/dx not finite"
            assert_close(grads[0], ref_grads[0], f"{what} d/dx", 0,
                         1e-4 * ref_grads[0].abs().max().item())


# -----------------------------------------------------------------------------
# Which path a call takes, and the switch


def test_path_selection(monkeypatch):
    """The inference path wherever nothing needs a gradient (sr_ratio 1, float32 / float64, no
    autocast); the training path wherever something does; the reference under "off", for an
    empty batch and where neither applies; Triton only on CUDA. (No GPU needed: the device
    test is a stand-in.)"""
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    x = seeded(1, 16, 16, seed=32)
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        assert m.forward_path(x) == "inference"
        assert m.forward_path(x[:0]) == "reference"                     # an empty batch
        assert m.double().forward_path(x.double()) == "inference"
        assert m.bfloat16().forward_path(x.bfloat16()) == "reference"   # half precision
        m.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.forward_path(x) == "reference"
        sr = fl.FocusedLinearAttention(16, 16, 2, sr_ratio=2)
        assert sr.forward_path(x) == "reference"
        with fast_path("off"):
            assert m.forward_path(x) == "reference"
    with torch.inference_mode():
        assert m.forward_path(x) == "inference"
    assert m.forward_path(x) == "train"                                  # trainable parameters
    assert m.requires_grad_(False).forward_path(x) == "inference"        # a frozen layer
    assert m.forward_path(xg) == "train"                                 # ... but x needs grads
    with fast_path("off"):
        assert m.forward_path(xg) == "reference"
    m.requires_grad_(True)
    if fl.triton is None:
        return
    monkeypatch.setattr(fl, "_on_cuda", lambda t: True)
    with torch.no_grad():
        assert m.forward_path(x) == "triton"
        assert m.bfloat16().forward_path(x.bfloat16()) == "triton"
        assert m.double().forward_path(x.double()) == "inference"  # the kernels are float32
        m.float()
        with fast_path("torch"):
            assert m.forward_path(x) == "inference"
        wide = fl.FocusedLinearAttention(256, 16, 2)   # head dim 128: beyond the kernels' tiles
        assert wide.forward_path(seeded(1, 16, 256)) == "inference"
        monkeypatch.setattr(fl, "_triton_failures", {fl._triton_key(m, x)})
        assert m.forward_path(x) == "inference"         # this configuration failed before
    assert m.forward_path(xg) == "train"


def test_set_fast_path_and_the_environment_variable():
    with pytest.raises(ValueError, match="auto, torch, off"):
        fl.set_fast_path("fast")
    assert fl.get_fast_path() == "auto"
    # FLATTEN_FAST_PATH is read at import: one process imports flatten afresh for each value
    code = """
import importlib, os, flatten
for value in ("off", "fastest", " "):
    os.environ["FLATTEN_FAST_PATH"] = value
    importlib.reload(flatten)
    try:
        print(repr(value), flatten.get_fast_path())
    except ValueError as err:
        print(repr(value), "ValueError:", err)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stderr[-2000:]
    assert lines[0] == "'off' off", f"FLATTEN_FAST_PATH=off: {lines[0]}"
    # a bad value: an error naming the variable at first use
    assert lines[1].startswith("'fastest' ValueError: FLATTEN_FAST_PATH must be one of auto, "
                               "torch, off"), f"FLATTEN_FAST_PATH=fastest: {lines[1]}"
    assert lines[2] == "' ' auto", f"FLATTEN_FAST_PATH=' ' (empty: as if unset): {lines[2]}"


def test_fast_path_restores_the_mode_before_it(monkeypatch):
    """`with fast_path(mode)` gives back the mode set before it (not "auto"), also when the
    block raises, and nested blocks unwind one by one."""
    monkeypatch.setattr(fl, "_fast_path_mode", "torch")
    with fl.fast_path("off"):
        assert fl.get_fast_path() == "off", "[torch, then fast_path('off')] inside"
        with fl.fast_path("auto"):
            assert fl.get_fast_path() == "auto", "[torch, off, then fast_path('auto')] inside"
        assert fl.get_fast_path() == "off", "[torch, off, auto] after the inner block"
    assert fl.get_fast_path() == "torch", f"[torch, fast_path('off')] after: {fl.get_fast_path()}"
    with pytest.raises(KeyError):
        with fl.fast_path("off"):
            raise KeyError("inside")
    assert fl.get_fast_path() == "torch", \
        f"[torch, fast_path('off') left by an exception] after: {fl.get_fast_path()}"
    with pytest.raises(ValueError, match="auto, torch, off"):
        with fl.fast_path("fastest"):
            pass
    assert fl.get_fast_path() == "torch", f"[torch, fast_path('fastest')]: {fl.get_fast_path()}"


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
def test_torch_func_transforms_take_the_reference(transform):
    """Inside torch.func transforms the fast paths' autograd Functions and out= ops do not work
    (torch raised "must override the setup_context staticmethod" and "Batching rule not
    implemented for aten::addmm.out"): the reference runs there, with the default mode."""
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True), seed=61)
    x = seeded(3, 16, 16, seed=62)
    case = f"[torch.func.{transform}, layer (16, 16 tokens, 2 heads), input 3x16x16 seed=62]"
    one = lambda t: m(t[None], 4, 4)[0]                          # noqa: E731 - one sample
    with fast_path("off"):
        refs = [torch.autograd.functional.jacobian(one, x[i]) for i in range(3)] \
            if transform != "vmap" else [one(x[i]).detach() for i in range(3)]
    with fast_path("auto"):
        if transform == "vmap":
            with torch.no_grad():
                got = torch.func.vmap(one)(x)
            want = torch.stack(refs)
        elif transform == "grad":
            got = torch.func.vmap(torch.func.grad(lambda t: one(t).square().sum()))(x)
            want = torch.stack([(2 * one(x[i]).detach()[..., None, None] * J).sum((0, 1))
                                for i, J in enumerate(refs)])
        else:
            got, want = torch.func.jacrev(one)(x[0]), refs[0]
    assert_close(got, want, case, 1e-4, 1e-5)


# -----------------------------------------------------------------------------
# Gradient penalties (double backward): the reference only; the fast paths refuse by name

TWICE = r'set_fast_path\("off"\)'


def penalty_setups():
    """name -> (module, input, forward, gradient of the first backward): a layer and a small
    model, trainable; and a frozen layer beside a twice differentiable branch, where the layer's
    backward gets an upstream gradient that needs no grad (grad_outputs=ones) but its saved
    inputs do: without a refusal its second derivative would be silently missing."""
    layer = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    frozen = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True)).requires_grad_(False)
    model = randomize(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1), num_classes=3),
                      std=0.05)
    tokens, image = seeded(2, 16, 16, seed=44), seeded(1, 3, 64, 64, seed=45)
    return {
        "layer": (layer, tokens, lambda x: layer(x, 4, 4).square().sum()),
        "frozen-layer+branch": (frozen, tokens,
                                lambda x: frozen(x, 4, 4).sum() + x.square().sum() / 2),
        "pvt_v2_b0": (model, image, lambda x: model(x).square().sum()),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("setup", ["layer", "frozen-layer+branch", "pvt_v2_b0"])
@pytest.mark.parametrize("wrt", ["backward", "grad-of-parameters"])
def test_gradient_penalty_on_the_fast_path_names_the_switch(setup, mode, wrt):
    """A penalty on d loss / d x differentiates twice: the hand-written backward passes refuse
    with an error that names set_fast_path("off") (they used to raise PyTorch's generic
    "@once_differentiable" error, or nothing at all when only the saved inputs needed grad)."""
    module, x, loss = penalty_setups()[setup]
    module.train(mode == "train")
    x = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    if wrt == "grad-of-parameters" and not params:
        pytest.skip("a frozen layer has no parameters to differentiate")
    (gx,) = torch.autograd.grad(loss(x), x, create_graph=True)
    penalty = gx.square().sum()
    with pytest.raises(RuntimeError, match=TWICE):
        if wrt == "backward":
            penalty.backward()
        else:
            torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("setup", ["layer", "frozen-layer+branch", "pvt_v2_b0"])
def test_gradient_penalty_with_the_fast_path_off(setup, mode):
    """The same penalty under set_fast_path("off"): it runs, its first backward equals the fast
    path's, and its gradient w.r.t. x matches central finite differences of the penalty (float64;
    the penalty's values come from the fast path's first backward)."""
    module, x, loss = penalty_setups()[setup]
    module.train(mode == "train").double()
    x = x.double().requires_grad_()
    what = f"[{setup} {mode} float64 seed=44/45]"

    def penalty(t):
        (g,) = torch.autograd.grad(loss(t), t, create_graph=torch.is_grad_enabled())
        return g.square().sum(), g

    (fast_g,) = torch.autograd.grad(loss(x), x)
    with fast_path("off"):
        value, g = penalty(x)
        (grad,) = torch.autograd.grad(value, x)
    assert_close(g, fast_g, f"{what} d loss / dx, off vs fast", rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(46)
    flat = torch.randperm(x.numel(), generator=gen)[:6]   # six entries of x, central differences
    h = 1e-5
    for i in flat.tolist():
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        plus = penalty((x.detach() + e).requires_grad_())[0].item()
        minus = penalty((x.detach() - e).requires_grad_())[0].item()
        fd = (plus - minus) / (2 * h)
        assert abs(grad.view(-1)[i].item() - fd) <= 1e-5 * max(1.0, abs(fd)), \
            f"{what} d penalty / dx[{i}]: off {grad.view(-1)[i].item():.10g}, finite " \
            f"differences {fd:.10g}"


def test_reference_gradgradcheck_on_a_tiny_layer():
    """The reference forward (set_fast_path("off")) is twice differentiable: gradcheck and
    gradgradcheck in float64 w.r.t. the input and every parameter (scale, positional encoding,
    DWC included) of a 2-head layer on a 2x2 grid with one class token."""
    m = randomize(fl.FocusedLinearAttention(4, 4, 2, qkv_bias=True, kernel_size=3,
                                            num_prefix_tokens=1), seed=47, std=0.5).double()
    names = [n for n, _ in m.named_parameters()]
    x = seeded(1, 5, 4, seed=48, dtype=torch.float64).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, 2, 2))

    with fast_path("off"):
        assert torch.autograd.gradcheck(fn, (x, *params)), "[tiny layer seed=47/48] gradcheck"
        assert torch.autograd.gradgradcheck(fn, (x, *params)), \
            "[tiny layer seed=47/48] gradgradcheck"


# -----------------------------------------------------------------------------
# The training path


@pytest.mark.parametrize("p", [3.0, 2.0, 1.0, 0.5])
def test_focus_backward_on_dead_tokens_without_offset(p):
    """_Focus.backward's branch for a token that ReLU zeroes entirely (||y|| = 0) is reached with
    offset 0 only (the layers' offset 1e-6 keeps every y > 0): phi_p is 0 all around such a token,
    so its gradient is exactly 0 (without the branch it is NaN: 0 / 0 of the norms), and every
    gradient equals autograd through focus(offset=0)."""
    g = torch.Generator().manual_seed(int(p * 10))
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    dead = torch.tensor([False, True, False, False, True])
    x[dead] = -x[dead].abs()
    s = 0.5 + torch.rand(6, generator=g, dtype=torch.float64)
    up = torch.randn(5, 6, generator=g, dtype=torch.float64)
    case = f"[_Focus.apply, p={p}, offset 0, tokens 1 and 4 all <= 0, seed={int(p * 10)}]"
    results = []
    def hand_written(t, sc):  # phi / D and D (no gradient): phi again
        phi, D = fl._Focus.apply(t, sc, p, 0.0, "token")
        return phi * D

    for fn in (hand_written, lambda t, sc: fl.focus(t, p, sc, offset=0)):
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        out = fn(xs, ss)
        results.append((out, *torch.autograd.grad(out, (xs, ss), up)))
    (out, gx, gs), (ref, rx, rs) = results
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all(), f"{case}: gradients not finite"
    assert torch.equal(gx[dead], torch.zeros_like(gx[dead])), f"{case}: dead tokens' gradient"
    for what, a, b in (("phi", out, ref), ("d/dx", gx, rx), ("d/dscale", gs, rs)):
        assert_close(a, b, f"{case} {what} vs autograd through focus", rtol=1e-10, atol=1e-12)


def test_training_path_under_autocast():
    """loss.backward() inside torch.autocast: the hand-written backward passes compute in float32
    as they chose, not in the autocast dtype; the gradients equal the reference's under the
    same autocast."""
    m = randomize(fl.FocusedLinearAttention(32, 16, 4, qkv_bias=True, num_prefix_tokens=1))
    x = seeded(2, 17, 32, seed=43)
    grads = []
    for mode in ("auto", "off"):
        with fast_path(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, 4, 4)
            grads.append(torch.autograd.grad(out.float().square().sum(), list(m.parameters())))
    for (name, _), a, b in zip(m.named_parameters(), *grads):
        assert torch.isfinite(a).all(), f"[autocast bfloat16 seed=43] d/d{name} not finite"
        assert_close(a, b, f"[autocast bfloat16 seed=43] d/d{name}", 2e-2,
                     2e-2 * b.abs().max().item())


def test_training_path_on_the_meta_device():
    """Shapes without data (the meta device has no autocast: the backward passes check it)."""
    m = fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True, num_prefix_tokens=1).to("meta")
    x = torch.randn(2, 17, 16, device="meta", requires_grad=True)
    assert m.forward_path(x) == "train"
    m(x, 4, 4).sum().backward()
    assert x.grad.shape == x.shape and m.scale.grad.shape == m.scale.shape


@pytest.mark.parametrize("B, C, H, W, k, bias", [(2, 3, 4, 6, 5, True), (1, 4, 5, 5, 3, False),
                                                 (3, 2, 1, 2, 5, True)])
def test_depthwise_conv_gradcheck(B, C, H, W, k, bias):
    """The DWC's hand-written backward, grids smaller than the kernel included."""
    g = torch.Generator().manual_seed(46)
    x = torch.randn(B, C, H, W, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(C, 1, k, k, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(C, generator=g, dtype=F64).requires_grad_() if bias else None

    def conv(x, w, *b):
        return fl._DepthwiseConv.apply(x, w, b[0] if b else None, k // 2)

    assert_close(conv(x, w, *([b] if bias else [])), F.conv2d(x, w, b, padding=k // 2, groups=C),
                 f"[{B}x{C}x{H}x{W} k={k}] forward")
    assert torch.autograd.gradcheck(conv, (x, w, b) if bias else (x, w)), f"{B}x{C}x{H}x{W} k={k}"


# -----------------------------------------------------------------------------
# The inference path: its numerically delicate corners


def floor_queries(m: fl.FocusedLinearAttention, keys: bool = False):
    """Biases of -100: every query (and key) entry at the ReLU floor 1e-6 / s."""
    with torch.no_grad():
        m.q.bias.fill_(-100.)
        if keys:
            m.kv.bias[:m.dim].fill_(-100.)
    return m


def test_inference_path_where_the_eps_matters():
    """The inference path multiplies only the keys by their factor c = ||y|| / ||t^p|| and moves
    the queries' c into the eps (eps / c): exact algebra, checked where the eps is a large share
    of the normaliser, queries at the ReLU floor."""
    m = floor_queries(randomize(fl.FocusedLinearAttention(32, 16, 4, qkv_bias=True,
                                                          num_prefix_tokens=1))).double()
    x = seeded(2, 17, 32, seed=48, dtype=F64)
    with torch.no_grad():
        fast = m(x, 4, 4)
        with fast_path("off"):
            ref = m(x, 4, 4)
        other_eps = fl.official_forward(m, x, 4, 4, normalizer="sum")
    assert_close(fast, ref, "[queries at the floor, float64 seed=48] inference vs reference",
                 1e-12, 1e-13)
    # the test can fail: the eps moves the output (mean: n eps = 16e-6 against 1e-6 for sum)
    assert (other_eps - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("p", [3.0, 40.0])
def test_inference_path_on_tokens_at_the_floor(p):
    """Queries and keys at the floor next to ordinary ones, p up to 40: t = y / max(y) keeps a 1
    in every token, so nothing underflows to 0 / 0 (the official formulation gives NaN here)."""
    m = floor_queries(randomize(fl.FocusedLinearAttention(64, 16, 2, qkv_bias=True,
                                                          focusing_factor=p)), keys=True)
    with torch.no_grad():
        m.kv.bias[:32].normal_(generator=torch.Generator().manual_seed(3))  # some keys not
    x = seeded(2, 16, 64, seed=49)
    with torch.no_grad():
        fast = m(x, 4, 4)
        with fast_path("off"):
            ref = m(x, 4, 4)
    assert torch.isfinite(fast).all(), f"[p={p} seed=49] not finite"
    assert_close(fast, ref, f"[p={p} seed=49] inference vs reference", 1e-5,
                 1e-5 * ref.abs().max().item())


def test_inference_path_with_large_values():
    """Values of 1e30 (and the DWC scaled back): finite and equal to the official formulation."""
    m = randomize(fl.FocusedLinearAttention(192, 16, 3, qkv_bias=True, num_prefix_tokens=1))
    with torch.no_grad():
        m.kv.weight[192:].mul_(1e30)
        m.kv.bias[192:].mul_(1e30)
        m.dwc.weight.mul_(1e-30)
    x = seeded(1, 17, 192, seed=51)
    with torch.no_grad():
        fast, official = m(x, 4, 4), fl.official_forward(m, x, 4, 4)
    assert torch.isfinite(official).all() and torch.isfinite(fast).all()
    assert_close(fast, official, "[values 1e30 seed=51]", 1e-4, 1e-5 * official.abs().max().item())


def test_inference_path_without_one_of_the_biases():
    for drop in ("q", "kv"):
        m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
        getattr(m, drop).bias = None
        x = seeded(1, 16, 16, seed=47)
        with torch.no_grad():
            assert_close(m(x, 4, 4), fl.official_forward(m, x, 4, 4), f"[no {drop} bias seed=47]")


def test_inference_path_sees_parameters_changed_in_place():
    """Nothing is cached between calls: a change through .data shows in the next output."""
    m = randomize(fl.FocusedLinearAttention(16, 16, 2, qkv_bias=True))
    x = seeded(1, 16, 16, seed=29)
    with torch.no_grad():
        before = m(x, 4, 4)
        for p in m.parameters():
            p.data.mul_(1.5)
        after = m(x, 4, 4)
        expected = fl.official_forward(m, x, 4, 4)
    assert (after - before).abs().max() > 1e-2
    assert_close(after, expected, "[after an in-place change seed=29]")


# -----------------------------------------------------------------------------
# The Triton kernels


def test_triton_path_with_multi_tile_chunks(triton_on_cpu, monkeypatch):
    """16-token tiles and two programs for the keys: every chunk sums several tiles."""
    monkeypatch.setattr(fl, "_TRITON_BLOCK_N", 16)
    monkeypatch.setattr(fl, "_TRITON_PROGRAMS", 2)
    for case in (CASES[1], CASES[2]):
        m, x, H, W = layer_and_input(case, F32)
        m, x = m.to(triton_on_cpu), x.to(triton_on_cpu)
        with torch.no_grad():
            out = m(x, H, W)
            with fast_path("off"):
                ref = m(x, H, W)
        assert_close(out, ref, f"[{case_id(case)} 16-token tiles]", 2e-5,
                     2e-5 * ref.abs().max().item())


def test_triton_path_catches_a_missing_dwc_and_positional_encoding(triton_on_cpu, monkeypatch):
    """The comparisons above can fail: the kernels with the DWC's bias, or the positional
    encoding, left out differ from the reference by far more than their tolerance."""
    m, x, H, W = layer_and_input(CASES[1], F32)
    m, x = m.to(triton_on_cpu), x.to(triton_on_cpu)
    with torch.no_grad():
        out = m(x, H, W)
        pe = m._positional_encoding
        monkeypatch.setattr(m, "_positional_encoding", lambda kh, kw: torch.zeros_like(pe(kh, kw)))
        assert (m(x, H, W) - out).abs().max() > 1e-3
        monkeypatch.undo()
        monkeypatch.setattr(fl, "_on_cuda", lambda x: True)
        m.dwc.bias.zero_()
        assert (m(x, H, W) - out).abs().max() > 1e-3


def test_triton_failure_falls_back_for_that_configuration(triton_on_cpu, monkeypatch):
    """A kernel that fails to compile or launch (a GPU or Triton it never ran on): one warning
    that says how to switch the kernels off, the torch path's output, the torch path for that
    configuration from then on; the switch itself and other configurations are untouched."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")
            return launch

    m, x, H, W = layer_and_input(CASES[1], F32)
    m, x = m.to(triton_on_cpu), x.to(triton_on_cpu)
    monkeypatch.setattr(fl, "_triton_failed", TRITON_FAILED)   # the fixture's raise_it undone
    monkeypatch.setattr(fl, "_flatten_queries_kernel", Broken())
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="(?s)Triton kernels failed.*PassManager.*"
                                                r"set_fast_path\('torch'\).*FLATTEN_FAST_PATH"):
            out = m(x, H, W)
        assert fl.get_fast_path() == "auto" and m.forward_path(x) == "inference"
        assert torch.equal(out, m(x, H, W))
        other, xo, Ho, Wo = layer_and_input(CASES[0], F32)
        assert other.forward_path(xo.to(triton_on_cpu)) == "triton"


def test_triton_path_lets_other_errors_through(triton_on_cpu, monkeypatch):
    """Only the kernels' own failures fall back: an error of the torch ops around them raises."""
    m, x, H, W = layer_and_input(CASES[0], F32)
    m, x = m.to(triton_on_cpu), x.to(triton_on_cpu)

    def broken_projection(t):
        raise ValueError("not a kernel failure")

    monkeypatch.setattr(m.q, "forward", broken_projection)
    with torch.no_grad(), pytest.raises(ValueError, match="not a kernel failure"):
        m(x, H, W)
    assert not fl._triton_failures


AOT_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import flatten as fl

def compile_for_sm90(kernel, dtype, warps, **constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):  # the layer's tensors in its dtype, the kernels' own float32
            sig[name] = "*" + (dtype if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else "fp32")
        else:
            sig[name] = "fp32" if name in ("offset", "p", "eps") else "i32"
    where = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(kernel, sig, constexprs=where)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))

# the DWC's taps unroll (KS x KS): KS = 5 once, 3 (half the compile time) for the other
for dtype, d, d_pad, p_int, warps, ks in [("fp32", 64, 64, 3, 8, 5), ("bf16", 24, 32, 0, 4, 3)]:
    common = dict(H=3, D=d, D_PAD=d_pad, P_INT=p_int, BLOCK_N=64)
    compile_for_sm90(fl._flatten_keys_kernel, dtype, warps, **common)
    compile_for_sm90(fl._flatten_queries_kernel, dtype, warps, KS=ks, **common)
    print("compiled", dtype, d, p_int, flush=True)
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_an_sm90_gpu(tmp_path):
    """No GPU needed: Triton compiles both kernels ahead of time, down to a cubin through its own
    ptxas, for an H100 / H200 (sm_90), in a process without the interpreter: float32 with an
    integer p, and bfloat16 with a non-integer p and a padded head dim (the kernels compute in
    float32 whatever the layer's dtype: float16 differs from bfloat16 in their loads and stores
    only). Catches what only the compiler rejects (tl.dot's shapes and precision, loop-carried
    types, constexpr branches)."""
    if fl.triton is None:
        pytest.skip("Triton is not installed (pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh compile, not a cache hit
    res = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 2, res.stdout
