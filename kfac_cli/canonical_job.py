"""`kfac-cli canonicalize` as library functions: parameter space to canonical blocks and back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from kfac_cli import __version__
from kfac_cli.canonical import ParamGroup, block_shape, check_groups
from kfac_cli.checkpoints import load_layer_table
from kfac_cli.devices import resolve_device, resolve_dtype
from kfac_cli.errors import KfacCliError
from kfac_cli.jobs import (
    CPU,
    LAYOUT_VERSION,
    Plan,
    Reporter,
    chunks,
    meta_json,
    near,
    order,
    summary,
    write_all,
)
from kfac_cli.layers import LayerTable
from kfac_cli.output import check_target
from kfac_cli.streaming import BufferPool, Prefetcher, view
from kfac_cli.tensorfile import DTYPE_NAMES, DTYPES, TensorSource, open_tensors


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
                f"only parameters of {model}{near(extra[0], list(shapes))}",
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
                Plan(key, dt, bshape, {"W": g.W, "b": g.b, "untreated": g.names[0] in untreated})
            )
        metadata = {
            "format": "kfac-cli/canonical",
            "layout_version": LAYOUT_VERSION,
            "kfac_cli_version": __version__,
            "layout": layout,
            "columns": meta_json(columns),
            "batch_first": meta_json(batch_first),
            "model": str(model),
            "tensors": str(tensors),
            "blocks": meta_json([{"key": p.key, **p.meta} for p in plans]),
            "parameters": meta_json(
                [
                    {"name": n, "shape": list(s), "dtype": DTYPE_NAMES[src.infos[n].dtype]}
                    for n, s in shapes.items()
                ]
            ),
        }
        by_key = {p.key: g for p, g in zip(plans, groups)}
        ordered = order(plans)
        rows = {p.key: _row_view(by_key[p.key], shapes, lead_shape, trail_shape) for p in ordered}
        row_chunks = {p.key: chunks(rows[p.key][0], p.nbytes) for p in ordered}
        blocks = BufferPool(4, CPU)

        def read_block(buf: torch.Tensor, plan: Plan, start: int, stop: int) -> torch.Tensor:
            """Rows ``start:stop`` of a block: each parameter's rows read into their columns."""
            lens = rows[plan.key][1]
            block = view(buf, plan.dtype, (stop - start, sum(lens.values())))
            col = 0
            for name, row_len in lens.items():  # joint: weight row, then bias entry
                src.read_rows_into(name, (row_len, start, stop), block[:, col : col + row_len])
                col += row_len
            return block

        def reads():
            for p in ordered:
                for start, stop in row_chunks[p.key]:
                    nbytes = (stop - start) * sum(rows[p.key][1].values()) * p.dtype.itemsize
                    yield nbytes, lambda buf, p=p, a=start, b=stop: read_block(buf, p, a, b)

        prefetch = Prefetcher(reads(), blocks, ahead=2)

        def produce(plan: Plan, put) -> None:
            for _ in row_chunks[plan.key]:
                block, buf = prefetch.next()
                put(plan.key, block.to(dev), None, lambda buf=buf: blocks.put(buf))

        try:
            written = write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return summary("canonicalize", out, plans, written, started)


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
            Plan(n, cast or dtypes[n], (*lead_shape, *s, *trail_shape)) for n, s in shapes.items()
        ]
        metadata = {
            "format": "kfac-cli/parameters",
            "layout_version": LAYOUT_VERSION,
            "kfac_cli_version": __version__,
            "columns": meta_json(opts["columns"]),
            "batch_first": meta_json(opts["batch_first"]),
            "canonical": str(canonical),
        }
        group_of = {n: (k, g) for k, g in blocks for n in g.names}
        ordered = order(plans)
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
        block_chunks = {k: chunks(views[k][0], src.infos[k].nbytes) for k, _ in blocks}
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

        def produce(plan: Plan, put) -> None:
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
            written = write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return summary("canonicalize --inverse", out, plans, written, started)
