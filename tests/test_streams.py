"""Shell pipelines both ways: '-' and named pipes as inputs, stdout that closes or fills."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from kfac_cli.files.writer import SafetensorsWriter
from kfac_cli.record import record
from tests.conftest import kfac_cli_exe, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streams")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    )
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    pairs = record(model, data, torch.nn.CrossEntropyLoss(), folder, fisher_type="empirical")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    params = folder / "params.safetensors"
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, params)
    canonical = folder / "canonical.safetensors"
    run_cli("canonicalize", pt2, params, "-o", canonical, check=True)
    factors = folder / "factors.safetensors"
    run_cli("factors", pt2, pairs[0][0], "--grads", pairs[0][1], "-o", factors, check=True)
    factors2 = folder / "factors2.safetensors"
    run_cli("factors", pt2, pairs[1][0], "--grads", pairs[1][1], "-o", factors2, check=True)
    return {
        "factors2": factors2,
        "pt2": pt2,
        "acts": pairs[0][0],
        "grads": pairs[0][1],
        "acts2": pairs[1][0],
        "grads2": pairs[1][1],
        "params": params,
        "canonical": canonical,
        "factors": factors,
    }


def _roles(f):
    """Each command and input role: (arguments with {} where the input goes, the input)."""
    return {
        "patches": (["patches", f["pt2"], "{}"], f["acts"]),
        "patches-reduce": (["patches", f["pt2"], "{}", "--approx", "reduce"], f["acts"]),
        "canonicalize": (["canonicalize", f["pt2"], "{}"], f["params"]),
        "inverse": (["canonicalize", "--inverse", "{}"], f["canonical"]),
        "factors-acts": (["factors", f["pt2"], "{}", "--grads", f["grads"]], f["acts"]),
        "factors-grads": (["factors", f["pt2"], f["acts"], "--grads", "{}"], f["grads"]),
        "merge": (["merge", f["factors2"], "{}"], f["factors"]),
    }


ROLES = [
    "patches",
    "patches-reduce",
    "canonicalize",
    "inverse",
    "factors-acts",
    "factors-grads",
    "merge",
]


def _args(template, value):
    return [value if a == "{}" else a for a in template]


@pytest.mark.parametrize("role", ROLES)
def test_stdin_gives_the_same_bytes_as_the_file(files, tmp_path, role):
    template, source = _roles(files)[role]
    by_file, by_pipe = tmp_path / "file.safetensors", tmp_path / "pipe.safetensors"
    run_cli(*_args(template, source), "-o", by_file, check=True)
    proc = run_cli(*_args(template, "-"), "-o", by_pipe, input=source.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert by_pipe.read_bytes() == by_file.read_bytes()


CUTS = ["in-header", "mid-tensor", "short-promise", "extra-bytes", "empty"]


@pytest.mark.parametrize(
    "role,cut",
    [("patches", cut) for cut in CUTS]
    + [(role, "mid-tensor") for role in ("canonicalize", "inverse", "factors-acts")]
    + [("factors-grads", "short-promise"), ("merge", "in-header")],
)
def test_broken_streams_are_one_clear_error(files, tmp_path, role, cut):
    template, source = _roles(files)[role]
    data = source.read_bytes()
    n = int.from_bytes(data[:8], "little")
    stream = {
        "in-header": data[: 8 + n // 2],
        "mid-tensor": data[: 8 + n + (len(data) - 8 - n) // 2],
        "short-promise": data[:-4],
        "extra-bytes": data + b"\0" * 16,
        "empty": b"",
    }[cut]
    out = tmp_path / "out.safetensors"
    proc = run_cli(*_args(template, "-"), "-o", out, input=stream)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and lines[0].startswith("Error: stdin"), lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_named_pipe_is_a_stream(files, tmp_path):
    fifo = tmp_path / "acts.fifo"
    os.mkfifo(fifo)
    data = files["acts"].read_bytes()

    def feed():
        with open(fifo, "wb") as f:
            f.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = tmp_path / "p.safetensors"
    proc = run_cli("patches", files["pt2"], fifo, "-o", out)
    feeder.join()
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref.safetensors"
    run_cli("patches", files["pt2"], files["acts"], "-o", ref, check=True)
    assert out.read_bytes() == ref.read_bytes()


def test_a_weight_before_its_bias_is_kept_aside(files, tmp_path):
    """A stream with a layer's weight before its bias: the weight waits on disk (spill)."""
    params = load_file(files["params"])
    order = ["3.weight", "0.weight", "0.bias", "3.bias"]
    odd = tmp_path / "odd.safetensors"
    with open(odd, "wb") as fh:
        w = SafetensorsWriter(fh, [(k, params[k].dtype, tuple(params[k].shape)) for k in order], {})
        for k in order:
            w.write(k, params[k])
        w.close()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("canonicalize", files["pt2"], odd, "-o", a, check=True)
    proc = run_cli("canonicalize", files["pt2"], "-", "-o", b, input=odd.read_bytes())
    assert proc.returncode == 0, proc.stderr
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _shell(command: str, tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(kfac_cli_exe()[0])}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, env=env, cwd=tmp_path
    )


def test_a_reader_that_stops_early_ends_the_command_quietly(files, tmp_path):
    big = tmp_path / "big.safetensors"
    x = load_file(files["acts"])
    save_file({"0": x["0"].repeat(64, 1, 1, 1), "3": x["3"].repeat(64, 1)}, big)
    proc = _shell(f"kfac-cli patches {files['pt2']} {big} -o - | head -c 100 > /dev/null", tmp_path)
    assert proc.returncode == 141  # SIGPIPE's status, like any Unix tool
    assert proc.stderr == b"", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_is_one_clear_error(files, tmp_path):
    proc = _shell(f"kfac-cli patches {files['pt2']} {files['acts']} -o - > /dev/full", tmp_path)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert (
        lines[0] == "Error: stdout: expected to write the output but found No space left on device"
    )


def test_models_and_second_streams_are_usage_errors(files, tmp_path):
    proc = run_cli("patches", "-", files["acts"], "-o", tmp_path / "o")
    assert proc.returncode == 2 and b"random access" in proc.stderr
    proc = run_cli("factors", files["pt2"], "-", "--grads", "-", "-o", tmp_path / "o")
    assert proc.returncode == 2 and b"at most one" in proc.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_reading_a_pipe_needs_no_more_memory_than_a_file(tmp_path):
    layers = [torch.nn.Conv2d(8, 8, 5, padding=2) for _ in range(6)]
    model = torch.nn.Sequential(*layers)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 8, 8, 8),)), pt2)
    dump = tmp_path / "acts.safetensors"
    save_file({str(i): torch.randn(32, 8, 64, 64) for i in range(6)}, dump)  # 25 MiB each
    # The peak of this process's own memory (VmHWM starts afresh at exec; ru_maxrss does
    # not: a child started from a large pytest worker would report the worker's peak).
    code = (
        "import sys; from kfac_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) // 1024, file=sys.stderr)"
    )
    peaks = {}
    for how in ("file", "pipe"):
        out = tmp_path / f"{how}.safetensors"
        src = str(dump) if how == "file" else "-"
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "patches",
                str(pt2),
                src,
                "-o",
                str(out),
                "-q",
                "--approx",
                "reduce",
            ],
            input=dump.read_bytes() if how == "pipe" else None,
            capture_output=True,
            check=True,
        )
        peaks[how] = int(proc.stderr.decode().split()[-1])
    assert peaks["pipe"] <= peaks["file"] + 16, peaks
