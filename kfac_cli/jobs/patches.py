"""`kfac-cli patches` as a library function: activation dump in, (averaged) patches out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kfac_cli.enums import ComputeDtype, KFACType
from kfac_cli.errors import KfacError
from kfac_cli.files.digest import PENDING
from kfac_cli.files.kinds import PATCHES
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.pipeline import Prefetcher, Read, shares_memory, view
from kfac_cli.jobs.skeleton import (
    Finite,
    Job,
    Plan,
    Reporter,
    as_enums,
    check_input,
    check_sums,
    chunks,
    layer_meta,
    model_ref,
    options_of,
    order,
    release_all,
    sealed,
    select_keys,
)
from kfac_cli.models.load import load_layer_table
from kfac_cli.models.table import Layer
from kfac_cli.ops.patches import layer_patches, output_shape


@dataclass(frozen=True)
class PatchesOptions:
    """Everything ``patches`` takes besides its files: one value, built once.

    Attributes:
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
    """

    approx: KFACType = KFACType.EXPAND
    patterns: tuple[str, ...] = ()
    bias_column: bool = False
    dtype: ComputeDtype | None = None
    device: str = "cpu"
    force: bool = False
    ignore_unknown: bool = False
    strict: bool = False
    spec: Path | str | None = None
    unsafe_pickle: bool = False

    def __post_init__(self) -> None:
        as_enums(self, approx=KFACType, dtype=ComputeDtype)


def run_patches(
    model: Path | str,
    activations: Path | str,
    out: str,
    *,
    options: PatchesOptions | None = None,
    reporter: Reporter | None = None,
    **settings: object,
) -> dict:
    """Write the (averaged) patches of every layer in the dump to ``out``.

    Args:
        model: The checkpoint (``.pt2``, a state dict with ``spec``, ...).
        activations: The activation dump: a safetensors file, a sharded set, or ``-`` /
            a named pipe (read once; the output then follows the dump's tensor order).
        out: The output file, or ``-`` for stdout.
        options: Every other setting (:class:`PatchesOptions`), or them as keywords
            (``approx="reduce"``, ...).
        reporter: Progress and warnings.

    Returns:
        A summary: layers with input/output shapes, bytes written, seconds.

    Raises:
        KfacError: For bad inputs (nothing is written).
    """
    o = options_of(PatchesOptions, options, settings)
    dtype = o.dtype.value if o.dtype else None
    job = Job("patches", out, force=o.force, device=o.device, dtype=dtype, reporter=reporter)
    approx, bias_column, strict = o.approx, o.bias_column, o.strict
    table = load_layer_table(model, o.spec, o.unsafe_pickle)
    with open_tensors(activations, role="activations", hashed=True) as src:
        keys = select_keys(table, src, model, list(o.patterns), o.ignore_unknown, job.reporter)
        plans = [
            _plan(key, table.layer(key), src, model, approx, bias_column, job.cast) for key in keys
        ]
        metadata = job.header(
            PATCHES,
            approx=approx.value,
            bias_column=bias_column,
            model=model_ref(model, table),
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

        def produce(plan: Plan, put, prefetch: Prefetcher) -> None:
            layer = table.layer(plan.key)
            params = layer.conv if layer.is_conv else None
            into_buffer = params is not None and approx is KFACType.EXPAND
            for start, stop in row_chunks[plan.key]:
                x_host, in_buf = prefetch.next(plan.key, (start, stop))
                finite.check(plan.key, x_host)
                x = stage.to_device(x_host, plan.dtype)
                shape = (stop - start, *plan.shape[1:])
                nbytes = math.prod(shape) * plan.dtype.itemsize
                release = [lambda b=in_buf: prefetch.release(b)]
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

        reads = batch_reads(src, [p.key for p in ordered], row_chunks)
        commit = sealed(metadata, "activations", src)
        written = job.stream(ordered, metadata, reads, produce, commit)
    return job.summary(plans, written, items="layers", approx=approx.value)


def batch_reads(src: Tensors, keys: list[str], row_chunks: dict[str, list[tuple[int, int]]]):
    """The :class:`Read` of every batch chunk of every key, in order."""
    for key in keys:
        info = src.infos[key]
        row_len = math.prod(info.shape[1:])
        for start, stop in row_chunks[key]:
            yield Read(
                key,
                (start, stop),
                (stop - start) * row_len * info.dtype.itemsize,
                lambda buf, k=key, r=(row_len, start, stop), s=info.shape: src.read(k, buf, r).view(
                    r[2] - r[1], *s[1:]
                ),
            )


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
