"""`kfac-cli factors` on torchrun ranks (gloo, CPU): same result as one process, and
failures that fail every rank, promptly, with one line and no output."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli.record import record
from tests.conftest import free_port, invoke, kfac_cli_exe, torchrun_command
from tests.test_ekfac import _blocks_of

# Measured bound of the float32 difference from one process (summation order only).
RANK_RTOL = 1e-6


class Windows(nn.Module):
    """A linear layer on 4x4 windows with the batch folded in (``[B·4, 16, C]``), and one on
    a positional table computed once per batch (``[1, 16, 2]``): row ranges of a file split
    the first by sample and give the second to one rank."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.mix = nn.Linear(c, c)
        self.pos = nn.Linear(2, c)
        self.register_buffer("table", torch.randn(1, 16, 2))

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 16, c)
        return (self.mix(x) + self.pos(self.table)).reshape(b, -1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), Windows(6), nn.Linear(384, 4))
    data = [(torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))) for _ in range(7)]
    pairs = record(model, data, nn.CrossEntropyLoss(), folder, fisher_type="empirical")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    return pt2, [a for a, _ in pairs], [g for _, g in pairs]


def torchrun(*args, script=("-m", "kfac_cli"), timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(*args, script=script)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def _our_lines(stderr: bytes) -> list[str]:
    """kfac-cli's own stderr lines (torchrun adds its banner and failure report), and no
    traceback through kfac-cli's code."""
    text = stderr.decode(errors="replace")
    assert "kfac_cli/" not in text and "internal error" not in text, text[-2000:]
    return [line for line in text.splitlines() if line.startswith(("Error:", "Hint:", "Warning:"))]


@pytest.mark.parametrize(
    "count,approx,with_grads",
    [
        pytest.param(1, "expand", True, marks=pytest.mark.smoke),
        pytest.param(2, "reduce", False, marks=pytest.mark.slow),
        pytest.param(3, "expand", False, marks=pytest.mark.slow),
        pytest.param(7, "reduce", True, marks=pytest.mark.slow),
    ],
    ids=["1-shard-rows", "2-shards", "3-shards", "7-shards"],
)
def test_ranks_equal_one_process(shards, tmp_path, count, approx, with_grads):
    pt2, acts, grads = shards
    args = [pt2, *acts[:count], "--approx", approx]
    if with_grads:
        args += ["--grads", *grads[:count]]
    single = tmp_path / "single.safetensors"
    assert invoke("factors", *args, "-o", single).returncode == 0
    out = tmp_path / "ranks.safetensors"
    script = ("-m", "kfac_cli") if count != 7 else (kfac_cli_exe()[0],)  # the console script
    proc = torchrun("factors", *args, "-o", out, "--json", script=script)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert _our_lines(proc.stderr) == []
    summaries = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and f'"num_data": {5 * count}' in summaries[0]
    assert _header(out) == _header(single)  # same shapes, counts and metadata, to the byte
    a, b = load_file(single), load_file(out)
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], rtol=RANK_RTOL, atol=RANK_RTOL * a[key].abs().max()
        )
        assert torch.equal(b[key], b[key].T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.safetensors", "single.safetensors"]


@pytest.mark.slow
def test_a_bad_shard_on_one_rank_fails_every_rank(shards, tmp_path):
    pt2, acts, _ = shards
    x = load_file(acts[1])
    x["3"][0, 0] = float("nan")  # only rank 1 reads this file
    bad = tmp_path / "nan.safetensors"
    with safe_open(acts[1], "pt") as f:
        save_file(x, bad, metadata=f.metadata())  # the batch size: a layer folds the batch
    out = tmp_path / "out.safetensors"
    start = time.monotonic()
    proc = torchrun("factors", pt2, acts[0], bad, "-o", out, "--strict")
    assert proc.returncode != 0
    lines = _our_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: 3: expected finite"), lines
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert time.monotonic() - start < 60


def _opened(pid: int, name: str) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name)
            for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_dead_rank_does_not_leave_the_others_waiting(shards, tmp_path):
    """Ranks started by hand (no torchrun agent to clean up): rank 1 is killed once it has
    joined and opened its inputs; rank 0 notices within the timeout and fails with one
    line, writing nothing."""
    pt2, acts, _ = shards
    big = tmp_path / "big.safetensors"
    n = 40000
    tensors = {"0": torch.randn(n, 3, 8, 8), "2.mix": torch.randn(4 * n, 16, 6)}
    tensors |= {"2.pos": torch.randn(1, 16, 2), "3": torch.randn(n, 384)}
    save_file(tensors, big, metadata={"batch_size": str(n)})
    out = tmp_path / "out.safetensors"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONWARNINGS": "ignore",
            "TORCH_CPP_LOG_LEVEL": "ERROR",
        }
        cmd = [*kfac_cli_exe(), "factors", str(pt2), str(acts[0]), str(big), "-o", str(out)]
        procs.append(subprocess.Popen([*cmd, "--timeout", "3"], env=env, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 120
    while not _opened(procs[1].pid, "big.safetensors") and time.monotonic() < deadline:
        assert procs[1].poll() is None, procs[1].stderr.read()
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].communicate()
    start = time.monotonic()
    _, stderr = procs[0].communicate(timeout=60)
    waited = time.monotonic() - start
    assert procs[0].returncode == 1, stderr
    lines = _our_lines(stderr)
    assert len(lines) == 1 and "rank 1" in lines[0] and "3 s" in lines[0], lines
    assert waited < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


PER_SAMPLE = ("--layer", "0", "--layer", "2.mix", "--layer", "3")  # not 2.pos: once per batch


@pytest.mark.parametrize("count", [pytest.param(1, marks=pytest.mark.smoke), 2])
def test_ekfac_ranks_equal_one_process(shards, tmp_path, count):
    """Both passes split as factors splits them, one eigenbasis on every rank."""
    pt2, acts, grads = shards
    args = [pt2, *acts[:count], "--grads", *grads[:count], "--ekfac", *PER_SAMPLE]
    single = tmp_path / "single.safetensors"
    assert invoke("factors", *args, "-o", single).returncode == 0
    out = tmp_path / "ranks.safetensors"
    proc = torchrun("factors", *args, "-o", out)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert _our_lines(proc.stderr) == []
    assert _header(out) == _header(single)
    a, b = load_file(single), load_file(out)
    for key in a:
        if key.endswith((".A", ".G", ".eigenvalues")):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6 * a[key].abs().max())
    expected, got = _blocks_of(single), _blocks_of(out)  # eigenvectors: up to sign
    assert expected.keys() == got.keys() and len(expected) == 3
    for key, block in expected.items():
        torch.testing.assert_close(got[key], block, rtol=1e-4, atol=1e-5 * block.abs().max())


@pytest.mark.slow
def test_a_bad_shard_in_the_corrections_pass_fails_every_rank(shards, tmp_path):
    pt2, acts, grads = shards
    basis = tmp_path / "basis.safetensors"
    assert invoke("factors", pt2, *acts[:2], "--grads", *grads[:2], "--eigh", *PER_SAMPLE,
                  "-o", basis).returncode == 0  # fmt: skip
    g = load_file(grads[1])
    g["3"][0, 0, 0] = float("nan")  # only rank 1 reads this file
    bad = tmp_path / "nan.safetensors"
    with safe_open(grads[1], "pt") as f:
        save_file(g, bad, metadata=f.metadata())
    out = tmp_path / "out.safetensors"
    proc = torchrun("factors", pt2, *acts[:2], "--grads", grads[0], bad, "--eigenbasis", basis,
                    *PER_SAMPLE, "-o", out, "--strict")  # fmt: skip
    assert proc.returncode != 0
    lines = _our_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: 3: expected finite"), lines
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "basis.safetensors",
        "nan.safetensors",
    ]


@pytest.mark.parametrize("vectors", [pytest.param(1000, marks=pytest.mark.smoke), 1])
def test_apply_on_ranks_equals_one_process(shards, tmp_path, vectors):
    """The ranks share the chunks of vectors; rank 0 receives and writes them."""
    pt2, acts, grads = shards
    factors = tmp_path / "f.safetensors"
    assert invoke("factors", pt2, *acts[:2], "--grads", *grads[:2], "-o", factors).returncode == 0
    with safe_open(factors, "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in layers.values():
        tensors[layer["weight"]] = torch.randn(vectors, *layer["weight_shape"], generator=gen)
        if layer["bias"]:
            tensors[layer["bias"]] = torch.randn(vectors, layer["C_out"], generator=gen)
    tensors["other.scale"] = torch.randn(vectors, 3, generator=gen)
    src = tmp_path / "v.safetensors"
    save_file(tensors, src)
    args = ["apply", factors, src, "--batch-first", "--inverse", "--damping", "0.1"]
    single = tmp_path / "single.safetensors"
    assert invoke(*args, "-o", single).returncode == 0
    out = tmp_path / "ranks.safetensors"
    proc = torchrun(*args, "-o", out, "--json")  # 1000 vectors: chunks for both ranks
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert _our_lines(proc.stderr) == []
    summaries = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and '"ranks": 2' in summaries[0]
    assert _header(out) == _header(single)
    a, b = load_file(single), load_file(out)  # (threads change a GEMM's rounding)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6 * value.abs().max())
