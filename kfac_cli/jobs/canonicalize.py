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

from kfac_cli.enums import ComputeDtype, Layout
from kfac_cli.errors import KfacError
from kfac_cli.files.digest import PENDING
from kfac_cli.files.kinds import CANONICAL, LAYOUT_VERSION, PARAMETERS
from kfac_cli.files.safetensors import DTYPE_NAMES, DTYPES
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.pipeline import Prefetcher, Read, view
from kfac_cli.jobs.skeleton import (
    Job,
    Plan,
    Reporter,
    as_enums,
    chunks,
    model_ref,
    near,
    options_of,
    order,
    sealed,
)
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


@dataclass(frozen=True)
class CanonicalizeOptions:
    """Everything ``canonicalize`` takes besides its files: one value, built once.

    Attributes:
        separate_bias: Weight and bias as separate blocks (default: joint per layer).
        treated_only: Leave out every tensor KFAC does not treat.
        patterns: Only layers matching these globs.
        layout: ``flat`` ``[C_out*(rest+1)]`` or ``matrix`` ``[C_out, rest+1]``.
        columns: Tensors carry a trailing column axis ``[*param_shape, C]``.
        batch_first: Tensors carry a leading batch axis ``[N, *param_shape]``.
        dtype: Compute and output dtype (default: keep the input's).
        force: Replace an existing output.
        spec: A state dict's layer spec.
        unsafe_pickle: Allow unpickling a whole module.
    """

    separate_bias: bool = False
    treated_only: bool = False
    patterns: tuple[str, ...] = ()
    layout: Layout = Layout.FLAT
    columns: bool = False
    batch_first: bool = False
    dtype: ComputeDtype | None = None
    force: bool = False
    spec: Path | str | None = None
    unsafe_pickle: bool = False

    def __post_init__(self) -> None:
        as_enums(self, layout=Layout, dtype=ComputeDtype)


def run_canonicalize(
    model: Path | str,
    tensors: Path | str,
    out: str,
    *,
    options: CanonicalizeOptions | None = None,
    reporter: Reporter | None = None,
    **settings: object,
) -> dict:
    """Parameter-space tensors to canonical blocks (``docs/formats.md``), one per block.

    A permutation: values (NaN and Inf included) pass through unchanged, so they are not
    scanned. From a stream (``-``, a named pipe) the blocks follow the input's order.
    ``options`` (:class:`CanonicalizeOptions`) or its fields as keywords.

    Raises:
        KfacError: For bad inputs (nothing is written).
    """
    o = options_of(CanonicalizeOptions, options, settings)
    dtype = o.dtype.value if o.dtype else None
    job = Job("canonicalize", out, force=o.force, dtype=dtype, reporter=reporter)
    table = load_layer_table(model, o.spec, o.unsafe_pickle)
    columns, batch_first, layout = o.columns, o.batch_first, o.layout.value
    lead, trail = int(batch_first), int(columns)
    with open_tensors(tensors, role="tensors", hashed=True) as src:
        blocks, missing = plan_blocks(
            table,
            list(src.infos),
            src.path,
            separate_bias=o.separate_bias,
            treated_only=o.treated_only,
            patterns=list(o.patterns),
        )
        names = [n for blk in blocks for n in blk.group.names]
        shapes = {n: _param_shape(table, n, src, lead, trail, columns, batch_first) for n in names}
        lead_shape, trail_shape = _outer_axes(src, names, lead, trail)
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
            model=model_ref(model, table),
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
                    read = lambda buf, p=p, a=start, b=stop: read_block(buf, p, a, b)  # noqa: E731
                    yield Read(p.key, (start, stop), nbytes, read)

        def produce(plan: Plan, put, prefetch: Prefetcher) -> None:
            for rows_ in row_chunks[plan.key]:
                block, buf = prefetch.next(plan.key, rows_)
                put(plan.key, block, None, lambda buf=buf: prefetch.release(buf))

        commit = sealed(metadata, "tensors", src)
        written = job.stream(ordered, metadata, reads(), produce, commit, ahead=2)
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
    src: Tensors, names: list[str], lead: int, trail: int
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
    with open_tensors(canonical, role="canonical", hashed=True) as src:
        opts, blocks, info = _canonical_meta(src.path, src.metadata)
        shapes, dtypes = info["shapes"], info["dtypes"]
        if model is not None:
            _check_model(load_layer_table(model, spec, unsafe_pickle), shapes, src.path, model)
        lead_shape, trail_shape = _check_blocks(src, blocks, shapes, opts)
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
        ordered = _arrival_order(src, plans, blocks, group_of) if src.sequential else order(plans)
        views = {k: _row_view(g, shapes, lead_shape, trail_shape) for k, g in blocks}
        block_chunks = {k: chunks(views[k][0], src.infos[k].nbytes) for k, _ in blocks}
        split = _Splitter(src, ordered, group_of, views, block_chunks)
        commit = sealed(metadata, "canonical", src)
        written = job.stream(ordered, metadata, split.reads(), split.produce, commit)
    return job.summary(plans, written)


def _check_model(table: LayerTable, shapes: dict, file: object, model: object) -> None:
    """Every parameter of the file is one of ``model``'s, of its shape (or a buffer)."""
    for name, shape in shapes.items():
        resolved = table.resolve(name)
        if resolved is not None and table.parameters[resolved] != shape:
            raise KfacError(file, name, f"the parameters of {model}", "another shape")
        if resolved is None and not is_buffer_name(table, name):
            raise KfacError(file, name, f"the parameters of {model}", "another name")


def _check_blocks(src: Tensors, blocks: list, shapes: dict, opts: dict):
    """The file's tensors are exactly the blocks its metadata lists, each of its block
    shape between the same N and C axes; those axes' shapes."""
    lead, trail = int(opts["batch_first"]), int(opts["columns"])
    names = {k for k, _ in blocks}
    if set(src.infos) != names:
        odd = sorted(set(src.infos) ^ names)[0]
        found = "a tensor not listed" if odd in src.infos else "no such tensor"
        raise KfacError(src.path, odd, "the blocks the metadata lists", found)
    for key, g in blocks:
        s = src.infos[key].shape
        want = block_shape(g, shapes, opts["layout"])
        if len(s) != lead + len(want) + trail or tuple(s[lead : lead + len(want)]) != want:
            raise KfacError(
                src.path,
                key,
                f"a block of shape {list(want)} "
                f"(batch_first={opts['batch_first']}, columns={opts['columns']})",
                f"{list(s)}",
            )
    return _outer_axes(src, [k for k, _ in blocks], lead, trail)


def _arrival_order(src: Tensors, plans: list[Plan], blocks: list, group_of: dict) -> list[Plan]:
    """From a stream: block by block as they arrive, weight before bias."""
    begin = {k: src.infos[k].begin for k, _ in blocks}

    def arrival(p: Plan) -> tuple[int, bool]:
        key, g = group_of[p.key]
        return begin[key], p.key != g.names[0]

    return sorted(plans, key=arrival)


class _Splitter:
    """Reads canonical blocks and writes their parameters: a whole block, a weight (its
    bias column kept aside), or a bias, from what was kept or from its own pass."""

    def __init__(self, src: Tensors, ordered: list[Plan], group_of, views, block_chunks) -> None:
        self.src, self.ordered, self.group_of = src, ordered, group_of
        self.views, self.block_chunks = views, block_chunks
        self.steps: dict[str, str] = {}
        seen = set()
        for p in ordered:
            key, g = group_of[p.key]
            mode = "whole" if not g.joint else "weight" if p.key == g.W else "bias"
            if mode == "bias" and key in seen:
                mode = "cached"
            seen.add(key)
            self.steps[p.key] = mode
        self.bias_cache: dict[str, list[torch.Tensor]] = {}

    def reads(self):
        for p in self.ordered:
            key = self.group_of[p.key][0]
            if self.steps[p.key] == "cached":
                continue
            width = sum(self.views[key][1].values())
            item = self.src.infos[key].dtype.itemsize
            for start, stop in self.block_chunks[key]:
                read = lambda buf, k=key, r=(width, start, stop): self.src.read(k, buf, r)  # noqa: E731
                yield Read(key, (start, stop), (stop - start) * width * item, read)

    def produce(self, plan: Plan, put, prefetch: Prefetcher) -> None:
        key, g = self.group_of[plan.key]
        mode = self.steps[plan.key]
        if mode == "cached":
            put(plan.key, torch.cat(self.bias_cache.pop(plan.key)).to(plan.dtype))
            return
        w_len = self.views[key][1].get(g.W, 0) if g.joint else 0
        for rows in self.block_chunks[key]:
            chunk, buf = prefetch.next(key, rows)
            release = lambda b=buf: prefetch.release(b)  # noqa: E731
            if mode == "whole":
                put(plan.key, chunk.to(plan.dtype), None, release)
                continue
            if mode == "weight":
                self.bias_cache.setdefault(g.b, []).append(chunk[:, w_len:].clone())
                part = chunk[:, :w_len]
            else:
                part = chunk[:, w_len:]
            # A one-row chunk's part is contiguous already, a view of the buffer: keep the
            # buffer until the part is written.
            put(plan.key, part.to(plan.dtype).contiguous(), None, release)


def is_buffer_name(table: LayerTable, name: str) -> bool:
    """Whether a key no parameter resolves to is a buffer of the model."""
    return name in table.buffers or name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS
