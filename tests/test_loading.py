"""Checkpoint loading: official-like files with pickled config objects (zip and legacy
formats), files that pickle code (refused, nothing runs), files that are not checkpoints,
containers and prefixes, mismatch messages, another num_classes, another input size.
"""

import argparse
import builtins
import os
import pickle
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from common import randomize, seeded

import flatten as fl

FORMATS = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def official_like_state_dict(model):
    """Our state dict with the official v1 extras: the never-applied final norm."""
    sd = dict(model.state_dict())
    if isinstance(model, fl.PyramidVisionTransformer) and model.cfg.version == 1:
        sd["norm.weight"] = torch.ones(model.num_features)
        sd["norm.bias"] = torch.zeros(model.num_features)
    return sd


def small_pvt():
    return fl.create_model("flatten_pvt_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=4)


def tiny_pvt():
    """small_pvt with narrow stages, where the widths do not matter."""
    return fl.create_model("flatten_pvt_tiny", img_size=64, depths=(1, 1, 1, 1),
                           embed_dims=(16, 32, 40, 64), num_classes=4)


def throwaway_config_class(module_name):
    """A config class like yacs' CfgNode (a dict with instance attributes), defined in a module
    that exists only while the checkpoint is written: the loading side cannot import it."""
    mod = types.ModuleType(module_name)

    class CfgNode(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = module_name, "CfgNode"
    mod.CfgNode = CfgNode
    return mod, CfgNode


@pytest.fixture(params=list(FORMATS), ids=list(FORMATS))
def official_like_checkpoint(request, tmp_path):
    """A file like the released ones: weights under 'model' next to optimizer state, an
    argparse Namespace and a pickled config object of a module the loading side lacks."""
    name = "throwaway_config_for_flatten_tests"
    mod, CfgNode = throwaway_config_class(name)
    model = randomize(small_pvt())
    cfg = CfgNode(MODEL=CfgNode(TYPE="flatten_pvt_tiny"), TRAIN=CfgNode(EPOCHS=300))
    path = tmp_path / f"ckpt_{request.param}.pth"
    sys.modules[name] = mod
    try:
        torch.save({"model": official_like_state_dict(model), "config": cfg, "epoch": 299,
                    "args": argparse.Namespace(lr=1e-3),
                    "optimizer": {"state": {}, "param_groups": []}},
                   path, _use_new_zipfile_serialization=FORMATS[request.param])
    finally:
        del sys.modules[name]
    return model, path, request.param, name


def test_official_like_file_loads_without_running_pickled_code(official_like_checkpoint):
    model, path, fmt, module_name = official_like_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what users hit with the released files
    x = seeded(1, 3, 64, 64)
    for how in ("load_pretrained", "create_model"):
        # the file looks released (a 'config' next to 'model') and the model has normalizer="mean"
        with pytest.warns(UserWarning, match='normalizer="sum"'):
            if how == "load_pretrained":
                m = small_pvt()
                fl.load_pretrained(m, path)
            else:
                m = fl.create_model("flatten_pvt_tiny", img_size=64, depths=(1, 1, 1, 1),
                                    num_classes=4, checkpoint=path)
        with torch.no_grad():
            assert torch.equal(m.eval()(x), model(x)), \
                f"[{fmt} file, {how}, input 1x3x64x64 seed=0]: outputs differ from the saved " \
                "model's"
    assert module_name not in sys.modules, f"[{fmt} file]: loading imported {module_name}"


# The released files were trained with normalizer="sum": loading one into "mean" layers warns

RELEASED_EXTRAS = {"config": {"MODEL": {"TYPE": "flatten_pvt"}}, "max_accuracy": 77.8,
                   "epoch": 299, "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_swin_tiny"])
@pytest.mark.parametrize("as_file", [False, True], ids=["dict", "file"])
def test_released_checkpoint_into_mean_layers_warns_once(tmp_path, name, as_file):
    src = fl.create_model(name, depths=(1, 1, 1, 1), num_classes=4)
    ckpt = {"model": official_like_state_dict(src), **RELEASED_EXTRAS}
    if as_file:
        torch.save(ckpt, tmp_path / "released.pth")
        ckpt = tmp_path / "released.pth"
    for how in ("create_model", "load_pretrained"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if how == "create_model":
                fl.create_model(name, depths=(1, 1, 1, 1), num_classes=4, checkpoint=ckpt)
            else:
                fl.load_pretrained(fl.create_model(name, depths=(1, 1, 1, 1), num_classes=4),
                                   ckpt)
        found = [w for w in caught if issubclass(w.category, UserWarning)]
        msgs = [str(w.message) for w in found]
        case = f"[{name}, released-style checkpoint {'file' if as_file else 'dict'}, " \
               f"mean layers, {how}]"
        assert len(msgs) == 1, f"{case}: {len(msgs)} warnings, expected one: {msgs}"
        assert 'normalizer="sum"' in msgs[0] and 'normalizer="mean"' in msgs[0], \
            f"{case}: {msgs[0]}"
        assert Path(found[0].filename).resolve() == Path(__file__).resolve(), \
            f"{case}: the warning points at {found[0].filename}:{found[0].lineno}, not the caller"


NO_WARNING = {  # what is loaded, into a model with which normaliser
    "state-dict": (lambda sd: sd, "mean"),
    "own-training-loop": (lambda sd: {"model": sd, "epoch": 3, "optimizer": {}}, "mean"),
    "released-into-sum": (lambda sd: {"model": sd, **RELEASED_EXTRAS}, "sum"),
    "released-into-softmax": (lambda sd: {"model": sd, **RELEASED_EXTRAS}, None),
}


@pytest.mark.parametrize("kind", list(NO_WARNING))
def test_no_normalizer_warning_otherwise(kind):
    wrap, normalizer = NO_WARNING[kind]
    name = "pvt_tiny" if normalizer is None else "flatten_pvt_tiny"
    kw = {"depths": (1, 1, 1, 1), "num_classes": 4, "normalizer": normalizer or "mean"}
    sd = official_like_state_dict(fl.create_model(name, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.create_model(name, checkpoint=wrap(sd), **kw)


# -----------------------------------------------------------------------------
# Files that pickle code: refused, and nothing from them runs

# name in the message, and a callable with arguments whose execution leaves the marker file
CODE = {
    "builtins.eval": lambda marker: (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
    "os.system": lambda marker: (os.system, (f"touch '{marker}'",)),
}
REFUSED_NAMES = {"builtins.eval": r"builtins\.eval", "os.system": r"(os|posix|nt)\.system"}


def code_checkpoint(tmp_path, code, fmt):
    marker = tmp_path / f"ran_{fmt}_{code}"

    class Payload:
        def __reduce__(self):
            return CODE[code](marker)

    path = tmp_path / f"evil_{fmt}_{code.replace('.', '_')}.pth"
    weights = fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)).state_dict()
    torch.save({"model": weights, "x": Payload()}, path,
               _use_new_zipfile_serialization=FORMATS[fmt])
    return path, marker


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("code", list(CODE))
def test_file_pickling_code_is_refused_and_nothing_runs(tmp_path, code, fmt):
    path, marker = code_checkpoint(tmp_path, code, fmt)
    for how in ("load_pretrained", "create_model"):
        case = f"[{fmt} file pickling {code}, {how}]"
        with pytest.raises(ValueError) as err:
            if how == "load_pretrained":
                fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)), path)
            else:
                fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1), checkpoint=path)
        assert str(path) in str(err.value) and "expected" in str(err.value), \
            f"{case}: the message does not name the file and what was expected: {err.value}"
        assert not marker.exists(), f"{case}: the pickled {code} ran"


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("code", list(CODE))
def test_refusal_names_the_refused_global(tmp_path, code, fmt):
    path, marker = code_checkpoint(tmp_path, code, fmt)
    with pytest.raises(ValueError) as err:
        fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)), path)
    msg = str(err.value)
    case = f"[{fmt} file pickling {code}]"
    assert str(path) in msg, f"{case}: the message does not name the file: {msg}"
    assert "refused" in msg and "expected" in msg, \
        f"{case}: the message does not say it refused the file and what was expected: {msg}"
    assert re.search(REFUSED_NAMES[code], msg), f"{case}: the message does not name {code}: {msg}"
    assert not marker.exists(), f"{case}: the pickled {code} ran"


# -----------------------------------------------------------------------------
# Files that are not checkpoints: one ValueError naming the file and what was expected


def write_empty(path):
    path.write_bytes(b"")


def write_text(path):
    path.write_text("model weights: see the release page\n")


def write_list(path):
    torch.save([1, 2], path)


def write_tensorless_dict(path):
    torch.save({"epoch": 3, "note": "no weights"}, path)


NOT_CHECKPOINTS = {
    "empty": (write_empty, r"the file is empty; expected a file saved with torch\.save"),
    "text": (write_text, r"expected a file saved with torch\.save"),
    "list": (write_list, r"holds a list; expected a state dict"),
    "no-tensors": (write_tensorless_dict, r"no tensors found"),
}


def load_small_model(how: str, path) -> None:
    """Load path into a small FLatten-PVTv2 through load_pretrained or create_model."""
    if how == "load_pretrained":
        fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)), path)
    else:
        fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1), checkpoint=path)


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_file_that_is_not_a_checkpoint_raises_one_value_error(tmp_path, kind):
    write, expected = NOT_CHECKPOINTS[kind]
    path = tmp_path / f"{kind}.pth"
    write(path)
    for how in ("load_pretrained", "create_model"):
        with pytest.raises(ValueError, match=expected) as err:
            load_small_model(how, path)
        assert str(path) in str(err.value), \
            f"[{kind} file, {how}]: the file is not named: {err.value}"


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    path = tmp_path / "no_such_checkpoint.pth"
    for how in ("load_pretrained", "create_model"):
        with pytest.raises(FileNotFoundError) as err:
            load_small_model(how, path)
        assert str(path) in str(err.value), \
            f"[missing file, {how}]: the file is not named: {err.value}"


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_says_truncated_in_whole_sentences(tmp_path, fmt, keep):
    """A download cut short: the message says so, and torch's reason is not cut mid-sentence
    (it was cut at 200 characters, before its word "corrupted")."""
    full, path = tmp_path / "full.pth", tmp_path / f"truncated_{fmt}.pth"
    model = fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1))
    torch.save({"model": model.state_dict()}, full, _use_new_zipfile_serialization=FORMATS[fmt])
    data = full.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    for how in ("load_pretrained", "create_model"):
        case = f"[{fmt} file cut to {keep:.1%} of {len(data)} bytes, {how}]"
        with pytest.raises(ValueError) as err:
            load_small_model(how, path)
        msg = str(err.value)
        assert str(path) in msg, f"{case}: the file is not named: {msg}"
        assert "truncated or corrupted" in msg and "expected a file saved with torch.save" in msg, \
            f"{case}: the message does not say the file is truncated and what was expected: {msg}"
        assert msg.endswith(".)"), f"{case}: torch's reason is cut mid-sentence: {msg}"


def test_directory_raises_is_a_directory_naming_it(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"")
    for how in ("load_pretrained", "create_model"):
        with pytest.raises(IsADirectoryError) as err:
            load_small_model(how, tmp_path)
        msg = str(err.value)
        assert str(tmp_path) in msg and "is a directory" in msg and "checkpoint file" in msg, \
            f"[a directory, {how}]: the message does not name it and say what was expected: {msg}"


NOT_PATHS = {  # what load_pretrained is given -> how the message names it
    "tensor": (lambda tmp: torch.zeros(3), r"checkpoint is a tensor of shape \(3,\)"),
    "open-file": (lambda tmp: open(tmp / "w.pth", "rb"),
                  r"checkpoint is an open file object \(BufferedReader\).*: pass its path"),
    "int": (lambda tmp: 3, r"checkpoint is 3 \(of type int\)"),
    "module": (lambda tmp: fl.DWConv(4), r"checkpoint is a module \(DWConv\).*state_dict\(\)"),
}


@pytest.mark.parametrize("kind", list(NOT_PATHS))
def test_checkpoint_neither_path_nor_dict_raises_one_value_error(tmp_path, kind):
    torch.save(fl.DWConv(4).state_dict(), tmp_path / "w.pth")
    make, given = NOT_PATHS[kind]
    obj = make(tmp_path)
    try:
        for how in ("load_pretrained", "create_model"):
            with pytest.raises(ValueError, match=given) as err:
                load_small_model(how, obj)
            assert re.search(r"expected the path of a checkpoint file \(a str or os\.PathLike\) "
                             r"or a state dict", str(err.value)), \
                f"[checkpoint={kind}, {how}]: the message does not say what was expected: " \
                f"{err.value}"
    finally:
        if hasattr(obj, "close"):
            obj.close()


# -----------------------------------------------------------------------------
# State dicts: containers, prefixes, mismatches, another num_classes, another input size


def test_containers_and_prefixes():
    src = randomize(fl.create_model("flatten_pvt_v2_b0", num_classes=5, depths=(1, 1, 1, 1)))
    sd = src.state_dict()
    containers = {"model": {"model": sd}, "state_dict": {"state_dict": sd},
                  "model_ema": {"model_ema": sd}, "bare": sd,
                  "module.-prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
                  "_orig_mod.-prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
                  "compiled DDP": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}
    for what, ckpt in containers.items():
        m = fl.create_model("flatten_pvt_v2_b0", num_classes=5, depths=(1, 1, 1, 1))
        fl.load_pretrained(m, ckpt)
        differ = [k for k, v in sd.items() if not torch.equal(m.state_dict()[k], v)]
        assert not differ, f"[{what} checkpoint dict]: tensors not loaded: {differ}"


def test_mismatch_lists_missing_and_unexpected_keys_and_shapes():
    sd = dict(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)).state_dict())
    sd.pop("block1.0.attn.q.weight")
    sd["block9.0.foo"] = torch.zeros(1)
    sd["patch_embed1.proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)), sd)
    msg = str(err.value)
    for part in ("missing keys (1): block1.0.attn.q.weight", "unexpected keys (1): block9.0.foo",
                 "patch_embed1.proj.bias: checkpoint (7,) vs model (32,)"):
        assert part in msg, f"[flatten_pvt_v2_b0 state dict, edited]: '{part}' not in: {msg}"


def test_checkpoint_of_another_model_says_so_first_and_stays_short():
    """A FLatten-PVT-T state dict into FLatten-Swin-T listed every key (10,000 characters):
    now how many tensors match first, and at most 20 keys per list."""
    sd = fl.create_model("flatten_pvt_tiny").state_dict()
    with pytest.raises(ValueError) as err:
        fl.load_pretrained(fl.create_model("flatten_swin_tiny"), sd)
    msg = str(err.value)
    case = "[flatten_pvt_tiny state dict into flatten_swin_tiny]"
    assert re.search(r"does not fit SwinTransformer: \d+ of its \d+ tensors match \(a checkpoint "
                     r"of another model\?\)", msg), f"{case}: {msg[:300]}"
    assert "more" in msg and len(msg) < 3000, f"{case}: {len(msg)} characters"


def test_a_path_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    m = fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1))
    torch.save(m.state_dict(), tmp_path / "w.pth")
    fl.load_pretrained(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)), "~/w.pth")


@pytest.mark.parametrize("num_classes", [0, 10])
def test_head_kept_for_another_num_classes(num_classes):
    src = randomize(fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1)))
    m = fl.create_model("flatten_pvt_v2_b0", depths=(1, 1, 1, 1), num_classes=num_classes)
    own_head = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("head.")}
    with pytest.warns(UserWarning, match=rf"classifier of the checkpoint dict \(1000 classes\) "
                      rf"does not fit PyramidVisionTransformer's \(num_classes={num_classes}\): "
                      r"the model keeps its own"):
        fl.load_pretrained(m, src.state_dict())
    loaded = m.state_dict()
    case = f"[1000-class checkpoint into num_classes={num_classes}]"
    assert all(torch.equal(loaded[k], v) for k, v in own_head.items()), f"{case}: head replaced"
    differ = [k for k, v in src.state_dict().items()
              if not k.startswith("head.") and not torch.equal(loaded[k], v)]
    assert not differ, f"{case}: tensors not loaded: {differ}"


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_deit_tiny"])
def test_weights_for_224_load_into_a_model_built_at_another_size(name):
    """The position tables are resampled at loading as the 224 model resamples them on the
    fly: the same outputs at the new size (non-square here)."""
    small = {"depth": 2} if "deit" in name else {"depths": (1, 1, 1, 1)}
    m224 = randomize(fl.create_model(name, **small), std=0.02)
    other = fl.create_model(name, img_size=(320, 448), **small)
    fl.load_pretrained(other, {"model": official_like_state_dict(m224)})
    x = seeded(1, 3, 320, 448, seed=14)
    with torch.no_grad():
        a, b = other.eval()(x), m224(x)
    assert torch.equal(a, b), \
        f"[{name} 224 weights built at 320x448, input 1x3x320x448 seed=14]: max |diff| " \
        f"{(a - b).abs().max():.3g}"


def test_sr_ratio_tables_load_to_their_key_grid():
    """Focused linear layers with sr_ratio 2 keep their table on the key grid (floor(H / 2) x
    floor(W / 2)): the 64 x 64 weights, loaded into the model built at 48 x 80, are resampled
    from the square key grids 8x8, 4x4, 2x2 to 6x10, 3x5, 1x2, and the model equals the 64 model
    at 48 x 80 bit for bit (which resamples on the fly)."""
    kw = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), la_sr_ratios=(2, 2, 2, 1),
              num_classes=4)
    m64 = randomize(fl.create_model("flatten_pvt_tiny", img_size=64, **kw), std=0.02)
    other = fl.create_model("flatten_pvt_tiny", img_size=(48, 80), **kw)
    fl.load_pretrained(other, m64.state_dict())
    case = "[flatten_pvt_tiny la_sr_ratios (2, 2, 2, 1), 64 weights built at 48x80]"
    rows = [other.get_submodule(f"block{i}.0.attn").positional_encoding.shape[1]
            for i in range(1, 5)]
    assert rows == [6 * 10, 3 * 5, 1 * 2, 1 * 2], \
        f"{case}: table rows {rows}, expected the key grids 6x10, 3x5, 1x2 and the 1x2 grid"
    x = seeded(1, 3, 48, 80, seed=15)
    with torch.no_grad():
        a, b = other.eval()(x), m64(x)
    assert torch.equal(a, b), \
        f"{case}, input 1x3x48x80 seed=15: max |diff| {(a - b).abs().max():.3g}"


def test_module_prefix_is_dropped_only_when_every_key_has_it():
    """A 'module.' prefix (DistributedDataParallel) goes when every tensor key has it; a state
    dict with one such key among others keeps its keys (here an extra key, left out)."""
    m = tiny_pvt()
    sd = dict(m.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fl.load_pretrained(m, {**sd, "module.extra": torch.zeros(1)}, strict=False)
    case = "[small PVT state dict + 'module.extra', strict=False]"
    assert result.unexpected_keys == ["module.extra"] and not result.missing_keys, \
        f"{case}: {result}, warnings {[str(w.message)[:200] for w in caught]}"


# -----------------------------------------------------------------------------
# The weights and the EMA weights of one file; strict=False; a pickled module


def two_weight_sets():
    """Two different weight sets of one small model: the raw and the EMA weights of a file."""
    raw = randomize(small_pvt(), seed=1).state_dict()
    ema = randomize(small_pvt(), seed=2).state_dict()
    return raw, ema


def loaded_from(checkpoint, **kwargs):
    m = small_pvt()
    fl.load_pretrained(m, checkpoint, **kwargs)
    return m.state_dict()


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ema_key", ["model_ema", "state_dict_ema"])
@pytest.mark.parametrize("ema_first", [False, True], ids=["model-first", "ema-first"])
def test_model_weights_by_default_ema_weights_on_request(ema_key, ema_first):
    """A file with both (the released L2ViT 'best-ema' files: 'model' and 'model_ema'; the
    FLatten-CSwin ones: 'model' and 'state_dict_ema') loads 'model' whatever the key order, and
    the EMA copy with use_ema=True (load_pretrained and create_model)."""
    raw, ema = two_weight_sets()
    items = [("model", raw), (ema_key, ema), ("epoch", "best-ema")]
    ckpt = dict(reversed(items) if ema_first else items)
    case = f"[file with 'model' and {ema_key!r}, {'EMA' if ema_first else 'model'} first]"
    assert same_weights(loaded_from(ckpt), raw), f"{case}: default did not load 'model'"
    assert same_weights(loaded_from(ckpt, use_ema=True), ema), f"{case}: use_ema=True"
    m = fl.create_model("flatten_pvt_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=4,
                        checkpoint=ckpt, use_ema=True)
    assert same_weights(m.state_dict(), ema), f"{case}: create_model(use_ema=True)"


def test_model_is_taken_before_state_dict():
    """The documented order of the containers: 'model', then 'state_dict', whatever the order
    of the file's keys."""
    raw, other = (randomize(tiny_pvt(), seed=s).state_dict() for s in (1, 2))
    for items in ([("model", raw), ("state_dict", other)], [("state_dict", other), ("model", raw)]):
        m = tiny_pvt()
        fl.load_pretrained(m, dict(items))
        assert same_weights(m.state_dict(), raw), \
            f"[file with {[k for k, _ in items]}]: not the 'model' weights"


def test_use_ema_without_ema_weights_says_so(tmp_path):
    raw, _ = two_weight_sets()
    for ckpt in ({"model": raw, "epoch": 3}, raw):
        with pytest.raises(ValueError, match=r"use_ema=True but .* holds no EMA weights \(no "
                                             r"'model_ema' or 'state_dict_ema'"):
            loaded_from(ckpt, use_ema=True)


def test_strict_false_loads_what_fits_and_warns_what_it_left_out():
    """Never torch's RuntimeError (25,000 characters for a checkpoint of another model): the
    tensors that fit load, the rest is named in one warning."""
    raw, _ = two_weight_sets()
    sd = dict(raw)
    sd.pop("block1.0.attn.q.weight")
    sd["block9.0.foo"] = torch.zeros(1)
    sd["patch_embed1.proj.bias"] = torch.zeros(7)
    m = small_pvt()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fl.load_pretrained(m, sd, strict=False)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and caught[0].filename == __file__, \
        f"[strict=False, edited state dict]: expected one warning at the caller, got {msgs}"
    for part in ("missing keys (1): block1.0.attn.q.weight", "unexpected keys (1): block9.0.foo",
                 "patch_embed1.proj.bias: checkpoint (7,) vs model (64,)"):
        assert part in msgs[0], f"[strict=False]: '{part}' not in: {msgs[0]}"
    now = m.state_dict()
    assert torch.equal(now["patch_embed1.proj.bias"], before["patch_embed1.proj.bias"])
    assert torch.equal(now["block1.0.attn.q.weight"], before["block1.0.attn.q.weight"])
    differ = [k for k in sd if k in now and k != "patch_embed1.proj.bias"
              and not torch.equal(now[k], sd[k])]
    assert not differ, f"[strict=False]: tensors that fit were not loaded: {differ}"
    # a tensor of another shape is left out, so the model misses it
    assert sorted(result.missing_keys) == ["block1.0.attn.q.weight", "patch_embed1.proj.bias"], \
        result
    assert result.unexpected_keys == ["block9.0.foo"], result


def test_strict_false_with_a_checkpoint_of_another_model_stays_short():
    sd = fl.create_model("flatten_pvt_tiny", depths=(1, 1, 1, 1)).state_dict()
    m = fl.create_model("flatten_swin_tiny", depths=(1, 1, 1, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fl.load_pretrained(m, sd, strict=False)
    caught = [w for w in caught if "strict=False" in str(w.message)]
    msg = str(caught[0].message)
    assert len(caught) == 1 and "more" in msg and len(msg) < 3000, \
        f"[flatten_pvt_tiny into flatten_swin_tiny, strict=False]: {len(msg)} characters"


def test_strict_false_that_fits_does_not_warn():
    raw, _ = two_weight_sets()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_weights(loaded_from(raw, strict=False), raw)


@pytest.mark.parametrize("what", ["module", "module in a dict"])
def test_pickled_module_says_to_save_the_state_dict(tmp_path, what):
    m = small_pvt()
    path = tmp_path / "whole_model.pth"
    torch.save(m if what == "module" else {"model": m, "epoch": 1}, path)
    with pytest.raises(ValueError) as err:
        fl.load_pretrained(small_pvt(), path)
    msg = str(err.value)
    assert "pickled module" in msg and "model.state_dict()" in msg and str(path) in msg, \
        f"[torch.save of a {what}]: {msg}"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_numpy_objects_beside_the_weights_load(tmp_path, fmt):
    """A numpy scalar (a best accuracy), an array and numpy's RNG state next to the weights: read as
    the numpy objects they are (torch's allowlist for them), not refused as 'not a checkpoint';
    an object array holding a function is still refused."""
    np = pytest.importorskip("numpy")
    raw, _ = two_weight_sets()
    path = tmp_path / "with_numpy.pth"
    torch.save({"model": raw, "best_acc1": np.float64(77.8), "hist": np.arange(3),
                "rng": np.random.get_state()}, path,
               _use_new_zipfile_serialization=FORMATS[fmt])
    assert same_weights(loaded_from(path), raw), f"[{fmt} file with numpy objects]"
    torch.save({"model": raw, "hooks": np.array([os.system], dtype=object)}, path,
               _use_new_zipfile_serialization=FORMATS[fmt])
    with pytest.raises(ValueError, match=r"refused to load .*(os|posix)\.system"):
        loaded_from(path)
