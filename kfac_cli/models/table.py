"""The layer table: which layers KFAC treats, under which names, and everything it does not.

Built from a model checkpoint (:mod:`kfac_cli.models.load`) and written by ``kfac-cli
layers --json`` in the versioned format of ``docs/formats.md`` ("Layer spec"), which a
state dict's ``spec`` reads back.

Names. A layer is named after the module that *calls* it (``lm_head``, ``encoder.conv``),
which is the key a forward hook on that module records; a weight shared by several modules
(a tied head) is one layer whose ``modules`` all resolve to it. A parameter has one
canonical name (the first of ``named_parameters()``); its other names (a tied
``state_dict()`` key, the name ``torch.export`` chose) are ``aliases`` that resolve to it.
A dump key ``<layer>#<k>`` (k >= 1) holds the k-th extra call of a layer called more than
once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from math import prod

from kfac_cli.errors import KfacError
from kfac_cli.ops.conv import ConvParams

FORMAT = "kfac-cli/layer-table"
VERSION = 2
KINDS = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}  # kind -> weight rank
TREATED = "Linear and Conv1d/2d/3d layers whose weight is a plain parameter"
SPEC_HINT = (
    "a state dict does not record stride/padding/dilation/groups: give it the layer spec "
    "of the exported model (`kfac-cli layers MODEL.pt2 --json`)"
)


@dataclass(frozen=True)
class Layer:
    """One layer KFAC treats: a linear layer or an N-d convolution.

    ``conv`` is ``None`` for linear layers, and for conv layers whose hyper-parameters
    are unknown (a state dict without a spec). ``modules`` are the modules that call it
    (``name`` is the first), ``shared_with`` the weight's other uses (``aten.embedding in
    wte``), ``calls`` the number of calls in one forward pass.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    conv: ConvParams | None = None
    calls: int = 1
    modules: tuple[str, ...] = ()
    shared_with: tuple[str, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def canonical_size(self) -> int:
        """Length of the joint canonical block: ``C_out * (rest + 1)`` (``rest`` w/o bias)."""
        return self.weight_shape[0] * (prod(self.weight_shape[1:]) + (self.bias is not None))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that resolves to this layer."""
        return tuple(dict.fromkeys((self.name, *self.modules)))

    def require_conv(self, file: object) -> ConvParams:
        """The conv hyper-parameters, or an error that says how to get them."""
        if self.conv is None:
            raise KfacError(
                file, self.name, "known conv hyper-parameters", "none", hint=SPEC_HINT, fix="spec"
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
            "modules": list(self.names),
            "shared_with": list(self.shared_with),
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
        parameters: Every parameter's canonical name and shape, in the model's order.
        untreated: Parameters KFAC does not treat, with what uses them.
        buffers: Names of non-parameter state (running statistics...).
        aliases: Other names of parameters (tied ``state_dict`` keys) -> canonical name.
        untreated_layers: Modules that call a linear or conv op KFAC cannot treat, each
            ``{"name", "op", "reason"}``.
        frozen: Parameters that do not require gradients (absent from gradient files).
    """

    source: str
    layers: list[Layer]
    parameters: dict[str, tuple[int, ...]]
    untreated: list[dict] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    untreated_layers: list[dict] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        """Each layer under every name it is called by (built once: jobs look up every key
        several times)."""
        by_name: dict[str, Layer] = {}
        for la in self.layers:
            for n in la.names:
                by_name.setdefault(n, la)
        return by_name

    def layer(self, key: str) -> Layer | None:
        """The layer a dump key names: a calling module, or ``<module>#<k>``."""
        return self._by_name.get(call_of(key)[0])

    def untreated_layer(self, key: str) -> dict | None:
        """The entry of ``untreated_layers`` a dump key names, if any."""
        name = call_of(key)[0]
        return next((u for u in self.untreated_layers if u["name"] == name), None)

    def resolve(self, name: str) -> str | None:
        """A parameter's canonical name from any of its names (``None``: not a parameter)."""
        if name in self.parameters:
            return name
        return self.aliases.get(name)

    def select(self, patterns: list[str] | None) -> list[Layer]:
        """Layers with a name matching any glob pattern (all layers without patterns)."""
        if not patterns:
            return list(self.layers)
        return [la for la in self.layers if any(matches(n, patterns) for n in la.names)]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "layers": [la.to_json() for la in self.layers],
            "untreated": self.untreated,
            "untreated_layers": self.untreated_layers,
            "parameters": [
                {"name": n, "shape": list(s), "frozen": n in self.frozen}
                for n, s in self.parameters.items()
            ],
            "aliases": self.aliases,
            "buffers": self.buffers,
        }

    @classmethod
    def from_json(cls, data: object, file: object) -> LayerTable:
        """Parse and check the JSON form (a layer spec, version 1 or 2)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KfacError(
                file,
                "format",
                f"a layer table ({FORMAT!r})",
                repr(data.get("format") if isinstance(data, dict) else type(data).__name__),
            )
        if data.get("version") not in (1, VERSION):
            raise KfacError(file, "version", f"version 1 or {VERSION}", repr(data.get("version")))
        try:
            params = {str(p["name"]): _shape(p["shape"]) for p in data["parameters"]}
            frozen = [str(p["name"]) for p in data["parameters"] if p.get("frozen") is True]
            layers = [_layer_from_json(e) for e in data["layers"]]
            untreated = [
                {
                    "name": str(u["name"]),
                    "shape": list(_shape(u["shape"])),
                    "used_by": [str(x) for x in u.get("used_by", [])],
                }
                for u in data.get("untreated", [])
            ]
            untreated_layers = [
                {"name": str(u["name"]), "op": str(u["op"]), "reason": str(u["reason"])}
                for u in data.get("untreated_layers", [])
            ]
            aliases = {str(k): str(v) for k, v in dict(data.get("aliases", {})).items()}
            buffers = [str(b) for b in data.get("buffers", [])]
        except KfacError as e:
            raise e.with_context(file) from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KfacError(
                file, None, "a layer table as docs/formats.md documents it", _brief(e)
            ) from None
        table = cls(
            str(data.get("source", file)),
            layers,
            params,
            untreated,
            buffers,
            aliases,
            untreated_layers,
            frozen,
        )
        table.check(file)
        return table

    def check(self, file: object) -> None:
        """Layer parameters exist with the recorded shapes; nothing is treated twice;
        aliases name parameters; layer names are unique."""
        seen: set[str] = set()
        names: set[str] = set()
        for la in self.layers:
            for name in la.names:
                if name in names:
                    raise KfacError(file, name, "a layer name used once", "it twice")
                names.add(name)
            for name in (la.weight, la.bias):
                if name is None:
                    continue
                if name not in self.parameters:
                    raise KfacError(
                        file, la.name, f"parameter {name} in the parameter list", "no such name"
                    )
                if name in seen:
                    raise KfacError(file, name, "a parameter in one layer", "it in two")
                seen.add(name)
            if self.parameters[la.weight] != la.weight_shape:
                raise KfacError(
                    file,
                    la.weight,
                    f"shape {list(la.weight_shape)}",
                    f"{list(self.parameters[la.weight])}",
                )
            if la.bias is not None and self.parameters[la.bias] != la.weight_shape[:1]:
                raise KfacError(
                    file,
                    la.bias,
                    f"shape {list(la.weight_shape[:1])}",
                    f"{list(self.parameters[la.bias])}",
                )
            if len(la.weight_shape) != KINDS[la.kind]:
                raise KfacError(
                    file,
                    la.weight,
                    f"a rank-{KINDS[la.kind]} {la.kind} weight",
                    f"shape {list(la.weight_shape)}",
                )
            if la.conv is not None and tuple(la.weight_shape[2:]) != la.conv.kernel_size:
                raise KfacError(
                    file,
                    la.name,
                    f"kernel_size {list(la.weight_shape[2:])}",
                    f"{list(la.conv.kernel_size)}",
                )
        for u in self.untreated:
            if u["name"] in seen or u["name"] not in self.parameters:
                raise KfacError(
                    file, u["name"], "an untreated parameter of the model", "another name"
                )
        for alias, target in self.aliases.items():
            if target not in self.parameters or alias in self.parameters:
                raise KfacError(file, alias, "an alias of a parameter", f"an alias of {target}")


def call_of(key: str) -> tuple[str, int]:
    """A dump key's layer name and call index: ``conv#2`` -> ``("conv", 2)``."""
    name, sep, index = key.rpartition("#")
    if sep and index.isdigit() and int(index) >= 1 and name:
        return name, int(index)
    return key, 0


def matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches any of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_name(weight: str) -> str:
    """A layer's name from its weight's: the module path (``fc.weight`` -> ``fc``), or the
    weight's name without ``_weight`` (``attn.in_proj_weight`` -> ``attn.in_proj``)."""
    for suffix in (".weight", "_weight"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight[: -len(suffix)]
    return weight


def with_call(layer: Layer, module: str) -> Layer:
    """``layer`` called once more, from ``module``."""
    return replace(
        layer, calls=layer.calls + 1, modules=tuple(dict.fromkeys((*layer.names, module)))
    )


def _brief(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:120]


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise KfacError(None, None, "a shape (list of non-negative ints)", repr(value)[:60])
    return tuple(value)


def _layer_from_json(e: Mapping) -> Layer:
    kind = e["kind"]
    if kind not in KINDS:
        raise KfacError(None, str(e.get("name")), f"kind in {', '.join(KINDS)}", repr(kind))
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
        except KfacError as err:
            raise err.with_context(key=str(e["name"])) from None
    bias = e.get("bias")
    name = str(e["name"])
    return Layer(
        name=name,
        kind=kind,
        weight=str(e["weight"]),
        bias=None if bias is None else str(bias),
        weight_shape=_shape(e["weight_shape"]),
        conv=conv,
        calls=int(e.get("calls", 1)),
        modules=tuple(str(m) for m in e.get("modules", [name])),
        shared_with=tuple(str(s) for s in e.get("shared_with", [])),
    )
