"""Writing safetensors files header first, then each tensor's bytes as they are computed.

The official library's ``save_file`` needs every tensor in memory at once; a command that
streams layer after layer, chunk after chunk, knows every output's shape before it computes
anything, so it writes the header first and then the bytes in order, to a file or to a pipe
(no seeking). The result reads back with the official library.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from math import prod
from typing import BinaryIO

import torch
from torch import Tensor

from kfac_cli.errors import KfacError
from kfac_cli.files.safetensors import DTYPE_NAMES, tensor_bytes


def safetensors_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The header (length prefix included) for tensors written in ``entries`` order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise KfacError(None, name, "a dtype safetensors can store", str(dtype))
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
        self._entries = entries
        self._header = safetensors_header(entries, metadata)
        self._write(self._header)

    def finish_header(self, metadata: dict[str, str]) -> None:
        """Rewrite the header with the final ``metadata`` (values known only at the end,
        such as the inputs' fingerprints), which must encode to the same length (a
        fingerprint replaces its placeholder of equal length). Needs a seekable output."""
        header = safetensors_header(self._entries, metadata)
        if len(header) != len(self._header):
            raise RuntimeError("the final metadata changed the header's length")
        if header != self._header:
            self._fh.rewrite(0, header)  # type: ignore[attr-defined]
            self._header = header

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
            self._write(tensor_bytes(t))
        self._left -= nbytes

    def close(self) -> None:
        """Check that every announced tensor was written."""
        left = next(self._pending, None)
        if self._left or left is not None:
            name = self._current[0] if self._left else left[0]  # type: ignore[index]
            raise RuntimeError(f"tensor {name} announced but never fully written")
