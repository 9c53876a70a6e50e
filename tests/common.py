"""Helpers shared by the test files: the official fixtures, seeded tensors, comparisons.

The test files import them with `from common import ...` (pytest.ini puts tests/ on sys.path).
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import flatten as fl
from flatten import fast_path  # noqa: F401 - the tests' way to switch paths

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
# the tolerance the official fixtures in tests/data are made for (float32 outputs)
RTOL, ATOL = 1e-4, 1e-5


def gmacs(model: torch.nn.Module, img: int) -> tuple:
    """Forward GMACs at 1 x 3 x img x img by torch's flop counter, with the FLOPs by op (for the
    failure message). The model is built on the meta device (shapes without data: a full-size
    model in a second)."""
    x = torch.empty(1, 3, img, img, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2 / 1e9, by_op


def check_manifest(model: torch.nn.Module, man: dict, case: str, img: int) -> None:
    """An official manifest (its state_dict as (key, shape, dtype) rows) against a model built on
    the meta device: every key and shape loads strictly, the parameter count and the GMACs at
    1 x 3 x img x img are exactly the official ones."""
    official = {key: torch.zeros(shape, dtype=getattr(torch, dtype.rpartition(".")[2]),
                                 device="meta") for key, shape, dtype in man["state_dict"]}
    fl.load_pretrained(model, official)  # strict: raises on any missing, unexpected or reshaped key
    ours = sum(p.numel() for p in model.parameters())
    assert ours == man["num_parameters"], \
        f"{case}: {ours:,} parameters, official {man['num_parameters']:,}"
    ours_gmacs, by_op = gmacs(model, img)
    assert math.isclose(ours_gmacs, man[f"gmacs_{img}"], rel_tol=1e-9), \
        f"{case} at 1x3x{img}x{img}: {ours_gmacs!r} GMACs, official {man[f'gmacs_{img}']!r} " \
        f"(our FLOPs by op {by_op}, official {man[f'flops_{img}']})"


def load_fixture(name: str) -> dict:
    """An official fixture of tests/data: tensors and plain data only."""
    return torch.load(DATA / name, weights_only=True)


def seeded(*shape, seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """N(0, scale^2) numbers of the given shape from their own generator: the seed is the case."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def randomize(module: torch.nn.Module, seed: int | torch.Generator = 1,
              std: float = 0.2) -> torch.nn.Module:
    """Every parameter <- N(0, std^2) in place (the Parameter objects stay), from a seed or a
    generator, so that each part (scale, encoding, DWC) matters. Returns the module in eval mode."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL,
                 atol: float = ATOL) -> None:
    """allclose in float64; the message starts with `what` (name the case and seed there) and
    gives the shape and the largest difference."""
    assert actual.shape == expected.shape, \
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, e, rtol=rtol, atol=atol), \
        f"{what}: max |diff| = {diff:.3g} (shape {tuple(actual.shape)}, rtol {rtol:g}, " \
        f"atol {atol:g})"


def official_micro(fixture: str, name: str, dtype=torch.float32, **config):
    """An official micro fixture of tests/data and the model it was made with: create_model(name,
    **config) with the fixture's state_dict loaded, in eval mode and `dtype`. Returns (model,
    fixture)."""
    d = load_fixture(fixture)
    model = fl.create_model(name, **config)
    fl.load_pretrained(model, d["state_dict"])
    return model.to(dtype).eval(), d


# -----------------------------------------------------------------------------
# Independent references: the grid layout and the focused linear attention written out


def image_of(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Row-major tokens (B, H*W, C) -> the image (B, C, H, W): token i * W + j at (i, j)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], H, W)


def tokens_of(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> row-major tokens (B, H*W, C)."""
    return image.flatten(2).transpose(1, 2)


def resampled_table(table: torch.Tensor, grid, H: int, W: int) -> torch.Tensor:
    """A position table (1, h*w, C) on `grid` (h, w) at an H x W grid: as it is at its own grid,
    else F.interpolate's bicubic image resampling (align_corners=False) in float32, cast back
    (the documented recipe of resample_grid, timm's and the official fine-tuning one)."""
    (h, w), C = grid, table.shape[-1]
    assert table.shape[1] == h * w, f"table of {table.shape[1]} rows on grid {h}x{w}"
    if (h, w) == (H, W):
        return table
    image = table.reshape(1, h, w, C).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(H, W), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, H * W, C).to(table.dtype)


def reference_focused_linear(q, k, v, H, W, heads, scale, p, dwc, normalizer="mean"):
    """Focused linear attention with its DWC, written from the paper and the official code:
    phi(x) = ||y|| y^p / ||y^p|| with y = (ReLU(x) + 1e-6) / softplus(scale), norms over all C;
    per head (channel = head * d + j) out_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) .
    sum_j phi(k_j) + eps), eps = n 1e-6 ("mean") or 1e-6 ("sum"); plus the DWC of the raw v as
    one H x W image of d channels per head, one kernel shared by the heads. q (B, H*W, C), k and
    v (B, n, C); with n != H*W (sr_ratio > 1) the DWC takes v brought to H*W tokens by 1-D
    linear interpolation along the token axis, as the official code does."""
    s = F.softplus(scale)

    def phi(x):
        y = (F.relu(x) + 1e-6) / s
        return y.norm(dim=-1, keepdim=True) * y ** p / (y ** p).norm(dim=-1, keepdim=True)

    B, N, C = q.shape
    d = C // heads
    qh, kh, vh = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (phi(q), phi(k), v))
    n = kh.shape[2]
    eps = n * 1e-6 if normalizer == "mean" else 1e-6
    out = (qh @ (kh.transpose(-2, -1) @ vh)) / (qh @ kh.sum(dim=2).unsqueeze(-1) + eps)
    if n != H * W:
        v = F.interpolate(v.transpose(1, 2), size=H * W, mode="linear").transpose(1, 2)
    per_head = image_of(v, H, W).reshape(B * heads, d, H, W)
    conv = F.conv2d(per_head, dwc.weight, dwc.bias, padding=dwc.kernel_size[0] // 2, groups=d)
    return out.transpose(1, 2).reshape(B, N, C) + tokens_of(conv.reshape(B, C, H, W))


def check_odd_size(name: str, img_size, grids, stage_layers, **config) -> None:
    """Every grid of `name` at img_size, in __init__ and in set_input_size, is `grids` (one
    (H_i, W_i) per stage, worked out by the caller: ceil(H/2) x ceil(W/2) at each merge): the
    forward's stage grids and the construction grid of each position table. stage_layers(model)
    lists each stage's layers that hold a positional_encoding on their grid_size. The model built
    at img_size (224 weights loaded) and the 224 model after set_input_size(img_size) equal the 224
    model at img_size bit for bit (no resampling from a wrong grid, not even by 1e-8)."""
    m224 = randomize(fl.create_model(name, **config), seed=5)
    built = fl.create_model(name, img_size=img_size, **config)
    fl.load_pretrained(built, m224.state_dict())
    moved = fl.create_model(name, **config)
    moved.load_state_dict(m224.state_dict())
    moved.set_input_size(img_size)
    x = seeded(1, 3, *img_size, seed=6)
    with torch.no_grad():
        expected = m224(x)
        for model, how in ((m224, "built at 224"), (built.eval(), f"built at {img_size}"),
                           (moved.eval(), f"set_input_size({img_size})")):
            case = f"[{name} {config}, {how}, input 1x3x{img_size[0]}x{img_size[1]} seed=6]"
            seen = [(H, W) for _, H, W in model._stages(x)]
            assert seen == list(grids), f"{case}: stage grids {seen}, expected {list(grids)}"
            if model is m224:
                continue
            for i, (layers, grid) in enumerate(zip(stage_layers(model), grids), start=1):
                for layer in layers:
                    rows = layer.positional_encoding.shape[1]
                    assert tuple(layer.grid_size) == grid and rows == grid[0] * grid[1], \
                        f"{case}: a stage {i} table on grid {layer.grid_size} ({rows} rows), " \
                        f"expected {grid}"
            out = model(x)
            assert torch.equal(out, expected), f"{case}: logits differ from the 224 model's by " \
                f"{(out - expected).abs().max().item():.3g}"
