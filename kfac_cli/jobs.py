"""What the jobs share: plans of output tensors, chunking, and the streamed write.

A job (:mod:`kfac_cli.patches_job`, :mod:`kfac_cli.canonical_job`) checks everything it
can before computing (shapes, names, dtypes, the output path), then streams: rows of a
tensor (a batch chunk, a block of weight rows) are read, computed and written a chunk at a
time, so memory is bounded by a few chunks, never by a layer or the whole file.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kfac_cli.errors import KfacCliError
from kfac_cli.output import atomic_output
from kfac_cli.streaming import BackgroundWriter
from kfac_cli.tensorfile import SafetensorsWriter

LAYOUT_VERSION = "1"
CHUNK_BYTES = 8 * 2**20  # output bytes per batch chunk: large enough to amortise, small enough
GPU_CHUNK_FACTOR = 8  # larger chunks on a GPU: fewer launches and transfers
CPU = torch.device("cpu")


@dataclass
class Reporter:
    """Callbacks through which a job reports progress and warnings (no terminal here)."""

    start: Callable[[int], None] = lambda total_bytes: None
    advance: Callable[[str, int], None] = lambda key, nbytes: None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class Plan:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def order(plans: list[Plan]) -> list[Plan]:
    """Largest item size first (stable), so every tensor's offset stays aligned."""
    return sorted(plans, key=lambda p: -p.dtype.itemsize)


def write_all(out, force, plans, metadata, produce, reporter) -> int:
    """Stream every plan's tensor into ``out``.

    ``produce(plan, put)`` computes a plan's tensor, whole or in chunks of its first axis,
    and hands each to ``put(key, tensor, event=None, done=None)``; a background thread
    writes them in order (and calls ``done`` after each), overlapping I/O with compute.
    """
    reporter.start(sum(p.nbytes for p in plans))
    with atomic_output(out, force=force) as fh:
        writer = SafetensorsWriter(fh, [(p.key, p.dtype, p.shape) for p in plans], metadata)
        background = BackgroundWriter(writer)
        try:
            for plan in plans:
                produce(plan, background.put)
                reporter.advance(plan.key, plan.nbytes)
            background.close()
        except BaseException:
            background.abort()
            raise
        return writer.bytes_written


def near(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3)
    return f" (nearest: {', '.join(near)})" if near else ""


def meta_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _nonfinite(x: torch.Tensor) -> int:
    """How many NaN/Inf ``x`` holds; one read pass when there are none."""
    if not x.is_floating_point() or torch.isfinite(x.sum()):
        return 0  # any NaN/Inf makes the sum non-finite (an overflow is counted exactly)
    return x.numel() - int(torch.isfinite(x).sum())


class Finite:
    """Counts NaN/Inf chunk by chunk; fails at once with ``strict``, else warns per tensor."""

    def __init__(self, file: object, strict: bool, reporter: Reporter) -> None:
        self.file, self.strict, self.reporter = file, strict, reporter
        self.bad: dict[str, int] = {}

    def check(self, key: str, x: torch.Tensor) -> None:
        bad = _nonfinite(x)
        if bad and self.strict:
            raise KfacCliError(self.file, key, "finite values", f"{bad} NaN/Inf values")
        if bad:
            self.bad[key] = self.bad.get(key, 0) + bad

    def report(self, key: str, total: int) -> None:
        if key in self.bad:
            err = KfacCliError(
                self.file, key, "finite values", f"{self.bad.pop(key)} NaN/Inf of {total}"
            )
            self.reporter.warn(err.line())


def chunks(rows: int, nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` each (at least one, even for no rows)."""
    step = max(1, chunk_bytes // max(nbytes // max(rows, 1), 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)] or [(0, 0)]


def release_all(fns: list) -> Callable[[], None]:
    return lambda: [f() for f in fns]


def summary(
    command: str,
    out: str,
    plans: list[Plan],
    written: int,
    started: float,
    items: str = "tensors",
    **fields: object,
) -> dict:
    """The ``--json`` summary: what was written, with shapes, bytes and seconds."""
    return {
        "command": command,
        "output": out,
        **fields,
        items: [
            {
                "name": p.key,
                **({"input_shape": p.meta["input_shape"]} if "input_shape" in p.meta else {}),
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "bytes": p.nbytes,
            }
            for p in plans
        ],
        "bytes": written,
        "seconds": round(time.perf_counter() - started, 4),
    }
