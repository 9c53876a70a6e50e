"""timm's own checks on the models, registered with timm from here (flatten.py stays torch-only).
Skipped where timm is not installed (it needs torchvision).

The models register under their names (those timm already has, its pvt_v2_b*, stay timm's), each
entry point taking timm's arguments: device and dtype, features_only (timm's FeatureGetterNet
over forward_intermediates), a TypeError for an unknown argument; their default_cfg is
flatten.pretrained_cfg with timm's first_conv (the first convolution) and classifier. The checks
here run through timm's functions: create_model, FeatureInfo, the features_only wrapper,
resolve_data_config and create_transform against flatten.eval_transform. With TIMM_TESTS set to
the tests/ folder of timm's source distribution (`pip download timm --no-binary :all:
--no-deps`; the wheel has no tests), the functions of its tests/test_models.py run on every
registered model too.
"""

import contextlib
import dataclasses
import importlib
import os
import sys

import pytest
import torch
from test_features import SMALL  # one small model per family

import flatten as fl

pytestmark = pytest.mark.usefixtures("one_thread")

timm = pytest.importorskip("timm")
from timm.models import FeatureInfo, PretrainedCfg  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

TIMM_KEYS = {f.name for f in dataclasses.fields(PretrainedCfg)}
NAMES = [n for n in fl.list_models() if not timm.is_model(n)]  # registered below


def timm_cfg(name: str, model=None) -> dict:
    """flatten.pretrained_cfg(name) in timm's keys; with the model, its first convolution."""
    cfg = {k: v for k, v in fl.pretrained_cfg(name).items() if k in TIMM_KEYS}
    convs = [n for n, m in (model.named_modules() if model else ())
             if isinstance(m, torch.nn.Conv2d)]
    return dict(cfg, first_conv=convs[0] if convs else None, classifier="head",
                architecture=name)


def entry_point(name: str):
    fields = {f.name for f in dataclasses.fields(fl.MODELS[name][0])}

    def create(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
               cache_dir=None, device=None, dtype=None, features_only=False, out_indices=None,
               feature_cls=None, output_fmt="NCHW", **kwargs):
        if pretrained:
            raise ValueError(f"{name}: timm has no weights to fetch; load a file with "
                             "flatten.load_pretrained")
        unknown = sorted(set(kwargs) - fields)
        if unknown:  # timm's contract: an unexpected keyword argument is a TypeError
            raise TypeError(f"{name}() got unexpected keyword arguments {unknown}")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = fl.create_model(name, **kwargs)
        if dtype is not None:
            model.to(dtype)
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg,
                                                        **timm_cfg(name, model))
        if features_only:  # as timm's builder wraps a model with forward_intermediates
            indices = len(model.feature_info) if out_indices is None else out_indices
            features = FeatureGetterNet(model, out_indices=indices, output_fmt=output_fmt)
            features.pretrained_cfg = features.default_cfg = model.pretrained_cfg
            return features
        return model

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    return create


default_cfgs = {name: timm_cfg(name) for name in NAMES}  # read by register_model
for _name in NAMES:
    timm.models.register_model(entry_point(_name))


# -----------------------------------------------------------------------------
# Through timm's functions


@pytest.mark.parametrize("name", SMALL)
def test_timm_builds_and_describes_the_model(name):
    m = timm.create_model(name, num_classes=3, **SMALL[name])
    case = f"[timm.create_model({name!r})]"
    assert isinstance(m, fl._FAMILIES[fl.MODELS[name][0]]), f"{case}: {type(m).__name__}"
    info = FeatureInfo(m.feature_info, len(m.feature_info))    # timm checks the entries
    assert info.channels() == [d["num_chs"] for d in m.feature_info], f"{case}: {info.channels()}"
    assert timm.get_pretrained_cfg_value(name, "input_size") == (3, 224, 224), case
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)
    with torch.no_grad():
        out = m.eval()(torch.randn(1, 3, 96, 128))
    assert out.shape == (1, 3) and torch.isfinite(out).all(), f"{case}: logits {out.shape}"


@pytest.mark.parametrize("name", SMALL)
def test_timm_features_only(name):
    feats = timm.create_model(name, features_only=True, out_indices=(1, -1), **SMALL[name])
    feats.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        maps = feats(x)
        expected = feats.model.forward_intermediates(x, indices=(1, -1), intermediates_only=True)
    assert feats.feature_info.channels() == [t.shape[1] for t in maps], \
        f"[{name} features_only] channels {feats.feature_info.channels()}"
    for r, t in zip(feats.feature_info.reduction(), maps):
        assert t.shape[-2:] == (96 // r, 128 // r), f"[{name}] reduction {r}: map {t.shape}"
    assert all(torch.equal(a, b) for a, b in zip(maps, expected)), f"[{name}] maps differ"


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_swin_base_384",
                                  "flatten_cswin_base_384"])
def test_timm_transform_matches_eval_transform(name):
    """timm's evaluation transform from the model's cfg (torchvision on a PIL image, crop_mode
    "squash" as the official pipeline) against flatten.eval_transform on the same pixels."""
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    from timm.data import create_transform, resolve_data_config
    with torch.device("meta"):
        model = timm.create_model(name)
    pil_transform = create_transform(**resolve_data_config(model=model))
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 301), torch.linspace(0, 1, 411), indexing="ij")
    rgb = torch.stack([yy, xx, (xx * 9).sin() * 0.4 + 0.5]) + 0.05 * torch.randn(3, 301, 411,
                                                                                  generator=g)
    image = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    ref = pil_transform(Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())))
    out = fl.eval_transform(model)(image)[0]
    levels = ((out - ref) * torch.tensor(model.pretrained_cfg["std"]).view(3, 1, 1) * 255).abs()
    assert out.shape == ref.shape and levels.max() < 1.001 and levels.mean() < 0.01, \
        f"[{name} timm/PIL vs eval_transform, 301x411] {tuple(out.shape)} vs " \
        f"{tuple(ref.shape)}, max {levels.max():.3g}, mean {levels.mean():.3g} levels of 1/255"


# -----------------------------------------------------------------------------
# timm's tests/test_models.py itself, from its source distribution (TIMM_TESTS)


def timm_tests():
    folder = os.environ.get("TIMM_TESTS")
    if not folder:
        pytest.skip("TIMM_TESTS (the tests/ folder of timm's source distribution) is not set")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("test_models")
    finally:
        sys.path.remove(folder)


# timm's checks for models whose forward_features gives tokens (its group with vit_*, deit*,
# twins_*): forward, backward, the default cfgs, forward_intermediates and its features_only
CHECKS = ["test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
          "test_model_forward_intermediates", "test_model_forward_intermediates_features"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", CHECKS)
def test_timm_model_checks(check, name):
    tm = timm_tests()
    if check == "test_model_default_cfgs_non_std":
        getattr(tm, check)(name, 1, "meta")
    else:
        getattr(tm, check)(name, 2 if check == "test_model_backward" else 1)


@pytest.mark.parametrize("name", ["flatten_swin_tiny", "flatten_cswin_tiny"])
def test_timm_stop_early_skips_the_final_norm(name):
    # CSwin's stripe stages split their heads in two: an even number
    timm_tests().test_forward_intermediates_stop_early_final_norm(
        name, dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2)))
