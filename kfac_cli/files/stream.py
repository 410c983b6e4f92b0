"""Safetensors read from a stream (stdin, a pipe): the header, then the bytes once, in order.

A stream cannot seek, so a :class:`StreamSource` serves reads in the order of the data
offsets with bounded memory: a job that asks for tensors (or runs of their rows) in that
order (``order()``) reads each byte once, straight into its own buffer. A read further
ahead skips the bytes before it, keeping those of tensors still expected (``expect()``) in a
temporary file (already unlinked, so nothing is left behind) from which they are read
later: memory stays a chunk, disk holds what arrived too early. ``finish()`` consumes the
rest and checks that the stream ends exactly where the header says.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import BinaryIO

import torch
from torch import Tensor

from kfac_cli.errors import KfacError
from kfac_cli.files.digest import TensorDigests
from kfac_cli.files.header import read_header
from kfac_cli.files.inputs import read_exactly
from kfac_cli.files.safetensors import row_range, tensor_bytes

SKIP_CHUNK = 1 << 20


class StreamSource:
    """Tensors by name from a safetensors stream read once, front to back.

    Args:
        fh: The stream, at its first byte (the source owns and closes it).
        name: How it is named in messages (``stdin``, or the pipe's path).
        hashed: Hash every byte as it arrives, for :meth:`digest` (else it cannot say).

    Raises:
        KfacError: For a malformed header, or (on reads) a stream that ends early.
    """

    sequential = True

    def __init__(self, fh: BinaryIO, name: str, hashed: bool = True) -> None:
        self.path = name
        self._fh = fh
        try:
            self.infos, self.metadata, self._end = read_header(fh, name)
        except BaseException:
            fh.close()
            raise
        ordered = sorted(self.infos.values(), key=lambda i: i.begin)
        self._starts = [i.begin for i in ordered]
        self._by_start = [k for k, _ in sorted(self.infos.items(), key=lambda kv: kv[1].begin)]
        self._pos = ordered[0].begin if ordered else self._end
        self._expected = set(self.infos)
        self._spill: BinaryIO | None = None
        self._segments: list[tuple[int, int, int]] = []  # (begin, end, spill offset)
        self._lock = threading.Lock()
        self._digests = TensorDigests({k: i.nbytes for k, i in self.infos.items()}, hashed)

    def order(self, keys: Iterable[str]) -> list[str]:
        """``keys`` in the order their bytes arrive."""
        return sorted(keys, key=lambda k: self.infos[k].begin)

    def expect(self, keys: Iterable[str]) -> None:
        """Only these tensors will be read: the bytes of others are skipped, not kept."""
        self._expected = set(keys)

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor:
        """One tensor, or rows ``start:stop`` of it seen as ``[-1, row_len]``."""
        info = self.infos[name]
        shape, begin, nbytes = row_range(info, rows)
        t = torch.empty(shape, dtype=info.dtype) if out is None else out[:nbytes]
        t = t.view(info.dtype).view(shape)
        if nbytes:
            self._read_range(name, begin, tensor_bytes(t))
        return t

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None:
        """Rows ``start:stop`` of a tensor into ``dst`` (which may be a column block)."""
        info = self.infos[name]
        if dst.dtype != info.dtype or dst.device.type != "cpu" or not dst.is_contiguous():
            dst.copy_(self.read(name, rows=rows))
            return
        _, begin, nbytes = row_range(info, rows)
        if nbytes:
            self._read_range(name, begin, tensor_bytes(dst))

    def finish(self) -> None:
        """Consume the rest of the stream and check that it ends where the header says."""
        with self._lock:
            self._advance(self._end)
            if self._fh.read(1):
                raise KfacError(
                    self.path, None, f"the data to end at byte {self._end}", "more bytes"
                )

    def digest(self, name: str) -> str:
        """The ``sha256`` of one tensor's bytes, every one of which was hashed as it
        arrived (after :meth:`finish`)."""
        return self._digests.hexdigest(name, None)

    def close(self) -> None:
        self._fh.close()
        if self._spill is not None:
            self._spill.close()

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _key_at(self, position: int) -> str:
        return self._by_start[bisect.bisect_right(self._starts, position) - 1]

    def _read_range(self, name: str, begin: int, view: memoryview) -> None:
        with self._lock:
            if begin >= self._pos:
                self._advance(begin)
                got = read_exactly(self._fh, view)
                self._pos += got
                if got < len(view):
                    self._ended(name)
                self._digests.update(name, begin - self.infos[name].begin, view)
                return
            for seg_begin, seg_end, offset in self._segments:
                if seg_begin <= begin and begin + len(view) <= seg_end:
                    done, at = 0, offset + begin - seg_begin
                    while done < len(view):
                        done += os.preadv(self._spill.fileno(), [view[done:]], at + done)
                    return
        raise RuntimeError(f"{name}: bytes {begin}+{len(view)} were read once already")

    def _advance(self, target: int) -> None:
        """Consume the stream up to ``target``, keeping what is still expected."""
        scratch = None
        while self._pos < target:
            key = self._key_at(self._pos)
            stop = min(target, self.infos[key].end, self._pos + SKIP_CHUNK)
            if scratch is None:
                scratch = memoryview(bytearray(min(SKIP_CHUNK, target - self._pos)))
            part = scratch[: stop - self._pos]
            got = read_exactly(self._fh, part)
            if got < len(part):
                self._ended(key)
            self._digests.update(key, self._pos - self.infos[key].begin, part)
            if key in self._expected:
                self._keep(self._pos, part)
            self._pos = stop

    def _keep(self, begin: int, data: memoryview) -> None:
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="kfac-cli-spill-")  # noqa: SIM115
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(data)
        if self._segments and self._segments[-1][1] == begin:
            seg_begin, _, seg_offset = self._segments[-1]
            self._segments[-1] = (seg_begin, begin + len(data), seg_offset)
        else:
            self._segments.append((begin, begin + len(data), offset))
        self._spill.flush()

    def _ended(self, key: str) -> None:
        raise KfacError(
            self.path,
            key,
            f"tensor data up to byte {self._end} as the header promises",
            f"the stream ended near byte {self._pos}",
        )
