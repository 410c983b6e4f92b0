"""Layer tables from torch.export archives (``.pt2``), without unpickling anything.

``torch.export.load`` unpickles weights, constants and sample inputs stored in the archive.
We need none of them: the serialized graph (``models/<name>.json``, schema major version 8)
names every parameter with its shape and every ``aten`` call with its arguments and the
stack of modules it was called from; the weights' JSON index
(``data/weights/model_weights_config.json``) lists every name of every parameter (tied
``state_dict`` keys share one file) and whether it requires gradients. Only these two JSON
members are ever read, with limits on their size and compression ratio; members with
absolute or ``..`` paths make the whole archive suspect and are refused.

A linear or convolution call (``aten.linear``, ``aten.conv{1,2,3}d``, ``aten.convolution``,
and the ``permute`` + ``addmm``/``mm`` of a decomposed linear) whose weight is a parameter
is a layer, named after the module that calls it. A call whose weight is computed (weight
normalisation, weight standardisation) or that is transposed is listed, with the reason,
as a layer KFAC cannot treat.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath

from kfac_cli.errors import KfacError
from kfac_cli.files.inputs import open_readable, sniff
from kfac_cli.models.table import TREATED, Layer, LayerTable, layer_name, with_call
from kfac_cli.ops.conv import ConvParams

SCHEMA_MAJOR = 8
MAX_JSON_BYTES = 256 * 2**20
MAX_RATIO = 200  # JSON compresses well, but not like a zip bomb
MAX_TRACE = 64  # producer nodes followed back from a computed weight

_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_KIND = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
# Schema defaults for omitted trailing arguments of each overload.
_DEFAULTS = {
    "default": {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    "padding": {"bias": None, "stride": 1, "padding": "valid", "dilation": 1, "groups": 1},
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_NN_LAYERS = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d")


def _members(path: Path, zf: zipfile.ZipFile) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo | None]:
    """The graph member and (if present) the weights' JSON index."""
    infos = zf.infolist()
    for info in infos:
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts or "\\" in info.filename:
            raise KfacError(
                path,
                info.filename,
                "archive member names inside the archive",
                "an absolute or '..' path",
            )
    candidates = [
        i
        for i in infos
        if (PurePosixPath(i.filename).parent.name == "models" and i.filename.endswith(".json"))
        or PurePosixPath(i.filename).name == "serialized_exported_program.json"
    ]
    if not candidates:
        raise KfacError(
            path,
            None,
            "a torch.export archive with models/<name>.json",
            f"members {', '.join(i.filename for i in infos[:5])}"[:160] or "none",
        )
    preferred = [i for i in candidates if i.filename.endswith("models/model.json")]
    weights = next(
        (i for i in infos if i.filename.endswith("data/weights/model_weights_config.json")), None
    )
    return (preferred or candidates)[0], weights


def _read_json(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> object:
    if info.file_size > MAX_JSON_BYTES or (
        info.compress_size
        and info.file_size / info.compress_size > MAX_RATIO
        and info.file_size > 2**20
    ):
        raise KfacError(
            path,
            info.filename,
            f"a member of at most {MAX_JSON_BYTES} bytes, plausibly compressed",
            f"{info.file_size} bytes from {info.compress_size}",
        )
    try:
        with zf.open(info) as member:
            raw = member.read(MAX_JSON_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as e:
        raise KfacError(
            path, info.filename, "a readable archive member", f"{type(e).__name__}: {e}"[:120]
        ) from None
    if len(raw) > MAX_JSON_BYTES:
        raise KfacError(path, info.filename, f"at most {MAX_JSON_BYTES} bytes", "more")
    try:
        return json.loads(raw)
    except RecursionError:
        raise KfacError(path, info.filename, "JSON of plausible depth", "deeper nesting") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise KfacError(path, info.filename, "JSON", f"invalid JSON ({e})"[:120]) from None


def read_graph(path: Path) -> tuple[dict, dict | None]:
    """The archive's serialized ExportedProgram JSON and its weights' index (if any)."""
    with open_readable(path) as fh:
        head = fh.read(4)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise KfacError(
                path,
                None,
                "a torch.export archive (.pt2, a zip)",
                sniff(head) if head else "an empty file",
            ) from None
        with zf:
            graph_info, weights_info = _members(path, zf)
            data = _read_json(path, zf, graph_info)
            weights = _read_json(path, zf, weights_info) if weights_info else None
    if not isinstance(data, dict):
        raise KfacError(path, graph_info.filename, "a JSON object", type(data).__name__)
    version = data.get("schema_version")
    major = version.get("major") if isinstance(version, dict) else None
    if major != SCHEMA_MAJOR:
        raise KfacError(
            path,
            "schema_version",
            f"major version {SCHEMA_MAJOR}",
            repr(version)[:60],
            hint="re-export with a torch release this kfac-cli supports",
        )
    config = weights.get("config") if isinstance(weights, dict) else None
    return data, config if isinstance(config, dict) else None


def _value(arg: Mapping) -> object:
    """Decode one serialized argument (ints, strings, tensors by name, None)."""
    if not isinstance(arg, Mapping) or len(arg) != 1:
        raise ValueError(f"unexpected argument {arg!r}"[:80])
    ((kind, v),) = arg.items()
    if kind == "as_tensor":
        return ("tensor", v["name"])
    if kind in ("as_int", "as_ints", "as_string", "as_float", "as_bool", "as_floats"):
        return v
    if kind == "as_none":
        return None
    return (kind, v)


def _node_args(node: Mapping, names: tuple[str, ...], defaults: Mapping) -> dict:
    args = {}
    for i, inp in enumerate(node.get("inputs", [])):
        key = inp.get("name") or (names[i] if i < len(names) else f"arg{i}")
        args[key] = _value(inp["arg"])
    for k, v in defaults.items():
        args.setdefault(k, v)
    return args


def _tensor(value: object) -> str | None:
    """The graph name of a tensor argument (``None`` for anything else)."""
    return value[1] if isinstance(value, tuple) and value[0] == "tensor" else None


def _tensor_inputs(node: Mapping) -> Iterator[str]:
    """Every tensor a node reads."""
    for inp in node.get("inputs", []):
        arg = inp.get("arg")
        if not isinstance(arg, Mapping):
            continue
        for kind, v in arg.items():
            if kind == "as_tensor":
                yield v["name"]
            elif kind in ("as_tensors", "as_optional_tensors") and isinstance(v, list):
                for t in v:
                    if isinstance(t, Mapping) and "as_tensor" in t:
                        yield t["as_tensor"]["name"]
                    elif isinstance(t, Mapping) and "name" in t:
                        yield t["name"]


def _module_of(node: Mapping) -> tuple[str | None, str]:
    """The innermost module a node was called from: ``(path, type)``."""
    stack = (node.get("metadata") or {}).get("nn_module_stack")
    if not stack:
        return None, ""
    _, _, rest = stack.split(";")[-1].partition(",")
    path, _, kind = rest.rpartition(",")
    return (path or None), kind


def _op(node: Mapping) -> str:
    return str(node["target"]).removeprefix("torch.ops.").rsplit(".", 1)[0]


def _shape(tensor_values: Mapping, name: str) -> tuple[int, ...]:
    sizes = tensor_values[name]["sizes"]
    return tuple(int(s["as_int"]) for s in sizes)


def layer_table_from_pt2(path: Path) -> LayerTable:
    """Read a ``.pt2`` archive's graph into a layer table.

    Raises:
        KfacError: For anything but a readable torch.export archive, or a weight used by
            several calls with different hyper-parameters.
    """
    data, config = read_graph(path)
    try:
        return _Graph(path, data, config).table()
    except KfacError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise KfacError(
            path,
            None,
            "a serialized graph of the documented schema",
            f"{type(e).__name__}: {e}"[:120],
        ) from None


def _own_padding(args: dict, kernel: tuple[int, ...], n: int) -> list[tuple[int, int]] | None:
    """The conv op's own padding as ``(left, right)`` per spatial dim (``'same'`` as
    PyTorch computes it), or ``None`` when it is not numbers."""
    own, dilation = args["padding"], args["dilation"]
    dil = [dilation] * n if isinstance(dilation, int) else list(dilation)
    if own == "valid":
        return [(0, 0)] * n
    if own == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dil)]
    own = [own] * n if isinstance(own, int) else list(own)
    if len(own) != n or not all(isinstance(v, int) for v in own):
        return None
    return [(v, v) for v in own]


def _fold_pads(pads: list[tuple], args: dict, kernel: tuple[int, ...], n: int):
    """One ``(padding, mode)`` equal to the pads a module applies (``pads``, the conv's side
    first) followed by the conv's own zero padding, or why there is none (a string).

    Zero pads add up with the conv's own padding; one reflect, replicate or circular pad
    applied first (a conv's ``padding_mode``) stands alone; replicate pads add up. Anything
    else (another pad value, a crop, two modes in a row, a pad of the batch or channels) is
    no single convolution padding.
    """
    if not pads:  # the conv reads its input as it is
        return args["padding"], "zeros"
    own = _own_padding(args, kernel, n)
    if own is None:
        return f"its padding {args['padding']!r} is not numbers"
    steps = []  # (mode, [(left, right)] per dim), the input's side first
    for mode, flat, value in reversed(pads):
        if len(flat) % 2 or (len(flat) > 2 * n and any(flat[2 * n :])):
            return "its module pads more than the spatial dims of its input"
        if min(flat, default=0) < 0:
            return "its module crops its input (a negative pad) before the convolution"
        if mode == "constant" and value not in (None, 0, 0.0):
            return f"its module pads its input with the value {value} (only zeros fold)"
        flat = (flat + [0] * (2 * n))[: 2 * n]  # last dim first
        per_dim = [(flat[2 * i], flat[2 * i + 1]) for i in reversed(range(n))]
        if any(any(p) for p in per_dim):
            steps.append(("zeros" if mode == "constant" else mode, per_dim))
    if any(any(p) for p in own):
        steps.append(("zeros", own))
    modes = [m for m, _ in steps]
    total = [(sum(p[d][0] for _, p in steps), sum(p[d][1] for _, p in steps)) for d in range(n)]
    if all(m == "zeros" for m in modes) or all(m == "replicate" for m in modes):
        mode = modes[0] if modes else "zeros"
    elif len(modes) == 1:
        mode = modes[0]
    else:
        return (
            f"its module pads its input {' then '.join(modes)} before the convolution: "
            "no single padding mode does that"
        )
    if all(left == right for left, right in total):
        return tuple(left for left, _ in total), mode
    return tuple(total), mode


class _Graph:
    """One pass over the graph's nodes, collecting layers, uses and untreated layers."""

    def __init__(self, path: Path, data: dict, config: dict | None) -> None:
        gm = data["graph_module"]
        self.path = path
        self.nodes = gm["graph"]["nodes"]
        tv = gm["graph"]["tensor_values"]
        self.tensor_values = tv
        self.params: dict[str, str] = {}  # graph input name -> parameter name
        self.buffers: list[str] = []
        for spec in gm["signature"]["input_specs"]:
            if "parameter" in spec:
                self.params[spec["parameter"]["arg"]["name"]] = spec["parameter"]["parameter_name"]
            elif "buffer" in spec:
                self.buffers.append(spec["buffer"]["buffer_name"])
        shapes = {p: _shape(tv, arg) for arg, p in self.params.items()}
        self.canonical, self.aliases, self.frozen, order = _names(shapes, config)
        self.params = {arg: self.canonical[p] for arg, p in self.params.items()}
        self.shapes = {self.canonical[p]: s for p, s in shapes.items()}
        self.order = list(dict.fromkeys([*order, *self.shapes]))
        self.producers: dict[str, Mapping] = {}
        self.uses: dict[str, list[tuple[str, str, str | None]]] = {}  # (node, op, module)
        self.found: dict[str, tuple[Layer, str]] = {}  # weight -> (layer, first node name)
        self.untreated_layers: dict[str, dict] = {}
        self.calls: set[str] = set()  # the nodes of treated calls (and their transposes)

    def table(self) -> LayerTable:
        paths = set()  # every module path the graph was called through
        for node in self.nodes:
            for out in node.get("outputs", []):
                if isinstance(out, Mapping) and "as_tensor" in out:
                    self.producers[out["as_tensor"]["name"]] = node
            use = (str(node.get("name")), _op(node), _module_of(node)[0])
            paths.add(use[2])
            for t in _tensor_inputs(node):
                if t in self.params:
                    self.uses.setdefault(self.params[t], []).append(use)
            self._visit(node)
        layers = []
        for weight, (la, _) in self.found.items():
            other = {
                f"{op} in {module}" if module else op
                for node, op, module in self.uses.get(weight, [])
                if node not in self.calls
            }
            layers.append(Layer(**{**la.__dict__, "shared_with": tuple(sorted(other))}))
        names = {n for la in layers for n in la.names}
        layers = [self._own_name(la, paths | names) for la in layers]
        treated = {n for la in layers for n in (la.weight, la.bias) if n}
        untreated = [
            {
                "name": n,
                "shape": list(self.shapes[n]),
                "used_by": sorted({op for _, op, _ in self.uses.get(n, [])}),
            }
            for n in self.order
            if n not in treated
        ]
        return LayerTable(
            str(self.path),
            layers,
            {n: self.shapes[n] for n in self.order},
            untreated,
            self.buffers,
            self.aliases,
            list(self.untreated_layers.values()),
            [n for n in self.order if n in self.frozen],
        )

    # ------------------------------------------------------------------ one node

    def _visit(self, node: Mapping) -> None:
        op = str(node["target"]).removeprefix("torch.ops.")
        base, _, overload = op.rpartition(".")
        family = base.removeprefix("aten.")
        if base == "aten.linear":
            args = _node_args(node, ("input", "weight", "bias"), {"bias": None})
            self._call(node, base, "linear", args["weight"], args["bias"], None)
        elif base in ("aten.addmm", "aten.mm"):
            names = ("self", "mat1", "mat2") if base == "aten.addmm" else ("self", "mat2")
            args = _node_args(node, names, {})
            weight = self._transposed_parameter(_tensor(args["mat2"]))
            if weight is not None:
                bias = args["self"] if base == "aten.addmm" else None
                self.calls.add(str(self.producers[_tensor(args["mat2"])].get("name")))
                self._call(node, base, "linear", ("tensor", weight), bias, None)
        elif family in _CONV and overload in _DEFAULTS:
            args = _node_args(node, _CONV_ARGS, _DEFAULTS[overload])
            conv = self._conv_params(node, args, _CONV[family])
            if isinstance(conv, str):
                self._untreated(node, base, conv)
            else:
                self._call(node, base, family, args["weight"], args["bias"], conv)
        elif base == "aten.convolution":
            args = _node_args(node, _CONVOLUTION_ARGS, {})
            rank = self._rank(args["weight"])
            if args.get("transposed"):
                self._untreated(node, base, "a transposed convolution")
            elif rank in (3, 4, 5):
                conv = self._conv_params(node, args, rank - 2)
                if isinstance(conv, str):
                    self._untreated(node, base, conv)
                else:
                    self._call(node, base, _KIND[rank], args["weight"], args["bias"], conv)
        elif family.startswith("conv_transpose"):
            self._untreated(node, base, "a transposed convolution")

    def _rank(self, weight: object) -> int | None:
        name = _tensor(weight)
        if name in self.params:
            return len(self.shapes[self.params[name]])
        return None

    def _transposed_parameter(self, tensor: str | None) -> str | None:
        """The graph input of ``W`` when ``tensor`` is ``W.t()`` of a 2-d parameter ``W``."""
        node = self.producers.get(tensor or "")
        if node is None:
            return None
        op = _op(node)
        args = _node_args(node, ("self", "dims"), {})
        source = _tensor(args.get("self"))
        if source not in self.params or len(self.shapes[self.params[source]]) != 2:
            return None
        if op == "aten.t" or (op == "aten.permute" and list(args.get("dims", [])) == [1, 0]):
            return source
        return None

    def _conv_params(self, node: Mapping, args: dict, n: int) -> ConvParams | str | None:
        """The conv's hyper-parameters as a forward hook on its module sees them (pads the
        module applies first folded in), or why KFAC cannot treat it (a string)."""
        weight = _tensor(args["weight"])
        if weight not in self.params:
            return None
        kernel = self.shapes[self.params[weight]][2:]
        source, pads = self._own_pads(node, args)
        folded = _fold_pads(pads, args, kernel, n)
        if isinstance(folded, str):
            return folded
        padding, mode = folded
        try:
            conv = ConvParams.create(
                kernel, args["stride"], padding, args["dilation"], args["groups"], mode, n=n
            )
        except KfacError as e:
            raise e.with_context(self.path, str(node.get("name"))) from None
        return self._check_output(node, source, conv, n)

    def _own_pads(self, node: Mapping, args: dict) -> tuple[str | None, list[tuple]]:
        """The pads the conv's own module applies to its input, the conv's side first:
        ``(mode, flat pad, value)`` each; and the tensor the first of them reads (what a
        forward hook on the module records)."""
        pads: list[tuple] = []
        tensor = _tensor(args["input"])
        while True:
            pad_node = self.producers.get(tensor or "")
            if pad_node is None or _module_of(pad_node)[0] != _module_of(node)[0]:
                return tensor, pads
            op = _op(pad_node)
            if op == "aten.pad":
                defaults = {"mode": "constant", "value": None}
                a = _node_args(pad_node, ("self", "pad", "mode", "value"), defaults)
            elif op == "aten.constant_pad_nd":
                a = {
                    **_node_args(pad_node, ("self", "pad", "value"), {"value": 0}),
                    "mode": "constant",
                }
            elif op.startswith(("aten.reflection_pad", "aten.replication_pad")):
                a = _node_args(pad_node, ("self", "padding"), {})
                a = {**a, "pad": a["padding"], "value": None}
                a["mode"] = "reflect" if "reflection" in op else "replicate"
            else:
                return tensor, pads
            pads.append((a["mode"], list(a["pad"]), a["value"]))
            tensor = _tensor(a["self"])

    def _check_output(self, node: Mapping, source: str | None, conv: ConvParams, n: int):
        """``conv``, or why not: the output size the graph records must be the one the
        hyper-parameters give for the module's input (the patches' row count)."""
        tv = self.tensor_values
        out = next(
            (o["as_tensor"]["name"] for o in node.get("outputs", []) if "as_tensor" in o), None
        )
        try:
            given, got = _shape(tv, source)[2:], _shape(tv, out)[2:]
        except (KeyError, TypeError):  # symbolic sizes: nothing to compare
            return conv
        try:
            want = conv.output_size(given)
        except KfacError:
            want = None
        if len(given) == n and want != tuple(got):
            return (
                f"its output {list(got)} is not what its input {list(given)} and "
                f"hyper-parameters give ({list(want) if want else 'none'})"
            )
        return conv

    def _call(self, node, op, kind, weight_arg, bias_arg, conv) -> None:
        module, module_type = _module_of(node)
        weight_tensor = _tensor(weight_arg)
        if weight_tensor is None:
            return
        if weight_tensor not in self.params:
            self._untreated(node, op, self._computed(weight_tensor), module)
            return
        weight = self.params[weight_tensor]
        bias_tensor = _tensor(bias_arg)
        bias = self.params.get(bias_tensor or "")
        if bias is not None and self.shapes[bias] != self.shapes[weight][:1]:
            bias = None
        self.calls.add(str(node.get("name")))
        name = self._name(weight, module, module_type)
        layer = Layer(name, kind, weight, bias, self.shapes[weight], conv, modules=(name,))
        if weight in self.found:
            first, first_node = self.found[weight]
            if first.conv != layer.conv or first.bias != layer.bias:
                raise KfacError(
                    self.path,
                    weight,
                    "one set of hyper-parameters per weight",
                    f"different ones in calls {first_node} and {node.get('name')}",
                )
            self.found[weight] = (with_call(first, name), first_node)
        else:
            self.found[weight] = (layer, str(node.get("name")))

    def _name(self, weight: str, module: str | None, module_type: str) -> str:
        """The calling module when the weight is its own (``<module>.weight`` by any name)
        or the module is a torch.nn layer (a tied head); else the weight's name."""
        taken = {n for w, (la, _) in self.found.items() if w != weight for n in la.names}
        if module is not None and module not in taken:
            own = f"{module}.weight"
            if own in self._names_of(weight) or module_type.rpartition(".")[2] in _NN_LAYERS:
                return module
        return layer_name(weight)

    def _names_of(self, param: str) -> set[str]:
        """Every name of a parameter: its canonical name and its aliases."""
        return {param, *(a for a, t in self.aliases.items() if t == param)}

    def _own_name(self, la: Layer, taken: set[str]) -> Layer:
        """A module registered under several paths (``cpe1.proj``, and as a shared part
        ``blocks.0.cpe.proj``) is called through the others: name it by its first path, the
        one ``named_modules()`` and forward hooks give it, when its calls own the weight as
        ``<path>.weight`` and the graph never calls that path itself (a tied head's
        embedding is called: it stays another module)."""
        owner = layer_name(la.weight)
        names = self._names_of(la.weight)
        if (
            owner in la.names
            or la.weight != f"{owner}.weight"
            or owner in taken
            or not any(f"{m}.weight" in names for m in la.names)
        ):
            return la
        return replace(la, name=owner, modules=la.names)

    def _computed(self, tensor: str) -> str:
        """Why a weight is no parameter: the op that computes it, from which parameters."""
        node = self.producers.get(tensor)
        if node is None:
            return "its weight is an input of the model, not a parameter"
        seen, queue, found = set(), [tensor], []
        while queue and len(seen) < MAX_TRACE:
            t = queue.pop(0)
            if t in seen:
                continue
            seen.add(t)
            if t in self.params:
                found.append(self.params[t])
            elif t in self.producers:
                queue.extend(_tensor_inputs(self.producers[t]))
        sources = ", ".join(dict.fromkeys(found)) or "no parameter"
        return f"its weight is computed by {_op(node)} from {sources}"

    def _untreated(self, node: Mapping, op: str, why: str, module: str | None = None) -> None:
        module = module or _module_of(node)[0] or str(node.get("name"))
        if module not in self.untreated_layers:
            reason = f"{why}; KFAC treats only {TREATED}"
            self.untreated_layers[module] = {"name": module, "op": op, "reason": reason}


def _names(
    shapes: Mapping[str, tuple[int, ...]], config: dict | None
) -> tuple[dict[str, str], dict[str, str], set[str], list[str]]:
    """From the weights' index: each signature name's canonical name (the first of its
    names in ``state_dict`` order, as ``named_parameters()`` has it), the aliases, the
    frozen parameters and the parameter order. Without an index: the signature's names."""
    canonical = {p: p for p in shapes}
    if not config:
        return canonical, {}, set(), list(shapes)
    groups: dict[str, list[str]] = {}
    for name, entry in config.items():
        if isinstance(entry, Mapping) and entry.get("is_param") and "path_name" in entry:
            groups.setdefault(str(entry["path_name"]), []).append(str(name))
    aliases, frozen, order = {}, set(), []
    for names in groups.values():
        signature = [n for n in names if n in shapes]
        if not signature:
            continue
        first = names[0]
        for s in signature:
            canonical[s] = first
        order.append(first)
        aliases.update({n: first for n in names if n != first})
        meta = config[first].get("tensor_meta") if isinstance(config[first], Mapping) else None
        if isinstance(meta, Mapping) and meta.get("requires_grad") is False:
            frozen.add(first)
    return canonical, aliases, frozen, order
