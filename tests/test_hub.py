"""torch.hub: hubconf.py at the repository's top level has one entry point per registered name
and depends on torch alone; torch.hub.load(<repository>, name, source="local") builds every
registered model (on the meta device, one block a stage: no memory, little time) as
create_model does, and loads a checkpoint with overrides."""

import importlib.util

import pytest
import torch
from common import ROOT, seeded

import flatten as fl

pytestmark = pytest.mark.usefixtures("one_thread")


def shallow(name: str) -> dict:
    """One block a stage: the named model's family, widths, heads and sizes, few modules."""
    cfg_cls, base = fl.MODELS[name]
    cfg = cfg_cls(**base)
    return {"depths": (1,) * len(cfg.depths)} if hasattr(cfg, "depths") else {"depth": 1}


def test_hubconf_lists_every_registered_name_and_needs_torch_only():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    # torch.hub.list's rule: every public callable is an entry point
    entries = sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_"))
    assert entries == fl.list_models(), \
        f"[hubconf.py] entry points differ from list_models(): " \
        f"{sorted(set(entries) ^ set(fl.list_models()))}"
    assert hub.dependencies == ["torch"], f"[hubconf.py] dependencies {hub.dependencies}"
    for name in entries:
        assert name in getattr(hub, name).__doc__, f"[hubconf.py {name}] docstring"


@pytest.mark.parametrize("name", fl.list_models())
def test_hub_load_builds_every_model(name):
    kw = shallow(name)
    with torch.device("meta"):
        model = torch.hub.load(str(ROOT), name, source="local", num_classes=7, **kw)
        expected = fl.create_model(name, num_classes=7, **kw)
    case = f"[torch.hub.load {name} num_classes=7 {kw}]"
    assert type(model) is type(expected) and model.cfg == expected.cfg, f"{case}: {model.cfg}"
    assert model.pretrained_cfg == fl.pretrained_cfg(name), f"{case}: {model.pretrained_cfg}"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in expected.state_dict().items()}, f"{case}: weights"
    assert shapes["head.weight"] == (7, model.num_features), f"{case}: head {shapes['head.weight']}"


def test_hub_load_with_a_checkpoint(tmp_path):
    kw = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_classes=3)
    torch.manual_seed(0)
    saved = fl.create_model("flatten_pvt_v2_b0", **kw)
    path = tmp_path / "weights.pth"
    torch.save({"model": saved.state_dict()}, path)
    torch.manual_seed(1)
    model = torch.hub.load(str(ROOT), "flatten_pvt_v2_b0", source="local", checkpoint=str(path),
                           **kw).eval()
    x = seeded(1, 3, 64, 48, seed=2)
    with torch.no_grad():
        assert torch.equal(model(x), saved.eval()(x)), \
            "[torch.hub.load flatten_pvt_v2_b0 checkpoint=path] logits differ from the saved model"
    with pytest.raises(ValueError, match="no config field"):
        torch.hub.load(str(ROOT), "flatten_pvt_v2_b0", source="local", not_a_field=1)
