"""Helpers shared by the test files: the official fixtures, seeded tensors, comparisons.

The test files import them with `from common import ...` (pytest.ini puts tests/ on sys.path).
"""

from pathlib import Path

import torch

import flatten as fl
from flatten import fast_path  # noqa: F401 - the tests' way to switch paths

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
# the tolerance the official fixtures in tests/data are made for (float32 outputs)
RTOL, ATOL = 1e-4, 1e-5


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
