"""Shared fixtures and helpers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def kfac_cli_exe() -> list[str]:
    """The installed console script (next to this Python), else ``python -m kfac_cli``."""
    exe = Path(sys.executable).with_name("kfac-cli")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kfac-cli")
    return [found] if found else [sys.executable, "-m", "kfac_cli"]


def free_port() -> int:
    """A free TCP port on this machine, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: object, script=("-m", "kfac_cli"), ranks: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` with ``args`` on ``ranks`` local
    ranks and a free rendezvous port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(free_port()),
        *script,
        *map(str, args),
    ]


def run_cli(*args: object, check: bool = False, env: dict | None = None, **kw):
    """Run the real CLI as a subprocess; return the CompletedProcess (bytes stdout)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [*kfac_cli_exe(), *map(str, args)],
        capture_output=True,
        env=full_env,
        **{"timeout": 300, **kw},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kfac-cli {args} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def invoke(*args: object, check: bool = False):
    """Run the CLI in-process (fast); same result fields as :func:`run_cli`."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from kfac_cli.cli import app, spread_options

    r = CliRunner().invoke(app, spread_options([str(a) for a in args]))
    if check and r.exit_code != 0:
        raise AssertionError(f"kfac-cli {args} exited {r.exit_code}:\n{r.stderr}")
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout_bytes, stderr=r.stderr_bytes)
