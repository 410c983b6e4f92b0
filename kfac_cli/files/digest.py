"""Fingerprints that identify a tensor file's data, hashed while its bytes stream past.

A file's fingerprint is ``sha256:<hex>`` of the compact, key-sorted JSON
``{"metadata": {...}, "tensors": {name: [dtype, shape, sha256 of its bytes]}}``: it changes
when any tensor byte, name, dtype, shape or metadata string changes, and is the same for a
file, a stream of it, or a sharded set of the same tensors.

Each tensor's hash is fed by the reads themselves (:meth:`TensorDigests.update`): a read
that continues where the hashed bytes end extends the hash, so a job that reads a tensor
front to back (every job does, chunk after chunk) hashes it without a second read. What a
job did not read in order (a layer left out by ``--layer``, another rank's rows) is read
once more when the fingerprint is asked for (:meth:`TensorDigests.hexdigest`). A stream
hashes every byte as it arrives, kept or skipped, so its digests are complete once it has
been read to its end. Files nobody fingerprints (factors, vectors) are opened without
hashing (``hashed=False``): their reads cost no hashing, and a fingerprint asked of one all
the same reads the file once more.

Thread rules: ``update`` runs on the one reader thread of a job, ``hexdigest`` after the
reads; ``hashlib`` releases the GIL while it hashes, so hashing overlaps the compute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

HASH_CHUNK = 8 * 2**20
PENDING = "sha256:" + "0" * 64  # a fingerprint's place in a header, filled in at the end


class TensorDigests:
    """Per-tensor ``sha256`` of the bytes read so far, in order from each tensor's start.

    Args:
        sizes: Each tensor's name and byte count.
        hashed: Hash the reads as they pass (else only on :meth:`hexdigest`).
    """

    def __init__(self, sizes: dict[str, int], hashed: bool = True) -> None:
        self._sizes = sizes
        self._hashed = hashed
        self._hashes = {k: hashlib.sha256() for k in sizes}
        self._done = dict.fromkeys(sizes, 0)

    def update(self, name: str, offset: int, data: memoryview) -> None:
        """``data`` was read at byte ``offset`` of tensor ``name``: hash it if it continues
        the hashed bytes (a read elsewhere is left to :meth:`hexdigest`)."""
        if self._hashed and offset == self._done[name] and len(data):
            self._hashes[name].update(data)
            self._done[name] += len(data)

    def hexdigest(self, name: str, read: Callable[[int, memoryview], None] | None) -> str:
        """The tensor's hash; the bytes not hashed yet are read with ``read(offset, view)``
        (offset within the tensor), a chunk at a time."""
        done, size = self._done[name], self._sizes[name]
        if done < size:
            if read is None:
                raise RuntimeError(f"{name}: bytes {done}:{size} were never hashed")
            self._hashed = True
            buf = memoryview(bytearray(min(HASH_CHUNK, size - done)))
            while done < size:
                part = buf[: min(len(buf), size - done)]
                read(done, part)
                self.update(name, done, part)
                done = self._done[name]
        return self._hashes[name].hexdigest()


def fingerprint_of(metadata: dict[str, str], tensors: dict[str, tuple[str, list[int], str]]) -> str:
    """``sha256:<hex>`` of a file's metadata and its tensors' ``(dtype, shape, hash)``."""
    desc = {"metadata": metadata, "tensors": {k: list(v) for k, v in sorted(tensors.items())}}
    return json_fingerprint(desc)


def json_fingerprint(value: object) -> str:
    """``sha256:<hex>`` of a value's compact, key-sorted JSON (a layer table)."""
    raw = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"
