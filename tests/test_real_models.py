"""Models as people have them: tied heads, computed weights, frozen parameters, BatchNorm
state dicts; each exported with torch.export and recorded with forward hooks."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from kfac_cli.models.load import load_layer_table
from kfac_cli.ops.patches import layer_patches
from kfac_cli.record import record
from tests.conftest import invoke, run_cli
from tests.models import (
    BNNet,
    ComputedWeights,
    PaddedOutside,
    SharedPart,
    TinyGPT,
    hook_dump,
)


def _export(model, inputs, folder):
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, inputs), pt2)
    acts = folder / "acts.safetensors"
    save_file(hook_dump(model, *inputs), acts)
    spec = folder / "spec.json"
    spec.write_bytes(invoke("layers", pt2, "--json", check=True).stdout)
    return pt2, acts, spec


def _grads(model, inputs):
    """Gradients as a user saves them: named_parameters() that have a gradient."""
    model.zero_grad()
    model(*inputs).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyGPT()
    ids = torch.randint(0, 17, (3, 5))
    folder = tmp_path_factory.mktemp("gpt")
    pt2, acts, spec = _export(model, (ids,), folder)
    state_pt = folder / "state.pt"  # both tied keys, sharing storage
    torch.save(model.state_dict(), state_pt)
    state_st = folder / "state.safetensors"  # the official writer keeps one tied key
    save_model(model, str(state_st))
    grads = folder / "grads.safetensors"
    save_file(_grads(model, (ids,)), grads)
    return {
        "model": model,
        "pt2": pt2,
        "acts": acts,
        "spec": spec,
        "state_pt": state_pt,
        "state_st": state_st,
        "grads": grads,
    }


def test_tied_head_is_named_after_the_module_that_calls_it(gpt):
    table = load_layer_table(gpt["pt2"])
    assert [la.name for la in table.layers] == ["fc", "proj", "lm_head"]
    head = table.layer("lm_head")
    assert head.weight == "wte.weight"  # the name named_parameters() gives it
    assert head.shared_with == ("aten.embedding in wte",)
    assert table.resolve("lm_head.weight") == "wte.weight"
    assert list(table.parameters) == [n for n, _ in gpt["model"].named_parameters()]
    assert table.frozen == ["wpe"]
    text = run_cli("layers", gpt["pt2"], check=True).stdout.decode()
    assert "lm_head.weight is wte.weight (tied)" in text
    assert "aten.embedding in wte" in text and "Frozen (no gradients): wpe" in text


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_hook_dump_of_a_tied_model_needs_no_flags(gpt, tmp_path, approx):
    out = tmp_path / "p.safetensors"
    invoke("patches", gpt["pt2"], gpt["acts"], "-o", out, "--approx", approx, check=True)
    got, acts = load_file(out), load_file(gpt["acts"])
    table = load_layer_table(gpt["pt2"])
    assert set(got) == set(acts) == {"fc", "proj", "lm_head"}
    for key, x in acts.items():
        torch.testing.assert_close(got[key], layer_patches(x, None, approx), rtol=0, atol=0)
    assert json.loads(safe_open(out, "pt").metadata()["layers"])["lm_head"]["weight"] == (
        table.layer("lm_head").weight
    )


@pytest.mark.parametrize("state", ["state_pt", "state_st"])
def test_state_dicts_with_tied_keys_and_a_spec_give_the_exported_table(gpt, tmp_path, state):
    exported = load_layer_table(gpt["pt2"]).to_json()
    from_state = load_layer_table(gpt[state], gpt["spec"]).to_json()
    for field in ("layers", "parameters", "untreated", "untreated_layers", "aliases"):
        assert from_state[field] == exported[field], field
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    invoke("patches", gpt["pt2"], gpt["acts"], "-o", a, check=True)
    invoke("patches", gpt[state], gpt["acts"], "--spec", gpt["spec"], "-o", b, check=True)
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_tied_state_dict_without_spec_is_one_parameter(gpt):
    table = load_layer_table(gpt["state_pt"])
    assert table.resolve("lm_head.weight") == "wte.weight"
    assert "lm_head.weight" not in table.parameters


def test_a_module_shared_under_two_paths_is_named_as_hooks_name_it(tmp_path):
    """CoaT: the positional conv is ``cpe`` to named_modules() and hooks, but the graph
    calls it only as ``blocks.0.pos`` and ``blocks.1.pos``."""
    torch.manual_seed(0)
    model = SharedPart()
    pt2, acts, spec = _export(model, (torch.randn(2, 4, 6, 6),), tmp_path)
    table = load_layer_table(pt2)
    cpe = table.layer("cpe")
    assert cpe.name == "cpe" and cpe.calls == 2
    assert cpe.names == ("cpe", "blocks.0.pos", "blocks.1.pos")
    assert {table.layer(k).name for k in ("blocks.0.pos", "cpe#1")} == {"cpe"}
    assert set(load_file(acts)) == {"cpe", "blocks.0.mix", "blocks.1.mix", "head"}
    out = tmp_path / "p.safetensors"
    invoke("patches", pt2, acts, "-o", out, check=True)  # no --ignore-unknown
    assert set(load_file(out)) == set(load_file(acts))
    data = [(torch.randn(2, 4, 6, 6), torch.randint(0, 3, (2,)))]
    [(a, g)] = record(model, data, nn.CrossEntropyLoss(), tmp_path / "d", fisher_type="empirical")
    assert "cpe#1" in load_file(a)
    invoke("factors", pt2, a, "--grads", g, "-o", tmp_path / "F.safetensors", check=True)
    assert {"cpe.A", "cpe.G"} <= set(load_file(tmp_path / "F.safetensors"))
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    assert load_layer_table(state, spec).to_json()["layers"] == table.to_json()["layers"]
    grads = tmp_path / "grads.safetensors"
    save_file(_grads(model, (torch.randn(2, 4, 6, 6),)), grads)
    canon, back = _round_trip(pt2, grads, tmp_path / "rt")
    assert "cpe" in load_file(canon)
    got, want = load_file(back), load_file(grads)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_pad_in_the_conv_module_is_its_padding(tmp_path):
    """timm's Conv2dSame pads in forward: the layer has that (unequal) padding and reads
    what the hook records; a pad in the parent module stays outside the layer."""
    torch.manual_seed(0)
    model = PaddedOutside()
    x = torch.randn(2, 3, 9, 8)
    pt2, acts, _ = _export(model, (x,), tmp_path)
    table = load_layer_table(pt2)
    assert table.layer("stem").conv.padding == ((1, 1), (0, 1))
    assert table.layer("conv").conv.padding == (1, 1)
    out = tmp_path / "p.safetensors"
    invoke("patches", pt2, acts, "-o", out, check=True)
    got, dumped = load_file(out), load_file(acts)
    assert dumped["stem"].shape == x.shape
    for name, pads in (("stem", [0, 1, 1, 1]), ("conv", [1, 1, 1, 1])):
        m = getattr(model, name)
        xp = F.pad(dumped[name], pads)
        want = F.unfold(xp, m.kernel_size, stride=m.stride).transpose(1, 2)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
        w = m.weight.flatten(1).T
        conv = F.conv2d(xp, m.weight, stride=m.stride).flatten(2).transpose(1, 2)
        torch.testing.assert_close(got[name] @ w, conv)  # the patches' defining property
    data = [(x, torch.randint(0, 3, (2,)))]
    [(a, g)] = record(model, data, nn.CrossEntropyLoss(), tmp_path / "d", fisher_type="empirical")
    invoke("factors", pt2, a, "--grads", g, "-o", tmp_path / "F.safetensors", check=True)


def _round_trip(model, tensors, tmp_path, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    canon, back = tmp_path / "c.safetensors", tmp_path / "back.safetensors"
    proc = invoke("canonicalize", model, tensors, "-o", canon, *flags)
    assert proc.returncode == 0, proc.stderr
    invoke("canonicalize", "--inverse", canon, "-o", back, check=True)
    return canon, back


def test_gradients_without_the_frozen_parameter(gpt, tmp_path):
    grads = load_file(gpt["grads"])
    assert "wpe" not in grads
    canon, back = _round_trip(gpt["pt2"], gpt["grads"], tmp_path)
    meta = safe_open(canon, "pt").metadata()
    assert json.loads(meta["missing"]) == ["wpe"]
    blocks = load_file(canon)
    assert torch.equal(blocks["lm_head"], grads["wte.weight"].flatten())
    got = load_file(back)
    assert got.keys() == grads.keys() and all(torch.equal(got[k], grads[k]) for k in grads)


def test_state_dict_tensors_keep_every_key(gpt, tmp_path):
    """A full state dict as TENSORS: the tied second key and the frozen table are kept."""
    state = gpt["model"].state_dict()
    canon, back = _round_trip(gpt["pt2"], gpt["state_pt"], tmp_path)
    blocks = json.loads(safe_open(canon, "pt").metadata()["blocks"])
    alias = next(b for b in blocks if b["key"] == "lm_head.weight")
    assert alias["untreated"] and alias["alias_of"] == "wte.weight"
    assert next(b for b in blocks if b["key"] == "wpe")["untreated"]
    got = load_file(back)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    only, _ = _round_trip(gpt["pt2"], gpt["state_pt"], tmp_path / "t", "--treated-only")
    assert set(load_file(only)) == {"fc", "proj", "lm_head"}


def test_any_subset_of_whole_layers(gpt, tmp_path):
    grads = {k: v for k, v in load_file(gpt["grads"]).items() if k.startswith("fc.")}
    part = tmp_path / "part.safetensors"
    save_file(grads, part)
    canon, back = _round_trip(gpt["pt2"], part, tmp_path)
    assert set(load_file(canon)) == {"fc"}
    assert load_file(back).keys() == grads.keys()
    sel, _ = _round_trip(gpt["pt2"], gpt["grads"], tmp_path / "s", "--layer", "pro*")
    assert set(load_file(sel)) == {"proj"}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    torch.manual_seed(1)
    model = ComputedWeights()
    folder = tmp_path_factory.mktemp("computed")
    pt2, acts, spec = _export(model, (torch.randn(2, 3, 6, 6),), folder)
    return {"model": model, "pt2": pt2, "acts": acts, "spec": spec}


def test_computed_and_transposed_layers_are_listed_with_the_reason(computed):
    table = load_layer_table(computed["pt2"])
    assert [la.name for la in table.layers] == ["conv", "head"]
    reasons = {u["name"]: u["reason"] for u in table.untreated_layers}
    assert set(reasons) == {"stem", "up", "pos"}
    assert "computed by aten.div" in reasons["stem"] and "stem.weight" in reasons["stem"]
    assert "aten._weight_norm" in reasons["pos"] and "original0" in reasons["pos"]
    assert "transposed convolution" in reasons["up"]
    text = invoke("layers", computed["pt2"], check=True).stdout.decode()
    assert "Layers KFAC cannot treat:" in text and "aten._weight_norm" in text


def test_a_dump_with_untreatable_layers_says_why(computed, tmp_path):
    out = tmp_path / "p.safetensors"
    proc = invoke("patches", computed["pt2"], computed["acts"], "-o", out)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and not out.exists()
    assert "expected a layer KFAC treats but found" in lines[0]
    assert "computed by" in lines[0] and "--ignore-unknown" in lines[0]
    proc = invoke("patches", computed["pt2"], computed["acts"], "-o", out, "--ignore-unknown")
    assert proc.returncode == 0, proc.stderr
    assert set(load_file(out)) == {"conv", "head"}
    warnings = proc.stderr.decode()
    assert "aten._weight_norm" in warnings and "transposed" in warnings


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    torch.manual_seed(2)
    model = BNNet()
    x = torch.randn(2, 3, 8, 8)
    model.train()
    model(x)  # running statistics and num_batches_tracked move
    folder = tmp_path_factory.mktemp("bn")
    pt2, acts, spec = _export(model, (x,), folder)
    state = folder / "state.safetensors"
    save_file({k: v.clone() for k, v in model.state_dict().items()}, state)
    grads = folder / "grads.safetensors"
    save_file(_grads(model, (x,)), grads)
    return {"pt2": pt2, "acts": acts, "spec": spec, "state": state, "grads": grads}


def test_batchnorm_state_dict_with_spec(bn, tmp_path):
    exported = load_layer_table(bn["pt2"])
    table = load_layer_table(bn["state"], bn["spec"])
    assert table.parameters == exported.parameters
    assert [u["name"] for u in table.untreated] == [u["name"] for u in exported.untreated]
    assert {"bn1.num_batches_tracked", "bn2.running_var"} <= set(table.buffers)
    a, _ = _round_trip(bn["pt2"], bn["grads"], tmp_path / "a")
    b, _ = _round_trip(bn["state"], bn["grads"], tmp_path / "b", "--spec", bn["spec"])
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # Without a spec, the state dict's buffers are buffers too.
    assert not any("num_batches" in u["name"] for u in load_layer_table(bn["state"]).untreated)


def test_a_full_state_dict_keeps_its_buffers_through_the_round_trip(bn, tmp_path):
    state = load_file(bn["state"])
    _, back = _round_trip(bn["pt2"], bn["state"], tmp_path)
    got = load_file(back)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


# ----------------------------------------------------------------- bad inputs, issue items


def test_an_empty_dump_is_an_error(bn, tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    out = tmp_path / "out.safetensors"
    proc = invoke("patches", bn["pt2"], empty, "-o", out)
    assert proc.returncode == 1 and b"no tensors" in proc.stderr and not out.exists()
    other = tmp_path / "other.safetensors"
    save_file({"nothing": torch.zeros(2, 3)}, other)
    proc = invoke("patches", bn["pt2"], other, "-o", out, "--ignore-unknown")
    assert proc.returncode == 1 and b"expected a layer's input" in proc.stderr
    assert not out.exists()


def test_a_deeply_nested_header_is_a_clear_error(bn, tmp_path):
    raw = b'{"a":' * 3000 + b"1" + b"}" * 3000
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(len(raw).to_bytes(8, "little") + raw)
    proc = run_cli("patches", bn["pt2"], deep, "-o", tmp_path / "o")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith(f"Error: {deep}: ") and "internal" not in err
    proc = run_cli("patches", bn["pt2"], "-", "-o", tmp_path / "o", input=deep.read_bytes())
    assert proc.returncode == 1 and "nested" in proc.stderr.decode()


def test_control_characters_are_escaped(bn, tmp_path):
    bad = tmp_path / "esc.safetensors"
    save_file({"evil\x1b[2Jkey": torch.zeros(2, 3)}, bad)
    proc = run_cli("patches", bn["pt2"], bad, "-o", tmp_path / "o")
    assert proc.returncode == 1
    assert b"\x1b" not in proc.stderr and b"evil\\x1b[2Jkey" in proc.stderr


def test_outputs_get_the_umask_mode(bn, tmp_path):
    out = tmp_path / "p.safetensors"
    run_cli(
        "patches", bn["pt2"], bn["acts"], "-o", out, check=True, preexec_fn=lambda: os.umask(0o022)
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    out2 = tmp_path / "q.safetensors"
    run_cli(
        "patches", bn["pt2"], bn["acts"], "-o", out2, check=True, preexec_fn=lambda: os.umask(0o077)
    )
    assert stat.S_IMODE(out2.stat().st_mode) == 0o600


def test_non_regular_inputs(bn, tmp_path):
    fifo = tmp_path / "model.pt2"
    os.mkfifo(fifo)
    proc = run_cli("layers", fifo, timeout=60)
    assert proc.returncode == 1 and b"expected a regular file" in proc.stderr
    proc = run_cli("layers", "-")
    assert proc.returncode == 2 and b"random access" in proc.stderr
    proc = run_cli("patches", bn["pt2"], "/dev/null", "-o", tmp_path / "o")
    assert proc.returncode == 1 and b"character device" in proc.stderr
