"""Model checkpoints to layer tables, by format, never executing untrusted code.

- ``.pt2``: torch.export archives, read through their graph JSON (:mod:`kfac_cli.pt2`).
- ``.safetensors`` and ``*.safetensors.index.json``: state dicts, read by header only.
- ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(weights_only=True)``, passed explicitly so
  that ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off.
- A pickled whole module (``torch.save(model)``): only with ``unsafe_pickle=True``, and then
  the table comes from ``named_modules()``. A failed safe load never falls back to it.

State dicts carry no conv hyper-parameters; a ``spec`` (``kfac-cli layers --json``) adds them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from kfac_cli.conv import ConvParams
from kfac_cli.errors import KfacCliError
from kfac_cli.layers import Layer, LayerTable, layers_from_state_dict, merge_spec, read_spec
from kfac_cli.pt2 import layer_table_from_pt2
from kfac_cli.tensorfile import TensorSource, open_readable, sniff

PICKLE_HINT = (
    "unpickling runs code chosen by whoever wrote the file; re-save it as a state dict "
    "(torch.save(model.state_dict())) or a torch.export archive, or pass "
    "--unsafe-trust-pickle if you trust its author completely"
)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat ``{name: tensor}`` dict, memory-mapped."""
    with open_readable(path) as fh:
        head = fh.read(8)
    if not head:
        raise KfacCliError(path, None, "a torch.save file", "an empty file")
    kw = {"map_location": "cpu", "weights_only": True}
    try:
        try:
            obj = torch.load(path, mmap=True, **kw)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, **kw)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0] if str(e) else "a forbidden object"
        if "Weights only load failed" in str(e):
            detail = "a pickle that needs code execution to load (a whole module?)"
        raise KfacCliError(
            path, None, "a weights-only state dict", detail[:160], hint=PICKLE_HINT
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError) as e:
        found = sniff(head) if sniff(head) == "unrecognised bytes" else str(e).splitlines()[0]
        raise KfacCliError(path, None, "a readable torch.save file", found[:160]) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise KfacCliError(
            path, None, "a flat {name: tensor} state dict", f"a {type(obj).__name__}"
        )
    return obj


def _table_from_module(model: torch.nn.Module, source: str) -> LayerTable:
    """Walk ``named_modules()``: Linear and Conv1d/2d/3d are treated, the rest is not."""
    kinds = {
        torch.nn.Linear: "linear",
        torch.nn.Conv1d: "conv1d",
        torch.nn.Conv2d: "conv2d",
        torch.nn.Conv3d: "conv3d",
    }
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner.setdefault(f"{mname}.{pname}" if mname else pname, type(module).__name__)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layers = []
    for mname, module in model.named_modules():
        kind = next((k for cls, k in kinds.items() if type(module) is cls), None)
        if kind is None or not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            continue
        prefix = f"{mname}." if mname else ""
        bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
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
        layers.append(
            Layer(
                mname or "weight", kind, f"{prefix}weight", bias, tuple(module.weight.shape), conv
            )
        )
    treated = {n for la in layers for n in (la.weight, la.bias) if n}
    untreated = [
        {"name": n, "shape": list(s), "used_by": [owner.get(n, "?")]}
        for n, s in params.items()
        if n not in treated
    ]
    buffers = [n for n, _ in model.named_buffers()]
    return LayerTable(source, layers, params, untreated, buffers)


def _load_pickled_module(path: Path) -> LayerTable:
    obj = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for it
    if isinstance(obj, torch.nn.Module):
        return _table_from_module(obj, str(path))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return layers_from_state_dict({k: tuple(v.shape) for k, v in obj.items()}, str(path))
    raise KfacCliError(path, None, "a torch.nn.Module or a state dict", type(obj).__name__)


def state_dict_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a state dict file (safetensors: header only)."""
    name = path.name
    if name.endswith(".safetensors") or name.endswith(".json"):
        with TensorSource(path) as src:
            return {k: info.shape for k, info in src.infos.items()}
    return {k: tuple(v.shape) for k, v in load_weights_only(path).items()}


def load_layer_table(
    path: Path | str, spec: Path | str | None = None, unsafe_pickle: bool = False
) -> LayerTable:
    """The layer table of a checkpoint.

    Args:
        path: ``.pt2``, ``.safetensors``, ``*.index.json``, or ``.pt``/``.pth``/``.bin``.
        spec: A layer spec (``kfac-cli layers --json``) for state dicts.
        unsafe_pickle: Allow unpickling a whole module (runs the file's code!).

    Raises:
        KfacCliError: For unreadable, unsafe or inconsistent checkpoints.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        table = layer_table_from_pt2(path)
    elif suffix in (".safetensors", ".json") or (
        suffix in STATE_DICT_SUFFIXES and not unsafe_pickle
    ):
        shapes = state_dict_shapes(path)
        if spec is not None:
            return merge_spec(shapes, read_spec(Path(spec)), path, spec)
        return layers_from_state_dict(shapes, str(path))
    elif suffix in STATE_DICT_SUFFIXES:
        open_readable(path).close()
        table = _load_pickled_module(path)
    else:
        raise KfacCliError(
            path,
            None,
            "a .pt2, .safetensors, .index.json, .pt, .pth or .bin checkpoint",
            f"suffix {suffix or '(none)'!r}",
        )
    if spec is not None:
        return merge_spec(table.parameters, read_spec(Path(spec)), path, spec)
    return table
