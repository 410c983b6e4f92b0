"""The first hour of a new user (docs/formats.md, README): wrong roles and orders, data-true
fingerprints, `kfac-cli info`, terminals and narrow tables, dtypes and the recorder."""

from __future__ import annotations

import json
import os
import pty
import shutil
import struct
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli import KfacError, record
from tests.conftest import invoke, kfac_cli_exe, run_cli
from tests.models import BNNet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A recorded CNN with BatchNorm: model.pt2, three shards of dumps, and every output."""
    folder = tmp_path_factory.mktemp("everyday")
    torch.manual_seed(0)
    model = BNNet().eval()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    pairs = record(model, data, nn.CrossEntropyLoss(), folder, fisher_type="empirical", run="r")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    f = {"pt2": pt2, "acts": [a for a, _ in pairs], "grads": [g for _, g in pairs]}
    f["factors"] = folder / "F.safetensors"
    invoke("factors", pt2, *f["acts"], "--grads", *f["grads"], "-o", f["factors"], check=True)
    f["patches"] = folder / "P.safetensors"
    invoke("patches", pt2, f["acts"][0], "-o", f["patches"], check=True)
    f["params"] = folder / "params.safetensors"
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, f["params"])
    f["canonical"] = folder / "C.safetensors"
    invoke("canonicalize", pt2, f["params"], "-o", f["canonical"], check=True)
    f["back"] = folder / "back.safetensors"
    invoke("canonicalize", "--inverse", f["canonical"], "-o", f["back"], check=True)
    return f


def _one_error(proc, *needles: str) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_factors_of_selected_layers_with_gradients_equal_the_full_run(run, tmp_path):
    out = tmp_path / "some.safetensors"
    proc = invoke(
        "factors", run["pt2"], *run["acts"], "--grads", *run["grads"], "--layer", "fc*", "-o", out
    )
    assert proc.returncode == 0, proc.stderr
    full, some = load_file(run["factors"]), load_file(out)
    assert some and set(some) < set(full)
    for key, value in some.items():
        assert torch.equal(value, full[key]), key


@pytest.mark.parametrize(
    "args, needles",
    [
        (["patches", "{acts}", "{pt2}", "-o", "{out}"], ["activation dump", "MODEL comes first"]),
        (["factors", "{grads}", "{acts}", "-o", "{out}"], ["output-gradient dump", "MODEL comes"]),
        (["canonicalize", "{params}", "{pt2}", "-o", "{out}"], ["torch.export", "MODEL comes"]),
        (["merge", "{pt2}", "{factors}", "-o", "{out}"], ["torch.export archive"]),
        (["layers", "{factors}"], ["a factors file (kfac-cli/factors)"]),
        (["layers", "{acts}"], ["an activation dump"]),
        (["canonicalize", "{pt2}", "{canonical}", "-o", "{out}"], ["--inverse"]),
        (["patches", "{pt2}", "{grads}", "-o", "{out}"], ["--grads"]),
        (["factors", "{pt2}", "{acts}", "--grads", "{acts}", "-o", "{out}"], ["activation dump"]),
    ],
    ids=[
        "patches",
        "factors",
        "canonicalize",
        "merge",
        "layers-factors",
        "layers-dump",
        "canonical-as-tensors",
        "grads-as-acts",
        "acts-as-grads",
    ],
)
def test_a_file_in_the_wrong_role_says_what_it_is(run, tmp_path, args, needles):
    files = {k: v[0] if isinstance(v, list) else v for k, v in run.items()}
    out = tmp_path / "out.safetensors"
    proc = invoke(*[a.format(out=out, **files) for a in args])
    _one_error(proc, *needles)
    assert not out.exists()


def test_a_truncated_archive_says_truncated(run, tmp_path):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(run["pt2"].read_bytes()[:-100])
    _one_error(invoke("layers", cut), "truncated")
    dump = tmp_path / "cut.safetensors"
    dump.write_bytes(run["acts"][0].read_bytes()[:-100])
    for args in (["patches", run["pt2"], dump, "-o", tmp_path / "o"], ["info", dump]):
        _one_error(invoke(*args), "a truncated file (an activation dump")


def test_fingerprints_identify_the_data(run, tmp_path):
    """Two dumps differing in one byte differ; a merge of overlapping inputs fails naming
    both files."""
    a = load_file(run["acts"][0])
    b = {k: v.clone() for k, v in a.items()}
    first = next(iter(b))
    b[first].view(-1)[0] += 1
    with safe_open(run["acts"][0], "pt") as f:
        meta = f.metadata()
    save_file(b, tmp_path / "b.safetensors", metadata=meta)
    outs = []
    for src in (run["acts"][0], tmp_path / "b.safetensors"):
        outs.append(tmp_path / f"p{len(outs)}.safetensors")
        invoke("patches", run["pt2"], src, "-o", outs[-1], check=True)
    prints = [safe_open(o, "pt").metadata()["activations"] for o in outs]
    assert prints[0] != prints[1] and all(p.startswith("sha256:") for p in prints)
    part = tmp_path / "part.safetensors"
    invoke(
        "factors", run["pt2"], run["acts"][0], "--grads", run["grads"][0], "-o", part, check=True
    )
    line = _one_error(invoke("merge", run["factors"], part, "-o", tmp_path / "m.safetensors"))
    assert str(run["factors"]) in line and str(part) in line
    _one_error(invoke("merge", part, part, "-o", tmp_path / "m.safetensors"), str(part))


def test_the_same_run_in_another_folder_gives_the_same_bytes(run, tmp_path):
    outs = []
    for where in ("one", "two/deeper"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        pt2 = shutil.copy(run["pt2"], folder / "model.pt2")
        acts = [shutil.copy(a, folder / a.name) for a in run["acts"]]
        grads = [shutil.copy(g, folder / g.name) for g in run["grads"]]
        outs.append(folder / "F.safetensors")
        invoke("factors", pt2, *acts, "--grads", *grads, "-o", outs[-1], check=True)
        invoke("patches", pt2, acts[0], "-o", folder / "P.safetensors", check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert (tmp_path / "one/P.safetensors").read_bytes() == (
        tmp_path / "two/deeper/P.safetensors"
    ).read_bytes()


def test_forward_only_is_said(run, tmp_path):
    proc = invoke("factors", run["pt2"], run["acts"][0], "-o", tmp_path / "A.safetensors", "--json")
    assert proc.returncode == 0 and b"forward-only" in proc.stderr
    assert json.loads(proc.stdout)["forward_only"] is True
    proc = invoke("factors", run["pt2"], run["acts"][0], "-o", tmp_path / "B.safetensors", "-q")
    assert proc.returncode == 0 and proc.stderr == b""


def test_binary_to_a_terminal_is_a_usage_error(run, tmp_path):
    leader, follower = pty.openpty()
    try:
        for force in ([], ["--force"]):
            proc = subprocess.run(
                [
                    *kfac_cli_exe(),
                    "patches",
                    str(run["pt2"]),
                    str(run["acts"][0]),
                    "-o",
                    "-",
                    *force,
                ],
                stdout=follower,
                stderr=subprocess.PIPE,
                timeout=120,
            )
            assert proc.returncode == 2 and b"terminal" in proc.stderr
    finally:
        os.close(leader)
        os.close(follower)


def test_errors_say_what_to_do(run, tmp_path):
    proc = invoke("patches", run["pt2"], run["acts"][0], "-o", tmp_path / "x", "--approx", "reduc")
    assert proc.returncode == 2 and b"Value error" not in proc.stderr
    assert b"'reduc' is not one of 'expand', 'reduce'" in proc.stderr
    proc = invoke("factors", run["pt2"], run["acts"][0], "-o", tmp_path / "x", "--dtype", "float16")
    assert proc.returncode == 2 and b"float16" in proc.stderr
    proc = invoke("canonicalize", run["pt2"], "-o", tmp_path / "x")
    assert proc.returncode == 2 and b"inputs" not in proc.stderr
    ints = {k: (v * 10).to(torch.int32) for k, v in load_file(run["acts"][0]).items()}
    int_file = tmp_path / "ints.safetensors"
    save_file(ints, int_file, metadata={"batch_size": "4"})
    out = tmp_path / "f.safetensors"
    _one_error(invoke("factors", run["pt2"], int_file, "-o", out), "--dtype")
    proc = invoke("factors", run["pt2"], int_file, "-o", out, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr


def test_the_layer_table_folds_between_values_and_has_no_trailing_spaces(run):
    proc = run_cli("layers", run["pt2"])
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert all(line == line.rstrip() for line in lines)
    leader, follower = pty.openpty()
    try:
        env = {**os.environ, "COLUMNS": "60", "LINES": "40"}
        proc = subprocess.run(
            [*kfac_cli_exe(), "layers", str(run["pt2"])], stdout=follower, env=env, timeout=120
        )
        os.close(follower)
        text = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(leader)
    narrow = text.decode().replace("\r", "").splitlines()
    assert proc.returncode == 0, narrow
    assert max(len(line) for line in narrow if str(run["pt2"]) not in line) <= 60, narrow
    table = invoke("layers", run["pt2"], "--json")
    for layer in json.loads(table.stdout)["layers"]:
        assert layer["name"] in narrow  # a name on a line of its own, never broken
    assert any("weight" in line and "kind" in line for line in narrow)


def test_version_and_completion():
    proc = invoke("-V")
    assert proc.returncode == 0 and proc.stdout.decode().startswith("kfac-cli ")
    assert b"--install-completion" in invoke("--help").stdout


def test_float64_dumps_give_float64_factors(run, tmp_path):
    a64 = {k: v.double() for k, v in load_file(run["acts"][0]).items()}
    f64 = tmp_path / "a64.safetensors"
    save_file(a64, f64, metadata={"batch_size": "4"})
    out = tmp_path / "F.safetensors"
    invoke("factors", run["pt2"], f64, "-o", out, check=True)
    assert {v.dtype for v in load_file(out).values()} == {torch.float64}
    h16 = tmp_path / "a16.safetensors"
    save_file({k: v.half() for k, v in a64.items()}, h16, metadata={"batch_size": "4"})
    invoke("factors", run["pt2"], h16, "-o", out, "--force", check=True)
    assert {v.dtype for v in load_file(out).values()} == {torch.float32}


def test_record_refuses_a_loss_without_reduction(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    for fisher in ("empirical", "mc", "type-2"):
        with pytest.raises(KfacError, match="reduction"):
            record(model, data, nn.CrossEntropyLoss(reduction="none"), tmp_path, fisher_type=fisher)
    assert not list(tmp_path.iterdir())


def test_record_continues_the_mc_generator_across_calls(tmp_path):
    """Shards recorded in separate calls (as separate processes would, with the generator's
    state handed on) get the labels of one call over all batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    data = [(torch.randn(5, 3), torch.randint(0, 4, (5,))) for _ in range(4)]
    loss = nn.CrossEntropyLoss()
    one = record(model, data, loss, tmp_path / "one", fisher_type="mc", run="x")
    g = torch.Generator().manual_seed(2147483647)
    record(model, data[:2], loss, tmp_path / "two", fisher_type="mc", generator=g, run="x")
    state = g.get_state()
    g2 = torch.Generator()
    g2.set_state(state)
    record(
        model, data[2:], loss, tmp_path / "two", fisher_type="mc", generator=g2, start=2, run="x"
    )
    for acts, grads in one:
        other = tmp_path / "two" / grads.name
        assert other.read_bytes() == grads.read_bytes()
        assert (tmp_path / "two" / acts.name).read_bytes() == acts.read_bytes()
    with safe_open(one[3][1], "pt") as f:
        assert f.metadata()["batch_index"] == "3" and f.metadata()["run"] == "x"


def _official(path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {
            k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape()))
            for k in f.keys()  # noqa: SIM118 (a safe_open handle)
        }
    return {"metadata": meta, "tensors": tensors}


@pytest.mark.parametrize(
    "which", ["acts", "grads", "patches", "canonical", "back", "factors", "params"]
)
def test_info_agrees_with_the_official_reader(run, which):
    path = run[which][0] if isinstance(run[which], list) else run[which]
    proc = invoke("info", path, "--json")
    assert proc.returncode == 0, proc.stderr
    (f,) = json.loads(proc.stdout)["files"]
    ref = _official(path)
    assert {t["name"]: (t["dtype"], t["shape"]) for t in f["tensors"]} == ref["tensors"]
    assert set(f["metadata"]) == set(ref["metadata"])
    assert f["format"] == ref["metadata"].get("format", "safetensors")
    assert (
        f["tensor_bytes"] == path.stat().st_size - 8 - struct.unpack("<Q", path.read_bytes()[:8])[0]
    )
    text = invoke("info", path)
    assert text.returncode == 0 and str(path) in text.stdout.decode()


def test_info_on_a_stream_a_sharded_set_and_a_pt2(run, tmp_path):
    src = run["acts"][0]
    proc = run_cli("info", "-", "--json", input=src.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads(proc.stdout)["files"][0]["tensors"]
        == json.loads(invoke("info", src, "--json").stdout)["files"][0]["tensors"]
    )
    tensors = load_file(run["params"])
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:2]}, tmp_path / "s1.safetensors")
    save_file({n: tensors[n] for n in names[2:]}, tmp_path / "s2.safetensors")
    index = {
        "weight_map": {
            n: "s1.safetensors" if i < 2 else "s2.safetensors" for i, n in enumerate(names)
        }
    }
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    (f,) = json.loads(invoke("info", tmp_path / "m.safetensors.index.json", "--json").stdout)[
        "files"
    ]
    assert sorted(t["name"] for t in f["tensors"]) == sorted(names)
    (p,) = json.loads(invoke("info", run["pt2"], "--json").stdout)["files"]
    assert p["kind"].startswith("a torch.export archive") and p["layers"]


def test_info_and_layers_do_not_import_torch(run):
    for args in (["info", str(run["factors"])], ["layers", str(run["pt2"])], ["--help"]):
        code = (
            "import sys; from kfac_cli.cli import app; "
            f"app(args={args!r}, standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'"
        )
        proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("length", [0x0380, 0x4B50, 0x0280])
def test_a_header_length_that_looks_like_a_pickle_or_zip_is_still_safetensors(length, tmp_path):
    """Found by the fuzz sweep: a header of 896 bytes starts the file with 0x80 0x03, a
    pickle's first bytes; one of 19280 bytes with 'PK', a zip's."""
    from kfac_cli import identify

    meta = {"format": "kfac-cli/patches", "pad": ""}
    path = tmp_path / "x.safetensors"
    for _ in range(3):
        save_file({"t": torch.zeros(2)}, path, metadata=meta)
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        meta["pad"] += " " * (length - n)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] == length
    kind = identify(path)
    assert (kind.kind, kind.format) == ("safetensors", "kfac-cli/patches")
    assert invoke("info", path).returncode == 0
