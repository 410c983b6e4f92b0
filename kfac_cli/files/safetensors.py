"""Safetensors files: header validation and row-range reads into caller's buffers.

The format (see ``docs/formats.md``): an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the tensors' bytes, which tile the
data section exactly.

What the official ``safetensors`` library does as well, it does here: a regular file's
header is validated by ``safetensors.safe_open`` too (its JSON parser bounds nesting depth,
and anything it refuses, no other tool will read). What it cannot do is kept here: reading a
tensor, or a range of its rows, with ``readinto``/``preadv`` straight into a pooled (or
pinned) buffer, without mapping the file and without a copy, so that memory is bounded by a
chunk of rows; and parsing a header from a stream (stdin, a pipe), which it cannot map.
Our own checks come first, for messages that name what is wrong (a hole, an overlap, a
duplicate key, which the official parser silently accepts).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from kfac_cli.errors import KfacError
from kfac_cli.files.digest import TensorDigests
from kfac_cli.files.header import ITEM_SIZES, TensorInfo, official_check, read_header, torch_dtype
from kfac_cli.files.inputs import open_readable, read_exactly

DTYPES: dict[str, torch.dtype] = {name: torch_dtype(name) for name in ITEM_SIZES}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """A validated safetensors file (random access) whose tensors are read on demand.

    Args:
        path: The file.
        hashed: Hash the bytes read in order, for :meth:`digest` (see :mod:`.digest`).

    Raises:
        KfacError: For anything that is not a well-formed safetensors file.
    """

    sequential = False

    def __init__(self, path: Path | str, hashed: bool = True) -> None:
        self.path = Path(path)
        self._fh = open_readable(self.path)
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self.infos, self.metadata, _ = read_header(self._fh, self.path, size)
            official_check(self.path)
        except BaseException:
            self._fh.close()
            raise
        self._digests = TensorDigests({k: i.nbytes for k, i in self.infos.items()}, hashed)

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor:
        """Read one tensor (or some of its rows, see :func:`read_into`) into CPU memory;
        bytes that continue the tensor's hash extend it (see :mod:`.digest`)."""
        info = self.infos[name]
        t = read_into(self._fh, info, out, rows)
        self._digests.update(name, row_range(info, rows)[1] - info.begin, tensor_bytes(t))
        return t

    def digest(self, name: str) -> str:
        """The ``sha256`` of one tensor's bytes (reading what was not read in order)."""
        info = self.infos[name]

        def read(offset: int, view: memoryview) -> None:
            if read_at(self._fh, view, info.begin + offset) < len(view):
                raise KfacError(self.path, name, f"{info.nbytes} bytes", "the file shrank")

        return self._digests.hexdigest(name, read)

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None:
        """Rows of one tensor straight into ``dst`` (see :func:`read_rows_into`)."""
        read_rows_into(self._fh, self.infos[name], rows, dst)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_bytes(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def row_range(
    info: TensorInfo, rows: tuple[int, int, int] | None
) -> tuple[tuple[int, ...], int, int]:
    """``(shape, first byte, byte count)`` of a whole tensor (``rows=None``) or of rows
    ``start:stop`` of it seen as ``[-1, row_len]`` (``rows=(row_len, start, stop)``)."""
    if rows is None:
        return info.shape, info.begin, info.nbytes
    row_len, start, stop = rows
    row_bytes = row_len * info.dtype.itemsize
    begin, nbytes = info.begin + start * row_bytes, (stop - start) * row_bytes
    if not 0 <= start <= stop or begin + nbytes > info.end:
        raise ValueError(f"rows {start}:{stop} of {row_len} lie outside the tensor")
    return (stop - start, row_len), begin, nbytes


def read_into(
    fh: BinaryIO,
    info: TensorInfo,
    out: Tensor | None = None,
    rows: tuple[int, int, int] | None = None,
) -> Tensor:
    """Read ``info``'s tensor from ``fh`` straight into memory (no copy, no memory map).

    Args:
        fh: The open file.
        info: Where the tensor lies.
        out: A ``uint8`` buffer to read into (default: fresh memory).
        rows: ``(row_len, start, stop)`` to read only rows ``start:stop`` of the tensor seen
            as ``[-1, row_len]`` (rows are contiguous bytes: batch chunks, weight rows).

    Returns:
        ``info.shape``, or ``[stop - start, row_len]`` with ``rows``.
    """
    shape, begin, nbytes = row_range(info, rows)
    t = torch.empty(shape, dtype=info.dtype) if out is None else out[:nbytes]
    t = t.view(info.dtype).view(shape)
    if nbytes == 0:
        return t
    got = read_at(fh, tensor_bytes(t), begin)
    if got < nbytes:
        raise KfacError(info.file, None, f"{nbytes} bytes", f"{got} (the file shrank)")
    return t


def read_at(fh: BinaryIO, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fh`` at byte ``offset`` with positional reads (``preadv``: the
    handle's own offset is not used, so threads may share it); the bytes read, fewer only
    at the end of the file."""
    if not hasattr(os, "preadv"):  # no positional reads here: seek and read
        fh.seek(offset)
        return read_exactly(fh, view)
    done = 0
    while done < len(view):
        got = os.preadv(fh.fileno(), [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


def read_rows_into(fh: BinaryIO, info: TensorInfo, rows: tuple[int, int, int], dst: Tensor) -> None:
    """Read rows ``start:stop`` of ``info`` seen as ``[-1, row_len]`` straight into ``dst``.

    ``dst`` is ``[stop - start, row_len]`` and may have a row stride (a column block of a
    wider tensor): each row is read into place with one scatter read (``preadv``), so no
    extra copy is made. A ``dst`` of another dtype gets a converted copy.
    """
    row_len, start, stop = rows
    if dst.dtype != info.dtype or dst.device.type != "cpu" or (dst.numel() and dst.stride(1) != 1):
        dst.copy_(read_into(fh, info, None, rows))
        return
    if not dst.numel():
        return
    row_bytes = row_len * info.dtype.itemsize
    step = dst.stride(0) * info.dtype.itemsize
    base = dst.data_ptr()
    views = [
        memoryview((ctypes.c_char * row_bytes).from_address(base + i * step)).cast("B")
        for i in range(stop - start)
    ]
    offset = info.begin + start * row_bytes
    if not hasattr(os, "preadv"):  # one read per row where scatter reads are missing
        for v in views:
            fh.seek(offset)
            offset += fh.readinto(v)
        return
    while views:
        batch = views[:512]  # within IOV_MAX
        got = os.preadv(fh.fileno(), batch, offset)
        if not got:
            raise KfacError(info.file, None, f"rows {start}:{stop}", "a file that shrank")
        offset += got
        done = 0
        while done < len(batch) and got >= len(batch[done]):
            got -= len(batch[done])
            done += 1
        views = views[done:]
        if got:
            views[0] = views[0][got:]
