"""What every job shares: the prologue, output plans, chunking, the streamed write, and
the summary.

A job (:mod:`.patches`, :mod:`.canonicalize`, :mod:`.factors`) opens a :class:`Job` (the
output checked before any work, the device and dtype resolved), checks and plans everything
it can before computing (shapes, names, dtypes), then streams: rows of a tensor (a batch
chunk, a block of weight rows) are read, computed and written a chunk at a time, so memory
is bounded by a few chunks, never by a layer or the whole file.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kfac_cli import __version__
from kfac_cli.errors import KfacError
from kfac_cli.files.digest import json_fingerprint
from kfac_cli.files.kinds import LAYOUT_VERSION
from kfac_cli.files.output import atomic_output, check_target
from kfac_cli.files.safetensors import DTYPE_NAMES
from kfac_cli.files.sources import Tensors, fingerprint
from kfac_cli.files.writer import SafetensorsWriter
from kfac_cli.jobs.devices import resolve_device, resolve_dtype
from kfac_cli.jobs.pipeline import BackgroundWriter, BufferPool, DeviceStage, Prefetcher, Read
from kfac_cli.models.table import Layer, LayerTable, matches

CHUNK_BYTES = 8 * 2**20  # output bytes per batch chunk: large enough to amortise, small enough
GPU_CHUNK_FACTOR = 8  # larger chunks on a GPU: fewer launches and transfers
CPU = torch.device("cpu")


@dataclass
class Reporter:
    """Callbacks through which a job reports progress and warnings (no terminal here)."""

    start: Callable[[int], None] = lambda total_bytes: None
    advance: Callable[[str, int], None] = lambda key, nbytes: None
    warn: Callable[[str], None] = lambda message: None
    note: Callable[[str], None] = lambda message: None  # what the run does that was not asked


@dataclass
class Plan:
    """One output tensor: its key, dtype, shape and metadata."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Job:
    """One command's run: checks the output first, resolves device and dtype, writes the
    output in one atomic stream, and summarises.

    Args:
        command: The command's name (for the summary).
        out: The output path, or ``-`` for stdout.
        force: Replace an existing output.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        dtype: A compute dtype name, or ``None`` to keep each input's.
        reporter: Progress and warnings.
        writer: Whether this process writes the output (not the other torchrun ranks).
    """

    def __init__(
        self,
        command: str,
        out: str,
        *,
        force: bool = False,
        device: str = "cpu",
        dtype: str | None = None,
        reporter: Reporter | None = None,
        writer: bool = True,
    ) -> None:
        self.started = time.perf_counter()
        self.command, self.out, self.force = command, str(out), force
        self.reporter = reporter or Reporter()
        if writer:
            check_target(self.out, force)
        self.device, self.cast = resolve_device(device), resolve_dtype(dtype)

    @property
    def chunk_bytes(self) -> int:
        """Bytes per chunk on this job's device."""
        return CHUNK_BYTES * (1 if self.device.type == "cpu" else GPU_CHUNK_FACTOR)

    def stage(self) -> DeviceStage:
        return DeviceStage(self.device)

    @staticmethod
    def header(fmt: str, **fields: object) -> dict[str, str]:
        """The metadata every output carries (format, versions) and ``fields`` (strings as
        they are, everything else as compact JSON)."""
        out = {"format": fmt, "layout_version": LAYOUT_VERSION, "kfac_cli_version": __version__}
        for k, v in fields.items():
            out[k] = v if isinstance(v, str) else meta_json(v)
        return out

    def write(
        self,
        plans: list[Plan],
        metadata: dict[str, str],
        produce: Callable[[Plan, Callable], None],
        before_commit: Callable[[], dict[str, str] | None] = lambda: None,
    ) -> int:
        """Stream every plan's tensor into the output, atomically; the bytes written.

        ``produce(plan, put)`` computes a plan's tensor, whole or in chunks of its first
        axis, and hands each to ``put(key, tensor, event=None, done=None)``; a background
        thread writes them in order (and calls ``done`` after each), overlapping I/O with
        compute. ``before_commit`` runs after the last byte, before the output appears
        (e.g. to check that an input stream ended where its header said); it may return
        the final metadata, in which :data:`~kfac_cli.files.digest.PENDING` fingerprints
        are filled in (the header is rewritten in place).
        """
        self.reporter.start(sum(p.nbytes for p in plans))
        with atomic_output(self.out, force=self.force) as fh:
            writer = SafetensorsWriter(fh, [(p.key, p.dtype, p.shape) for p in plans], metadata)
            sink = BackgroundWriter(writer)
            try:
                for plan in plans:
                    produce(plan, sink.put)
                    self.reporter.advance(plan.key, plan.nbytes)
                sink.close()
            except BaseException:
                sink.abort()
                raise
            final = before_commit()
            if final is not None:
                writer.finish_header(final)
            return writer.bytes_written

    def stream(
        self,
        plans: list[Plan],
        metadata: dict[str, str],
        reads: Iterable[Read],
        produce: Callable[[Plan, Callable, Prefetcher], None],
        before_commit: Callable[[], dict[str, str] | None] = lambda: None,
        *,
        ahead: int = 1,
        write: bool = True,
    ) -> int:
        """The one streaming loop every job runs: ``reads`` on a reader thread into a pool
        of ``ahead + 2`` buffers, ``produce(plan, put, prefetch)`` for each plan (it takes
        each chunk with ``prefetch.next(key, rows)`` and hands results to ``put``), the
        writer thread, and the teardown of all three on every path (see
        :mod:`~kfac_cli.jobs.pipeline` for the thread rules). ``write=False`` (a torchrun
        rank that only sums) runs the same loop and drops what it puts. The bytes written.
        """
        pool = BufferPool(ahead + 2, CPU, pin_memory=self.device.type == "cuda")
        prefetch = Prefetcher(reads, pool, ahead)
        try:

            def step(plan: Plan, put: Callable) -> None:
                produce(plan, put, prefetch)

            if write:
                return self.write(plans, metadata, step, before_commit)
            for plan in plans:
                step(plan, lambda *args, **kwargs: None)
            before_commit()
            return 0
        finally:
            prefetch.close()

    def summary(
        self, plans: list[Plan], written: int, items: str = "tensors", **fields: object
    ) -> dict:
        """The ``--json`` summary: what was written, with shapes, bytes and seconds."""
        return {
            "command": self.command,
            "output": self.out,
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
            "seconds": round(time.perf_counter() - self.started, 4),
        }


def as_enums(options: object, **enums: type) -> None:
    """In a frozen options value's ``__post_init__``: each named field as its enum (the
    keyword API takes values, ``approx="reduce"``), globs as a tuple.

    Raises:
        KfacError: For a value no member has.
    """
    for name, enum in enums.items():
        value = getattr(options, name)
        if value is not None:
            try:
                object.__setattr__(options, name, enum(value))
            except ValueError:
                names = ", ".join(m.value for m in enum)
                raise KfacError(None, name, f"one of {names}", repr(value)) from None
    if hasattr(options, "patterns"):
        object.__setattr__(options, "patterns", tuple(options.patterns or ()))


def options_of(kind: type, options: object | None, settings: dict) -> object:
    """A job's options value: ``options`` as given, or built from keyword ``settings``."""
    if options is not None and settings:
        raise TypeError("give options or keyword settings, not both")
    return options if options is not None else kind(**settings)


def model_ref(model: object, table: LayerTable) -> dict[str, str]:
    """How an output records its model: the file's name and the fingerprint of its layer
    table (what an output depends on: layers, parameter names and shapes, hyper-parameters;
    its weights are in the dumps' fingerprints), never the path given, so identical inputs
    give identical outputs wherever they are, and a 10 GB checkpoint is not read again."""
    layout = {k: v for k, v in table.to_json().items() if k != "source"}
    return {"file": Path(str(model)).name, "fingerprint": json_fingerprint(layout)}


def sealed(metadata: dict[str, str], key: str, src: Tensors) -> Callable[[], dict[str, str]]:
    """A ``before_commit`` for :meth:`Job.write`: read ``src`` to its end, then fill in its
    fingerprint under ``key`` (written as :data:`PENDING`)."""

    def commit() -> dict[str, str]:
        src.finish()
        return {**metadata, key: fingerprint(src)}

    return commit


def order(plans: list[Plan]) -> list[Plan]:
    """Largest item size first (stable), so every tensor's offset stays aligned."""
    return sorted(plans, key=lambda p: -p.dtype.itemsize)


def near(name: str, known: Iterable[str]) -> str:
    """`` (nearest: a, b)`` for the known names closest to ``name``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (nearest: {', '.join(close)})" if close else ""


def meta_json(value: object) -> str:
    """Compact, key-sorted JSON for a metadata string (deterministic bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _nonfinite(x: torch.Tensor, probe: torch.Tensor | None = None) -> int:
    """How many NaN/Inf ``x`` holds; one read pass of ``x`` when there are none, or of
    ``probe``: values computed from ``x`` that any NaN/Inf in it makes non-finite (sums
    that every element of ``x`` enters)."""
    if not x.is_floating_point() or torch.isfinite((x if probe is None else probe).sum()):
        return 0  # any NaN/Inf makes the sum non-finite (an overflow is counted exactly)
    return x.numel() - int(torch.isfinite(x).sum())


class Finite:
    """Counts NaN/Inf chunk by chunk; fails at once with ``strict``, else warns per tensor."""

    def __init__(self, file: object, strict: bool, reporter: Reporter) -> None:
        self.file, self.strict, self.reporter = file, strict, reporter
        self.bad: dict[str, int] = {}

    def check(self, key: str, x: torch.Tensor, probe: torch.Tensor | None = None) -> None:
        """Count ``x``'s NaN/Inf (``probe``: see :func:`_nonfinite`)."""
        bad = _nonfinite(x, probe)
        if bad and self.strict:
            raise KfacError(self.file, key, "finite values", f"{bad} NaN/Inf values")
        if bad:
            self.bad[key] = self.bad.get(key, 0) + bad

    def report(self, key: str, total: int) -> None:
        if key in self.bad:
            err = KfacError(
                self.file, key, "finite values", f"{self.bad.pop(key)} NaN/Inf of {total}"
            )
            self.reporter.warn(err.line())


def chunks(rows: int, nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` each (at least one, even for no rows)."""
    step = max(1, chunk_bytes // max(nbytes // max(rows, 1), 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)] or [(0, 0)]


def release_all(fns: list) -> Callable[[], None]:
    return lambda: [f() for f in fns]


# Checks every job that reads layer inputs shares.

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def select_keys(
    table: LayerTable,
    src: Tensors,
    model: object,
    patterns: list[str] | None,
    ignore_unknown: bool,
    reporter: Reporter,
) -> list[str]:
    """The dump keys to use, in table order (a stream: in data order).

    Every key must name a layer KFAC treats (a calling module, or ``<module>#<k>`` for
    the k-th extra call), or be skipped with ``ignore_unknown``; at least one must remain.

    Raises:
        KfacError: For a key that names no layer (or a layer KFAC cannot treat, saying
            why), or a selection with no layer in it.
    """
    names = [n for la in table.layers for n in la.names]
    for key in src.infos:
        if table.layer(key) is not None:
            continue
        untreated = table.untreated_layer(key)
        if untreated is not None:
            expected, found = "a layer KFAC treats", f"{untreated['op']}: {untreated['reason']}"
        else:
            expected, found = f"a layer of {model}{near(key, names)}", "no such layer"
        if not ignore_unknown:
            raise KfacError(src.path, key, expected, found, fix="ignore_unknown")
        reporter.warn(f"{KfacError(src.path, key, expected, found).line()}; skipped")
    rank = {la.name: i for i, la in enumerate(table.layers)}
    selected = [
        k
        for k in src.infos
        if (layer := table.layer(k)) is not None
        and (not patterns or any(matches(n, patterns) for n in layer.names))
    ]
    if not selected:
        what = f"a layer matching {' or '.join(patterns)}" if patterns else "a layer's input"
        found = "no tensors" if not src.infos else "none"
        raise KfacError(src.path, None, what, found)
    selected.sort(key=lambda k: rank[table.layer(k).name])
    keys = src.order(selected)
    src.expect(keys)
    return keys


def check_sums(y: torch.Tensor, key: str, bad_inputs: bool, file: object) -> None:
    """Sums of finite inputs that came out NaN/Inf overflowed their dtype: one error naming
    the layer and the wider ``dtype`` that fixes it (NaN/Inf inputs follow ``strict``).

    Raises:
        KfacError: For a non-finite ``y`` from finite inputs.
    """
    if bad_inputs or bool(torch.isfinite(y).all()):
        return
    wider = "float32" if y.dtype in (torch.float16, torch.bfloat16) else "float64"
    raise KfacError(
        file,
        key,
        f"sums that fit {str(y.dtype).removeprefix('torch.')}",
        "NaN/Inf from finite inputs (an overflow)",
        fix=f"dtype_{wider}",
    )


def check_input(
    key: str, layer: Layer, shape: tuple[int, ...], dtype: torch.dtype, file: object, model: object
) -> None:
    """A layer input ``[B, C_in, *I]`` (conv) or ``[B, ..., d_in]`` (linear) of a float
    dtype that fits the layer.

    Raises:
        KfacError: Naming the file, the key, and the expected versus found shape or dtype.
    """
    if dtype not in FLOAT_DTYPES:
        raise KfacError(
            file,
            key,
            "float16/bfloat16/float32/float64 (or a compute dtype)",
            f"dtype {DTYPE_NAMES.get(dtype, dtype)}",
            fix="dtype",
        )
    params = layer.require_conv(model) if layer.is_conv else None
    c_in = layer.weight_shape[1] * (params.groups if params else 1)
    if params is not None:
        n = params.ndim
        if len(shape) != n + 2:
            dims = ", ".join(["B", "C_in", *(f"I{i + 1}" for i in range(n))])
            raise KfacError(
                file, key, f"a rank-{n + 2} {layer.kind} input [{dims}]", f"shape {list(shape)}"
            )
        if shape[1] != c_in:
            raise KfacError(
                file,
                key,
                f"C_in={c_in} channels (weight {list(layer.weight_shape)}, groups {params.groups})",
                f"{shape[1]} in shape {list(shape)}",
            )
    elif len(shape) < 2 or shape[-1] != c_in:
        raise KfacError(file, key, f"a linear input [B, ..., {c_in}]", f"shape {list(shape)}")


def layer_meta(layer: Layer, shape: tuple[int, ...]) -> dict:
    """What an output records of the layer an input belongs to."""
    meta = {
        "kind": layer.kind,
        "input_shape": list(shape),
        "weight": layer.weight,
        "bias": layer.bias,
        "weight_shape": list(layer.weight_shape),
    }
    if layer.conv is not None:
        meta.update(layer.conv.to_json())
    return meta
