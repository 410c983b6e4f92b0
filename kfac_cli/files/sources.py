"""Where tensors come from: one interface over every tensor file kfac-cli reads.

- a safetensors file, or a Hugging Face sharded set (``*.index.json`` whose ``weight_map``
  names the shard of each key): random access (:class:`TensorSource`);
- a weights-only ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``):
  :class:`~kfac_cli.files.torch_save.DictSource`;
- a safetensors stream, ``-`` (stdin) or a named pipe, read once front to back:
  :class:`~kfac_cli.files.stream.StreamSource`.

Each has ``path``, ``infos`` (name to :class:`~kfac_cli.files.safetensors.TensorInfo`),
``metadata``, ``read``/``read_rows_into``, and for streams: ``sequential``, ``order`` (the
order that reads each byte once), ``expect`` and ``finish``, which are no-ops elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from torch import Tensor

from kfac_cli.errors import KfacError
from kfac_cli.files.digest import fingerprint_of
from kfac_cli.files.header import TensorInfo, no_duplicates
from kfac_cli.files.inputs import display_name, open_input, open_readable
from kfac_cli.files.kinds import MAX_HEADER_BYTES, identify, require, require_format
from kfac_cli.files.kinds import TORCH_SAVE_SUFFIXES as SUFFIXES
from kfac_cli.files.safetensors import DTYPE_NAMES, SafetensorsFile, tensor_bytes
from kfac_cli.files.stream import StreamSource
from kfac_cli.files.torch_save import load_weights_only


class Tensors(Protocol):
    """What every tensor source offers (see the module docstring)."""

    path: object
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    sequential: bool

    def read(
        self, name: str, out: Tensor | None = None, rows: tuple[int, int, int] | None = None
    ) -> Tensor: ...

    def read_rows_into(self, name: str, rows: tuple[int, int, int], dst: Tensor) -> None: ...

    def digest(self, name: str) -> str: ...

    def order(self, keys: Iterable[str]) -> list[str]: ...

    def expect(self, keys: Iterable[str]) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class RandomAccess:
    """The stream methods, for sources that can read in any order."""

    sequential = False

    def order(self, keys: Iterable[str]) -> list[str]:
        return list(keys)

    def expect(self, keys: Iterable[str]) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class TensorSource(RandomAccess):
    """Tensors by name from a safetensors file or a sharded set (``*.index.json``); reads
    ``hashed`` for :meth:`digest` or not (see :mod:`.digest`)."""

    def __init__(self, path: Path | str, hashed: bool = True) -> None:
        self.path = Path(path)
        self._hashed = hashed
        self.files: list[SafetensorsFile] = []
        self.infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        try:
            if self.path.name.endswith(".json"):
                self._open_index()
            else:
                self._add(SafetensorsFile(self.path, hashed))
        except BaseException:
            self.close()
            raise
        self.metadata = self.files[0].metadata if len(self.files) == 1 else {}

    def _add(self, f: SafetensorsFile) -> None:
        self.files.append(f)
        for name, info in f.infos.items():
            if name in self.infos:
                raise KfacError(
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
            index = json.loads(raw, object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise KfacError(self.path, None, "a JSON shard index", f"{e}"[:120]) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise KfacError(
                self.path,
                "weight_map",
                "a map of tensor names to shard files",
                repr(weight_map)[:80],
            )
        for shard in dict.fromkeys(weight_map.values()):
            if Path(shard).is_absolute() or ".." in Path(shard).parts or "/" in shard:
                raise KfacError(
                    self.path,
                    shard,
                    "a shard file name beside the index",
                    "a path outside its folder",
                )
            self._add(SafetensorsFile(self.path.parent / shard, self._hashed))
        for name, shard in weight_map.items():
            if name not in self.infos or self.infos[name].file.name != shard:
                raise KfacError(
                    self.path.parent / shard,
                    name,
                    "the key the index names",
                    "no such tensor in the shard",
                )
        extra = [n for n in self.infos if n not in weight_map]
        if extra:
            raise KfacError(
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

    def digest(self, name: str) -> str:
        return self._file_of[name].digest(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


class DictSource(RandomAccess):
    """Tensors by name from a weights-only ``torch.save`` file (the TensorSource interface)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._tensors = load_weights_only(self.path)
        self.metadata: dict[str, str] = {}
        self.infos = {
            k: TensorInfo(
                self.path, DTYPE_NAMES[v.dtype], tuple(v.shape), 0, v.numel() * v.element_size()
            )
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

    def digest(self, name: str) -> str:
        t = self._tensors[name].contiguous()  # kept alive while its bytes are hashed
        return hashlib.sha256(tensor_bytes(t)).hexdigest()

    def close(self) -> None:
        self._tensors = {}


def open_tensors(
    path: Path | str, stream_ok: bool = True, role: str | None = None, hashed: bool = False
) -> Tensors:
    """The tensors of a safetensors file, a sharded set, a weights-only ``.pt`` file, or
    (with ``stream_ok``) a safetensors stream: ``-`` or a named pipe.

    Args:
        path: The file, or ``-``.
        stream_ok: Whether a stream may be read.
        role: What the command takes the file for (a key of
            :data:`~kfac_cli.files.kinds.ROLES`): a file of another kind is refused, saying
            what it is (:func:`~kfac_cli.files.kinds.require`).
        hashed: Hash the reads as they pass, for a :func:`fingerprint` at the end (a
            stream cannot give one otherwise; a file would be read once more).
    """
    if display_name(path) != str(path) or Path(str(path)).is_fifo():
        fh, _ = open_input(path, stream_ok=stream_ok)
        src: Tensors = StreamSource(fh, display_name(path), hashed)
        if role is not None:
            try:
                require_format(src.path, src.metadata, role)
            except BaseException:
                src.close()
                raise
        return src
    if role is not None:
        require(path, identify(path), role)
    if Path(path).suffix.lower() in SUFFIXES:
        return DictSource(path)
    return TensorSource(path, hashed)


def fingerprint(src: Tensors) -> str:
    """``sha256:<hex>`` that identifies a tensor file's data (see :mod:`.digest`): its
    metadata and each tensor's name, dtype, shape and bytes. The same for a file, a stream
    of it, or a sharded set of the same tensors. Bytes a job did not read in order are read
    now (a stream: ask once it has been read to its end)."""
    return fingerprint_of(
        src.metadata,
        {k: (i.dtype_name, list(i.shape), src.digest(k)) for k, i in src.infos.items()},
    )
