"""Safetensors headers, parsed and validated without torch (``info`` and ``layers`` on a
state dict need nothing else).

The format (see ``docs/formats.md``): an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the tensors' bytes, which tile the
data section exactly. Our own checks come first, for messages that name what is wrong (a
hole, an overlap, a duplicate key, which the official parser silently accepts); then the
official library validates a regular file's header too (its JSON parser bounds nesting
depth, and anything it refuses, no other tool will read).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

from kfac_cli.errors import KfacError
from kfac_cli.files.inputs import sniff
from kfac_cli.files.kinds import MAX_HEADER_BYTES

# Each safetensors dtype name and its item size in bytes.
ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in its file: dtype, shape and absolute byte range."""

    file: object  # the path, or "stdin"
    dtype_name: str  # as safetensors names it: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return torch_dtype(self.dtype_name)

    @property
    def floating(self) -> bool:
        return self.dtype_name in FLOAT_NAMES


def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise KfacError(path, name, "an entry {dtype, shape, data_offsets}", repr(entry)[:80])
    dtype = entry["dtype"] if entry["dtype"] in ITEM_SIZES else None
    if dtype is None:
        raise KfacError(path, name, f"a dtype in {', '.join(ITEM_SIZES)}", repr(entry["dtype"]))
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise KfacError(path, name, "a shape of non-negative ints", repr(shape)[:80])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise KfacError(path, name, "data_offsets [begin, end]", repr(offsets)[:80])
    nbytes = prod(shape) * ITEM_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise KfacError(
            path,
            name,
            f"{nbytes} bytes for {entry['dtype']} {shape}",
            f"{offsets[1] - offsets[0]} bytes",
        )
    return TensorInfo(path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(fh: BinaryIO, name: object, size: int | None = None) -> tuple[dict, dict, int]:
    """Read and check the header at the start of ``fh``.

    Args:
        fh: The input, positioned at its first byte.
        name: How the input is named in messages.
        size: The input's size in bytes, if known (a file; ``None`` for a stream).

    Returns:
        ``(infos, metadata, data_end)``: each tensor's :class:`TensorInfo` (absolute byte
        ranges), the ``__metadata__`` strings, and where the last tensor ends.

    Raises:
        KfacError: For a header that is not a well-formed safetensors header, or that does
            not fit ``size``.
    """
    head = fh.read(8)
    if len(head) < 8:
        found = sniff(head) if not head else f"an input of only {len(head)} bytes"
        raise KfacError(name, None, "a safetensors file", found)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        found = sniff(head) if sniff(head) != "unrecognised bytes" else f"length {n}"
        raise KfacError(name, None, f"a header of at most {MAX_HEADER_BYTES} bytes", found)
    if size is not None and 8 + n > size:
        raise KfacError(
            name, None, f"a header within the file's {size} bytes", f"header length {n}"
        )
    raw = fh.read(n)
    if len(raw) < n:
        raise KfacError(name, None, f"a header of {n} bytes", f"the input ended after {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except RecursionError:
        raise KfacError(name, None, "a header nested at most 3 deep", "deeper nesting") from None
    except (UnicodeDecodeError, ValueError) as e:
        found = sniff(head) if sniff(head) != "unrecognised bytes" else f"invalid JSON ({e})"
        raise KfacError(name, None, "a safetensors JSON header", found[:120]) from None
    if not isinstance(header, dict):
        raise KfacError(name, None, "a JSON object header", type(header).__name__)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise KfacError(name, "__metadata__", "a map of strings to strings", "other values")
    infos = {key: parse_entry(name, key, e, 8 + n) for key, e in header.items()}
    position = 8 + n
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != position:
            what = "overlapping data" if info.begin < position else "a hole before it"
            raise KfacError(name, key, f"data starting at byte {position}", what)
        position = info.end
    if size is not None and position != size:
        found = f"data ending at byte {size}" if position < size else "a truncated file"
        raise KfacError(name, None, f"tensor data ending at byte {position}", found)
    return infos, metadata, position


def official_check(path: Path) -> None:
    """What the official library refuses, we refuse too (it maps the file, reads no data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):  # opens the header: no torch
            pass
    except (SafetensorError, OSError, ValueError) as e:
        found = str(e).removeprefix("Error while deserializing header: ")
        raise KfacError(
            path, None, "a header the safetensors library accepts", found[:120]
        ) from None
