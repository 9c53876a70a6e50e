"""The README's Python examples run as written, in order, in one namespace (an official-style
checkpoint file stands in for the released one they load); its numbers and commands are the
project's."""

import json
import os
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from common import DATA, ROOT, assert_close

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


def write_photo(path) -> torch.Tensor:
    """A JPEG of 300 x 420 pixels (smooth colours, hard edges) where the README reads its photo;
    returns the (3, H, W) uint8 image as the JPEG decoder gives it back."""
    Image = pytest.importorskip("PIL.Image")  # Pillow comes with matplotlib (requirements.txt)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 300), torch.linspace(0, 1, 420), indexing="ij")
    rgb = torch.stack([yy, xx, ((xx * 9).floor() % 2) * 0.5 + 0.25 * yy], dim=-1)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(path, quality=95)
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2, "the README has no Python examples"
    sd = write_official_style_checkpoint(tmp_path / "flatten_pvt_t.pth")
    photo = write_photo(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    before = fl.get_fast_path()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, code in enumerate(blocks):
                exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    finally:
        fl.set_fast_path(before)
    ns = types.SimpleNamespace(**namespace)
    ours = [str(w.message) for w in caught if w.filename == fl.__file__ or "normalizer" in
            str(w.message)]
    assert not ours, f"the README's examples warn: {ours}"
    assert ns.num_params == 35_362_280, f"FLatten-PVT-T at 1024: {ns.num_params} parameters"
    assert ns.logits.shape == (1, 1000) and torch.isfinite(ns.logits).all()
    assert [tuple(m.shape) for m in ns.maps] == [(1, 64, 200, 304), (1, 128, 100, 152),
                                                  (1, 320, 50, 76), (1, 512, 25, 38)]
    assert ns.final.shape == (1, 25 * 38, 512), f"final features {tuple(ns.final.shape)}"
    assert (ns.c3.shape, ns.c4.shape) == ((1, 128, 32, 40), (1, 320, 16, 20)), \
        f"stop_early maps {tuple(ns.c3.shape)}, {tuple(ns.c4.shape)}"
    assert ns.strides == [(64, 4), (128, 8), (320, 16), (512, 32)], ns.strides
    # the one-image example: the photo through the official evaluation, into the checkpoint
    assert torch.equal(ns.image, photo), "the README's image is not the photo file's pixels"
    with torch.no_grad():
        expected = ns.classifier(fl.eval_transform("flatten_pvt_tiny")(photo)).softmax(-1)
    assert ns.probs.shape == (1, 1000) and torch.equal(ns.probs, expected), "probs"
    assert torch.equal(ns.top5.indices, expected.topk(5).indices), "top-5"
    assert ns.classifier.pretrained_cfg["official_config"] == "cfgs/flatten_pvt_t.yaml"
    assert torch.equal(ns.hub_model.patch_embed1.proj.weight, sd["patch_embed1.proj.weight"])
    assert ns.hub_model.block1[0].attn.normalizer == "sum", "torch.hub overrides"
    assert ns.p5.shape == (2, 256, 25, 38) and ns.p4.shape == (2, 256, 49, 75), \
        f"FocusedLinearAttention2d: {tuple(ns.p5.shape)}, {tuple(ns.p4.shape)}"
    assert torch.equal(ns.model.patch_embed1.proj.weight, sd["patch_embed1.proj.weight"])
    assert ns.y.shape == (2, 2400, 64)
    # the cross-attention example: (B, N, dim) from queries and contexts of other lengths, the
    # second padded: each is the explicit matrix of its real keys alone
    assert ns.out.shape == (2, 100, 64)
    lengths = (~ns.padding).sum(-1).tolist()
    assert lengths == [77, 50], f"[README cross-attention] context lengths {lengths}"
    for b, L in enumerate(lengths):
        explicit = analysis.linear_attention_matrix(ns.q[b:b + 1], ns.k[b:b + 1, :, :L]) \
            @ ns.v[b:b + 1, :, :L]                                            # (1, h, N, d)
        assert_close(ns.out[b:b + 1], explicit.transpose(1, 2).flatten(2),
                     f"[README cross-attention, context {b} of {L} keys] output", 1e-5, 1e-6)
    assert os.getcwd() == str(tmp_path)


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_has_no_placeholders():
    found = re.findall(r"<[^<>\n]*>", readme())
    assert not found, f"placeholders in README.md: {found}"


def test_readme_parameter_counts_are_exact():
    """The 1,024² example, and FLatten-PVT against the official counts (tests/data manifests;
    tests/test_official.py holds ours + the 1,024 of the dropped norm equal to them)."""
    text = " ".join(readme().split())
    at_1024, at_224 = (int(n.replace(",", "")) for n in re.search(
        r"grows with img_size: ([\d,]+) here, ([\d,]+) at 224", text).groups())
    built = fl.create_model("flatten_pvt_tiny")
    assert at_224 == sum(p.numel() for p in built.parameters()), f"README: {at_224} at 224"
    assert at_1024 == 35_362_280, f"README: {at_1024} at 1024 (the example checks the count)"
    m = re.search(r"FLatten-PVT-T / S / M / L have ([\d,]+) / ([\d,]+) / ([\d,]+) / ([\d,]+) "
                  r"parameters, 1,024 fewer than the official ([\d,]+) / ([\d,]+) / ([\d,]+) / "
                  r"([\d,]+)", text)
    assert m, "README: the FLatten-PVT parameter sentence is missing"
    counts = [int(n.replace(",", "")) for n in m.groups()]
    for size, ours, official in zip(("tiny", "small", "medium", "large"), counts[:4], counts[4:]):
        manifest = json.loads((DATA / f"manifest_flatten_pvt_{size}.json").read_text())
        assert official == manifest["num_parameters"], \
            f"flatten_pvt_{size}: README official {official}, manifest {manifest['num_parameters']}"
        assert official - ours == 1024, f"flatten_pvt_{size}: README {ours} vs {official}"
        row = re.search(r"\| flatten_pvt_tiny / small / medium / large \| ([^|]+)\|", text)
        shown = row.group(1).split(" / ")[["tiny", "small", "medium", "large"].index(size)]
        assert shown.strip() == f"{ours / 1e6:.2f}M" == f"{official / 1e6:.2f}M", \
            f"flatten_pvt_{size}: the table shows {shown}"
    assert counts[0] == at_224, "the two FLatten-PVT-T counts of the README differ"


def test_readme_names_the_command_of_its_model_ratios():
    """The whole-model ratios come from the canonical run: its command, without the output
    flags, as results/README.md gives it."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "results" / "README.md").read_text(), re.S)
    command = " ".join(block.group(1).replace("\\\n", " ").split())
    command = re.sub(r" --(json|csv|plot) \S+| > \S+", "", command)
    text = " ".join(readme().replace("\\\n", " ").split())
    assert command in text and "FLatten-Swin-T against Swin-T" in text, \
        f"README does not name {command!r} with the model ratios"


def test_readme_maps_the_released_checkpoints_to_models():
    section = readme().split("**The released checkpoints.**")[1].split("\n\n")[1]
    names = re.findall(r"\| `(\w+)` \|$", section, re.M)
    configs = re.findall(r"`cfgs/(\w+)\.yaml`", section)
    assert len(configs) == len(names) == 7, f"7 released files, 7 models: {section}"
    unknown = [n for n in names if n not in fl.MODELS]
    assert not unknown, f"README maps released files to unknown models {unknown}"


# -----------------------------------------------------------------------------
# The benchmark figures of README.md and docs/fast-paths.md are those of results/

LAYERS = {"DeiT-T": "DeiT-T layer", "PVT stage 1": "FLatten-PVT stage-1 layer",
          "FLatten-PVT stage 1": "FLatten-PVT stage-1 layer"}


def canonical_layer_rows() -> dict:
    """results/cpu_float32.txt's layer tables: {(table title start, N): {method: cells}}."""
    rows, title = {}, None
    for line in (ROOT / "results" / "cpu_float32.txt").read_text().splitlines():
        if line.startswith("Attention layer: "):
            title = line[len("Attention layer: "):]
        elif title and re.match(r"\| \d+ +\| \d+ ", line):
            cells = [c.strip() for c in line.strip("|").split("|")]
            method = re.sub(r" \[.*\]", "", cells[2])
            rows.setdefault((title, int(cells[1])), {})[method] = cells
    return rows


def layer_row(rows: dict, layer: str, n: str) -> dict:
    """The methods' cells of the canonical run at a README layer name and token count."""
    return next(methods for (title, tokens), methods in rows.items()
                if title.startswith(LAYERS[layer]) and tokens == int(n.replace(",", "")))


def first(cell: str) -> str:
    """A time cell's median, with its noise mark: "31.8 (100)?" -> "31.8?"."""
    return cell.split(" (")[0] + ("?" if cell.endswith("?") else "")


def test_readme_benchmark_table_is_the_canonical_run():
    rows = canonical_layer_rows()
    table = readme().split("| layer | N | ours, ms fwd / fwd+bwd |")[1].split("\n\n")[0]
    checked = 0
    for line in table.splitlines()[2:]:
        layer, n, ms, sdpa, official, mib = [c.strip() for c in line.strip("|").split("|")]
        got = layer_row(rows, layer, n)
        ours, soft, off = (got[m] for m in ("focused linear (ours)", "softmax, SDPA",
                                             "focused linear, official"))
        case = f"[README benchmark row {layer} N={n}]"
        assert ms == f"{first(ours[3])} / {first(ours[4])}", f"{case} ms: {ms} vs {ours[3:5]}"
        assert sdpa in ("not run", ours[8]), f"{case} vs SDPA: {sdpa} vs {ours[8]}"
        assert sdpa != "not run" or ours[8] == "-", f"{case}: 'not run' but results have {ours[8]}"
        assert official == ours[9], f"{case} vs official: {official} vs {ours[9]}"
        assert mib == f"{ours[6]} / {soft[6]} / {off[6]}", \
            f"{case} MiB: {mib} vs {ours[6]} / {soft[6]} / {off[6]}"
        checked += 1
    assert checked == 6, f"README benchmark table: {checked} rows checked, expected 6"


def test_fast_paths_doc_against_official_is_the_canonical_run():
    rows = canonical_layer_rows()
    doc = (ROOT / "docs" / "fast-paths.md").read_text()
    table = doc.split("| layer | N | vs official |")[1].split("\n\n")[0]
    for line in table.splitlines()[2:]:
        layer, ns, ratios, mib = [c.strip() for c in line.strip("|").split("|")]
        for n, ratio, pair in zip(ns.split(" / "), ratios.split(", "), mib.split(", ")):
            got = layer_row(rows, layer, n)
            ours, off = got["focused linear (ours)"], got["focused linear, official"]
            case = f"[docs/fast-paths.md {layer} N={n}]"
            assert ratio == ours[9], f"{case}: {ratio} vs {ours[9]}"
            assert pair == f"{ours[6]} / {off[6]}", f"{case}: {pair} vs {ours[6]} / {off[6]}"
