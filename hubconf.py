"""torch.hub entry points: one per name of flatten.list_models(), made from the registry.

    model = torch.hub.load("<owner>/<repo>", "flatten_swin_tiny", checkpoint=path,
                           normalizer="sum")

Each entry point is flatten.create_model(name, checkpoint=None, **overrides): checkpoint is the
path of a released official file (or any state dict), loaded strictly (use_ema=True: its EMA
weights); overrides replace config fields (img_size, num_classes, normalizer, ...).
torch.hub.list("<owner>/<repo>") lists them.
"""

import flatten as _flatten

dependencies = ["torch"]


def _entry_point(name: str):
    def entry_point(checkpoint=None, **overrides):
        return _flatten.create_model(name, checkpoint=checkpoint, **overrides)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"flatten.create_model({name!r}, checkpoint=None, **overrides): "
                           f"evaluation settings in model.pretrained_cfg.")
    return entry_point


globals().update({name: _entry_point(name) for name in _flatten.list_models()})
