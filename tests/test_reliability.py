"""Every bad input: one clear error line, exit 1, nothing written, no code executed.

Each corrupt file is tried in every role it can play (model, activation dump, parameter
tensors, canonical file) under every command. Most runs are in-process (fast); a
representative set runs the installed CLI as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.conftest import invoke, run_cli
from tests.models import write_model_files

MARKER = "PWNED-marker"


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)
    )
    files = write_model_files(model, torch.randn(2, 3, 6, 6), folder)
    files["canonical"] = folder / "canonical.safetensors"
    proc = invoke("canonicalize", files["pt2"], files["params"], "-o", files["canonical"])
    assert proc.returncode == 0, proc.stderr
    return files


def _corrupt_safetensors(valid: bytes, case: str) -> bytes:
    header, data = _split(valid)
    keys = [k for k in header if k != "__metadata__"]
    last = max(keys, key=lambda k: header[k]["data_offsets"][1])
    first = min(keys, key=lambda k: header[k]["data_offsets"][0])
    if case == "empty":
        return b""
    if case == "tiny":
        return valid[:5]
    if case == "truncated":
        return valid[:-7]
    if case == "header-past-file":
        return struct.pack("<Q", len(valid)) + valid[8:]
    if case == "header-gigabytes":
        return struct.pack("<Q", 2**34) + valid[8:]
    if case == "header-not-json":
        return _st_bytes({}, b"")[:8].replace(b"\x02", b"\x09") + b"{not json"
    if case == "header-not-object":
        raw = b"[1, 2, 3]"
        return struct.pack("<Q", len(raw)) + raw
    if case == "overlap":
        header[last]["data_offsets"][0] -= 4
        header[last]["data_offsets"][1] -= 4
        return _st_bytes(header, data[:-4])
    if case == "hole":
        header[first]["data_offsets"] = [o + 8 for o in header[first]["data_offsets"]]
        for k in keys:
            if k != first:
                header[k]["data_offsets"] = [o + 8 for o in header[k]["data_offsets"]]
        return _st_bytes(header, bytes(8) + data)
    if case == "past-end":
        header[last]["data_offsets"][1] += 4
        header[last]["shape"] = [header[last]["data_offsets"][1] - header[last]["data_offsets"][0]]
        header[last]["dtype"] = "U8"
        return _st_bytes(header, data)
    if case == "unknown-dtype":
        header[first]["dtype"] = "F33"
        return _st_bytes(header, data)
    if case == "length-mismatch":
        header[first]["shape"] = [*header[first]["shape"][:-1], header[first]["shape"][-1] + 1]
        return _st_bytes(header, data)
    if case == "duplicate-key":
        raw = json.dumps(header).encode()
        dup = (
            raw[:-1] + b', "' + first.encode() + b'": ' + json.dumps(header[first]).encode() + b"}"
        )
        return struct.pack("<Q", len(dup)) + dup + data
    if case == "pickle-renamed":
        buf = io.BytesIO()
        torch.save(Payload(MARKER), buf, _use_new_zipfile_serialization=False)
        return buf.getvalue()
    if case == "zip-pickle-renamed":
        buf = io.BytesIO()
        torch.save({"x": Payload(MARKER)}, buf)
        return buf.getvalue()
    raise AssertionError(case)


ST_CASES = [
    "empty",
    "tiny",
    "truncated",
    "header-past-file",
    "header-gigabytes",
    "header-not-json",
    "header-not-object",
    "overlap",
    "hole",
    "past-end",
    "unknown-dtype",
    "length-mismatch",
    "duplicate-key",
    "pickle-renamed",
    "zip-pickle-renamed",
]
ROLES = {
    # role: (the valid file it replaces, the command line using it)
    "model": ("safetensors", lambda f, bad, out: ["canonicalize", bad, f["params"], "-o", out]),
    "model-layers": ("safetensors", lambda f, bad, out: ["layers", bad]),
    "activations": ("acts", lambda f, bad, out: ["patches", f["pt2"], bad, "-o", out]),
    "tensors": ("params", lambda f, bad, out: ["canonicalize", f["pt2"], bad, "-o", out]),
    "canonical": ("canonical", lambda f, bad, out: ["canonicalize", "--inverse", bad, "-o", out]),
}


def _check_failure(proc, bad: Path, outdir: Path, old: bytes, *, code: int = 1) -> None:
    stderr = proc.stderr.decode(errors="replace")
    lines = stderr.strip().splitlines()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("Error: "), stderr
    assert str(bad) in lines[0] or bad.name in lines[0], stderr
    assert sorted(p.name for p in outdir.iterdir()) == ["out.safetensors"], "files left behind"
    assert (outdir / "out.safetensors").read_bytes() == old
    assert not Path(MARKER).exists(), "the pickle payload ran"


@pytest.fixture
def outdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the payload's marker would land here
    d = tmp_path / "out"
    d.mkdir()
    (d / "out.safetensors").write_bytes(b"old result")
    return d


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("case", ST_CASES)
def test_corrupt_safetensors(base, outdir, tmp_path, case, role):
    valid_key, argv = ROLES[role]
    suffix = ".safetensors"
    bad = tmp_path / f"bad-{case}{suffix}"
    bad.write_bytes(_corrupt_safetensors(base[valid_key].read_bytes(), case))
    out = outdir / "out.safetensors"
    proc = (
        invoke(*argv(base, bad, out), "--force")
        if role != "model-layers"
        else invoke(*argv(base, bad, out))
    )
    _check_failure(proc, bad, outdir, b"old result")


@pytest.mark.parametrize("what", ["missing", "directory"])
@pytest.mark.parametrize("role", list(ROLES))
def test_missing_file_or_directory(base, outdir, tmp_path, what, role):
    _, argv = ROLES[role]
    bad = tmp_path / "nothing.safetensors"
    if what == "directory":
        bad.mkdir()
    proc = invoke(
        *argv(base, bad, outdir / "out.safetensors"), *(["--force"] * (role != "model-layers"))
    )
    _check_failure(proc, bad, outdir, b"old result")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file(base, outdir, tmp_path):
    bad = tmp_path / "locked.safetensors"
    bad.write_bytes(base["acts"].read_bytes())
    bad.chmod(0)
    proc = invoke("patches", base["pt2"], bad, "-o", outdir / "out.safetensors", "--force")
    _check_failure(proc, bad, outdir, b"old result")


def _pt2_variant(valid: Path, case: str, dest: Path) -> None:
    with zipfile.ZipFile(valid) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    prefix = members[0][0].filename.split("/")[0]
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info, data in members:
            name = info.filename
            if case == "weights-pickle" and "/data/weights/weight_0" in name:
                data = _pickle_bytes()
            if case == "constants-pickle" and name.endswith("model_constants_config.json"):
                out.writestr(f"{prefix}/data/constants/tensor_0", _pickle_bytes())
            if case == "sample-inputs-pickle" and "sample_inputs" in name:
                data = _pickle_bytes()
            if case == "dotdot" and name.endswith("archive_format"):
                out.writestr("../evil", b"x")
            if case == "absolute" and name.endswith("archive_format"):
                out.writestr("/etc/evil", b"x")
            if case == "bomb" and name.endswith("models/model.json"):
                data = data[:-1] + b" " * (300 * 2**20) + b"}"
            if case == "graph-not-json" and name.endswith("models/model.json"):
                data = b"{ this is not json"
            if case == "graph-garbage-schema" and name.endswith("models/model.json"):
                data = json.dumps(
                    {"schema_version": {"major": 8, "minor": 0}, "graph_module": {"graph": 3}}
                ).encode()
            out.writestr(info.filename, data)


def _bad_pt2(base, folder: Path, case: str) -> Path:
    """A broken or hostile ``.pt2``: a variant of the valid one, a zip of garbage, a pickle."""
    pt2 = folder / f"{case}.pt2"
    if case == "garbage-zip":
        with zipfile.ZipFile(pt2, "w") as z:
            z.writestr("random/stuff.bin", os.urandom(100))
    elif case == "pickle-renamed":
        pt2.write_bytes(_pickle_bytes())
    else:
        _pt2_variant(base["pt2"], case, pt2)
    return pt2


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(MARKER), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["weights-pickle", "constants-pickle", "sample-inputs-pickle"])
def test_pt2_hidden_pickles_never_run(base, outdir, tmp_path, case):
    pt2 = tmp_path / f"{case}.pt2"
    _pt2_variant(base["pt2"], case, pt2)
    out = outdir / "new.safetensors"
    for argv in (
        ["layers", pt2],
        ["patches", pt2, base["acts"], "-o", out, "--force"],
        ["canonicalize", pt2, base["params"], "-o", out, "--force"],
    ):
        proc = invoke(*argv)
        assert proc.returncode == 0, proc.stderr
        assert not Path(MARKER).exists()


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "bomb",
        "graph-not-json",
        "graph-garbage-schema",
        "garbage-zip",
        "pickle-renamed",
    ],
)
def test_bad_pt2(base, outdir, tmp_path, case):
    pt2 = _bad_pt2(base, tmp_path, case)
    for argv in (
        ["layers", pt2],
        ["patches", pt2, base["acts"], "-o", outdir / "out.safetensors", "--force"],
        ["canonicalize", pt2, base["params"], "-o", outdir / "out.safetensors", "--force"],
    ):
        _check_failure(invoke(*argv), pt2, outdir, b"old result")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_malicious_pickle_checkpoints(base, outdir, tmp_path, suffix):
    for new_format in (True, False):
        bad = tmp_path / f"evil{int(new_format)}{suffix}"
        torch.save({"w": Payload(MARKER)}, bad, _use_new_zipfile_serialization=new_format)
        for argv in (
            ["layers", bad],
            ["patches", bad, base["acts"], "-o", outdir / "out.safetensors", "--force"],
            ["canonicalize", base["pt2"], bad, "-o", outdir / "out.safetensors", "--force"],
        ):
            _check_failure(invoke(*argv), bad, outdir, b"old result")


@pytest.mark.slow
def test_malicious_pickle_as_subprocess_with_env_override(base, outdir, tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"w": Payload(MARKER)}, bad)
    for argv in (
        ["layers", bad],
        ["patches", bad, base["acts"], "-o", outdir / "out.safetensors", "--force"],
        ["canonicalize", base["pt2"], bad, "-o", outdir / "out.safetensors", "--force"],
    ):
        proc = run_cli(*argv, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
        _check_failure(proc, bad, outdir, b"old result")


def _shards(base, tmp_path, case) -> Path:
    from safetensors.torch import load_file

    acts = load_file(base["acts"])
    keys = list(acts)
    save_file({keys[0]: acts[keys[0]]}, tmp_path / "s1.safetensors")
    save_file({k: acts[k] for k in keys[1:]}, tmp_path / "s2.safetensors")
    weight_map = {keys[0]: "s1.safetensors", **dict.fromkeys(keys[1:], "s2.safetensors")}
    if case == "missing-shard":
        weight_map[keys[0]] = "s3.safetensors"
    if case == "key-in-two-shards":
        save_file({k: acts[k] for k in keys}, tmp_path / "s2.safetensors")
    if case == "key-not-in-shard":
        weight_map["ghost"] = "s1.safetensors"
    if case == "shard-outside":
        weight_map[keys[0]] = "../s1.safetensors"
    index = tmp_path / "acts.safetensors.index.json"
    index.write_text("{not json" if case == "not-json" else json.dumps({"weight_map": weight_map}))
    return index


@pytest.mark.parametrize(
    "case", ["missing-shard", "key-in-two-shards", "key-not-in-shard", "shard-outside", "not-json"]
)
def test_bad_sharded_index(base, outdir, tmp_path, case):
    index = _shards(base, tmp_path, case)
    proc = invoke("patches", base["pt2"], index, "-o", outdir / "out.safetensors", "--force")
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and stderr.startswith("Error: ") and "Traceback" not in stderr
    assert sorted(p.name for p in outdir.iterdir()) == ["out.safetensors"]


def test_good_sharded_index(base, outdir, tmp_path):
    index = _shards(base, tmp_path, "ok")
    proc = invoke("patches", base["pt2"], index, "-o", outdir / "out.safetensors", "--force")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["rank", "channels", "spatial", "name", "dtype"])
def test_activation_does_not_fit_the_model(base, outdir, tmp_path, case):
    from safetensors.torch import load_file

    acts = load_file(base["acts"])
    x = acts["0"]
    acts["0"] = {
        "rank": x[:, :, 0].contiguous(),
        "channels": torch.randn(2, 5, 6, 6),
        "spatial": torch.zeros(2, 3, 0, 6),  # padded height 2 < kernel 3
        "name": x,
        "dtype": x.to(torch.int32),
    }[case]
    if case == "name":
        acts["conv9"] = acts.pop("0")
    bad = tmp_path / f"{case}.safetensors"
    save_file(acts, bad)
    proc = invoke("patches", base["pt2"], bad, "-o", outdir / "out.safetensors", "--force")
    _check_failure(proc, bad, outdir, b"old result")
    key = "conv9" if case == "name" else "0"
    assert f": {key}: expected" in proc.stderr.decode()


def test_nan_is_reported_and_strict_fails(base, outdir, tmp_path):
    from safetensors.torch import load_file

    acts = load_file(base["acts"])
    acts["0"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(acts, bad)
    out = outdir / "new.safetensors"
    proc = invoke("patches", base["pt2"], bad, "-o", out)
    assert proc.returncode == 0 and b"NaN/Inf" in proc.stderr
    out.unlink()
    proc = invoke("patches", base["pt2"], bad, "-o", out, "--strict")
    assert proc.returncode == 1 and b"expected finite values" in proc.stderr
    assert not out.exists()


def test_zero_size_batch_is_fine(base, outdir, tmp_path):
    from safetensors.torch import load_file

    acts = {k: v[:0].contiguous() for k, v in load_file(base["acts"]).items()}
    dump = tmp_path / "empty-batch.safetensors"
    save_file(acts, dump)
    out = outdir / "new.safetensors"
    proc = invoke("patches", base["pt2"], dump, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert load_file(out)["0"].shape == (0, 36, 27)


@pytest.mark.parametrize("edit", ["format", "blocks-json", "drop-block", "layout"])
def test_edited_canonical_metadata(base, outdir, tmp_path, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file

    blocks = load_file(base["canonical"])
    with safe_open(base["canonical"], framework="pt") as f:
        meta = dict(f.metadata())
    if edit == "format":
        meta["format"] = "kfac-cli/patches"
    elif edit == "blocks-json":
        meta["blocks"] = "[{]"
    elif edit == "drop-block":
        blocks.pop(next(iter(blocks)))
    else:
        meta["layout"] = "matrix"
    bad = tmp_path / f"{edit}.safetensors"
    save_file(blocks, bad, metadata=meta)
    proc = invoke("canonicalize", "--inverse", bad, "-o", outdir / "out.safetensors", "--force")
    _check_failure(proc, bad, outdir, b"old result")


def test_output_folder_missing(base, tmp_path):
    out = tmp_path / "gone" / "out.safetensors"
    proc = invoke("patches", base["pt2"], base["acts"], "-o", out)
    assert proc.returncode == 1 and proc.stderr.decode().startswith(f"Error: {out}: expected")


def test_sigterm_leaves_nothing(tmp_path):
    """Terminated while writing its output: exit 130, nothing left behind."""
    import signal

    from tests.conftest import interrupt_mid_write

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 7, padding=3))
    files = write_model_files(model, torch.randn(1, 16, 8, 8), tmp_path / "m")
    save_file({"0": torch.randn(16, 16, 24, 24)}, files["acts"])
    outdir = tmp_path / "o"
    outdir.mkdir()
    fifo = tmp_path / "acts.fifo"
    args = ["patches", str(files["pt2"]), str(fifo), "-o", str(outdir / "p.safetensors")]
    proc, stderr = interrupt_mid_write(
        args, files["acts"].read_bytes(), fifo, outdir, signal.SIGTERM
    )
    assert proc.returncode == 130, stderr
    assert list(outdir.iterdir()) == [], stderr


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_inputs_never_crash(base, tmp_path_factory, data):
    """Bit flips, truncations and header edits: exit 0 or one clean error, never a traceback."""
    which = data.draw(st.sampled_from(["acts", "params", "canonical", "pt2"]))
    blob = bytearray(base[which].read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "header"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        (n,) = struct.unpack("<Q", bytes(blob[:8])) if which != "pt2" else (64,)
        i = data.draw(st.integers(8, min(8 + n, len(blob)) - 1))
        blob[i] = data.draw(st.sampled_from(b'{}[]",:0123456789 x'))
    folder = tmp_path_factory.mktemp("fuzz")
    bad = folder / base[which].name
    bad.write_bytes(bytes(blob))
    out = folder / "out.safetensors"
    argv = {
        "acts": ["patches", base["pt2"], bad, "-o", out],
        "params": ["canonicalize", base["pt2"], bad, "-o", out],
        "canonical": ["canonicalize", "--inverse", bad, "-o", out],
        "pt2": ["patches", bad, base["acts"], "-o", out],
    }[which]
    proc = invoke(*argv)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode in (0, 1), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if proc.returncode:
        assert stderr.startswith("Error: ") and not out.exists()
    assert sorted(p.name for p in folder.iterdir()) in ([bad.name], sorted([bad.name, out.name]))


@pytest.mark.parametrize("case", ST_CASES)
@pytest.mark.slow
def test_corrupt_dump_as_subprocess(base, outdir, tmp_path, case):
    """The same contract from the installed CLI: exit code, one line, nothing written."""
    bad = tmp_path / f"bad-{case}.safetensors"
    bad.write_bytes(_corrupt_safetensors(base["acts"].read_bytes(), case))
    out = outdir / "out.safetensors"
    _check_failure(
        run_cli("patches", base["pt2"], bad, "-o", out, "--force"), bad, outdir, b"old result"
    )


@pytest.mark.parametrize("case", ["dotdot", "bomb", "garbage-zip", "pickle-renamed"])
@pytest.mark.slow
def test_bad_pt2_as_subprocess(base, outdir, tmp_path, case):
    pt2 = _bad_pt2(base, tmp_path, case)
    _check_failure(run_cli("layers", pt2), pt2, outdir, b"old result")
