"""The one error class for what a user can fix, and safe quoting of names from files.

Every such error names the file, the key (a layer, tensor or parameter name, if any), and
what was expected versus what was found. The command line turns it into one line on stderr
and exit 1:

    Error: dump.safetensors: conv1: expected rank 4 [B, C_in, H, W] but found shape [8, 3, 32]

The library never names command-line flags: an error that one of a job's options would fix
names that option's keyword in ``fix`` (``force``, ``spec``, ...), and the command line
turns it into a hint about its flag.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: object) -> str:
    """``text`` with control characters escaped (``\\x1b``), so that names read from a file
    cannot move the cursor or recolour the user's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


class KfacError(Exception):
    """A problem with the user's input (or the environment) that the user can fix.

    Args:
        file: The file the problem is in (``None`` when no file is involved).
        key: The tensor, layer or parameter name within the file, if any.
        expected: What was expected.
        found: What was found instead.
        hint: An optional sentence that says how to fix it (no command-line words).
        fix: The keyword of the job option that fixes it, if one does (``"force"``).
    """

    def __init__(
        self,
        file: object | None,
        key: str | None,
        expected: str,
        found: str,
        hint: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.key = key
        self.expected = expected
        self.found = found
        self.hint = hint
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message, ``<file>: <key>: expected … but found …``, escaped."""
        parts = [p for p in (self.file, self.key) if p]
        parts.append(f"expected {self.expected} but found {self.found}")
        return escape(": ".join(parts))

    def with_context(self, file: object | None = None, key: str | None = None) -> KfacError:
        """A copy with the file and/or key filled in where they were missing."""
        return KfacError(
            self.file if self.file is not None else file,
            self.key if self.key is not None else key,
            self.expected,
            self.found,
            self.hint,
            self.fix,
        )


class OutputClosed(Exception):
    """The reader of standard output went away (a broken pipe): stop quietly."""
