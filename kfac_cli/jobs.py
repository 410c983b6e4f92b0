"""The commands' work as library functions: checkpoint + tensors in, safetensors out.

Each job checks everything it can before computing (shapes, names, dtypes, the output
path), then streams: one layer (or block) is read, computed and written at a time, in batch
chunks, so memory is bounded by the largest layer and never by the whole file.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kfac_cli import __version__
from kfac_cli.canonical import (
    ParamGroup,
    block_shape,
    check_groups,
)
from kfac_cli.checkpoints import load_layer_table
from kfac_cli.devices import resolve_device, resolve_dtype
from kfac_cli.enums import KFACType
from kfac_cli.errors import KfacCliError
from kfac_cli.layers import Layer, LayerTable
from kfac_cli.output import atomic_output, check_target
from kfac_cli.patches import layer_patches, output_shape
from kfac_cli.streaming import BackgroundWriter, BufferPool, Prefetcher, view
from kfac_cli.tensorfile import DTYPE_NAMES, DTYPES, SafetensorsWriter, TensorSource, open_tensors

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
class _Plan:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _order(plans: list[_Plan]) -> list[_Plan]:
    """Largest item size first (stable), so every tensor's offset stays aligned."""
    return sorted(plans, key=lambda p: -p.dtype.itemsize)


def _write_all(out, force, plans, metadata, produce, reporter) -> int:
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


def _near(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3)
    return f" (nearest: {', '.join(near)})" if near else ""


def _meta_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _nonfinite(x: torch.Tensor) -> int:
    """How many NaN/Inf ``x`` holds; one read pass when there are none."""
    if not x.is_floating_point() or torch.isfinite(x.sum()):
        return 0  # any NaN/Inf makes the sum non-finite (an overflow is counted exactly)
    return x.numel() - int(torch.isfinite(x).sum())


class _Finite:
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


def _chunks(rows: int, nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` each (at least one, even for no rows)."""
    step = max(1, chunk_bytes // max(nbytes // max(rows, 1), 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)] or [(0, 0)]


def _release_all(fns: list) -> Callable[[], None]:
    return lambda: [f() for f in fns]


def run_patches(
    model: Path,
    activations: Path,
    out: str,
    *,
    approx: str = "expand",
    patterns: list[str] | None = None,
    bias_column: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    force: bool = False,
    ignore_unknown: bool = False,
    strict: bool = False,
    spec: Path | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Write the (averaged) patches of every layer in the dump to ``out``.

    Returns:
        A summary: layers with input/output shapes, bytes written, seconds.
    """
    started = time.perf_counter()
    reporter = reporter or Reporter()
    approx = KFACType(approx)
    check_target(out, force)
    dev, cast = resolve_device(device), resolve_dtype(dtype)
    table = load_layer_table(model, spec, unsafe_pickle)
    with TensorSource(activations) as src:
        unknown = [k for k in src.infos if table.layer(k) is None]
        names = [la.name for la in table.layers]
        for key in unknown:
            if not ignore_unknown:
                raise KfacCliError(
                    activations,
                    key,
                    f"a layer of {model}{_near(key, names)}",
                    "no such layer",
                    hint="see `kfac-cli layers MODEL`, or pass --ignore-unknown to skip such keys",
                )
            reporter.warn(f"{activations}: {key}: skipped, the model has no such layer")
        selected = [la for la in table.select(patterns) if la.name in src.infos]
        if patterns and not selected:
            raise KfacCliError(
                activations, None, f"a layer matching {' or '.join(patterns)}", "none in the dump"
            )
        plans = [
            _plan_layer(la, src, activations, model, approx, bias_column, cast) for la in selected
        ]
        metadata = {
            "format": "kfac-cli/patches",
            "layout_version": LAYOUT_VERSION,
            "kfac_cli_version": __version__,
            "approx": approx.value,
            "bias_column": _meta_json(bias_column),
            "model": str(model),
            "activations": str(activations),
            "layers": _meta_json({p.key: p.meta for p in plans}),
        }
        ordered = _order(plans)
        on_gpu = dev.type != "cpu"
        pin = dev.type == "cuda"
        inputs, outputs = BufferPool(3, CPU, pin), BufferPool(3, CPU, pin)
        on_device = BufferPool(1, dev)
        chunk_bytes = CHUNK_BYTES * (1 if dev.type == "cpu" else GPU_CHUNK_FACTOR)
        chunks = {p.key: _chunks(p.shape[0], p.nbytes, chunk_bytes) for p in ordered}
        finite = _Finite(activations, strict, reporter)

        def reads():
            for p in ordered:
                info = src.infos[p.key]
                row_len = math.prod(info.shape[1:])
                for start, stop in chunks[p.key]:
                    yield (
                        (stop - start) * row_len * info.dtype.itemsize,
                        lambda buf, k=p.key, r=(row_len, start, stop), s=info.shape: src.read(
                            k, buf, r
                        ).view(r[2] - r[1], *s[1:]),
                    )

        prefetch = Prefetcher(reads(), inputs)

        def produce(plan: _Plan, put) -> None:
            layer = table.layer(plan.key)
            params = layer.conv if layer.is_conv else None
            into_buffer = params is not None and approx is KFACType.EXPAND
            for start, stop in chunks[plan.key]:
                x_host, in_buf = prefetch.next()
                finite.check(plan.key, x_host)
                x = x_host.to(dev, plan.dtype, non_blocking=True)
                shape = (stop - start, *plan.shape[1:])
                nbytes = math.prod(shape) * plan.dtype.itemsize
                release = []
                if into_buffer and not on_gpu:
                    buf = outputs.get(nbytes)
                    release.append(lambda buf=buf: outputs.put(buf))
                    y = layer_patches(x, params, approx, bias_column, view(buf, plan.dtype, shape))
                elif into_buffer:
                    dbuf = on_device.get(nbytes)  # reused in stream order: no wait needed
                    y = layer_patches(x, params, approx, bias_column, view(dbuf, plan.dtype, shape))
                    on_device.put(dbuf)
                else:
                    y = layer_patches(x, params, approx, bias_column)
                event = None
                if on_gpu:
                    host = outputs.get(nbytes)
                    release.append(lambda host=host: outputs.put(host))
                    y = view(host, plan.dtype, shape).copy_(y, non_blocking=True)
                    if dev.type == "cuda":
                        event = torch.cuda.Event()
                        event.record()
                aliased = y.untyped_storage().data_ptr() == in_buf.untyped_storage().data_ptr()
                if on_gpu or aliased:  # the input is still read: return it once written
                    release.append(lambda b=in_buf: inputs.put(b))
                else:
                    inputs.put(in_buf)
                put(plan.key, y, event, _release_all(release))
            finite.report(plan.key, math.prod(plan.meta["input_shape"]))

        try:
            written = _write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return {
        "command": "patches",
        "output": out,
        "approx": approx.value,
        "layers": [
            {
                "name": p.key,
                "input_shape": p.meta["input_shape"],
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "bytes": p.nbytes,
            }
            for p in plans
        ],
        "bytes": written,
        "seconds": round(time.perf_counter() - started, 4),
    }


def _plan_layer(
    layer: Layer,
    src: TensorSource,
    file: Path,
    model: Path,
    approx: KFACType,
    bias_column: bool,
    cast: torch.dtype | None,
) -> _Plan:
    info = src.infos[layer.name]
    params = layer.require_conv(model) if layer.is_conv else None
    dtype = cast or info.dtype
    if not dtype.is_floating_point or dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ):
        raise KfacCliError(
            file,
            layer.name,
            "float16/bfloat16/float32/float64 (or pass --dtype)",
            f"dtype {DTYPE_NAMES.get(info.dtype, info.dtype)}",
        )
    shape = info.shape
    c_in = layer.weight_shape[1] * (params.groups if params else 1)
    if params is not None:
        n = params.ndim
        if len(shape) != n + 2:
            dims = ", ".join(["B", "C_in", *(f"I{i + 1}" for i in range(n))])
            raise KfacCliError(
                file,
                layer.name,
                f"a rank-{n + 2} {layer.kind} input [{dims}]",
                f"shape {list(shape)}",
            )
        if shape[1] != c_in:
            raise KfacCliError(
                file,
                layer.name,
                f"C_in={c_in} channels (weight {list(layer.weight_shape)}, groups {params.groups})",
                f"{shape[1]} in shape {list(shape)}",
            )
    elif len(shape) < 2 or shape[-1] != c_in:
        raise KfacCliError(
            file, layer.name, f"a linear input [B, ..., {c_in}]", f"shape {list(shape)}"
        )
    try:
        out_shape = output_shape(shape, params, approx, bias_column)
    except KfacCliError as e:
        raise e.with_context(file, layer.name) from None
    meta = {
        "kind": layer.kind,
        "input_shape": list(shape),
        "weight": layer.weight,
        "bias": layer.bias,
        "weight_shape": list(layer.weight_shape),
    }
    if params is not None:
        meta.update(params.to_json())
    return _Plan(layer.name, dtype, out_shape, meta)


# --------------------------------------------------------------------------- canonicalize


def _block_key(table: LayerTable, g: ParamGroup, separate_bias: bool) -> str:
    """A layer's block is keyed by the layer's name; a separate block by its parameter's."""
    if not separate_bias:
        layer = next((la for la in table.layers if la.weight == g.W), None)
        if layer is not None:
            return layer.name
    return g.names[0]


def run_canonicalize(
    model: Path,
    tensors: Path,
    out: str,
    *,
    separate_bias: bool = False,
    keep_untreated: bool = False,
    layout: str = "flat",
    columns: bool = False,
    batch_first: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    force: bool = False,
    spec: Path | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Parameter-space tensors to canonical blocks (SPEC.md), one tensor per block.

    A permutation: values (NaN and Inf included) pass through unchanged, so they are not
    scanned.
    """
    started = time.perf_counter()
    reporter = reporter or Reporter()
    check_target(out, force)
    dev, cast = resolve_device(device), resolve_dtype(dtype)
    table = load_layer_table(model, spec, unsafe_pickle)
    lead, trail = int(batch_first), int(columns)
    with open_tensors(tensors) as src:
        shapes = table.parameters
        missing = [n for n in shapes if n not in src.infos]
        if missing:
            raise KfacCliError(
                tensors,
                missing[0],
                f"every parameter of {model}",
                f"{len(missing)} missing: {', '.join(missing[:8])}",
            )
        extra = [n for n in src.infos if n not in shapes]
        if extra:
            raise KfacCliError(
                tensors,
                extra[0],
                f"only parameters of {model}{_near(extra[0], list(shapes))}",
                "an extra key",
            )
        groups = check_groups(shapes, table.groups(separate_bias, keep_untreated))
        lead_shape = trail_shape = None
        for name in shapes:
            info = src.infos[name]
            s, p = info.shape, shapes[name]
            want = ["N"] * lead + [str(v) for v in p] + ["C"] * trail
            if len(s) != len(p) + lead + trail or tuple(s[lead : lead + len(p)]) != tuple(p):
                hint = None
                if not columns and len(s) == len(p) + 1 and tuple(s[:-1]) == tuple(p):
                    hint = "a trailing column axis needs --columns"
                elif not batch_first and len(s) == len(p) + 1 and tuple(s[1:]) == tuple(p):
                    hint = "a leading batch axis needs --batch-first"
                raise KfacCliError(
                    tensors, name, f"shape [{', '.join(want)}]", f"{list(s)}", hint=hint
                )
            lead_shape = lead_shape or tuple(s[:lead])
            trail_shape = trail_shape or tuple(s[len(s) - trail :])
            if tuple(s[:lead]) != lead_shape or tuple(s[len(s) - trail :]) != trail_shape:
                raise KfacCliError(
                    tensors,
                    name,
                    f"the same N/C axes as the others {list(lead_shape)}/{list(trail_shape)}",
                    f"{list(s)}",
                )
            if not (info.dtype.is_floating_point or cast):
                raise KfacCliError(tensors, name, "a floating-point dtype", str(info.dtype))
        plans, seen = [], set()
        untreated = {u["name"] for u in table.untreated}
        for g in groups:
            key = _block_key(table, g, separate_bias)
            if key in seen:
                raise KfacCliError(model, key, "unique block names", "a name used twice")
            seen.add(key)
            dtypes = [src.infos[n].dtype for n in g.names]
            dt = cast or (dtypes[0] if len(set(dtypes)) == 1 else torch.promote_types(*dtypes))
            bshape = (*lead_shape, *block_shape(g, shapes, layout), *trail_shape)
            plans.append(
                _Plan(key, dt, bshape, {"W": g.W, "b": g.b, "untreated": g.names[0] in untreated})
            )
        metadata = {
            "format": "kfac-cli/canonical",
            "layout_version": LAYOUT_VERSION,
            "kfac_cli_version": __version__,
            "layout": layout,
            "columns": _meta_json(columns),
            "batch_first": _meta_json(batch_first),
            "model": str(model),
            "tensors": str(tensors),
            "blocks": _meta_json([{"key": p.key, **p.meta} for p in plans]),
            "parameters": _meta_json(
                [
                    {"name": n, "shape": list(s), "dtype": DTYPE_NAMES[src.infos[n].dtype]}
                    for n, s in shapes.items()
                ]
            ),
        }
        by_key = {p.key: g for p, g in zip(plans, groups)}
        ordered = _order(plans)
        rows = {p.key: _row_view(by_key[p.key], shapes, lead_shape, trail_shape) for p in ordered}
        chunks = {p.key: _chunks(rows[p.key][0], p.nbytes) for p in ordered}
        inputs, outputs = BufferPool(4, CPU), BufferPool(3, CPU)

        def reads():
            for p in ordered:
                for start, stop in chunks[p.key]:
                    for name, row_len in rows[p.key][1].items():
                        info = src.infos[name]
                        yield (
                            (stop - start) * row_len * info.dtype.itemsize,
                            lambda buf, n=name, r=(row_len, start, stop): src.read(n, buf, r),
                        )

        prefetch = Prefetcher(reads(), inputs, ahead=2)

        def produce(plan: _Plan, put) -> None:
            g = by_key[plan.key]
            for start, stop in chunks[plan.key]:
                got = [prefetch.next() for _ in g.names]
                parts = [t.to(dev, plan.dtype) for t, _ in got]
                release = []
                if len(parts) == 1:
                    block = parts[0]
                    release += [lambda b=b: inputs.put(b) for _, b in got]
                else:  # joint: each output unit's weight row, then its bias entry
                    width = sum(t.shape[1] for t in parts)
                    nbytes = (stop - start) * width * plan.dtype.itemsize
                    raw = outputs.get(nbytes) if dev.type == "cpu" else None
                    into = None if raw is None else view(raw, plan.dtype, (stop - start, width))
                    block = torch.cat(parts, dim=1, out=into)
                    if raw is not None:
                        release.append(lambda raw=raw: outputs.put(raw))
                    for _, b in got:
                        inputs.put(b)
                put(plan.key, block, None, _release_all(release))

        try:
            written = _write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return _summary("canonicalize", out, plans, written, started)


def _row_view(
    g: ParamGroup,
    shapes: dict[str, tuple[int, ...]],
    lead_shape: tuple[int, ...],
    trail_shape: tuple[int, ...],
) -> tuple[int, dict[str, int]]:
    """A block as rows: ``(rows, {parameter: its row length})``.

    A parameter ``[*lead, *shape, *trail]`` is read as ``[lead*shape[0], rest*trail]`` rows
    of contiguous bytes; a joint block's row ``r`` is weight row ``r`` then bias row ``r``,
    which is the canonical order in both layouts, with or without lead and trail axes.
    """
    lead, trail = math.prod(lead_shape), math.prod(trail_shape)
    first = shapes[g.names[0]]
    rows = lead * (first[0] if first else 1)
    return rows, {n: math.prod(shapes[n][1:]) * trail for n in g.names}


def _summary(command: str, out: str, plans: list[_Plan], written: int, started: float) -> dict:
    return {
        "command": command,
        "output": out,
        "tensors": [
            {
                "name": p.key,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "bytes": p.nbytes,
            }
            for p in plans
        ],
        "bytes": written,
        "seconds": round(time.perf_counter() - started, 4),
    }


def _canonical_meta(path: Path, metadata: dict[str, str]) -> tuple[dict, list, dict]:
    if metadata.get("format") != "kfac-cli/canonical":
        raise KfacCliError(
            path,
            "__metadata__.format",
            "'kfac-cli/canonical' (a file written by kfac-cli canonicalize)",
            repr(metadata.get("format")),
        )
    if metadata.get("layout_version") != LAYOUT_VERSION:
        raise KfacCliError(
            path,
            "__metadata__.layout_version",
            repr(LAYOUT_VERSION),
            repr(metadata.get("layout_version")),
        )
    try:
        blocks = json.loads(metadata["blocks"])
        params = json.loads(metadata["parameters"])
        opts = {
            "layout": metadata["layout"],
            "columns": json.loads(metadata["columns"]),
            "batch_first": json.loads(metadata["batch_first"]),
        }
        shapes = {p["name"]: tuple(int(v) for v in p["shape"]) for p in params}
        dtypes = {p["name"]: DTYPES[p["dtype"]] for p in params}
        groups = [ParamGroup(b.get("W"), b.get("b")) for b in blocks]
        keys = [str(b["key"]) for b in blocks]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KfacCliError(
            path,
            "__metadata__",
            "canonical metadata as kfac-cli writes it",
            f"{type(e).__name__}: {e}"[:120],
        ) from None
    if opts["layout"] not in ("flat", "matrix") or not all(
        isinstance(opts[k], bool) for k in ("columns", "batch_first")
    ):
        raise KfacCliError(
            path, "__metadata__", "layout flat|matrix and boolean flags", repr(opts)[:80]
        )
    try:
        groups = check_groups(shapes, groups)
    except KfacCliError as e:
        raise e.with_context(path) from None
    return opts, list(zip(keys, groups)), {"shapes": shapes, "dtypes": dtypes}


def run_uncanonicalize(
    canonical: Path,
    out: str,
    *,
    model: Path | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    force: bool = False,
    spec: Path | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Canonical blocks back to one tensor per parameter, from the file's own metadata."""
    started = time.perf_counter()
    reporter = reporter or Reporter()
    check_target(out, force)
    dev, cast = resolve_device(device), resolve_dtype(dtype)
    with TensorSource(canonical) as src:
        opts, blocks, info = _canonical_meta(canonical, src.metadata)
        shapes, dtypes = info["shapes"], info["dtypes"]
        if model is not None:
            table = load_layer_table(model, spec, unsafe_pickle)
            if dict(table.parameters) != shapes:
                diff = sorted(set(table.parameters.items()) ^ set(shapes.items()))
                raise KfacCliError(
                    canonical,
                    diff[0][0] if diff else None,
                    f"the parameters of {model}",
                    "different names or shapes",
                )
        lead, trail = int(opts["batch_first"]), int(opts["columns"])
        names = {k for k, _ in blocks}
        if set(src.infos) != names:
            odd = sorted(set(src.infos) ^ names)[0]
            raise KfacCliError(
                canonical,
                odd,
                "the blocks the metadata lists",
                "a tensor not listed" if odd in src.infos else "no such tensor",
            )
        lead_shape = trail_shape = None
        for key, g in blocks:
            s = src.infos[key].shape
            want = block_shape(g, shapes, opts["layout"])
            if len(s) != lead + len(want) + trail or tuple(s[lead : lead + len(want)]) != want:
                raise KfacCliError(
                    canonical,
                    key,
                    f"a block of shape {list(want)} "
                    f"(batch_first={opts['batch_first']}, "
                    f"columns={opts['columns']})",
                    f"{list(s)}",
                )
            lead_shape = lead_shape or tuple(s[:lead])
            trail_shape = trail_shape or tuple(s[len(s) - trail :])
            if tuple(s[:lead]) != lead_shape or tuple(s[len(s) - trail :]) != trail_shape:
                raise KfacCliError(canonical, key, "the same N/C axes in every block", f"{list(s)}")
        plans = [
            _Plan(n, cast or dtypes[n], (*lead_shape, *s, *trail_shape)) for n, s in shapes.items()
        ]
        metadata = {
            "format": "kfac-cli/parameters",
            "layout_version": LAYOUT_VERSION,
            "kfac_cli_version": __version__,
            "columns": _meta_json(opts["columns"]),
            "batch_first": _meta_json(opts["batch_first"]),
            "canonical": str(canonical),
        }
        group_of = {n: (k, g) for k, g in blocks for n in g.names}
        ordered = _order(plans)
        views = {k: _row_view(g, shapes, lead_shape, trail_shape) for k, g in blocks}
        # How each parameter is produced: a whole block, a weight (caching its bias column),
        # or a bias, from that cache or from its own pass over the block.
        steps, seen = {}, set()
        for p in ordered:
            key, g = group_of[p.key]
            mode = "whole" if not g.joint else "weight" if p.key == g.W else "bias"
            if mode == "bias" and key in seen:
                mode = "cached"
            seen.add(key)
            steps[p.key] = mode
        block_chunks = {k: _chunks(views[k][0], src.infos[k].nbytes) for k, _ in blocks}
        inputs = BufferPool(3, CPU)

        def reads():
            for p in ordered:
                key = group_of[p.key][0]
                if steps[p.key] == "cached":
                    continue
                width = sum(views[key][1].values())
                info = src.infos[key]
                for start, stop in block_chunks[key]:
                    yield (
                        (stop - start) * width * info.dtype.itemsize,
                        lambda buf, k=key, r=(width, start, stop): src.read(k, buf, r),
                    )

        prefetch = Prefetcher(reads(), inputs)
        bias_cache: dict[str, list[torch.Tensor]] = {}

        def produce(plan: _Plan, put) -> None:
            key, g = group_of[plan.key]
            mode = steps[plan.key]
            if mode == "cached":
                put(plan.key, torch.cat(bias_cache.pop(plan.key)).to(dev, plan.dtype))
                return
            w_len = views[key][1].get(g.W, 0) if g.joint else 0
            for _ in block_chunks[key]:
                chunk, buf = prefetch.next()
                if mode == "whole":
                    put(plan.key, chunk.to(dev, plan.dtype), None, lambda b=buf: inputs.put(b))
                    continue
                if mode == "weight":
                    bias_cache.setdefault(g.b, []).append(chunk[:, w_len:].clone())
                    part = chunk[:, :w_len]
                else:
                    part = chunk[:, w_len:]
                # A one-row chunk's part is contiguous already, a view of the buffer: keep
                # the buffer until the part is written.
                release = lambda b=buf: inputs.put(b)  # noqa: E731
                put(plan.key, part.to(dev, plan.dtype).contiguous(), None, release)

        try:
            written = _write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return _summary("canonicalize --inverse", out, plans, written, started)
