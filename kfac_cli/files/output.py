"""Atomic output files: a temporary file beside the target, fsync, then rename.

Nothing partial is ever visible under the target's name: on any error or interruption the
temporary file is removed. An existing target is replaced (atomically) only with
``force``; otherwise the final step is a hard link, which fails if the target appeared in
the meantime. The file gets the mode any new file gets (``0666`` less the umask), or the
mode of the file it replaces.

``-`` writes to stdout instead, once the file is complete (it is spooled to an unlinked
temporary file first: its header, which records the inputs' fingerprints, is known only
after the last input byte): a reader that goes away (a broken pipe, ``| head``) raises
:class:`~kfac_cli.errors.OutputClosed`, any other failed write a :class:`KfacError` that
names stdout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kfac_cli.errors import KfacError, OutputClosed

STDOUT = "-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import (before any thread could create files)


def check_target(target: str | Path, force: bool) -> None:
    """Fail early (before any work) if ``target`` cannot be written."""
    if str(target) == STDOUT:
        return
    path = Path(target)
    if path.is_dir():
        raise KfacError(path, None, "an output file path", "a directory")
    if not path.parent.is_dir():
        raise KfacError(path, None, "an existing output folder", "no such folder")
    if path.exists() and not force:
        raise KfacError(path, None, "a new output file", "an existing file", fix="force")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StdoutWriter:
    """Standard output as a binary stream whose failures name stdout."""

    def __init__(self) -> None:
        self._out = sys.stdout.buffer

    def write(self, data) -> int:
        """Write all of ``data`` (a pipe whose reader went away mid-write takes part of it:
        the rest is written again, and then fails)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self._out.write(view) :]
            return len(data)
        except BrokenPipeError:
            raise OutputClosed from None
        except OSError as e:
            raise KfacError("stdout", None, "to write the output", _reason(e)) from None

    def flush(self) -> None:
        try:
            self._out.flush()
        except BrokenPipeError:
            raise OutputClosed from None
        except OSError as e:
            raise KfacError("stdout", None, "to write the output", _reason(e)) from None


class FileWriter:
    """A file opened for writing that starts the disk write-back of every
    :data:`WRITEBACK_BYTES` written (Linux ``sync_file_range``, asynchronous), so that the
    final ``fsync`` finds the data mostly on disk instead of flushing all of it then."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh, self._fd = fh, fh.fileno()
        self._flushed = self._written = 0

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._written += n
        if self._written - self._flushed >= WRITEBACK_BYTES:
            self._fh.flush()
            _start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written
        return n

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fd

    def rewrite(self, offset: int, data: bytes) -> None:
        """Replace bytes already written at ``offset`` (a header filled in at the end)."""
        self._fh.flush()
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self._fd, view, offset + len(data) - len(view)) :]


WRITEBACK_BYTES = 64 * 2**20


def _load_sync_file_range():
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` to disk, without waiting (a hint: errors are
    left to the final fsync)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def _reason(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)


@contextlib.contextmanager
def atomic_output(target: str | Path, force: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary stream whose bytes appear at ``target`` only if the block succeeds.

    Raises:
        KfacError: If the target exists without ``force``, or writing fails (disk full,
            permission denied, folder gone).
        OutputClosed: If ``target`` is ``-`` and the reader of stdout went away.
    """
    if str(target) == STDOUT:  # spooled: the header is complete only at the end
        with tempfile.TemporaryFile(prefix="kfac-cli-stdout-") as spool:
            yield FileWriter(spool)  # type: ignore[misc]
            spool.flush()
            spool.seek(0)
            out = StdoutWriter()
            while chunk := spool.read(WRITEBACK_BYTES // 8):
                out.write(chunk)
            out.flush()
        return
    path = Path(target)
    check_target(path, force)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if force and path.exists() else 0o666 & ~UMASK
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KfacError(path, None, "a writable output folder", _reason(e)) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield FileWriter(fh)  # type: ignore[misc]
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
        _fsync_dir(path.parent)
    except FileExistsError:
        raise KfacError(path, None, "a new output file", "an existing file", fix="force") from None
    except OSError as e:
        raise KfacError(path, None, "to write the output", _reason(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
