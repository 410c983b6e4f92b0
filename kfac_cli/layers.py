"""The layer table: which layers KFAC treats, their parameters and hyper-parameters.

Built from a model checkpoint (see :mod:`kfac_cli.checkpoints`) and written by
``kfac-cli layers --json`` in this versioned format, which ``--spec`` reads back::

    {
      "format": "kfac-cli/layer-table", "version": 1, "source": "model.pt2",
      "layers": [
        {"name": "conv1", "kind": "conv2d", "weight": "conv1.weight", "bias": "conv1.bias",
         "weight_shape": [16, 3, 3, 3], "calls": 1,
         "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
         "groups": 1, "padding_mode": "zeros", "canonical_size": 448},
        {"name": "fc", "kind": "linear", "weight": "fc.weight", "bias": null,
         "weight_shape": [10, 64], "calls": 1, "canonical_size": 640}
      ],
      "untreated": [{"name": "bn.weight", "shape": [16], "used_by": ["aten.batch_norm"]}],
      "parameters": [{"name": "conv1.weight", "shape": [16, 3, 3, 3]}, ...],
      "buffers": ["bn.running_mean", ...]
    }

``padding`` is an int list, a list of ``[left, right]`` pairs, ``"same"`` or ``"valid"``.
A conv layer from a state dict without a spec has no hyper-parameters (``"kernel_size"``
present, the rest ``null``): enough to canonicalize, not to extract patches.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from kfac_cli.canonical import ParamGroup
from kfac_cli.conv import ConvParams
from kfac_cli.errors import KfacCliError

FORMAT = "kfac-cli/layer-table"
VERSION = 1
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
KINDS = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}  # kind -> weight rank
SPEC_HINT = (
    "a state dict does not record stride/padding/dilation/groups: pass --spec FILE, written by "
    "`kfac-cli layers MODEL.pt2 --json > spec.json` on the exported model (format in README)"
)


@dataclass(frozen=True)
class Layer:
    """One layer KFAC treats: a linear layer or an N-d convolution.

    ``conv`` is ``None`` for linear layers, and for conv layers whose hyper-parameters
    are unknown (a state dict without ``--spec``).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    conv: ConvParams | None = None
    calls: int = 1

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def canonical_size(self) -> int:
        """Length of the joint canonical block: ``C_out * (rest + 1)`` (``rest`` w/o bias)."""
        return self.weight_shape[0] * (prod(self.weight_shape[1:]) + (self.bias is not None))

    def require_conv(self, file: object) -> ConvParams:
        """The conv hyper-parameters, or an error that says how to get them."""
        if self.conv is None:
            raise KfacCliError(
                file, self.name, "known conv hyper-parameters", "none", hint=SPEC_HINT
            )
        return self.conv

    def to_json(self) -> dict:
        out: dict = {
            "name": self.name,
            "kind": self.kind,
            "weight": self.weight,
            "bias": self.bias,
            "weight_shape": list(self.weight_shape),
            "calls": self.calls,
        }
        if self.is_conv:
            if self.conv is not None:
                out.update(self.conv.to_json())
            else:
                out["kernel_size"] = list(self.weight_shape[2:])
                out.update(dict.fromkeys(("stride", "padding", "dilation", "groups"), None))
                out["padding_mode"] = None
        out["canonical_size"] = self.canonical_size
        return out


@dataclass
class LayerTable:
    """A model's layer table.

    Attributes:
        source: The checkpoint it was read from.
        layers: Treated layers, in graph (or module) order.
        parameters: Every parameter's name and shape, in the model's order.
        untreated: Parameters KFAC does not treat, with what uses them.
        buffers: Names of non-parameter state (running statistics...).
    """

    source: str
    layers: list[Layer]
    parameters: dict[str, tuple[int, ...]]
    untreated: list[dict] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)

    def layer(self, name: str) -> Layer | None:
        return next((la for la in self.layers if la.name == name), None)

    def select(self, patterns: list[str] | None) -> list[Layer]:
        """Layers whose name matches any glob pattern (all layers without patterns)."""
        if not patterns:
            return list(self.layers)
        return [la for la in self.layers if any(fnmatch.fnmatchcase(la.name, p) for p in patterns)]

    def groups(self, separate_bias: bool = False, keep_untreated: bool = False) -> list[ParamGroup]:
        """Parameter groups in parameter order: one per layer (joint) or per parameter."""
        by_param: dict[str, ParamGroup] = {}
        for la in self.layers:
            if la.bias is not None and not separate_bias:
                by_param[la.weight] = ParamGroup(la.weight, la.bias)
            else:
                by_param[la.weight] = ParamGroup(W=la.weight)
                if la.bias is not None:
                    by_param[la.bias] = ParamGroup(b=la.bias)
        untreated = [u["name"] for u in self.untreated]
        if untreated and not keep_untreated:
            raise KfacCliError(
                self.source,
                untreated[0],
                "only parameters that KFAC treats",
                f"{len(untreated)} untreated: {', '.join(untreated)}",
                hint="pass --keep-untreated to give each its own flattened block",
            )
        for name in untreated:
            by_param[name] = ParamGroup(W=name)
        out: list[ParamGroup] = []
        for name in self.parameters:
            g = by_param.get(name)
            if g is not None and g not in out:
                out.append(g)
        return out

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "layers": [la.to_json() for la in self.layers],
            "untreated": self.untreated,
            "parameters": [{"name": n, "shape": list(s)} for n, s in self.parameters.items()],
            "buffers": self.buffers,
        }

    @classmethod
    def from_json(cls, data: object, file: object) -> LayerTable:
        """Parse and check the JSON form (``--spec``)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KfacCliError(
                file,
                "format",
                f"a layer table ({FORMAT!r})",
                repr(data.get("format") if isinstance(data, dict) else type(data).__name__),
            )
        if data.get("version") != VERSION:
            raise KfacCliError(file, "version", f"version {VERSION}", repr(data.get("version")))
        try:
            params = {p["name"]: _shape(p["shape"]) for p in data["parameters"]}
            layers = [_layer_from_json(e) for e in data["layers"]]
            untreated = [
                {
                    "name": str(u["name"]),
                    "shape": list(_shape(u["shape"])),
                    "used_by": [str(x) for x in u.get("used_by", [])],
                }
                for u in data.get("untreated", [])
            ]
            buffers = [str(b) for b in data.get("buffers", [])]
        except KfacCliError as e:
            raise e.with_context(file) from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KfacCliError(
                file, None, "a layer table as README documents it", f"{type(e).__name__}: {e}"[:120]
            ) from None
        table = cls(str(data.get("source", file)), layers, params, untreated, buffers)
        table.check(file)
        return table

    def check(self, file: object) -> None:
        """Layer parameters exist with the recorded shapes; nothing is treated twice."""
        seen: set[str] = set()
        for la in self.layers:
            for name in (la.weight, la.bias):
                if name is None:
                    continue
                if name not in self.parameters:
                    raise KfacCliError(
                        file,
                        la.name,
                        f"parameter {name} in the parameter list",
                        "no such parameter",
                    )
                if name in seen:
                    raise KfacCliError(file, name, "a parameter in one layer", "it in two")
                seen.add(name)
            if self.parameters[la.weight] != la.weight_shape:
                raise KfacCliError(
                    file,
                    la.weight,
                    f"shape {list(la.weight_shape)}",
                    f"{list(self.parameters[la.weight])}",
                )
            if la.bias is not None and self.parameters[la.bias] != la.weight_shape[:1]:
                raise KfacCliError(
                    file,
                    la.bias,
                    f"shape {list(la.weight_shape[:1])}",
                    f"{list(self.parameters[la.bias])}",
                )
            if len(la.weight_shape) != KINDS[la.kind]:
                raise KfacCliError(
                    file,
                    la.weight,
                    f"a rank-{KINDS[la.kind]} {la.kind} weight",
                    f"shape {list(la.weight_shape)}",
                )
            if la.conv is not None and tuple(la.weight_shape[2:]) != la.conv.kernel_size:
                raise KfacCliError(
                    file,
                    la.name,
                    f"kernel_size {list(la.weight_shape[2:])}",
                    f"{list(la.conv.kernel_size)}",
                )
        for u in self.untreated:
            if u["name"] in seen or u["name"] not in self.parameters:
                raise KfacCliError(
                    file,
                    u["name"],
                    "an untreated parameter of the model",
                    "a treated or unknown name",
                )


def layer_name(weight: str) -> str:
    """A layer's name from its weight's: the module path (``fc.weight`` -> ``fc``), or the
    weight's name without ``_weight`` (``attn.in_proj_weight`` -> ``attn.in_proj``)."""
    for suffix in (".weight", "_weight"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight[: -len(suffix)]
    return weight


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise KfacCliError(None, None, "a shape (list of non-negative ints)", repr(value)[:60])
    return tuple(value)


def _layer_from_json(e: Mapping) -> Layer:
    kind = e["kind"]
    if kind not in KINDS:
        raise KfacCliError(None, str(e.get("name")), f"kind in {', '.join(KINDS)}", repr(kind))
    conv = None
    if kind != "linear" and e.get("stride") is not None:
        try:
            conv = ConvParams.create(
                e["kernel_size"],
                e["stride"],
                e["padding"],
                e["dilation"],
                e["groups"],
                e.get("padding_mode") or "zeros",
                n=KINDS[kind] - 2,
            )
        except KfacCliError as err:
            raise err.with_context(key=str(e["name"])) from None
    bias = e.get("bias")
    return Layer(
        name=str(e["name"]),
        kind=kind,
        weight=str(e["weight"]),
        bias=None if bias is None else str(bias),
        weight_shape=_shape(e["weight_shape"]),
        conv=conv,
        calls=int(e.get("calls", 1)),
    )


def read_spec(path: Path) -> LayerTable:
    """Read a ``--spec`` file (the JSON of ``kfac-cli layers --json``)."""
    from kfac_cli.tensorfile import open_readable

    with open_readable(path) as fh:
        raw = fh.read(64 * 2**20)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise KfacCliError(path, None, "a JSON layer spec", f"invalid JSON ({e})"[:120]) from None
    return LayerTable.from_json(data, path)


def layers_from_state_dict(shapes: Mapping[str, tuple[int, ...]], source: str) -> LayerTable:
    """A layer table from parameter names and shapes alone (no hyper-parameters).

    ``x.weight`` of rank 2/3/4/5 is a linear/conv1d/conv2d/conv3d layer named ``x``,
    paired with ``x.bias`` when that is a vector of length ``C_out``. BatchNorm's running
    statistics (``*.running_mean``, ``*.running_var``, ``*.num_batches_tracked``) are
    buffers, not parameters; every other entry is a parameter.
    """
    kinds = {rank: kind for kind, rank in KINDS.items()}
    buffers = [n for n in shapes if n.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS]
    shapes = {n: s for n, s in shapes.items() if n not in buffers}
    layers, treated = [], set()
    for name, shape in shapes.items():
        if not name.endswith("weight") or len(shape) not in kinds:
            continue
        stem = name[: -len("weight")]
        bias = stem + "bias" if stem and stem + "bias" in shapes else None
        if bias is not None and tuple(shapes[bias]) != tuple(shape[:1]):
            bias = None
        layers.append(Layer(layer_name(name), kinds[len(shape)], name, bias, tuple(shape)))
        treated.update(n for n in (name, bias) if n)
    untreated = [
        {"name": n, "shape": list(s), "used_by": []} for n, s in shapes.items() if n not in treated
    ]
    return LayerTable(source, layers, dict(shapes), untreated, buffers)


def merge_spec(
    shapes: Mapping[str, tuple[int, ...]], spec: LayerTable, file: object, spec_file: object
) -> LayerTable:
    """Apply a spec to a state dict: the spec's layers, checked against the real shapes.

    Entries the spec lists as buffers are not parameters; entries the spec does not know
    are untreated parameters.
    """
    missing = [n for n in spec.parameters if n not in shapes]
    if missing:
        raise KfacCliError(
            file, missing[0], f"parameter {missing[0]} (named by {spec_file})", "no such tensor"
        )
    for name, shape in spec.parameters.items():
        if tuple(shapes[name]) != tuple(shape):
            raise KfacCliError(
                file, name, f"shape {list(shape)} (as in {spec_file})", f"{list(shapes[name])}"
            )
    buffers = set(spec.buffers)
    params = {n: tuple(s) for n, s in shapes.items() if n not in buffers}
    known = {u["name"] for u in spec.untreated}
    untreated = list(spec.untreated) + [
        {"name": n, "shape": list(s), "used_by": []}
        for n, s in params.items()
        if n not in spec.parameters and n not in known
    ]
    return LayerTable(
        str(file), list(spec.layers), params, untreated, [b for b in spec.buffers if b in shapes]
    )
