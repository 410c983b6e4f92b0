"""Shared fixtures and helpers."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
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


def _wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()!r}")
        if time.monotonic() > deadline:
            state = _signal_state(proc.pid)
            proc.kill()
            proc.wait()  # reaped here, not reported by a later test's garbage collection
            err = proc.stderr.read() if proc.stderr else b""
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
            raise AssertionError(f"timed out waiting for {what} ({state}; stderr {err[-300:]!r})")
        time.sleep(0.01)


def _foreground_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM at their defaults, as a foreground job
    has them. A suite started in the background (``cmd &`` in a script) ignores SIGINT,
    its children inherit that, and Python then keeps it ignored: the run would never see
    the test's Ctrl-C (measured: SigIgn 0x1001007 in the stuck run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    """A stuck run's signal masks and each thread's wait channel (Linux), for the report."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        masks = [line for line in status if line.startswith(("SigBlk", "SigIgn", "SigPnd"))]
        waits = [(t / "wchan").read_text() for t in sorted(Path(f"/proc/{pid}/task").iterdir())]
    except OSError:
        return "no /proc"
    return f"{', '.join(masks)}; threads waiting in {waits}"


def interrupt_mid_write(args: list[str], dump: bytes, fifo: Path, outdir: Path, signum: int):
    """Run the CLI with ``args`` (one of which is the named pipe ``fifo``), feed it all of
    ``dump`` but its last byte, and send ``signum`` once it is writing its output.

    Synchronised on what the run does, never on a sleep: the run cannot finish (its input
    has not ended), its temporary output exists when the signal is sent, and the pipe is
    closed only once that temporary file is gone again (the interrupt was handled). Returns
    the finished ``Popen`` and its stderr.
    """
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [*kfac_cli_exe(), *args], stderr=subprocess.PIPE, preexec_fn=_foreground_signals
    )
    fd = -1

    def opened() -> bool:  # the run has opened the pipe for reading
        nonlocal fd
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return False
        return True

    _wait_for(opened, proc, "it opened its input")
    os.set_blocking(fd, True)
    fed = threading.Event()

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):
            _write_all(fd, dump[:-1])
        fed.set()

    threading.Thread(target=feed, daemon=True).start()
    _wait_for(lambda: fed.is_set() and any(outdir.iterdir()), proc, "it wrote its output")
    proc.send_signal(signum)
    # (bounded above the writer's own abort bound, ABORT_SECONDS: a loaded machine may
    # make the run wait that long for its writer; a run that never cleans up still fails)
    _wait_for(lambda: not any(outdir.iterdir()), proc, "it removed its output", seconds=180)
    os.close(fd)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_PROCESS_CALLS = (
    "run_cli(",
    "subprocess.",
    "kfac_cli_exe(",
    "torchrun_command(",
    "interrupt_mid_write(",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start processes (the real CLI, torchrun ranks, the examples) are ``slow``
    unless marked ``smoke``: ``pytest -m "not slow"`` (the inner loop) runs every module
    in-process, the full suite runs everything."""
    import inspect

    seen: dict = {}
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("smoke") or item.get_closest_marker("slow"):
            continue
        if fn not in seen:
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                source = ""
            seen[fn] = any(call in source for call in _PROCESS_CALLS)
        if seen[fn]:
            item.add_marker(pytest.mark.slow)
