"""`kfac-cli info` as a library function: what files are and hold, from their headers.

Torch-free: a safetensors header is read and validated by :mod:`kfac_cli.files.header` as
every command reads it, a ``.pt2`` through its graph JSON (:mod:`kfac_cli.models.pt2`), and no
tensor data is read. A stream
(``-``) is read up to the end of its header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kfac_cli.errors import KfacError
from kfac_cli.files.header import read_header
from kfac_cli.files.inputs import display_name, open_input
from kfac_cli.files.kinds import Kind, identify


def _decode(value: str) -> object:
    """A metadata string as kfac-cli wrote it: compact JSON where it parses, else text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _safetensors(path: object, kind: Kind) -> dict:
    """A safetensors file's (or stream's) header, validated as every command reads it."""
    fh, stream = open_input(path, stream_ok=True)
    with fh:
        size = None if stream else os.fstat(fh.fileno()).st_size
        infos, meta, _ = read_header(fh, display_name(path), size)
    tensors = [
        {"name": k, "dtype": i.dtype_name, "shape": list(i.shape), "bytes": i.nbytes}
        for k, i in sorted(infos.items(), key=lambda kv: kv[1].begin)
    ]
    return {
        "metadata": {k: _decode(v) for k, v in meta.items()},
        "tensors": tensors,
        "format": meta.get("format") or kind.format,
    }


def _index(path: Path) -> dict:
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors, metadata = [], {}
    for shard in shards:
        if Path(shard).is_absolute() or ".." in Path(shard).parts or "/" in shard:
            raise KfacError(path, shard, "a shard file name beside the index", "a path")
        one = _safetensors(path.parent / shard, Kind("safetensors"))
        tensors += one["tensors"]
        metadata = metadata or one["metadata"]
    return {"shards": shards, "tensors": tensors, "metadata": metadata, "format": None}


def _pt2(path: Path) -> dict:
    from kfac_cli.models.pt2 import layer_table_from_pt2

    table = layer_table_from_pt2(path)
    return {
        "metadata": {},
        "format": None,
        "layers": [la.name for la in table.layers],
        "tensors": [
            {"name": n, "dtype": None, "shape": list(s), "bytes": None}
            for n, s in table.parameters.items()
        ],
    }


def describe(path: Path | str) -> dict:
    """What one file is and holds (see :func:`run_info`).

    Raises:
        KfacError: For a file that cannot be read or is not one kfac-cli knows.
    """
    kind = identify(path)
    if kind.kind in ("empty", "truncated", "damaged-zip", "unknown") and str(path) != "-":
        if not Path(str(path)).exists():
            raise KfacError(path, None, "an existing file", "no such file")
        raise KfacError(path, None, "a safetensors file, a sharded set or a .pt2", str(kind))
    if kind.kind in ("safetensors", "stream"):
        body = _safetensors(path, kind)
    elif kind.kind == "index":
        body = _index(Path(str(path)))
    elif kind.kind == "pt2":
        body = _pt2(Path(str(path)))
    else:
        raise KfacError(path, None, "a safetensors file, a sharded set or a .pt2", str(kind))
    what = body["format"] if body["format"] else kind.kind
    if kind.kind == "stream":
        kind = Kind("safetensors", body["format"])
    meta = body["metadata"]
    out = {
        "file": display_name(path),
        "kind": str(kind),
        "format": what,
        "layout_version": meta.get("layout_version", meta.get("version")),
        **{k: v for k, v in body.items() if k not in ("format",)},
        "tensor_count": len(body["tensors"]),
        "tensor_bytes": sum(t["bytes"] or 0 for t in body["tensors"]),
    }
    if isinstance(meta.get("layers"), dict):
        out["layers"] = {
            name: {k: la.get(k) for k in ("kind", "D", "C_out", "blocks") if k in la}
            for name, la in meta["layers"].items()
        }
    return out


def run_info(paths: list[Path | str]) -> dict:
    """Describe each file: its kind and format (version), the metadata decoded (factors:
    ``num_data``, conventions, layers and their blocks; inputs by fingerprint), each
    tensor's name, dtype, shape and bytes, and totals. Reads headers only (a ``.pt2``:
    its graph JSON), never tensor data, and never imports torch.

    Returns:
        ``{"command": "info", "files": [...], "tensor_count": ..., "tensor_bytes": ...}``.

    Raises:
        KfacError: For the first file that cannot be described.
    """
    if sum(str(p) == "-" for p in paths) > 1:
        raise KfacError("stdin", None, "at most one '-'", "more")
    files = [describe(p) for p in paths]
    return {
        "command": "info",
        "files": files,
        "tensor_count": sum(f["tensor_count"] for f in files),
        "tensor_bytes": sum(f["tensor_bytes"] for f in files),
    }
