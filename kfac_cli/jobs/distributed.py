"""Running one job on several ``torchrun`` ranks: who reads what, sums, and failing together.

Without the ``torch.distributed`` environment variables a job is one :class:`Ranks` of
one. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) :func:`ranks_from_env` joins the process group (gloo for CPU tensors,
nccl for CUDA, each rank on ``cuda:LOCAL_RANK``) and each rank:

- reads its share of the inputs (:meth:`Ranks.share`): whole files round-robin when there
  are at least as many files as ranks, else a range of every file's batch rows;
- sums what it read, and adds the sums up with one ``all_reduce`` per layer;
- agrees before anything is written: a rank that fails sets a key in the rendezvous store,
  the others see it between chunks and stop (quietly: the failing rank prints the one
  error line); every rank beats a heartbeat into the store, so a rank that dies is noticed
  within the timeout instead of being waited for forever;
- rank 0 writes the output atomically, then tells the others whether that worked.

Only ``torch.distributed`` (its process group and key-value store) carries messages.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch

from kfac_cli.errors import KfacError
from kfac_cli.jobs.devices import resolve_device

T = TypeVar("T")

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
POLL_SECONDS = 0.005
BEAT_SECONDS = 1.0


class RankFailed(KfacError):
    """Another rank failed (and printed why): this rank stops quietly."""

    def __init__(self, line: str) -> None:
        super().__init__(None, None, "every rank to succeed", line)
        self.quiet = True


class Ranks:
    """One process: it reads everything, sums alone and writes the output."""

    rank, world, local_rank = 0, 1, 0
    waited = 0.0  # seconds spent in barriers and collectives

    @property
    def writer(self) -> bool:
        """Whether this rank writes the output (rank 0)."""
        return self.rank == 0

    def share(self, batches: list[int]) -> list[tuple[int, int, int]]:
        """This rank's ``(file, first row, end row)`` units of files with ``batches`` rows:
        whole files round-robin when there are at least as many files as ranks, else
        ``world`` ranges of every file's rows."""
        if len(batches) >= self.world:
            return [(f, 0, b) for f, b in enumerate(batches) if f % self.world == self.rank]
        units = []
        for f, b in enumerate(batches):
            lo, hi = b * self.rank // self.world, b * (self.rank + 1) // self.world
            if hi > lo:
                units.append((f, lo, hi))
        return units

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (every rank gets the total; only the
        writer uses it)."""
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The writer's ``tensor`` on every rank, in place (the same bytes everywhere)."""
        return tensor

    def send_(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to rank ``dst`` (which receives it with :meth:`recv_`)."""
        raise RuntimeError("one process has no other rank")

    def recv_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill ``tensor`` with what rank ``src`` sends."""
        raise RuntimeError("one process has no other rank")

    def check(self) -> None:
        """Raise :class:`RankFailed` if another rank has failed."""

    def fail(self, error: BaseException) -> bool:
        """Tell the other ranks this one failed; whether it should print the error."""
        return True

    def agree(self) -> None:
        """Wait until every rank has finished its share (before the writer commits)."""

    def gather_strings(self, name: str, mine: dict[int, str], count: int) -> list[str] | None:
        """Strings ``0..count-1``, each given by one rank (``mine``), on the writer (in
        index order); ``None`` on the other ranks."""
        return [mine[i] for i in range(count)]

    def publish(self) -> None:
        """On the writer, after the output is in place: tell the others it worked."""

    def await_writer(self) -> None:
        """On the other ranks: wait for the writer's output (raise if it failed)."""

    def close(self) -> None:
        pass


def is_distributed() -> bool:
    """Whether the ``torchrun`` environment variables are present."""
    return all(k in os.environ for k in ENV) and int(os.environ["WORLD_SIZE"]) > 1


def rank_of_env() -> int:
    """This process's rank (0 without torchrun), from the environment alone."""
    return int(os.environ.get("RANK", 0)) if is_distributed() else 0


def on_ranks(device: str, timeout: float, run: Callable[[Ranks, str], T]) -> T:
    """``run(ranks, device)`` as this process's rank: ``device`` made ``cuda:LOCAL_RANK``
    for CUDA under torchrun (one GPU per rank), a failure told to the other ranks (the
    first to fail prints it; the others stop quietly), the group closed on every path."""
    ranks = ranks_from_env(resolve_device(device), timeout)
    if ranks.world > 1 and device in ("cuda", "auto") and resolve_device(device).type == "cuda":
        device = f"cuda:{ranks.local_rank}"
    try:
        return run(ranks, device)
    except BaseException as e:
        if not isinstance(e, RankFailed) and not ranks.fail(e):
            raise RankFailed("another rank failed first") from None
        raise
    finally:
        ranks.close()


def ranks_from_env(device: torch.device, timeout: float) -> Ranks:
    """The ranks of this run: :class:`Ranks` alone, or the torchrun group it joins.

    Args:
        device: The compute device (``cuda`` means nccl on ``cuda:LOCAL_RANK``).
        timeout: Seconds to wait for a rank that stopped responding.
    """
    if not is_distributed():
        return Ranks()
    return TorchrunRanks(device, timeout)


class TorchrunRanks(Ranks):
    """This process as one of ``torchrun``'s ranks (see the module docstring)."""

    def __init__(self, device: torch.device, timeout: float) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.timeout = timeout
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        try:
            base = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                self.world,
                is_master=self.rank == 0 and not agent_store,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, ValueError) as e:
            raise KfacError(
                None, "torchrun", "a reachable rendezvous store", str(e).splitlines()[0][:120]
            ) from None
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"kfac-cli/{run}/{restart}/", base)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        self._ask(
            dist.init_process_group,
            backend,
            store=dist.PrefixStore("pg/", self.store),
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=timeout),
        )
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="kfac-cli-heartbeat", daemon=True)
        self._beats.start()
        self._last_check = 0.0
        self._seen: dict[int, tuple[int, float]] = {}
        self._sums = 0
        self._interrupted = False

    def _beat(self) -> None:
        n = 0
        while not self._stop.wait(BEAT_SECONDS):
            n += 1
            try:
                self.store.set(f"alive/{self.rank}", str(n))
            except (RuntimeError, ValueError):
                return

    def _ask(self, op, *args, **kwargs):
        """A store or collective operation; a peer or store gone is one clear error."""
        try:
            return op(*args, **kwargs)
        except (RuntimeError, ValueError) as e:
            found = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            raise KfacError(None, "torchrun", "every rank and the store to answer", found) from None

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last_check < POLL_SECONDS:
            return
        self._last_check = now
        if self._ask(self.store.check, ["failed"]):
            raise RankFailed(self._ask(self.store.get, "failed").decode(errors="replace"))

    def _alive(self, rank: int) -> None:
        """Raise if ``rank``'s heartbeat has not moved for the timeout."""
        key = f"alive/{rank}"
        beat = int(self._ask(self.store.get, key)) if self._ask(self.store.check, [key]) else 0
        now = time.monotonic()
        last, since = self._seen.get(rank, (-1, now))
        if beat != last:
            self._seen[rank] = (beat, now)
        elif now - since > self.timeout:
            raise KfacError(
                None, f"rank {rank}", "a rank that responds", f"none for {self.timeout:.0f} s"
            )

    def fail(self, error: BaseException) -> bool:
        if isinstance(error, RankFailed):
            return False
        if isinstance(error, KeyboardInterrupt):  # the launcher stops every rank itself
            self._interrupted = True
            return True
        line = getattr(error, "line", None)
        text = line() if callable(line) else f"{type(error).__name__}: {error}"
        text = f"rank {self.rank}: {text}"
        try:
            return self.store.compare_set("failed", "", text).decode(errors="replace") == text
        except (RuntimeError, ValueError):
            return True

    def _wait_all(self, key: str) -> None:
        """Wait until every rank has set ``key/<rank>``, watching failures and heartbeats."""
        self._ask(self.store.set, f"{key}/{self.rank}", "1")
        pending = [r for r in range(self.world) if r != self.rank]
        while pending:
            self._last_check = 0.0
            self.check()
            pending = [r for r in pending if not self._ask(self.store.check, [f"{key}/{r}"])]
            for r in pending:
                self._alive(r)
            if pending:
                time.sleep(POLL_SECONDS)

    def _collective(self, op, *args, **kwargs) -> None:
        """A collective once every rank has arrived (it then waits no more), timed."""
        start = time.perf_counter()
        self._sums += 1
        self._wait_all(f"sum{self._sums}")
        self._ask(op, *args, **kwargs)
        self.waited += time.perf_counter() - start

    def _transfer(self, op, *args) -> None:
        """A point-to-point transfer, timed. Blocking: gloo completes one only in wait().
        A peer that fails closes its connection (an error here, quiet: it set "failed"
        first); one that hangs is bounded by the process group's timeout."""
        start = time.perf_counter()
        self._ask(op, *args)
        self.waited += time.perf_counter() - start

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._collective(self.dist.all_reduce, tensor)  # gloo's is faster than its reduce
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._collective(self.dist.broadcast, tensor, src=0)
        return tensor

    def send_(self, tensor: torch.Tensor, dst: int) -> None:
        self._transfer(self.dist.send, tensor, dst)

    def recv_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._transfer(self.dist.recv, tensor, src)
        return tensor

    def agree(self) -> None:
        start = time.perf_counter()
        self._wait_all("done")
        self.waited += time.perf_counter() - start

    def gather_strings(self, name: str, mine: dict[int, str], count: int) -> list[str] | None:
        for i, value in mine.items():
            self._ask(self.store.set, f"{name}/{i}", value)
        self._wait_all(f"{name}-set")
        if not self.writer:
            return None
        return [self._ask(self.store.get, f"{name}/{i}").decode() for i in range(count)]

    def publish(self) -> None:
        self._ask(self.store.set, "written", "1")
        self._wait_all("seen")  # the store may live in this process: stay until all know

    def await_writer(self) -> None:
        while not self._ask(self.store.check, ["written"]):
            self._last_check = 0.0
            self.check()
            self._alive(0)
            time.sleep(POLL_SECONDS)
        self._ask(self.store.set, f"seen/{self.rank}", "1")

    def close(self) -> None:
        self._stop.set()
        if self._interrupted:
            return  # its peers and store may be gone: nothing to wait for
        with contextlib.suppress(RuntimeError, ValueError, AssertionError):
            self.dist.destroy_process_group()
