"""`kfac-cli canonicalize` as library functions: parameter space to canonical blocks and back.

What a tensor file holds is what gets converted: all parameters or any subset of whole
layers (a gradient file without frozen parameters, a file of the treated layers only).
Each treated layer present becomes one block (joint weight and bias, or one per parameter
with ``separate_bias``); every other tensor (an untreated parameter, a buffer, a second key
of a tied parameter) is kept, losslessly, as its own block marked untreated, unless
``treated_only``. The metadata records the input's keys, shapes and dtypes and the model's
parameters that were absent, so the inverse gives back exactly the input's tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.digest import PENDING
from kfac_cli.files.kinds import CANONICAL, LAYOUT_VERSION, PARAMETERS
from kfac_cli.files.safetensors import DTYPE_NAMES, DTYPES
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.pipeline import BufferPool, Prefetcher, view
from kfac_cli.jobs.skeleton import CPU, Job, Plan, Reporter, chunks, model_ref, near, order, sealed
from kfac_cli.models.load import load_layer_table
from kfac_cli.models.state_dict import BATCHNORM_BUFFERS
from kfac_cli.models.table import LayerTable, matches
from kfac_cli.ops.canonical import ParamGroup, block_shape, check_groups


@dataclass(frozen=True)
class Block:
    """One output block: its key, its parameters (by input key), and what it is."""

    key: str
    group: ParamGroup
    untreated: bool = False
    alias_of: str | None = None

    def meta(self) -> dict:
        out = {"key": self.key, "W": self.group.W, "b": self.group.b, "untreated": self.untreated}
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        return out


def plan_blocks(
    table: LayerTable,
    keys: list[str],
    file: object,
    *,
    separate_bias: bool = False,
    treated_only: bool = False,
    patterns: list[str] | None = None,
) -> tuple[list[Block], list[str]]:
    """The blocks a tensor file's keys form, in model order, and the model's parameters
    that are absent from it.

    Raises:
        KfacError: For a key that is no parameter or buffer of the model, or a layer given
            partly (weight without bias or the reverse) in joint mode.
    """
    source: dict[str, str] = {}  # canonical parameter -> the input key that gives it
    extra: list[tuple[str, str | None]] = []  # (key, alias_of) of keys kept on their own
    for key in sorted(keys, key=lambda k: table.resolve(k) != k):  # canonical names first
        name = table.resolve(key)
        if name is None:
            if is_buffer_name(table, key):
                extra.append((key, None))
                continue
            raise KfacError(
                file,
                key,
                f"a parameter of {table.source}{near(key, list(table.parameters))}",
                "an extra key",
            )
        if name in source:
            extra.append((key, source[name]))
        else:
            source[name] = key
    blocks: list[Block] = []
    for layer in table.select(patterns):
        w, b = source.get(layer.weight), source.get(layer.bias or "")
        if layer.bias is not None and not separate_bias and (w is None) != (b is None):
            missing = layer.bias if w is not None else layer.weight
            raise KfacError(
                file,
                missing,
                f"both parameters of layer {layer.name} (treated jointly)",
                "only one",
                hint="give both, or treat weight and bias as separate blocks",
                fix="separate_bias",
            )
        if w is None and b is None:
            continue
        if not separate_bias:
            blocks.append(Block(layer.name, ParamGroup(w, b)))
            continue
        blocks += [Block(k, ParamGroup(W=k)) for k in (w,) if k]
        blocks += [Block(k, ParamGroup(b=k)) for k in (b,) if k]
    if not treated_only:
        treated = {n for la in table.layers for n in (la.weight, la.bias) if n}
        for name, key in source.items():
            if name not in treated and (not patterns or matches(key, patterns)):
                blocks.append(Block(key, ParamGroup(W=key), untreated=True))
        for key, alias_of in extra:
            if not patterns or matches(key, patterns):
                blocks.append(Block(key, ParamGroup(W=key), untreated=True, alias_of=alias_of))
    rank = {n: i for i, n in enumerate(table.parameters)}
    position = {k: i for i, k in enumerate(keys)}

    def place(block: Block) -> tuple[int, int]:
        first = block.group.names[0]
        name = table.resolve(first)
        if name is not None and block.alias_of is None:
            return (0, rank[name])
        return (1, position[first])

    blocks.sort(key=place)
    if not blocks:
        what = "a tensor to convert" + (" matching the patterns" if patterns else "")
        raise KfacError(file, None, what, "none" if keys else "no tensors")
    return blocks, [n for n in table.parameters if n not in source]


def run_canonicalize(
    model: Path | str,
    tensors: Path | str,
    out: str,
    *,
    separate_bias: bool = False,
    treated_only: bool = False,
    patterns: list[str] | None = None,
    layout: str = "flat",
    columns: bool = False,
    batch_first: bool = False,
    dtype: str | None = None,
    force: bool = False,
    spec: Path | str | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Parameter-space tensors to canonical blocks (``docs/formats.md``), one per block.

    A permutation: values (NaN and Inf included) pass through unchanged, so they are not
    scanned. From a stream (``-``, a named pipe) the blocks follow the input's order.

    Raises:
        KfacError: For bad inputs (nothing is written).
    """
    job = Job("canonicalize", out, force=force, dtype=dtype, reporter=reporter)
    table = load_layer_table(model, spec, unsafe_pickle)
    lead, trail = int(batch_first), int(columns)
    with open_tensors(tensors, role="tensors") as src:
        blocks, missing = plan_blocks(
            table,
            list(src.infos),
            src.path,
            separate_bias=separate_bias,
            treated_only=treated_only,
            patterns=patterns,
        )
        names = [n for blk in blocks for n in blk.group.names]
        shapes = {n: _param_shape(table, n, src, lead, trail, columns, batch_first) for n in names}
        lead_shape, trail_shape = _outer_axes(src, names, shapes, lead, trail)
        check_groups(shapes, [blk.group for blk in blocks])
        if src.sequential:
            blocks.sort(key=lambda blk: min(src.infos[n].begin for n in blk.group.names))
        plans = []
        for blk in blocks:
            dtypes = [src.infos[n].dtype for n in blk.group.names]
            dt = job.cast or (dtypes[0] if len(set(dtypes)) == 1 else torch.promote_types(*dtypes))
            bshape = (*lead_shape, *block_shape(blk.group, shapes, layout), *trail_shape)
            plans.append(Plan(blk.key, dt, bshape, blk.meta()))
        model_order = [n for n in table.parameters for n in [_key_of(table, n, names)] if n]
        listed = model_order + [n for n in names if n not in model_order]
        metadata = job.header(
            CANONICAL,
            layout=layout,
            columns=columns,
            batch_first=batch_first,
            model=model_ref(model),
            tensors=PENDING,
            blocks=[p.meta for p in plans],
            parameters=[
                {"name": n, "shape": list(shapes[n]), "dtype": DTYPE_NAMES[src.infos[n].dtype]}
                for n in listed
            ],
            missing=missing,
        )
        ordered = plans if src.sequential else order(plans)
        groups = {blk.key: blk.group for blk in blocks}
        rows = {p.key: _row_view(groups[p.key], shapes, lead_shape, trail_shape) for p in ordered}
        row_chunks = {p.key: chunks(rows[p.key][0], p.nbytes) for p in ordered}
        src.expect(names)
        pool = BufferPool(4, CPU)

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

        prefetch = Prefetcher(reads(), pool, ahead=2)

        def produce(plan: Plan, put) -> None:
            for _ in row_chunks[plan.key]:
                block, buf = prefetch.next()
                put(plan.key, block, None, lambda buf=buf: pool.put(buf))

        try:
            written = job.write(
                ordered, metadata, produce, before_commit=sealed(metadata, "tensors", src)
            )
        finally:
            prefetch.close()
    return job.summary(plans, written, missing=missing)


def _key_of(table: LayerTable, name: str, keys: list[str]) -> str | None:
    """The input key that gives parameter ``name`` (``None``: absent)."""
    return next((k for k in keys if table.resolve(k) == name), None)


def _param_shape(
    table: LayerTable,
    key: str,
    src: Tensors,
    lead: int,
    trail: int,
    columns: bool,
    batch_first: bool,
) -> tuple[int, ...]:
    """A key's parameter shape: the model's (checked against the file's, less the N and C
    axes), or, for a buffer, the file's."""
    s = src.infos[key].shape
    name = table.resolve(key)
    p = table.parameters[name] if name is not None else tuple(s[lead : len(s) - trail])
    if len(s) != len(p) + lead + trail or tuple(s[lead : lead + len(p)]) != tuple(p):
        hint, fix = None, None
        if not columns and len(s) == len(p) + 1 and tuple(s[:-1]) == tuple(p):
            hint, fix = "a trailing column axis must be declared", "columns"
        elif not batch_first and len(s) == len(p) + 1 and tuple(s[1:]) == tuple(p):
            hint, fix = "a leading batch axis must be declared", "batch_first"
        want = ["N"] * lead + [str(v) for v in p] + ["C"] * trail
        raise KfacError(
            src.path, key, f"shape [{', '.join(want)}]", f"{list(s)}", hint=hint, fix=fix
        )
    return tuple(p)


def _outer_axes(
    src: Tensors, names: list[str], shapes: dict, lead: int, trail: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The N and C axes every tensor shares."""
    lead_shape = trail_shape = None
    for name in names:
        s = src.infos[name].shape
        lead_shape = lead_shape if lead_shape is not None else tuple(s[:lead])
        trail_shape = trail_shape if trail_shape is not None else tuple(s[len(s) - trail :])
        if tuple(s[:lead]) != lead_shape or tuple(s[len(s) - trail :]) != trail_shape:
            raise KfacError(
                src.path,
                name,
                f"the same N/C axes as the others {list(lead_shape)}/{list(trail_shape)}",
                f"{list(s)}",
            )
    return lead_shape or (), trail_shape or ()


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


def _canonical_meta(path: object, metadata: dict[str, str]) -> tuple[dict, list, dict]:
    if metadata.get("format") != CANONICAL:
        raise KfacError(
            path,
            "__metadata__.format",
            f"{CANONICAL!r} (a file written by kfac-cli canonicalize)",
            repr(metadata.get("format")),
        )
    if metadata.get("layout_version") != LAYOUT_VERSION:
        raise KfacError(
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
        raise KfacError(
            path,
            "__metadata__",
            "canonical metadata as kfac-cli writes it",
            f"{type(e).__name__}: {e}"[:120],
        ) from None
    if opts["layout"] not in ("flat", "matrix") or not all(
        isinstance(opts[k], bool) for k in ("columns", "batch_first")
    ):
        raise KfacError(
            path, "__metadata__", "layout flat|matrix and boolean flags", repr(opts)[:80]
        )
    try:
        groups = check_groups(shapes, groups)
    except KfacError as e:
        raise e.with_context(path) from None
    return opts, list(zip(keys, groups)), {"shapes": shapes, "dtypes": dtypes}


def run_uncanonicalize(
    canonical: Path | str,
    out: str,
    *,
    model: Path | str | None = None,
    dtype: str | None = None,
    force: bool = False,
    spec: Path | str | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Canonical blocks back to one tensor per input key, from the file's own metadata.

    Raises:
        KfacError: For a file whose tensors do not match its metadata, or (with ``model``)
            whose parameters are not the model's.
    """
    job = Job("canonicalize --inverse", out, force=force, dtype=dtype, reporter=reporter)
    with open_tensors(canonical, role="canonical") as src:
        opts, blocks, info = _canonical_meta(src.path, src.metadata)
        shapes, dtypes = info["shapes"], info["dtypes"]
        if model is not None:
            table = load_layer_table(model, spec, unsafe_pickle)
            for name, shape in shapes.items():
                resolved = table.resolve(name)
                if resolved is not None and table.parameters[resolved] != shape:
                    raise KfacError(src.path, name, f"the parameters of {model}", "another shape")
                if resolved is None and not is_buffer_name(table, name):
                    raise KfacError(src.path, name, f"the parameters of {model}", "another name")
        lead, trail = int(opts["batch_first"]), int(opts["columns"])
        names = {k for k, _ in blocks}
        if set(src.infos) != names:
            odd = sorted(set(src.infos) ^ names)[0]
            raise KfacError(
                src.path,
                odd,
                "the blocks the metadata lists",
                "a tensor not listed" if odd in src.infos else "no such tensor",
            )
        lead_shape = trail_shape = None
        for key, g in blocks:
            s = src.infos[key].shape
            want = block_shape(g, shapes, opts["layout"])
            if len(s) != lead + len(want) + trail or tuple(s[lead : lead + len(want)]) != want:
                raise KfacError(
                    src.path,
                    key,
                    f"a block of shape {list(want)} "
                    f"(batch_first={opts['batch_first']}, "
                    f"columns={opts['columns']})",
                    f"{list(s)}",
                )
            lead_shape = lead_shape if lead_shape is not None else tuple(s[:lead])
            trail_shape = trail_shape if trail_shape is not None else tuple(s[len(s) - trail :])
            if tuple(s[:lead]) != lead_shape or tuple(s[len(s) - trail :]) != trail_shape:
                raise KfacError(src.path, key, "the same N/C axes in every block", f"{list(s)}")
        lead_shape, trail_shape = lead_shape or (), trail_shape or ()
        plans = [
            Plan(n, job.cast or dtypes[n], (*lead_shape, *s, *trail_shape))
            for n, s in shapes.items()
        ]
        metadata = job.header(
            PARAMETERS,
            columns=opts["columns"],
            batch_first=opts["batch_first"],
            canonical=PENDING,
        )
        group_of = {n: (k, g) for k, g in blocks for n in g.names}
        if src.sequential:  # block by block as they arrive, weight before bias
            begin = {k: src.infos[k].begin for k, _ in blocks}

            def arrival(p: Plan) -> tuple[int, bool]:
                key, g = group_of[p.key]
                return begin[key], p.key != g.names[0]

            ordered = sorted(plans, key=arrival)
        else:
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
                item = src.infos[key].dtype.itemsize
                for start, stop in block_chunks[key]:
                    yield (
                        (stop - start) * width * item,
                        lambda buf, k=key, r=(width, start, stop): src.read(k, buf, r),
                    )

        prefetch = Prefetcher(reads(), inputs)
        bias_cache: dict[str, list[torch.Tensor]] = {}

        def produce(plan: Plan, put) -> None:
            key, g = group_of[plan.key]
            mode = steps[plan.key]
            if mode == "cached":
                put(plan.key, torch.cat(bias_cache.pop(plan.key)).to(plan.dtype))
                return
            w_len = views[key][1].get(g.W, 0) if g.joint else 0
            for _ in block_chunks[key]:
                chunk, buf = prefetch.next()
                if mode == "whole":
                    put(plan.key, chunk.to(plan.dtype), None, lambda b=buf: inputs.put(b))
                    continue
                if mode == "weight":
                    bias_cache.setdefault(g.b, []).append(chunk[:, w_len:].clone())
                    part = chunk[:, :w_len]
                else:
                    part = chunk[:, w_len:]
                # A one-row chunk's part is contiguous already, a view of the buffer: keep
                # the buffer until the part is written.
                release = lambda b=buf: inputs.put(b)  # noqa: E731
                put(plan.key, part.to(plan.dtype).contiguous(), None, release)

        try:
            written = job.write(
                ordered, metadata, produce, before_commit=sealed(metadata, "canonical", src)
            )
        finally:
            prefetch.close()
    return job.summary(plans, written)


def is_buffer_name(table: LayerTable, name: str) -> bool:
    """Whether a key no parameter resolves to is a buffer of the model."""
    return name in table.buffers or name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS
