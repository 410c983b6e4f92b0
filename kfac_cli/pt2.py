"""Layer tables from torch.export archives (``.pt2``), without unpickling anything.

``torch.export.load`` unpickles weights, constants and sample inputs stored in the archive.
We need none of them: the serialized graph (``models/<name>.json``, schema major version 8)
names every parameter with its shape and every ``aten`` call with its arguments. Only that
JSON member is ever read, with limits on its size and compression ratio; members with
absolute or ``..`` paths make the whole archive suspect and are refused.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from kfac_cli.conv import ConvParams
from kfac_cli.errors import KfacCliError
from kfac_cli.layers import Layer, LayerTable, layer_name
from kfac_cli.tensorfile import open_readable, sniff

SCHEMA_MAJOR = 8
MAX_GRAPH_BYTES = 256 * 2**20
MAX_RATIO = 200  # JSON compresses well, but not like a zip bomb

_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
# Schema defaults for omitted trailing arguments of each overload.
_DEFAULTS = {
    "default": {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    "padding": {"bias": None, "stride": 1, "padding": "valid", "dilation": 1, "groups": 1},
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _graph_member(path: Path, zf: zipfile.ZipFile) -> zipfile.ZipInfo:
    infos = zf.infolist()
    for info in infos:
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts or "\\" in info.filename:
            raise KfacCliError(
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
        raise KfacCliError(
            path,
            None,
            "a torch.export archive with models/<name>.json",
            f"members {', '.join(i.filename for i in infos[:5])}"[:160] or "none",
        )
    preferred = [i for i in candidates if i.filename.endswith("models/model.json")]
    return (preferred or candidates)[0]


def read_graph(path: Path) -> dict:
    """The archive's serialized ExportedProgram JSON, read with size limits."""
    with open_readable(path) as fh:
        head = fh.read(4)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise KfacCliError(
                path,
                None,
                "a torch.export archive (.pt2, a zip)",
                sniff(head) if head else "an empty file",
            ) from None
        with zf:
            info = _graph_member(path, zf)
            if info.file_size > MAX_GRAPH_BYTES or (
                info.compress_size
                and info.file_size / info.compress_size > MAX_RATIO
                and info.file_size > 2**20
            ):
                raise KfacCliError(
                    path,
                    info.filename,
                    f"a graph of at most {MAX_GRAPH_BYTES} bytes, plausibly compressed",
                    f"{info.file_size} bytes from {info.compress_size}",
                )
            try:
                with zf.open(info) as member:
                    raw = member.read(MAX_GRAPH_BYTES + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as e:
                raise KfacCliError(
                    path,
                    info.filename,
                    "a readable archive member",
                    f"{type(e).__name__}: {e}"[:120],
                ) from None
    if len(raw) > MAX_GRAPH_BYTES:
        raise KfacCliError(path, info.filename, f"at most {MAX_GRAPH_BYTES} bytes", "more")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise KfacCliError(
            path, info.filename, "the serialized graph as JSON", f"invalid JSON ({e})"[:120]
        ) from None
    if not isinstance(data, dict):
        raise KfacCliError(path, info.filename, "a JSON object", type(data).__name__)
    version = data.get("schema_version")
    major = version.get("major") if isinstance(version, dict) else None
    if major != SCHEMA_MAJOR:
        raise KfacCliError(
            path,
            "schema_version",
            f"major version {SCHEMA_MAJOR}",
            repr(version)[:60],
            hint="re-export with a torch release this kfac-cli supports",
        )
    return data


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


def _module_of(node: Mapping) -> str | None:
    stack = (node.get("metadata") or {}).get("nn_module_stack")
    if not stack:
        return None
    last = stack.split(";")[-1].split(",")
    return last[1] if len(last) >= 2 else None


def _shape(tensor_values: Mapping, name: str) -> tuple[int, ...]:
    sizes = tensor_values[name]["sizes"]
    return tuple(int(s["as_int"]) for s in sizes)


def layer_table_from_pt2(path: Path) -> LayerTable:
    """Read a ``.pt2`` archive's graph into a layer table.

    Raises:
        KfacCliError: For anything but a readable torch.export archive, or a weight used by
            several calls with different hyper-parameters.
    """
    data = read_graph(path)
    try:
        return _table(path, data)
    except KfacCliError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise KfacCliError(
            path,
            None,
            "a serialized graph of the documented schema",
            f"{type(e).__name__}: {e}"[:120],
        ) from None


def _table(path: Path, data: dict) -> LayerTable:
    gm = data["graph_module"]
    graph, signature = gm["graph"], gm["signature"]
    tv = graph["tensor_values"]
    params: dict[str, str] = {}  # graph input name -> parameter name
    buffers: list[str] = []
    for spec in signature["input_specs"]:
        if "parameter" in spec:
            params[spec["parameter"]["arg"]["name"]] = spec["parameter"]["parameter_name"]
        elif "buffer" in spec:
            buffers.append(spec["buffer"]["buffer_name"])
    shapes = {pname: _shape(tv, arg) for arg, pname in params.items()}
    producers: dict[str, Mapping] = {}
    used_by: dict[str, list[str]] = {}
    found: dict[str, tuple[Layer, str]] = {}  # weight -> (layer, first node name)
    for node in graph["nodes"]:
        target = str(node["target"])
        for out in node.get("outputs", []):
            if isinstance(out, Mapping) and "as_tensor" in out:
                producers[out["as_tensor"]["name"]] = node
        op = target.removeprefix("torch.ops.")
        for inp in node.get("inputs", []):
            arg = inp.get("arg", {})
            if (
                isinstance(arg, Mapping)
                and "as_tensor" in arg
                and arg["as_tensor"]["name"] in params
            ):
                used_by.setdefault(params[arg["as_tensor"]["name"]], []).append(
                    op.rsplit(".", 1)[0]
                )
        layer = _layer(path, node, op, params, shapes, producers)
        if layer is None:
            continue
        if layer.weight in found:
            first, first_node = found[layer.weight]
            if first.conv != layer.conv or first.bias != layer.bias:
                raise KfacCliError(
                    path,
                    layer.weight,
                    "one set of hyper-parameters per weight",
                    f"different ones in calls {first_node} and {node.get('name')}",
                )
            found[layer.weight] = (
                Layer(**{**first.__dict__, "calls": first.calls + 1}),
                first_node,
            )
        else:
            found[layer.weight] = (layer, str(node.get("name")))
    layers = [la for la, _ in found.values()]
    treated = {n for la in layers for n in (la.weight, la.bias) if n}
    untreated = [
        {"name": n, "shape": list(s), "used_by": sorted(set(used_by.get(n, [])))}
        for n, s in shapes.items()
        if n not in treated
    ]
    return LayerTable(str(path), layers, shapes, untreated, buffers)


def _layer(path, node, op, params, shapes, producers) -> Layer | None:
    base, _, overload = op.rpartition(".")
    family = base.removeprefix("aten.")
    if base == "aten.linear":
        args = _node_args(node, ("input", "weight", "bias"), {"bias": None})
        kind, conv = "linear", None
    elif family in _CONV and overload in _DEFAULTS:
        args = _node_args(node, _CONV_ARGS, _DEFAULTS[overload])
        kind = family
        n = _CONV[family]
        padding = args["padding"]
        mode = "zeros"
        pad_node = producers.get(args["input"][1]) if isinstance(args["input"], tuple) else None
        if pad_node is not None and str(pad_node["target"]).endswith("aten.pad.default"):
            pad_args = _node_args(
                pad_node, ("self", "pad", "mode", "value"), {"mode": "constant", "value": None}
            )
            same_module = _module_of(pad_node) == _module_of(node)
            if pad_args["mode"] != "constant" and same_module and padding in (0, [0] * n, "valid"):
                flat = list(pad_args["pad"])  # last dim first, (left, right) each
                padding = tuple((flat[2 * i], flat[2 * i + 1]) for i in reversed(range(n)))
                if all(left == right for left, right in padding):
                    padding = tuple(left for left, _ in padding)
                mode = pad_args["mode"]
        conv_weight = args["weight"]
        if not (isinstance(conv_weight, tuple) and conv_weight[1] in params):
            return None
        kernel = shapes[params[conv_weight[1]]][2:]
        try:
            conv = ConvParams.create(
                kernel, args["stride"], padding, args["dilation"], args["groups"], mode, n=n
            )
        except KfacCliError as e:
            raise e.with_context(path, str(node.get("name"))) from None
    else:
        return None
    weight, bias = args["weight"], args["bias"]
    if not (isinstance(weight, tuple) and weight[1] in params):
        return None  # a computed weight (e.g. weight norm) is not a KFAC layer here
    wname = params[weight[1]]
    bname = params.get(bias[1]) if isinstance(bias, tuple) else None
    return Layer(layer_name(wname), kind, wname, bname, shapes[wname], conv)
