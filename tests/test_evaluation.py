"""The official evaluation settings by name (pretrained_cfg) and eval_transform, against a hand
computation of the official pipeline: each side resampled by PIL's antialiased filter written
out here as a weight matrix (in float64), the crop offsets and sizes worked out by hand, then
mean / std; at an odd non-square image, uint8 and float, (C, H, W) and (B, C, H, W)."""

import math

import pytest
import torch

import flatten as fl

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the official rows: name -> (config file, evaluation size, released); the released ones are
# the official README's "Pretrained Models" table
OFFICIAL = {"flatten_pvt_tiny": ("cfgs/flatten_pvt_t.yaml", 224, True),
            "flatten_pvt_small": ("cfgs/flatten_pvt_s.yaml", 224, False),
            "flatten_pvt_medium": ("cfgs/flatten_pvt_m.yaml", 224, False),
            "flatten_pvt_large": ("cfgs/flatten_pvt_b.yaml", 224, False),
            "flatten_pvt_v2_b0": ("cfgs/flatten_pvt_v2_b0.yaml", 224, True),
            **{f"flatten_pvt_v2_b{i}": (f"cfgs/flatten_pvt_v2_b{i}.yaml", 224, False)
               for i in range(1, 5)},
            "flatten_swin_tiny": ("cfgs/flatten_swin_t.yaml", 224, True),
            "flatten_swin_small": ("cfgs/flatten_swin_s.yaml", 224, True),
            "flatten_swin_base": ("cfgs/flatten_swin_b.yaml", 224, True),
            "flatten_swin_base_384": ("cfgs/flatten_swin_b_384.yaml", 384, True),
            "flatten_cswin_tiny": ("cfgs/flatten_cswin_t.yaml", 224, True),
            "flatten_cswin_small": ("cfgs/flatten_cswin_s.yaml", 224, False),
            "flatten_cswin_base": ("cfgs/flatten_cswin_b.yaml", 224, False),
            "flatten_cswin_base_384": ("cfgs/flatten_cswin_b_384.yaml", 384, False)}


def test_every_name_has_its_evaluation_settings():
    """The official rows as the config files give them; every other name (FLatten-PVTv2-B5,
    FLatten-DeiT, the softmax counterparts) the official pipeline's defaults at its img_size."""
    assert set(fl.PRETRAINED_CFGS) <= set(fl.list_models()), "settings of unknown names"
    assert set(OFFICIAL) <= set(fl.PRETRAINED_CFGS), set(OFFICIAL) - set(fl.PRETRAINED_CFGS)
    for name in fl.list_models():
        if name in fl.PRETRAINED_CFGS and name not in OFFICIAL:
            continue  # a family with its own pipeline, tested with it
        cfg = fl.pretrained_cfg(name)
        case = f"[{name}]"
        cfg_cls, base = fl.MODELS[name]
        size = cfg_cls(**base).img_size
        assert cfg["input_size"] == (3, size, size), f"{case}: input_size {cfg['input_size']}"
        assert (cfg["interpolation"], cfg["crop_mode"], cfg["mean"], cfg["std"],
                cfg["num_classes"]) == ("bicubic", "squash", MEAN, STD, 1000), f"{case}: {cfg}"
        # TEST.CROP False only in cfgs/flatten_swin_b_384.yaml: a warp to 384, no crop
        crop_pct = 1.0 if name == "flatten_swin_base_384" else 224 / 256
        assert cfg["crop_pct"] == crop_pct, f"{case}: crop_pct {cfg['crop_pct']}"
        row = (cfg["official_config"], size, cfg["released"])
        assert row == OFFICIAL.get(name, (None, 224, False)), f"{case}: {row}"
    m = fl.create_model("flatten_cswin_base_384", depths=(1, 1, 1, 1), embed_dim=32)
    assert m.pretrained_cfg == fl.pretrained_cfg("flatten_cswin_base_384"), m.pretrained_cfg
    assert m.pretrained_cfg is not fl.PRETRAINED_CFGS["flatten_cswin_base_384"], "shared dict"
    with pytest.raises(ValueError, match="unknown model"):
        fl.pretrained_cfg("resnet50")


# -----------------------------------------------------------------------------
# The hand computation


def cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = a * (((x - 5) * x + 8) * x - 4)
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's antialiased bicubic resampling of one axis: the kernel
    widened by the scale when shrinking, centred on each output pixel, each row summing to 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale          # (n_out,)
    pixels = torch.arange(n_in, dtype=torch.float64) + 0.5                       # (n_in,)
    w = cubic((pixels[None, :] - centres[:, None]) / stretch)
    return w / w.sum(dim=1, keepdim=True)


def official(image: torch.Tensor, resize, crop) -> torch.Tensor:
    """The official pipeline by hand on one (3, H, W) image: PIL's resize to `resize` = (h, w),
    the width first, then the height, each pass rounded and clipped to uint8 for uint8 images
    (clipped to [0, 1] for float); the crop `crop` = (top, left, h, w); (x - mean) / std.
    float64."""
    uint8 = image.dtype == torch.uint8
    x = image.double()
    clip = (lambda t: t.round().clamp(0, 255)) if uint8 else (lambda t: t.clamp(0, 1))
    x = clip(x @ resample_matrix(x.shape[2], resize[1]).T)                      # the width
    x = clip(resample_matrix(x.shape[1], resize[0]) @ x)                        # the height
    x = x / 255 if uint8 else x
    top, left, h, w = crop
    x = x[:, top:top + h, left:left + w]
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def photo_like(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """uint8 images (B, 3, H, W) with smooth shading, hard edges and noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    base = torch.stack([yy, xx, (yy * 3 + xx * 5).sin() * 0.5 + 0.5])            # (3, H, W)
    edges = ((xx * 7).floor() % 2) * 0.4 - 0.2
    x = base + edges + 0.15 * torch.randn(B, 3, H, W, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# (name or cfg, image H x W, the resize and crop worked out by hand)
CASES = {
    # squash (the official pipeline): int(256 / 224 * 224) = 256 on both sides, crop 16 .. 240
    "FLatten-PVT-T 224": ("flatten_pvt_tiny", (301, 411), (256, 256), (16, 16, 224, 224)),
    # TEST.CROP False: a warp to 384 x 384, nothing cropped
    "FLatten-Swin-B 384": ("flatten_swin_base_384", (301, 411), (384, 384), (0, 0, 384, 384)),
    # int(256 / 224 * 384) = 438, crop (438 - 384) / 2 = 27
    "FLatten-CSwin-B 384": ("flatten_cswin_base_384", (301, 411), (438, 438), (27, 27, 384, 384)),
    # "center" (timm's default, L2ViT's 224): the short side to 256, the long one to
    # int(256 * 411 / 301) = 349, crop left round(62.5) = 62 (round half to even, torchvision)
    "L2ViT-T 224": ("l2vit_tiny", (301, 411), (256, 349), (16, 62, 224, 224)),
    # int(256 * 412 / 300) = 351, crop left round(63.5) = 64 (a half rounded up: not a floor)
    "L2ViT-T 224 odd half": ("l2vit_tiny", (300, 412), (256, 351), (16, 64, 224, 224)),
    # a portrait image: the long side is the height, int(256 * 301 / 211) = 365, crop 70.5 -> 70
    "L2ViT-T 224 portrait": ("l2vit_tiny", (301, 211), (365, 256), (70, 16, 224, 224)),
    # L2ViT at 384: a warp to 384 x 384, nothing cropped
    "L2ViT-B 384": ("l2vit_base_384", (301, 411), (384, 384), (0, 0, 384, 384)),
}


def test_l2vit_evaluation_settings():
    """L2ViT's classification/main.py: below 384 the short side to int(224 / 0.875) = 256 and
    the centre crop (timm's "center"), at 384 a warp; every row released."""
    rows = {"l2vit_tiny": ("L2ViT-T", 224, "center", 0.875),
            "l2vit_small": ("L2ViT-S", 224, "center", 0.875),
            "l2vit_base": ("L2ViT-B", 224, "center", 0.875),
            "l2vit_base_384": ("L2ViT-B", 384, "squash", 1.0)}
    assert set(fl.list_models("l2vit")) == set(rows)
    for name, (row, size, mode, pct) in rows.items():
        cfg = fl.pretrained_cfg(name)
        got = (cfg["official_name"], cfg["input_size"], cfg["crop_mode"], cfg["crop_pct"],
               cfg["interpolation"], cfg["mean"], cfg["std"], cfg["released"])
        assert got == (row, (3, size, size), mode, pct, "bicubic", MEAN, STD, True), \
            f"[{name}] {cfg}"
        # a model built from its class (no pretrained_cfg) gets its family's pipeline too
        built = fl.L2ViT(fl.L2ViTConfig(img_size=size, dims=(16, 32, 64, 128),
                                        depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)))
        assert fl.eval_transform(built) == fl.eval_transform(name), f"[{name}] class-built"
    # from 384 on its longer side the warp, which takes any H x W (the centre crop needs a square)
    built = fl.L2ViT(fl.L2ViTConfig(img_size=(384, 256), dims=(16, 32, 64, 128),
                                    depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)))
    t = fl.eval_transform(built)
    assert (t.size, t.crop_mode, t.crop_pct) == ((384, 256), "squash", 1.0), \
        f"[L2ViT built for 384x256] {t}"


@pytest.mark.parametrize("case", list(CASES))
def test_transform_is_the_official_pipeline(case):
    src, (H, W), resize, crop = CASES[case]
    t = fl.eval_transform(src)
    assert t.resize_size(H, W) == resize, f"[{case}] resize {t.resize_size(H, W)}"
    images = photo_like(2, H, W, seed=3)
    ref = torch.stack([official(im, resize, crop) for im in images])             # (2, 3, h, w)
    out = t(images)
    assert out.dtype == torch.float32 and out.shape == ref.shape, \
        f"[{case} uint8 {H}x{W}] output {out.dtype} {tuple(out.shape)}, expected {ref.shape}"
    # uint8: the rounding to integers may go the other way where float32 and float64 straddle
    # a half: at most one level (1/255 / std) on a few pixels
    diff = (out.double() - ref).abs()
    assert diff.max() <= 1 / 255 / min(STD) + 1e-6 and (diff > 1e-4).double().mean() < 1e-3, \
        f"[{case} uint8 {H}x{W}] max |diff| {diff.max():.3g}, share off {(diff > 1e-4).sum()}"
    single = t(images[1])
    assert single.shape == (1, *ref.shape[1:]) and torch.equal(single[0], out[1]), \
        f"[{case}] (C, H, W) input gives {tuple(single.shape)}, not the batch's image"
    floats = images.float() / 255
    ref = torch.stack([official(im, resize, crop) for im in floats.double()])
    out = t(floats)
    assert out.dtype == torch.float32, f"[{case} float] output {out.dtype}"
    diff = (out.double() - ref).abs().max()
    assert diff < 1e-4, f"[{case} float {H}x{W}] max |diff| {diff:.3g}"


def test_transform_takes_its_settings_from_a_model_a_name_or_a_cfg():
    m = fl.create_model("flatten_swin_base_384", depths=(1, 1, 1, 1), embed_dim=32)
    assert fl.eval_transform(m) == fl.eval_transform("flatten_swin_base_384")
    t = fl.eval_transform(m, input_size=(3, 288, 288), crop_pct=0.9)
    assert (t.size, t.crop_pct, t.crop_mode) == ((288, 288), 0.9, "squash"), t
    plain = fl.PyramidVisionTransformer(fl.PVTConfig(img_size=160, embed_dims=(16, 32, 40, 64),
                                                     depths=(1, 1, 1, 1)))
    t = fl.eval_transform(plain)
    assert (t.size, t.resize_size(100, 200)) == ((160, 160), (182, 182)), t
    cfg = dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.9,
               mean=(0.5,) * 3, std=(0.5,) * 3, url="", hf_hub_id="timm/")  # timm's keys
    t = fl.eval_transform(cfg)
    assert (t.crop_mode, t.interpolation) == ("center", "bilinear"), t


@pytest.mark.parametrize("bad,match", [
    (dict(interpolation="nearest"), "interpolation"), (dict(crop_pct=0), "crop_pct"),
    (dict(crop_pct=1.5), "crop_pct"), (dict(crop_mode="border"), "crop_mode"),
    (dict(crop_mode="center", input_size=(3, 224, 256)), "square"),
    (dict(mean=(0.5, 0.5)), "mean and std"), (dict(std=(0.2, 0.2, 0)), "mean and std"),
    (dict(input_size=(224, 224)), "input_size"), (dict(resize=256), "no setting resize")])
def test_transform_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        fl.eval_transform("flatten_pvt_tiny", **bad)


def test_transform_rejects_bad_images_and_sources():
    t = fl.eval_transform("flatten_pvt_tiny")
    for bad, match in [(torch.zeros(50, 60, 3, dtype=torch.uint8), "channels first"),
                       (torch.zeros(1, 1, 50, 60), r"\(3, H, W\)"),
                       (torch.zeros(50, 60), r"\(3, H, W\)"),
                       (torch.zeros(3, 50, 60, dtype=torch.int32), "int32"),
                       (torch.full((3, 50, 60), 255.0), "divide by 255"),
                       ([[0]], "PIL image")]:
        with pytest.raises(ValueError, match=match):
            t(bad)
    with pytest.raises(ValueError, match="lacks"):
        fl.eval_transform({"input_size": (3, 224, 224)})
    with pytest.raises(ValueError, match="registered name"):
        fl.eval_transform(42)


def test_transform_agrees_with_pil():
    """PIL, which the official pipeline runs, on the same uint8 image: Image.resize((256, 256),
    BICUBIC), the same crop, ToTensor's / 255. Pillow comes with matplotlib (requirements.txt)."""
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    image = photo_like(1, 301, 411, seed=4)[0]                                   # (3, H, W)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((256, 256), Image.BICUBIC)
    ref = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[:, 16:240, 16:240]
    ref = (ref.double() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    out = fl.eval_transform("flatten_pvt_tiny")(image)[0].double()
    levels = ((out - ref) * torch.tensor(STD).view(3, 1, 1) * 255).abs()        # in 1/255 steps
    assert levels.max() < 1.001 and levels.mean() < 0.01, \
        f"[PIL bicubic 301x411 -> 256 -> 224] max {levels.max():.3g}, mean {levels.mean():.3g} " \
        f"levels of 1/255"


def test_resize_sizes_round_as_torchvision():
    t = fl.eval_transform(dict(fl.pretrained_cfg("flatten_pvt_tiny"), crop_mode="center"))
    for (H, W), expected in {(300, 400): (256, 341), (400, 300): (341, 256), (256, 256): (256, 256),
                             (17, 1000): (256, 15058)}.items():
        assert t.resize_size(H, W) == expected, f"[center 224, image {H}x{W}] " \
                                                f"{t.resize_size(H, W)}, expected {expected}"
    assert math.floor(224 / (224 / 256)) == 256 and math.floor(384 / (224 / 256)) == 438
