"""`kfac-cli patches` as a library function: activation dump in, (averaged) patches out."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kfac_cli.enums import KFACType
from kfac_cli.errors import KfacError
from kfac_cli.files.digest import PENDING
from kfac_cli.files.safetensors import DTYPE_NAMES
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.pipeline import BufferPool, Prefetcher, shares_memory, view
from kfac_cli.jobs.skeleton import (
    CPU,
    Finite,
    Job,
    Plan,
    Reporter,
    chunks,
    model_ref,
    near,
    order,
    release_all,
    sealed,
)
from kfac_cli.models.load import load_layer_table
from kfac_cli.models.table import Layer, LayerTable, matches
from kfac_cli.ops.patches import layer_patches, output_shape

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def run_patches(
    model: Path | str,
    activations: Path | str,
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
    spec: Path | str | None = None,
    unsafe_pickle: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Write the (averaged) patches of every layer in the dump to ``out``.

    Args:
        model: The checkpoint (``.pt2``, a state dict with ``spec``, ...).
        activations: The activation dump: a safetensors file, a sharded set, or ``-`` /
            a named pipe (read once; the output then follows the dump's tensor order).
        out: The output file, or ``-`` for stdout.
        approx: ``expand`` (patches) or ``reduce`` (averaged patches).
        patterns: Only layers matching these globs.
        bias_column: Append the ones column (joint weight and bias).
        dtype: Compute and output dtype (default: each input's).
        device: Compute device.
        force: Replace an existing output.
        ignore_unknown: Skip dump keys that name no layer KFAC treats, with a warning.
        strict: Fail on NaN/Inf inputs (default: warn).
        spec: The layer spec of a state dict.
        unsafe_pickle: Allow unpickling a whole module.
        reporter: Progress and warnings.

    Returns:
        A summary: layers with input/output shapes, bytes written, seconds.

    Raises:
        KfacError: For bad inputs (nothing is written).
    """
    job = Job("patches", out, force=force, device=device, dtype=dtype, reporter=reporter)
    approx = KFACType(approx)
    table = load_layer_table(model, spec, unsafe_pickle)
    with open_tensors(activations, role="activations") as src:
        keys = select_keys(table, src, model, patterns, ignore_unknown, job.reporter)
        plans = [
            _plan(key, table.layer(key), src, model, approx, bias_column, job.cast) for key in keys
        ]
        metadata = job.header(
            "kfac-cli/patches",
            approx=approx.value,
            bias_column=bias_column,
            model=model_ref(model),
            activations=PENDING,
            layers={p.key: p.meta for p in plans},
        )
        ordered = plans if src.sequential else order(plans)
        stage = job.stage()
        row_chunks = {
            p.key: chunks(p.shape[0], max(p.nbytes, src.infos[p.key].nbytes), job.chunk_bytes)
            for p in ordered
        }
        finite = Finite(src.path, strict, job.reporter)
        inputs = BufferPool(3, CPU, pin_memory=stage.cuda)
        prefetch = Prefetcher(batch_reads(src, [p.key for p in ordered], row_chunks), inputs)

        def produce(plan: Plan, put) -> None:
            layer = table.layer(plan.key)
            params = layer.conv if layer.is_conv else None
            into_buffer = params is not None and approx is KFACType.EXPAND
            for start, stop in row_chunks[plan.key]:
                x_host, in_buf = prefetch.next()
                finite.check(plan.key, x_host)
                x = stage.to_device(x_host, plan.dtype)
                shape = (stop - start, *plan.shape[1:])
                nbytes = math.prod(shape) * plan.dtype.itemsize
                release = [lambda b=in_buf: inputs.put(b)]
                buf = None
                if into_buffer:
                    buf = stage.host_pool.get(nbytes) if stage.on_cpu else stage.output(nbytes)
                    if stage.on_cpu:
                        release.append(lambda b=buf: stage.host_pool.put(b))
                y = layer_patches(
                    x,
                    params,
                    approx,
                    bias_column,
                    None if buf is None else view(buf, plan.dtype, shape),
                )
                if approx is KFACType.REDUCE:  # sums: finite inputs, finite outputs
                    check_sums(y, plan.key, plan.key in finite.bad, src.path)
                event = None
                if not stage.on_cpu:
                    host_buf = stage.host_pool.get(nbytes)
                    release.append(lambda b=host_buf: stage.host_pool.put(b))
                    y, event = stage.to_host(y, host_buf)
                elif not shares_memory(y, in_buf):  # the input is free: let the reader go on
                    release.pop(0)()
                put(plan.key, y, event, release_all(release))
            finite.report(plan.key, math.prod(plan.meta["input_shape"]))

        try:
            written = job.write(
                ordered, metadata, produce, before_commit=sealed(metadata, "activations", src)
            )
        finally:
            prefetch.close()
    return job.summary(plans, written, items="layers", approx=approx.value)


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


def batch_reads(src: Tensors, keys: list[str], row_chunks: dict[str, list[tuple[int, int]]]):
    """``(nbytes, read)`` of every batch chunk of every key, in order (for a Prefetcher)."""
    for key in keys:
        info = src.infos[key]
        row_len = math.prod(info.shape[1:])
        for start, stop in row_chunks[key]:
            yield (
                (stop - start) * row_len * info.dtype.itemsize,
                lambda buf, k=key, r=(row_len, start, stop), s=info.shape: src.read(k, buf, r).view(
                    r[2] - r[1], *s[1:]
                ),
            )


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


def _plan(
    key: str,
    layer: Layer,
    src: Tensors,
    model: object,
    approx: KFACType,
    bias_column: bool,
    cast: torch.dtype | None,
) -> Plan:
    info = src.infos[key]
    dtype = cast or info.dtype
    check_input(key, layer, info.shape, cast or info.dtype, src.path, model)
    try:
        out_shape = output_shape(info.shape, layer.conv, approx, bias_column)
    except KfacError as e:
        raise e.with_context(src.path, key) from None
    return Plan(key, dtype, out_shape, layer_meta(layer, info.shape))
