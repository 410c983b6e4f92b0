"""Layer tables of real exported models, from every checkpoint format."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from kfac_cli.errors import KfacError
from kfac_cli.models.load import load_layer_table
from kfac_cli.models.table import FORMAT
from kfac_cli.ops.conv import ConvParams
from tests.conftest import run_cli
from tests.models import KFAC_MODULES, MLPStack, ResNetLike, write_model_files


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = ResNetLike()
    files = write_model_files(model, torch.randn(2, 3, 16, 16), tmp_path_factory.mktemp("cnn"))
    return model, files


def _strip(table_json: dict) -> dict:
    return {k: v for k, v in table_json.items() if k != "source"}


def test_pt2_table_matches_the_modules(cnn):
    model, files = cnn
    table = load_layer_table(files["pt2"])
    modules = {n: m for n, m in model.named_modules() if type(m) in KFAC_MODULES}
    assert [la.name for la in table.layers] == list(modules)
    for la in table.layers:
        m = modules[la.name]
        assert la.weight == f"{la.name}.weight"
        assert la.bias == (f"{la.name}.bias" if m.bias is not None else None)
        assert la.weight_shape == tuple(m.weight.shape)
        if isinstance(m, torch.nn.Linear):
            assert la.kind == "linear" and la.conv is None
            continue
        expected = ConvParams.create(
            m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode
        )
        c = la.conv
        assert (c.kernel_size, c.stride, c.dilation, c.groups, c.padding_mode) == (
            expected.kernel_size,
            expected.stride,
            expected.dilation,
            expected.groups,
            expected.padding_mode,
        ), la.name
        assert c.pads() == expected.pads(), la.name
    assert table.layer("same").conv.padding == "same"
    untreated = {u["name"] for u in table.untreated}
    assert untreated == {"bn.weight", "bn.bias"}
    assert "bn.running_mean" in table.buffers
    assert list(table.parameters) == [n for n, _ in model.named_parameters()]


def test_same_table_from_every_format(cnn, tmp_path):
    _, files = cnn
    pt2 = load_layer_table(files["pt2"])
    spec = tmp_path / "spec.json"
    proc = run_cli("layers", files["pt2"], "--json", check=True)
    spec.write_bytes(proc.stdout)
    assert json.loads(proc.stdout)["format"] == FORMAT
    pickled = load_layer_table(files["pickle"], unsafe_pickle=True)
    for other in (
        pickled,
        load_layer_table(files["safetensors"], spec),
        load_layer_table(files["pt"], spec),
    ):
        assert _strip(other.to_json())["layers"] == _strip(pt2.to_json())["layers"]
        assert other.parameters == pt2.parameters
        assert [u["name"] for u in other.untreated] == [u["name"] for u in pt2.untreated]


def test_sharded_state_dict_gives_the_same_table(cnn, tmp_path):
    _, files = cnn
    from safetensors.torch import load_file

    state = load_file(files["safetensors"])
    names = list(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single = load_layer_table(files["safetensors"])
    sharded = load_layer_table(index)
    assert sharded.parameters == single.parameters
    assert _strip(sharded.to_json()) == _strip(single.to_json())


def test_state_dict_without_spec_knows_no_hyper_parameters(cnn):
    _, files = cnn
    table = load_layer_table(files["safetensors"])
    assert table.layer("stem").conv is None
    with pytest.raises(KfacError, match="known conv hyper-parameters") as info:
        table.layer("stem").require_conv(files["safetensors"])
    assert info.value.fix == "spec"
    assert table.layer("head").kind == "linear"


def test_pickled_module_is_refused_without_the_flag(cnn):
    _, files = cnn
    with pytest.raises(KfacError, match="weights-only state dict") as info:
        load_layer_table(files["pickle"])
    assert info.value.fix == "unsafe_pickle"


def test_weight_shared_with_different_hyper_parameters_is_an_error(tmp_path):
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.nn.functional.conv2d(y, self.conv.weight, stride=2)

    path = tmp_path / "shared.pt2"
    torch.export.save(torch.export.export(Shared(), (torch.randn(1, 3, 8, 8),)), path)
    with pytest.raises(KfacError, match="different ones in calls"):
        load_layer_table(path)


def test_weight_used_twice_with_the_same_hyper_parameters_is_one_layer(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    path = tmp_path / "twice.pt2"
    torch.export.save(torch.export.export(Twice(), (torch.randn(2, 4),)), path)
    table = load_layer_table(path)
    assert len(table.layers) == 1 and table.layers[0].calls == 2


def test_mlp_stack_table(tmp_path):
    model = MLPStack()
    files = write_model_files(model, torch.randn(2, 5, 12), tmp_path)
    table = load_layer_table(files["pt2"])
    assert [la.name for la in table.layers] == [
        "blocks.0.0",
        "blocks.0.2",
        "blocks.1.0",
        "blocks.1.2",
        "out",
    ]
    assert table.layer("blocks.0.2").bias is None
    assert {u["name"] for u in table.untreated} == {"norm.weight", "norm.bias"}


@pytest.mark.parametrize("fmt", ["pt2", "safetensors", "pt"])
def test_layers_cli_formats(cnn, fmt):
    """Each layer of the --json table is a row of the printed one: its name, kind, weight
    shape, bias and canonical block size; every untreated parameter is listed."""
    _, files = cnn
    proc = run_cli("layers", files[fmt])
    assert proc.returncode == 0, proc.stderr
    table = json.loads(run_cli("layers", files[fmt], "--json", check=True).stdout)
    rows = {line.split()[0]: line.split() for line in proc.stdout.decode().splitlines()[3:]}
    for layer in table["layers"]:
        row = rows[layer["name"]]
        weight = "x".join(map(str, layer["weight_shape"]))
        assert row[1:4] == [layer["kind"], weight, "yes" if layer["bias"] else "no"], row
        assert int(row[-1]) == math.prod(layer["weight_shape"][1:]) * layer["weight_shape"][0] + (
            layer["weight_shape"][0] if layer["bias"] else 0
        )
    for untreated in table["untreated"]:
        assert f"  {untreated['name']} {untreated['shape']}" in proc.stdout.decode()


def test_layers_cli_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip at all")
    proc = run_cli("layers", bad)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: expected a torch.export")


def test_unknown_schema_version(cnn, tmp_path):
    import zipfile

    _, files = cnn
    out = tmp_path / "future.pt2"
    with zipfile.ZipFile(files["pt2"]) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("models/model.json"):
                doc = json.loads(data)
                doc["schema_version"] = {"major": 99, "minor": 0}
                data = json.dumps(doc).encode()
            dst.writestr(info, data)
    with pytest.raises(KfacError, match="major version 8"):
        load_layer_table(out)


def test_torch_force_no_weights_only_load_cannot_unlock_pickles(cnn, tmp_path):
    _, files = cnn
    proc = run_cli("layers", files["pickle"], env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 1
    assert b"weights-only" in proc.stderr
    assert os.path.exists(files["pickle"])


def test_layers_json_has_the_documented_fields(cnn):
    _, files = cnn
    doc = json.loads(run_cli("layers", files["pt2"], "--json", check=True).stdout)
    assert set(doc) == {
        "format",
        "version",
        "source",
        "layers",
        "untreated",
        "untreated_layers",
        "parameters",
        "aliases",
        "buffers",
    }
    assert doc["version"] == 2
    common = {"name", "kind", "weight", "bias", "weight_shape", "calls", "canonical_size"}
    common |= {"modules", "shared_with"}
    conv = common | {"kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"}
    for layer in doc["layers"]:
        assert set(layer) == (common if layer["kind"] == "linear" else conv), layer["name"]
    assert all(set(u) == {"name", "shape", "used_by"} for u in doc["untreated"])
    assert all(set(p) == {"name", "shape", "frozen"} for p in doc["parameters"])


def test_attention_and_embedding_with_a_dynamic_batch(tmp_path):
    """nn.MultiheadAttention's in_proj_weight is a linear layer; embeddings are untreated."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 16)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = self.emb(x)
            return self.fc(h + self.attn(h, h, h)[0])

    model = Block().eval()
    x = torch.randint(0, 10, (2, 5))
    batch = torch.export.Dim("batch", min=1, max=64)
    path = tmp_path / "block.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}), path)
    table = load_layer_table(path)
    assert [la.name for la in table.layers] == ["attn.in_proj", "attn.out_proj", "fc"]
    assert table.layer("attn.in_proj").bias == "attn.in_proj_bias"
    assert [u["name"] for u in table.untreated] == ["emb.weight"]
    save_file(
        {n: p.detach().clone() for n, p in model.state_dict().items()},
        tmp_path / "block.safetensors",
    )
    from_state_dict = load_layer_table(tmp_path / "block.safetensors")
    assert [la.name for la in from_state_dict.layers if la.name != "emb"] == [
        "attn.in_proj",
        "attn.out_proj",
        "fc",
    ]
