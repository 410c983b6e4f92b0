"""Layer tables from state dicts: names, shapes and dtypes, plus a layer spec when given.

A state dict records no hyper-parameters and no module structure. Without a spec,
``x.weight`` of rank 2/3/4/5 is taken for a linear/conv1d/conv2d/conv3d layer ``x`` (paired
with ``x.bias``); with the spec of the exported model (``kfac-cli layers MODEL.pt2 --json``)
the table is the exported model's. Either way, buffers are never parameters: BatchNorm's
running statistics, integer tensors (``num_batches_tracked``, position ids) and whatever
the spec lists as a buffer; tied keys (``lm_head.weight`` beside ``wte.weight``) are one
parameter, by the spec's aliases or, in a ``torch.save`` file, by their shared storage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kfac_cli.errors import KfacError
from kfac_cli.files.header import official_check, read_header
from kfac_cli.files.inputs import open_readable
from kfac_cli.files.kinds import TORCH_SAVE_SUFFIXES as SUFFIXES
from kfac_cli.models.table import KINDS, Layer, LayerTable, layer_name

BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Entry:
    """A state-dict entry: its shape, dtype, and the key it shares storage with (if any)."""

    shape: tuple[int, ...]
    floating: bool
    alias_of: str | None = None


def is_buffer(name: str, entry: Entry) -> bool:
    """Whether a state-dict entry is, by its name or dtype, a buffer (never a parameter)."""
    return name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS or not entry.floating


def read_entries(path: Path) -> dict[str, Entry]:
    """The entries of a state-dict file: a safetensors file from its header alone (without
    torch), a sharded set from its shards' headers, a ``.pt`` file loaded weights-only."""
    if path.suffix.lower() in SUFFIXES:
        from kfac_cli.files.torch_save import load_weights_only

        tensors = load_weights_only(path)
        first: dict[tuple, str] = {}
        out = {}
        for name, t in tensors.items():
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
            alias = first.setdefault(where, name) if t.numel() else name
            floating = t.dtype.is_floating_point
            out[name] = Entry(tuple(t.shape), floating, None if alias == name else alias)
        return out
    if path.name.endswith(".json"):
        from kfac_cli.files.sources import open_tensors

        with open_tensors(path, stream_ok=False) as src:
            return {k: Entry(info.shape, info.floating) for k, info in src.infos.items()}
    with open_readable(path) as fh:
        infos, _, _ = read_header(fh, path, os.fstat(fh.fileno()).st_size)
    official_check(path)
    return {k: Entry(info.shape, info.floating) for k, info in infos.items()}


def layers_from_state_dict(entries: Mapping[str, Entry], source: str) -> LayerTable:
    """A layer table from a state dict alone (no hyper-parameters: see the module doc)."""
    kinds = {rank: kind for kind, rank in KINDS.items()}
    buffers = [n for n, e in entries.items() if is_buffer(n, e)]
    aliases = {n: e.alias_of for n, e in entries.items() if e.alias_of and n not in buffers}
    params = {
        n: tuple(e.shape) for n, e in entries.items() if n not in buffers and n not in aliases
    }
    layers: dict[str, Layer] = {}
    for name, e in entries.items():
        weight = aliases.get(name, name)
        if weight not in params or not name.endswith("weight") or len(e.shape) not in kinds:
            continue
        stem = name[: -len("weight")]
        bias = next(
            (
                aliases.get(b, b)
                for b in (stem + "bias",)
                if stem and b in entries and tuple(entries[b].shape) == tuple(e.shape[:1])
            ),
            None,
        )
        module = layer_name(name)
        if weight in layers:  # a tied alias: one more module calls the same weight
            la = layers[weight]
            layers[weight] = Layer(**{**la.__dict__, "modules": (*la.names, module)})
            continue
        layers[weight] = Layer(module, kinds[len(e.shape)], weight, bias, tuple(e.shape))
    treated = {n for la in layers.values() for n in (la.weight, la.bias) if n}
    untreated = [
        {"name": n, "shape": list(s), "used_by": []} for n, s in params.items() if n not in treated
    ]
    return LayerTable(source, list(layers.values()), params, untreated, buffers, aliases)


def merge_spec(
    entries: Mapping[str, Entry], spec: LayerTable, file: object, spec_file: object
) -> LayerTable:
    """A state dict with a spec: the spec's table, checked against the real entries.

    Entries the spec lists as aliases resolve to their parameter; buffers (by the spec, by
    name or by dtype) are not parameters; entries the spec does not know are untreated
    parameters.
    """
    present = {spec.resolve(n) or n: n for n in reversed(list(entries))}
    for name, shape in spec.parameters.items():
        key = present.get(name)
        if key is None:
            raise KfacError(
                file, name, f"parameter {name} (named by {spec_file})", "no such tensor"
            )
        if tuple(entries[key].shape) != tuple(shape):
            raise KfacError(
                file, key, f"shape {list(shape)} (as in {spec_file})", f"{list(entries[key].shape)}"
            )
    spec_buffers = set(spec.buffers)
    buffers = [
        n
        for n, e in entries.items()
        if spec.resolve(n) is None and (n in spec_buffers or is_buffer(n, e))
    ]
    known = {u["name"] for u in spec.untreated}
    extra = {
        n: tuple(e.shape)
        for n, e in entries.items()
        if spec.resolve(n) is None and n not in buffers and n not in known
    }
    untreated = list(spec.untreated) + [
        {"name": n, "shape": list(s), "used_by": []} for n, s in extra.items()
    ]
    return LayerTable(
        str(file),
        list(spec.layers),
        {**spec.parameters, **extra},
        untreated,
        buffers,
        dict(spec.aliases),
        list(spec.untreated_layers),
        list(spec.frozen),
    )
