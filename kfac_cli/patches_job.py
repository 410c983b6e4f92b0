"""`kfac-cli patches` as a library function: activation dump in, (averaged) patches out."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from kfac_cli import __version__
from kfac_cli.checkpoints import load_layer_table
from kfac_cli.devices import resolve_device, resolve_dtype
from kfac_cli.enums import KFACType
from kfac_cli.errors import KfacCliError
from kfac_cli.jobs import (
    CHUNK_BYTES,
    CPU,
    GPU_CHUNK_FACTOR,
    LAYOUT_VERSION,
    Finite,
    Plan,
    Reporter,
    chunks,
    meta_json,
    near,
    order,
    release_all,
    summary,
    write_all,
)
from kfac_cli.layers import Layer
from kfac_cli.output import check_target
from kfac_cli.patches import layer_patches, output_shape
from kfac_cli.streaming import BufferPool, Prefetcher, view
from kfac_cli.tensorfile import DTYPE_NAMES, TensorSource


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
                    f"a layer of {model}{near(key, names)}",
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
            "bias_column": meta_json(bias_column),
            "model": str(model),
            "activations": str(activations),
            "layers": meta_json({p.key: p.meta for p in plans}),
        }
        ordered = order(plans)
        on_gpu = dev.type != "cpu"
        pin = dev.type == "cuda"
        inputs, outputs = BufferPool(3, CPU, pin), BufferPool(3, CPU, pin)
        on_device = BufferPool(1, dev)
        chunk_bytes = CHUNK_BYTES * (1 if dev.type == "cpu" else GPU_CHUNK_FACTOR)
        # Rows per chunk from the larger of a layer's input and output (reduce: the input).
        row_chunks = {
            p.key: chunks(p.shape[0], max(p.nbytes, src.infos[p.key].nbytes), chunk_bytes)
            for p in ordered
        }
        finite = Finite(activations, strict, reporter)

        def reads():
            for p in ordered:
                info = src.infos[p.key]
                row_len = math.prod(info.shape[1:])
                for start, stop in row_chunks[p.key]:
                    yield (
                        (stop - start) * row_len * info.dtype.itemsize,
                        lambda buf, k=p.key, r=(row_len, start, stop), s=info.shape: src.read(
                            k, buf, r
                        ).view(r[2] - r[1], *s[1:]),
                    )

        prefetch = Prefetcher(reads(), inputs)

        def produce(plan: Plan, put) -> None:
            layer = table.layer(plan.key)
            params = layer.conv if layer.is_conv else None
            into_buffer = params is not None and approx is KFACType.EXPAND
            for start, stop in row_chunks[plan.key]:
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
                put(plan.key, y, event, release_all(release))
            finite.report(plan.key, math.prod(plan.meta["input_shape"]))

        try:
            written = write_all(out, force, ordered, metadata, produce, reporter)
        finally:
            prefetch.close()
    return summary("patches", out, plans, written, started, items="layers", approx=approx.value)


def _plan_layer(
    layer: Layer,
    src: TensorSource,
    file: Path,
    model: Path,
    approx: KFACType,
    bias_column: bool,
    cast: torch.dtype | None,
) -> Plan:
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
    return Plan(layer.name, dtype, out_shape, meta)


# --------------------------------------------------------------------------- canonicalize
