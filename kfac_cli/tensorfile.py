"""Safetensors files: a validating, streaming reader and a header-first streaming writer.

Reading never maps or loads the whole file: the header is parsed and checked (dtype,
shape, byte length, offsets that tile the data section exactly, as the format requires),
and each tensor is read with one ``readinto`` into a fresh tensor, so memory is bounded by
the tensor in hand. A sharded set is a Hugging Face style ``*.index.json`` whose
``weight_map`` names the shard of each key.

Writing computes the header from the known output shapes first, then streams each
tensor's bytes in order; the result reads back with the official ``safetensors`` library.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from kfac_cli.errors import KfacCliError

MAX_HEADER_BYTES = 100 * 2**20  # the official library's own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def open_readable(path: Path) -> BinaryIO:
    """Open a regular file for reading, mapping OS problems to :class:`KfacCliError`."""
    if path.is_dir():
        raise KfacCliError(path, None, "a file", "a directory")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise KfacCliError(path, None, "an existing file", "no such file") from None
    except OSError as e:
        raise KfacCliError(path, None, "a readable file", e.strerror or type(e).__name__) from None


def sniff(head: bytes) -> str:
    """Name a file format from its first bytes, for error messages."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save or torch.export?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (torch.save?)"
    if not head:
        return "an empty file"
    return "unrecognised bytes"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in its file: dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise KfacCliError(path, name, "an entry {dtype, shape, data_offsets}", repr(entry)[:80])
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise KfacCliError(path, name, f"a dtype in {', '.join(DTYPES)}", repr(entry["dtype"]))
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise KfacCliError(path, name, "a shape of non-negative ints", repr(shape)[:80])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise KfacCliError(path, name, "data_offsets [begin, end]", repr(offsets)[:80])
    nbytes = prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise KfacCliError(
            path,
            name,
            f"{nbytes} bytes for {entry['dtype']} {shape}",
            f"{offsets[1] - offsets[0]} bytes",
        )
    return TensorInfo(path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """A validated safetensors file whose tensors are read one at a time.

    Args:
        path: The file.

    Raises:
        KfacCliError: For anything that is not a well-formed safetensors file.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fh = open_readable(self.path)
        try:
            self.infos, self.metadata = self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _parse(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        path, fh = self.path, self._fh
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if size < 8:
            found = sniff(head) if size == 0 else f"a truncated file of {size} bytes"
            raise KfacCliError(path, None, "a safetensors file", found)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise KfacCliError(
                path, None, f"a header of at most {MAX_HEADER_BYTES} bytes", f"length {n}"
            )
        if 8 + n > size:
            raise KfacCliError(
                path, None, f"a header within the file's {size} bytes", f"header length {n}"
            )
        raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            found = sniff(head) if sniff(head) != "unrecognised bytes" else f"invalid JSON ({e})"
            raise KfacCliError(path, None, "a safetensors JSON header", found[:120]) from None
        if not isinstance(header, dict):
            raise KfacCliError(path, None, "a JSON object header", type(header).__name__)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise KfacCliError(path, "__metadata__", "a map of strings to strings", "other values")
        infos = {name: _parse_entry(path, name, e, 8 + n) for name, e in header.items()}
        position = 8 + n
        for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if info.begin != position:
                what = "overlapping data" if info.begin < position else "a hole before it"
                raise KfacCliError(path, name, f"data starting at byte {position}", what)
            position = info.end
        if position != size:
            found = f"data ending at byte {size}" if position < size else "a truncated file"
            raise KfacCliError(path, None, f"tensor data ending at byte {position}", found)
        return infos, metadata

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor:
        """Read one tensor (or some of its rows, see :func:`read_into`) into CPU memory."""
        return read_into(self._fh, self.infos[name], out, rows)

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None:
        """Rows of one tensor straight into ``dst`` (see :func:`read_rows_into`)."""
        read_rows_into(self._fh, self.infos[name], rows, dst)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _buffer(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


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
    if rows is None:
        shape, begin, nbytes = info.shape, info.begin, info.nbytes
    else:
        row_len, start, stop = rows
        row_bytes = row_len * info.dtype.itemsize
        shape, begin, nbytes = (
            (stop - start, row_len),
            info.begin + start * row_bytes,
            (stop - start) * row_bytes,
        )
        if begin + nbytes > info.end:
            raise ValueError(f"rows {start}:{stop} of {row_len} lie outside the tensor")
    if out is None:
        t = torch.empty(shape, dtype=info.dtype)
    else:
        t = out[:nbytes].view(info.dtype).view(shape)
    if nbytes == 0:
        return t
    view = _buffer(t)
    fh.seek(begin)
    done = 0
    while done < nbytes:
        got = fh.readinto(view[done:])
        if not got:
            raise KfacCliError(info.file, None, f"{nbytes} bytes", f"{done} (file shrank)")
        done += got
    return t


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
            raise KfacCliError(info.file, None, f"rows {start}:{stop}", "a file that shrank")
        offset += got
        done = 0
        while done < len(batch) and got >= len(batch[done]):
            got -= len(batch[done])
            done += 1
        views = views[done:]
        if got:
            views[0] = views[0][got:]


class TensorSource:
    """Tensors by name from a safetensors file or a sharded set (``*.index.json``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.files: list[SafetensorsFile] = []
        self.infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        try:
            if self.path.name.endswith(".json"):
                self._open_index()
            else:
                self._add(SafetensorsFile(self.path))
        except BaseException:
            self.close()
            raise
        self.metadata = self.files[0].metadata if len(self.files) == 1 else {}

    def _add(self, f: SafetensorsFile) -> None:
        self.files.append(f)
        for name, info in f.infos.items():
            if name in self.infos:
                raise KfacCliError(
                    self.path,
                    name,
                    "each key in one shard",
                    f"{self.infos[name].file.name} and {f.path.name}",
                )
            self.infos[name] = info
            self._file_of[name] = f

    def _open_index(self) -> None:
        fh = open_readable(self.path)
        with fh:
            raw = fh.read(MAX_HEADER_BYTES + 1)
        try:
            index = json.loads(raw, object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise KfacCliError(self.path, None, "a JSON shard index", f"{e}"[:120]) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise KfacCliError(
                self.path,
                "weight_map",
                "a map of tensor names to shard files",
                repr(weight_map)[:80],
            )
        for shard in dict.fromkeys(weight_map.values()):
            if Path(shard).is_absolute() or ".." in Path(shard).parts or "/" in shard:
                raise KfacCliError(
                    self.path,
                    shard,
                    "a shard file name beside the index",
                    "a path outside its folder",
                )
            self._add(SafetensorsFile(self.path.parent / shard))
        for name, shard in weight_map.items():
            if name not in self.infos or self.infos[name].file.name != shard:
                raise KfacCliError(
                    self.path.parent / shard,
                    name,
                    "the key the index names",
                    "no such tensor in the shard",
                )
        extra = [n for n in self.infos if n not in weight_map]
        if extra:
            raise KfacCliError(
                self.infos[extra[0]].file,
                extra[0],
                "keys listed in the index",
                "a key the index does not name",
            )

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor:
        """Read one tensor (or some of its rows, see :func:`read_into`) into CPU memory."""
        return self._file_of[name].read(name, out, rows)

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None:
        """Rows of one tensor straight into ``dst`` (see :func:`read_rows_into`)."""
        self._file_of[name].read_rows_into(name, rows, dst)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def safetensors_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The header (length prefix included) for tensors written in ``entries`` order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise KfacCliError(None, name, "a dtype safetensors can store", str(dtype))
        n = prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose header is written first.

    Args:
        fh: A binary stream to write to (a file, or stdout's buffer).
        entries: ``(name, dtype, shape)`` of every tensor, in the order they will be
            written (largest item size first keeps every tensor aligned).
        metadata: The ``__metadata__`` strings.
    """

    def __init__(
        self,
        fh: BinaryIO,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
    ) -> None:
        self._fh = fh
        self._pending: Iterator[tuple[str, torch.dtype, tuple[int, ...]]] = iter(entries)
        self._current: tuple[str, torch.dtype, tuple[int, ...]] | None = None
        self._left = 0
        self.bytes_written = 0
        self._write(safetensors_header(entries, metadata))

    def _write(self, data: memoryview | bytes) -> None:
        self._fh.write(data)
        self.bytes_written += len(data)

    def write(self, name: str, chunk: Tensor) -> None:
        """Write the next tensor's bytes, whole or in consecutive chunks of any shape."""
        if self._current is None or self._left == 0:
            self._current = next(self._pending, None)
            if self._current is not None:
                self._left = prod(self._current[2]) * self._current[1].itemsize
        want = self._current
        nbytes = chunk.numel() * chunk.element_size()
        if want is None or name != want[0] or chunk.dtype != want[1] or nbytes > self._left:
            got = (name, chunk.dtype, tuple(chunk.shape))
            raise RuntimeError(f"tensor written out of order: expected {want}, got {got}")
        t = chunk.detach().to("cpu").contiguous()
        if nbytes:
            self._write(_buffer(t))
        self._left -= nbytes

    def close(self) -> None:
        """Check that every announced tensor was written."""
        left = next(self._pending, None)
        if self._left or left is not None:
            name = self._current[0] if self._left else left[0]  # type: ignore[index]
            raise RuntimeError(f"tensor {name} announced but never fully written")


class DictSource:
    """Tensors by name from a weights-only ``torch.save`` file (the TensorSource interface)."""

    def __init__(self, path: Path | str) -> None:
        from kfac_cli.checkpoints import load_weights_only

        self.path = Path(path)
        self._tensors = load_weights_only(self.path)
        self.metadata: dict[str, str] = {}
        self.infos = {
            k: TensorInfo(self.path, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
            for k, v in self._tensors.items()
        }

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor:
        t = self._tensors[name]
        if rows is not None:
            row_len, start, stop = rows
            t = t.reshape(-1, row_len)[start:stop] if row_len else t.new_empty(stop - start, 0)
        if out is None:
            return t.contiguous()
        return out[: t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None:
        dst.copy_(self.read(name, rows=rows))

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self) -> DictSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tensors(path: Path | str) -> TensorSource | DictSource:
    """A safetensors file, a sharded ``*.index.json`` set, or a weights-only ``.pt`` file."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
        return DictSource(path)
    return TensorSource(path)
