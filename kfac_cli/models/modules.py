"""Layer tables from a pickled whole module (``torch.save(model)``), only when trusted.

Unpickling runs code chosen by whoever wrote the file, so this reader is used only when the
caller vouches for the file. The table comes from ``named_modules()``: every
``nn.Linear``/``nn.Conv1d/2d/3d`` whose weight is a parameter is a layer named after its
module; one whose weight is computed (a parametrization such as weight normalisation) is
listed as a layer KFAC cannot treat.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kfac_cli.errors import KfacError
from kfac_cli.models.state_dict import Entry, layers_from_state_dict
from kfac_cli.models.table import TREATED, Layer, LayerTable, with_call
from kfac_cli.ops.conv import ConvParams

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


def table_from_module(model: nn.Module, source: str) -> LayerTable:
    """The layer table of a module object (see the module docstring)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases = {
        n: canonical[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if canonical[id(p)] != n
    }
    owner: dict[str, str] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owner.setdefault(canonical[id(p)], type(module).__name__)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    found: dict[str, Layer] = {}
    untreated_layers = []
    for mname, module in model.named_modules():
        kind = next((k for cls, k in KINDS.items() if isinstance(module, cls)), None)
        if kind is None:
            continue
        weight = getattr(module, "weight", None)
        base = next(cls for cls in KINDS if isinstance(module, cls))
        why = None
        if not isinstance(weight, nn.Parameter):
            why = "its weight is computed by a parametrization or hook"
        elif type(module).forward is not base.forward:  # it may pad or change its input
            why = (
                f"{type(module).__name__} overrides forward, which a pickled module does not "
                "show (export the model with torch.export to see what it computes)"
            )
        if why is not None:
            untreated_layers.append(
                {
                    "name": mname,
                    "op": f"nn.{type(module).__name__}",
                    "reason": f"{why}; KFAC treats only {TREATED}",
                }
            )
            continue
        wname = canonical[id(weight)]
        bias = getattr(module, "bias", None)
        bname = canonical[id(bias)] if isinstance(bias, nn.Parameter) else None
        if wname in found:  # tied: one more module calls the same weight
            found[wname] = with_call(found[wname], mname)
            continue
        conv = None
        if kind != "linear":
            conv = ConvParams.create(
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.padding_mode,
            )
        name = mname or "weight"
        found[wname] = Layer(name, kind, wname, bname, tuple(weight.shape), conv, modules=(name,))
    layers = list(found.values())
    treated = {n for la in layers for n in (la.weight, la.bias) if n}
    untreated = [
        {"name": n, "shape": list(s), "used_by": [owner.get(n, "?")]}
        for n, s in params.items()
        if n not in treated
    ]
    buffers = [n for n, _ in model.named_buffers()]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return LayerTable(source, layers, params, untreated, buffers, aliases, untreated_layers, frozen)


def load_pickled_module(path: Path) -> LayerTable:
    """Unpickle ``path`` (runs its code: only for files the caller trusts) to a table."""
    obj = torch.load(path, map_location="cpu", weights_only=False)  # the caller vouched for it
    if isinstance(obj, nn.Module):
        return table_from_module(obj, str(path))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        entries = {k: Entry(tuple(v.shape), v.dtype.is_floating_point) for k, v in obj.items()}
        return layers_from_state_dict(entries, str(path))
    raise KfacError(path, None, "a torch.nn.Module or a state dict", type(obj).__name__)
