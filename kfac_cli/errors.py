"""The one error class for what a user can fix.

Every such error names the file, the key (a layer, tensor or parameter name, if any), and
what was expected versus what was found. The CLI turns it into one line on stderr, exit 1:

    Error: dump.safetensors: conv1: expected rank 4 [B, C_in, H, W] but found shape [8, 3, 32]
"""

from __future__ import annotations


class KfacCliError(Exception):
    """A problem with the user's input that the user can fix.

    Args:
        file: The file the problem is in (``None`` when no file is involved).
        key: The tensor, layer or parameter name within the file, if any.
        expected: What kfac-cli expected.
        found: What it found instead.
        hint: An optional second line that says how to fix it.
    """

    def __init__(
        self,
        file: object | None,
        key: str | None,
        expected: str,
        found: str,
        hint: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.key = key
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: ``<file>: <key>: expected … but found …``."""
        parts = [p for p in (self.file, self.key) if p]
        parts.append(f"expected {self.expected} but found {self.found}")
        return ": ".join(parts)

    def with_context(self, file: object | None = None, key: str | None = None) -> KfacCliError:
        """A copy with the file and/or key filled in where they were missing."""
        return KfacCliError(
            self.file if self.file is not None else file,
            self.key if self.key is not None else key,
            self.expected,
            self.found,
            self.hint,
        )
