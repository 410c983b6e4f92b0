"""The streaming pipeline: a reader thread, the device stage, and a writer thread.

Reads run a few chunks ahead on a :class:`Prefetcher` thread into buffers from a small
:class:`BufferPool`; the main thread moves each chunk through the :class:`DeviceStage`
(host to device, compute, device to host) and hands the result to a
:class:`BackgroundWriter`, whose thread writes it and then releases its buffers. Reads,
copies and writes release the GIL, so I/O and compute overlap even with one compute thread;
memory stays a few chunks. :meth:`kfac_cli.jobs.skeleton.Job.stream` sets the three up and
tears them down on every path; a job writes only what it computes per chunk.

Thread rules:

- **Who owns a buffer.** A pool buffer belongs to the reader from ``pool.get`` until its
  :class:`Read` is done; then to the main thread, which gets it with the tensor from
  :meth:`Prefetcher.next`; then to whoever it hands it on to: the writer thread, through a
  ``done`` callback that returns it (``release``) after the write, or the pool directly
  once nothing refers to it any more. Nobody touches a buffer it does not own.
- **How many buffers.** A pool holds ``ahead + 2`` buffers: ``ahead + 1`` reads in flight
  or waiting, and one with the consumer. That is also the least with which
  :meth:`Prefetcher.close` returns after an error left one buffer with the consumer: the
  reads still queued can each get one. :class:`Prefetcher` asserts it.
- **In step.** Each read carries what it reads (a tensor's key and row range); the
  consumer names what it expects in :meth:`Prefetcher.next`, and a mismatch is a bug that
  stops the run (two reads of the same size swapped would otherwise go unnoticed).
- **Reading.** One reader thread; files are read with positional reads (``preadv``), so
  no handle's offset is shared state.
- **Errors.** A read that fails returns its buffer and raises in :meth:`Prefetcher.next`;
  a write that fails is re-raised by the next ``put`` or by ``close``; on any error the
  main thread aborts the writer (joined with a bound) and closes the prefetcher (queued
  reads cancelled, the one running waited for), and the output file is removed.

On a CUDA device the stage also overlaps the transfers with the kernels: copies in run on
their own stream, the compute stream waits for them on an event; copies out run on a third
stream after an event of the compute stream; the output alternates between two device
buffers, each reused only after the copy out of it has finished; ``record_stream`` tells
the caching allocator which streams use a tensor. The writer waits for the copy-out event
before it touches the host buffer.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_cli.files.writer import SafetensorsWriter

ABORT_SECONDS = 60.0  # how long an abort waits for the write in progress


class BufferPool:
    """Reusable byte buffers (fresh memory is slow to touch; reused memory is not)."""

    def __init__(self, count: int, device: torch.device, pin_memory: bool = False) -> None:
        self.count = count
        self._free: queue.Queue[Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)
        self._device, self._pin = device, pin_memory

    def get(self, nbytes: int) -> Tensor:
        """A ``uint8`` buffer of at least ``nbytes`` (blocks until one is free); one far
        larger than needed is given back to the allocator, so memory follows the chunks
        of the layer in hand, not the largest chunk ever read."""
        buf = self._free.get()
        if buf is None or buf.numel() < nbytes or buf.numel() > 4 * max(nbytes, 2**20):
            buf = torch.empty(
                max(nbytes, 1), dtype=torch.uint8, device=self._device, pin_memory=self._pin
            )
        return buf

    def put(self, buf: Tensor) -> None:
        self._free.put(buf)


def view(buf: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """The first bytes of ``buf`` as a contiguous ``dtype`` tensor of ``shape``."""
    n = torch.Size(shape).numel() * dtype.itemsize
    return buf[:n].view(dtype).view(shape)


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` live in the same storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class BackgroundWriter:
    """Writes ``(key, tensor)`` items through a :class:`SafetensorsWriter` on a thread.

    ``put`` blocks while ``depth`` items are waiting; ``done`` callbacks run after an item
    is written (e.g. to return its buffers); an ``event`` (CUDA) is waited for before
    writing. Errors on the thread are re-raised in the caller by ``put`` and ``close``.
    """

    _STOP = object()

    def __init__(self, writer: SafetensorsWriter, depth: int = 2) -> None:
        self._writer = writer
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kfac-cli-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._items.get()
            if item is self._STOP:
                return
            key, tensor, event, done = item
            try:
                if self._error is None:
                    if event is not None:
                        event.synchronize()
                    self._writer.write(key, tensor)
            except BaseException as e:  # re-raised in the main thread
                self._error = e
            finally:
                if done is not None:
                    done()
                item = tensor = None  # written: not kept alive while the next is awaited

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(
        self, key: str, tensor: Tensor, event: object = None, done: Callable[[], None] | None = None
    ) -> None:
        self._raise()
        self._items.put((key, tensor, event, done))

    def close(self) -> None:
        """Wait until everything is written; raise the thread's error, if any."""
        self._items.put(self._STOP)
        self._thread.join()
        self._raise()
        self._writer.close()

    def abort(self) -> None:
        """Stop after the item being written (used on errors and interrupts); waits at
        most :data:`ABORT_SECONDS` for it (a write blocked on a full pipe stays behind, in
        a daemon thread)."""
        self._error = self._error or RuntimeError("aborted")  # the rest is not written,
        try:  # but each queued item's ``done`` still runs (its buffers go back)
            self._items.put(self._STOP, timeout=ABORT_SECONDS)
        except queue.Full:
            return
        self._thread.join(ABORT_SECONDS)


@dataclass(frozen=True)
class Read:
    """One prefetched read: what it reads (a tensor's key and row range ``start:stop``),
    how many bytes, and ``read(buffer)``, which fills a ``uint8`` buffer of at least
    ``nbytes`` and returns the tensor in it."""

    key: str
    rows: tuple[int, int]
    nbytes: int
    read: Callable[[Tensor], Tensor]


class Prefetcher:
    """Runs reads in a fixed order on one thread, a few ahead of the consumer.

    Each read gets a buffer from ``pool``; the consumer returns it (:meth:`release`) once
    nothing refers to it any more. See the module docstring for the thread rules.

    Args:
        reads: The reads, in the order :meth:`next` will ask for them.
        pool: Where the buffers come from (at least ``ahead + 2`` of them).
        ahead: How many reads may run ahead of the consumer.
    """

    def __init__(self, reads: Iterable[Read], pool: BufferPool, ahead: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if pool.count < ahead + 2:
            raise ValueError(f"a pool of {pool.count} buffers for {ahead} reads ahead")
        self._reads, self._pool = iter(reads), pool
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfac-cli-reader")
        self._pending: deque = deque()
        for _ in range(ahead + 1):
            self._submit()

    def _submit(self) -> None:
        item = next(self._reads, None)
        if item is not None:
            self._pending.append((item, self._executor.submit(self._load, item)))

    def _load(self, item: Read) -> tuple[Tensor, Tensor]:
        buf = self._pool.get(item.nbytes)
        try:
            return item.read(buf), buf
        except BaseException:
            self._pool.put(buf)
            raise

    def next(self, key: str, rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The next tensor, which must be rows ``start:stop`` of ``key``, and its buffer;
        starts another read.

        Raises:
            RuntimeError: When the next read is not what the consumer expects (a bug).
        """
        if not self._pending:
            raise RuntimeError(f"reader and consumer out of step: {key} {rows} was never read")
        item, future = self._pending.popleft()
        if (item.key, tuple(item.rows)) != (key, tuple(rows)):
            raise RuntimeError(
                f"reader and consumer out of step: expected {key} rows {rows}, "
                f"read {item.key} rows {item.rows}"
            )
        self._submit()
        return future.result()

    def release(self, buf: Tensor) -> None:
        """Give a buffer back to the pool (nothing refers to it any more)."""
        self._pool.put(buf)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class DeviceStage:
    """Chunks to the compute device and results back, overlapped on a CUDA device.

    On the CPU every method is (nearly) the identity. See the module docstring for the
    CUDA streams and events.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_pool = BufferPool(3, torch.device("cpu"), pin_memory=self.cuda)
        self._outputs: list[tuple[Tensor | None, object]] = [(None, None), (None, None)]
        self._turn = 0
        self._copied = None
        if self.cuda:
            self._compute = torch.cuda.current_stream(device)
            self._copy_in = torch.cuda.Stream(device)
            self._copy_out = torch.cuda.Stream(device)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def to_device(self, host: Tensor, dtype: torch.dtype) -> Tensor:
        """``host`` on the device as ``dtype``; the compute stream waits for the copy.

        The host tensor must stay untouched until the result of the computation on it has
        come back (release its buffer in the writer's ``done``)."""
        if self.on_cpu:
            return host.to(dtype)
        if not self.cuda:
            return host.to(self.device, dtype)
        with torch.cuda.stream(self._copy_in):
            x = host.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._copy_in)
        self._compute.wait_event(self._copied)
        x.record_stream(self._compute)
        return x.to(dtype)

    def wait_copied(self) -> None:
        """Wait until the last :meth:`to_device` copy has left its host buffer (CUDA: the
        copy stream's event; compute may still run)."""
        if self.cuda and self._copied is not None:
            self._copied.synchronize()

    def output(self, nbytes: int) -> Tensor:
        """A device buffer for one result: two alternate, each reused only after the copy
        out of its previous result has finished."""
        buf, done = self._outputs[self._turn]
        if self.cuda and done is not None:
            self._compute.wait_event(done)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        self._outputs[self._turn] = (buf, None)
        return buf

    def to_host(self, y: Tensor, host_buf: Tensor) -> tuple[Tensor, object]:
        """``y`` copied into ``host_buf`` (a pinned host buffer): ``(host tensor, event)``,
        the event to wait for before reading the host tensor (``None``: ready)."""
        host = view(host_buf, y.dtype, tuple(y.shape))
        if not self.cuda:
            host.copy_(y)  # synchronous from MPS and other devices
            return host, None
        computed = torch.cuda.Event()
        computed.record(self._compute)
        with torch.cuda.stream(self._copy_out):
            self._copy_out.wait_event(computed)
            host.copy_(y, non_blocking=True)
            y.record_stream(self._copy_out)
            copied = torch.cuda.Event()
            copied.record(self._copy_out)
        buf, _ = self._outputs[self._turn]
        if buf is not None and shares_memory(buf, y):
            self._outputs[self._turn] = (buf, copied)
            self._turn = 1 - self._turn
        return host, copied
