"""Opening inputs: regular files, and streams (``-`` for stdin, named pipes) where allowed.

A model checkpoint needs random access, so it must be a regular file. A tensor file that is
read once, front to back (an activation dump, a canonical file), may also be a stream:
``-`` (standard input) or a named pipe (``mkfifo``, or the ``/dev/fd/N`` of a shell's
``<(zstd -dc acts.safetensors.zst)``). Anything else (a directory, a terminal, a device) is
refused before anything is read.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO

from kfac_cli.errors import KfacError

STDIN = "-"


def is_stdin(path: object) -> bool:
    """Whether ``path`` names standard input (``-``)."""
    return str(path) == STDIN


def display_name(path: object) -> str:
    """How an input is named in messages: ``stdin`` for ``-``."""
    return "stdin" if is_stdin(path) else str(path)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: object, stream_ok: bool = False) -> tuple[BinaryIO, bool]:
    """Open an input for reading: ``(binary file, whether it is a one-pass stream)``.

    Args:
        path: A file path, or ``-`` for standard input.
        stream_ok: Whether a pipe (stdin or a named pipe) may be read front to back.

    Raises:
        KfacError: For a missing, unreadable or non-regular input, or a stream where random
            access is needed.
    """
    name = display_name(path)
    if is_stdin(path):
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise KfacError(name, None, "readable data on stdin", "no stdin") from None
        if stat.S_ISREG(mode):  # `< file`: a regular file after all
            return os.fdopen(os.dup(fd), "rb"), False
        if not stream_ok:
            raise KfacError(name, None, "a file with random access", "a stream")
        if os.isatty(fd):
            raise KfacError(name, None, "data piped into stdin", "a terminal")
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise KfacError(name, None, "a pipe or a file on stdin", _kind(mode))
        return os.fdopen(os.dup(fd), "rb"), True
    p = Path(str(path))
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise KfacError(p, None, "an existing file", "no such file") from None
    except OSError as e:
        raise KfacError(p, None, "a readable file", e.strerror or type(e).__name__) from None
    stream = stat.S_ISFIFO(mode)
    if stat.S_ISDIR(mode):
        raise KfacError(p, None, "a file", "a directory")
    if not stat.S_ISREG(mode) and not (stream and stream_ok):
        expected = "a regular file or a pipe" if stream_ok else "a regular file (random access)"
        raise KfacError(p, None, expected, _kind(mode))
    try:
        return open(p, "rb"), stream
    except OSError as e:
        raise KfacError(p, None, "a readable file", e.strerror or type(e).__name__) from None


def open_readable(path: object) -> BinaryIO:
    """Open a regular file (random access) for reading."""
    return open_input(path, stream_ok=False)[0]


def sniff(head: bytes) -> str:
    """Name a file format from its first bytes, for error messages."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save or torch.export?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (torch.save?)"
    if not head:
        return "an empty file"
    return "unrecognised bytes"


def read_exactly(fh: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``fh`` (pipes return short reads); the number of bytes read,
    less than ``len(view)`` only at the end of the input."""
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            break
        done += got
    return done
