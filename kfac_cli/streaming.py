"""Overlapped streaming: a background thread writes while the main thread computes.

The main thread computes output chunks into buffers from a small :class:`BufferPool` and
hands them to a :class:`BackgroundWriter`, whose thread writes them in order and returns
each buffer to its pool once written. Reads, copies and writes release the GIL, so I/O and
compute overlap even with one compute thread. Memory stays bounded: a few chunks in flight.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from kfac_cli.tensorfile import SafetensorsWriter


class BufferPool:
    """Reusable byte buffers (fresh memory is slow to touch; reused memory is not)."""

    def __init__(self, count: int, device: torch.device, pin_memory: bool = False) -> None:
        self._free: queue.Queue[Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)
        self._device, self._pin = device, pin_memory

    def get(self, nbytes: int) -> Tensor:
        """A ``uint8`` buffer of at least ``nbytes`` (blocks until one is free)."""
        buf = self._free.get()
        if buf is None or buf.numel() < nbytes:
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


class BackgroundWriter:
    """Writes ``(key, tensor)`` items through a :class:`SafetensorsWriter` on a thread.

    ``put`` blocks while ``depth`` items are waiting; ``done`` callbacks run after an item
    is written (e.g. to return its buffer); an ``event`` (CUDA) is waited for before writing.
    Errors on the thread are re-raised in the caller by ``put`` and ``close``.
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
        """Stop after the item being written (used on errors and interrupts)."""
        self._error = self._error or RuntimeError("aborted")
        self._items.put(self._STOP)
        self._thread.join()


class Prefetcher:
    """Runs reads in a fixed order on a thread, a few ahead of the consumer.

    Each read gets a buffer from ``pool``; the consumer returns it (``pool.put``) once
    nothing refers to it any more.

    Args:
        reads: ``(nbytes, read)`` pairs, in the order :meth:`next` will be called;
            ``read(buffer)`` fills a ``uint8`` buffer of at least ``nbytes`` and returns the
            tensor in it.
        pool: Where the buffers come from.
        ahead: How many reads may run ahead of the consumer.
    """

    def __init__(
        self,
        reads: Iterable[tuple[int, Callable[[Tensor], Tensor]]],
        pool: BufferPool,
        ahead: int = 1,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._reads, self._pool = iter(reads), pool
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfac-cli-reader")
        self._pending: deque = deque()
        for _ in range(ahead + 1):
            self._submit()

    def _submit(self) -> None:
        item = next(self._reads, None)
        if item is not None:
            self._pending.append(self._executor.submit(self._load, *item))

    def _load(self, nbytes: int, read: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        buf = self._pool.get(nbytes)
        try:
            return read(buf), buf
        except BaseException:
            self._pool.put(buf)
            raise

    def next(self) -> tuple[Tensor, Tensor]:
        """The next tensor and its buffer; starts another read."""
        future = self._pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
