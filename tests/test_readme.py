"""The README's Python examples run as written, in order, in one namespace (an official-style
checkpoint file stands in for the released one they load)."""

import os
import re
import sys
import types

import torch
from common import ROOT, assert_close

import analysis
import flatten as fl


def write_official_style_checkpoint(path):
    """What the released FLatten-PVT-T file holds: the weights under 'model' (with the official
    final norm, never applied) next to optimizer state and a pickled config object."""
    module = types.ModuleType("yacs_like_config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = module.__name__, "CfgNode"
    module.CfgNode = CfgNode
    sys.modules[module.__name__] = module
    try:
        torch.manual_seed(0)
        sd = fl.create_model("flatten_pvt_tiny").state_dict()
        sd.update({"norm.weight": torch.ones(512), "norm.bias": torch.zeros(512)})
        config = CfgNode(MODEL=CfgNode(TYPE="flatten_pvt", NAME="flatten_pvt_tiny"))
        torch.save({"model": sd, "optimizer": {}, "epoch": 299, "config": config}, path)
    finally:
        del sys.modules[module.__name__]
    return sd


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2, "the README has no Python examples"
    sd = write_official_style_checkpoint(tmp_path / "flatten_pvt_t.pth")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    before = fl.get_fast_path()
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    finally:
        fl.set_fast_path(before)
    ns = types.SimpleNamespace(**namespace)
    assert ns.logits.shape == (1, 1000) and torch.isfinite(ns.logits).all()
    assert [tuple(m.shape) for m in ns.maps] == [(1, 64, 200, 304), (1, 128, 100, 152),
                                                  (1, 320, 50, 76), (1, 512, 25, 38)]
    assert torch.equal(ns.model.patch_embed1.proj.weight, sd["patch_embed1.proj.weight"])
    assert ns.y.shape == (2, 2400, 64)
    # the cross-attention example: (B, N, dim) from queries and a context of another length
    assert ns.out.shape == (2, 100, 64)
    explicit = analysis.linear_attention_matrix(ns.q, ns.k) @ ns.v           # (B, h, N, d)
    assert_close(ns.out, explicit.transpose(1, 2).flatten(2), "[README cross-attention] output",
                 1e-5, 1e-6)
    assert os.getcwd() == str(tmp_path)
