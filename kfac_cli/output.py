"""Atomic output files: a temporary file beside the target, fsync, then rename.

Nothing partial is ever visible under the target's name: on any error or interruption the
temporary file is removed. An existing target is replaced (atomically) only with
``force``; otherwise the final step is a hard link, which fails if the target appeared in
the meantime. ``-`` writes to stdout instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kfac_cli.errors import KfacCliError

STDOUT = "-"


def check_target(target: str | Path, force: bool) -> None:
    """Fail early (before any work) if ``target`` cannot be written."""
    if str(target) == STDOUT:
        return
    path = Path(target)
    if path.is_dir():
        raise KfacCliError(path, None, "an output file path", "a directory")
    if not path.parent.is_dir():
        raise KfacCliError(path, None, "an existing output folder", "no such folder")
    if path.exists() and not force:
        raise KfacCliError(
            path, None, "a new output file", "an existing file (use --force to replace it)"
        )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(target: str | Path, force: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary stream whose bytes appear at ``target`` only if the block succeeds.

    Raises:
        KfacCliError: If the target exists without ``force``, or writing fails (disk full,
            permission denied, folder gone).
    """
    if str(target) == STDOUT:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(target)
    check_target(path, force)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KfacCliError(path, None, "a writable output folder", e.strerror or str(e)) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
        _fsync_dir(path.parent)
    except FileExistsError:
        raise KfacCliError(
            path, None, "a new output file", "an existing file (use --force to replace it)"
        ) from None
    except OSError as e:
        raise KfacCliError(path, None, "to write the output", e.strerror or str(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
