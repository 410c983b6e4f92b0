"""What a file is, from its first bytes and its header: the one place every command asks.

:func:`identify` names a regular file's kind without reading tensor data and without torch:
a torch.export archive (``.pt2``), a ``torch.save`` zip or legacy pickle, a safetensors file
(and which kfac-cli format its ``__metadata__.format`` says it is), a sharded set's
``*.index.json``, a layer spec, or what is wrong with it (empty, truncated). :func:`require`
checks a kind against the role a command gives the file (the model, an activation dump, a
factors file...) and fails with one line that says what the file is and what was expected,
with the keyword of the fix (``model_first``, ``grads``, ``inverse``) for the command line
to spell out.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kfac_cli.errors import KfacError

MAX_HEADER_BYTES = 100 * 2**20  # the official safetensors library's own limit
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # weights-only torch.save files

# Every format kfac-cli writes (``__metadata__.format``), as a reader names it.
FORMATS = {
    "kfac-cli/activations": "an activation dump",
    "kfac-cli/output-gradients": "an output-gradient dump",
    "kfac-cli/patches": "a patches file",
    "kfac-cli/canonical": "a canonical file",
    "kfac-cli/parameters": "a parameters file",
    "kfac-cli/factors": "a factors file",
    "kfac-cli/layer-table": "a layer spec",
}
ACTIVATIONS, GRADIENTS = "kfac-cli/activations", "kfac-cli/output-gradients"
CANONICAL, PARAMETERS, FACTORS = "kfac-cli/canonical", "kfac-cli/parameters", "kfac-cli/factors"
PATCHES = "kfac-cli/patches"
LAYOUT_VERSION = "1"  # of every kfac-cli output format (docs/formats.md)

_DESCRIPTIONS = {
    "pt2": "a torch.export archive (a model)",
    "torch-zip": "a torch.save zip archive",
    "pickle": "a pickle (torch.save)",
    "safetensors": "a safetensors file",
    "index": "a sharded safetensors index",
    "json": "a JSON file",
    "zip": "a zip archive",
    "damaged-zip": "a truncated or damaged zip archive (no readable central directory)",
    "truncated": "a truncated safetensors file (shorter than its header says)",
    "empty": "an empty file",
    "stream": "a stream",
    "unknown": "unrecognised bytes",
}


@dataclass(frozen=True)
class Kind:
    """A file's kind (a key of the descriptions above) and, for safetensors and JSON, the
    kfac-cli format its metadata names (``None``: a plain file, e.g. a state dict)."""

    kind: str
    format: str | None = None

    def __str__(self) -> str:
        if self.kind == "truncated" and self.format:
            what = FORMATS.get(self.format, f"a file of format {self.format!r}")
            return f"a truncated file ({what}, shorter than its header says)"
        if self.format in FORMATS:
            return f"{FORMATS[self.format]} ({self.format})"
        if self.format:
            return f"{_DESCRIPTIONS[self.kind]} of format {self.format!r}"
        return _DESCRIPTIONS[self.kind]


def _zip_kind(path: Path) -> Kind:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return Kind("damaged-zip")
    exported = ("/archive_format", "/models/model.json", "serialized_exported_program.json")
    if any(n.endswith(exported) for n in names):
        return Kind("pt2")
    if any(n.endswith("data.pkl") for n in names):
        return Kind("torch-zip")
    return Kind("zip")


def _safetensors_kind(fh, size: int, head: bytes) -> Kind | None:
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        return None
    if 8 + n > size:
        return Kind("truncated")
    raw = fh.read(n)
    if not raw.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # its reader says what is wrong
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    ends = [
        e["data_offsets"][1]
        for k, e in header.items()
        if k != "__metadata__"
        and isinstance(e, dict)
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and isinstance(e["data_offsets"][1], int)
    ]
    if ends and 8 + n + max(ends) > size:
        return Kind("truncated", fmt if isinstance(fmt, str) else None)
    return Kind("safetensors", fmt if isinstance(fmt, str) else None)


def _json_kind(path: Path, size: int) -> Kind:
    if size > MAX_HEADER_BYTES:
        return Kind("json")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError, OSError):
        return Kind("unknown")
    if isinstance(data, dict) and isinstance(data.get("weight_map"), dict):
        return Kind("index")
    fmt = data.get("format") if isinstance(data, dict) else None
    return Kind("json", fmt if isinstance(fmt, str) else None)


def identify(path: Path | str) -> Kind:
    """The kind of a regular file, from its first bytes and header (no tensor data read).

    Streams (``-``, pipes) and files that cannot be opened are ``Kind("stream")`` and
    ``Kind("unknown")``: their reader says more once it opens them.
    """
    p = Path(str(path))
    try:
        if str(path) == "-" or not p.is_file():
            return Kind("stream" if str(path) == "-" or p.is_fifo() else "unknown")
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            head = fh.read(9)
            if not head:
                return Kind("empty")
            if len(head) == 9 and head[8:9] == b"{":  # a header length, then its JSON: a
                fh.seek(8)  # safetensors file, whatever its length's bytes look like
                found = _safetensors_kind(fh, size, head[:8])
                if found is not None:
                    return found
            fh.seek(8)
            if head.startswith(b"PK"):
                return _zip_kind(p)
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                return Kind("pickle")
            if head.lstrip()[:1] in (b"{", b"["):
                return _json_kind(p, size)
    except OSError:
        return Kind("unknown")
    return Kind("unknown")


# What each role takes, and for the kinds it refuses, the keyword of the fix.
ROLES = {
    "model": "a model checkpoint (.pt2, a state dict, or a weights-only .pt)",
    "activations": "an activation dump (safetensors of layer inputs)",
    "grads": "an output-gradient dump",
    "tensors": "parameter-space tensors keyed by parameter name",
    "canonical": f"a canonical file ({CANONICAL})",
    "factors": f"a factors file ({FACTORS})",
    "vectors": f"parameter-space tensors keyed by parameter name, or a canonical file "
    f"({CANONICAL})",
}
_MODEL_FORMATS = (None, PARAMETERS)
_ACCEPTS = {
    "activations": (None, ACTIVATIONS),
    "grads": (None, GRADIENTS),
    "tensors": (None, PARAMETERS),
    "canonical": (CANONICAL,),
    "factors": (FACTORS,),
    "vectors": (None, PARAMETERS, CANONICAL),
}


def _fix(role: str, kind: Kind) -> str | None:
    """The keyword of the fix for a file of ``kind`` given in ``role``."""
    if role != "model" and kind.kind == "pt2":
        return "model_first"
    if role == "model" and kind.format in (ACTIVATIONS, GRADIENTS, CANONICAL):
        return "model_first"
    if role == "activations" and kind.format == GRADIENTS:
        return "grads"
    if role == "tensors" and kind.format == CANONICAL:
        return "inverse"
    if role in ("activations", "tensors", "canonical", "vectors") and kind.format == FACTORS:
        return "merge"
    return None


def require(path: object, kind: Kind, role: str) -> None:
    """Check that a file of ``kind`` may play ``role`` (a key of :data:`ROLES`).

    Raises:
        KfacError: Naming the file, what it is and what the role expects, with the
            keyword of the fix where one is known (``model_first``, ``grads``, ...).
    """
    if kind.kind in ("stream", "unknown"):
        return  # its reader checks it
    if kind.kind in ("empty", "truncated", "damaged-zip"):
        raise KfacError(path, None, ROLES[role], str(kind))
    if role == "model":
        ok = kind.kind in ("pt2", "torch-zip", "pickle", "index") or (
            kind.kind == "safetensors" and kind.format in _MODEL_FORMATS
        )
    elif kind.kind == "safetensors":
        ok = kind.format in _ACCEPTS[role]
    elif kind.kind == "index":
        ok = role in ("activations", "grads", "tensors", "vectors")
    else:
        ok = kind.kind in ("torch-zip", "pickle") and role in (
            "activations",
            "grads",
            "tensors",
            "vectors",
        )
    if not ok:
        raise KfacError(path, None, ROLES[role], str(kind), fix=_fix(role, kind))


def require_format(path: object, metadata: dict[str, str], role: str) -> None:
    """:func:`require` for a source already open (a stream): its metadata's format."""
    fmt = metadata.get("format")
    require(path, Kind("safetensors", fmt if isinstance(fmt, str) else None), role)
