"""kfac-cli factors as a kronfluence 1.0.1 factors folder (``OUTPUT/ANALYSIS/factors_NAME``).

kronfluence fits, per tracked module (Linear, Conv2d; keyed by module name), unnormalised
covariances with their row counts, the eigendecompositions of the normalised ones, and for
EKFAC the Lambda matrix ``Σ_n (Q_Gᵀ ∇_n Q_A)²`` with its sample count, all from per-sample
gradients of the summed training loss. The mapping (docs/formats.md, "kronfluence"):

- ``activation_covariance = A · rows``, ``num_activation_covariance_processed = rows`` (the
  expand rows: samples × locations), ``activation_eigen* =`` ``A``'s;
- ``gradient_covariance = G_sum``, ``num_gradient_covariance_processed = gradient rows``,
  ``gradient_eigen*`` of ``G_sum / rows``, where ``G_sum = G · s`` is ``G`` for the summed
  loss: ``s = 1`` for a ``sum`` loss, ``N·T`` for a ``mean`` loss;
- ``lambda_matrix = E · s`` (the corrections), ``num_lambda_processed = N``;
- ``factor_arguments.json``: ``strategy`` ``ekfac`` or ``kfac``, ``use_empirical_fisher``.

What kronfluence cannot represent is refused with one line instead of written subtly
different: Conv1d/3d, padding modes other than zeros, unequal padding, KFAC-reduce, separate
bias blocks, type-2 and forward-only Fisher types, several MC samples, and layers whose
leading axis is not the batch (kronfluence takes each row for a sample).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import factors_meta, read_factor, require_complete
from kfac_cli.files.sources import open_tensors
from kfac_cli.ops.conv import ConvParams

FILES = (
    "activation_covariance",
    "gradient_covariance",
    "num_activation_covariance_processed",
    "num_gradient_covariance_processed",
    "activation_eigenvectors",
    "activation_eigenvalues",
    "gradient_eigenvectors",
    "gradient_eigenvalues",
)
LAMBDA_FILES = ("lambda_matrix", "num_lambda_processed")


def export_kronfluence(factors: Path | str, folder: Path | str, *, force: bool = False) -> dict:
    """Write ``folder`` as the factors folder kronfluence's ``Analyzer`` loads.

    Args:
        factors: A kfac-cli factors file (KFAC, or a complete EKFAC file).
        folder: The factors folder, e.g. ``OUTPUT/ANALYSIS/factors_NAME`` (created; an
            existing one is replaced only with ``force``).
        force: Replace the files of an existing folder.

    Returns:
        A summary: the folder, its strategy, modules and files.

    Raises:
        KfacError: For a file kronfluence cannot represent (naming the layer and why), or
            an existing folder without ``force``.
    """
    from kronfluence.arguments import FactorArguments

    folder = Path(folder)
    with open_tensors(factors, stream_ok=False, role="factors") as src:
        meta = factors_meta(src)
        require_complete(src, meta)
        _check_representable(src.path, meta)
        if folder.exists() and any(folder.iterdir()) and not force:
            raise KfacError(folder, None, "a new folder", "an existing one", fix="force")
        scale = _sum_loss_scale(meta)
        out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in FILES}
        if meta["ekfac"]:
            out.update({name: {} for name in LAMBDA_FILES})
        for name, layer in meta["layers"].items():
            factors = {f: read_factor(src, f"{name}.{f}") for f in ("A", "G")}
            a, g = factors["A"].matrix, factors["G"].matrix
            dtype = src.infos[f"{name}.A"].dtype
            g_sum = g * scale
            rows_a, rows_g = layer["rows"], layer["gradient_rows"]
            out["activation_covariance"][name] = (a * rows_a).to(dtype)
            out["gradient_covariance"][name] = g_sum.to(dtype)
            out["num_activation_covariance_processed"][name] = torch.tensor([rows_a])
            out["num_gradient_covariance_processed"][name] = torch.tensor([rows_g])
            for part, factor in (("activation", "A"), ("gradient", "G")):
                vals, vecs = factors[factor].eigh()
                if factor == "G":
                    vals = vals * scale / rows_g
                out[f"{part}_eigenvalues"][name] = vals.to(dtype)
                out[f"{part}_eigenvectors"][name] = vecs.to(dtype).contiguous()
            if meta["ekfac"]:
                key = layer["blocks"][0]["key"]
                e = src.read(f"{key}.corrections").double() * scale
                out["lambda_matrix"][name] = e.to(dtype)
                out["num_lambda_processed"][name] = torch.tensor([meta["corrections_num_data"]])
    folder.mkdir(parents=True, exist_ok=True)
    strategy = "ekfac" if meta["ekfac"] else "kfac"
    arguments = FactorArguments(
        strategy=strategy, use_empirical_fisher=meta["fisher_type"] == "empirical"
    )
    stamp = {"kfac_cli_factors": Path(str(factors)).name, "eigenbasis": meta["eigenbasis"]}
    for file, tensors in out.items():
        save_file(tensors, folder / f"{file}.safetensors", metadata=stamp)
    (folder / "factor_arguments.json").write_text(json.dumps(arguments.to_dict(), indent=4))
    return {
        "command": "export",
        "to": "kronfluence",
        "folder": str(folder),
        "strategy": strategy,
        "modules": list(meta["layers"]),
        "files": sorted([f"{f}.safetensors" for f in out] + ["factor_arguments.json"]),
    }


def _sum_loss_scale(meta: dict) -> float:
    """``s``: ``G`` and the corrections of the summed loss are ``s`` times the file's."""
    if meta["loss_reduction"] == "mean":
        return float(meta["num_data"] * meta["num_per_example_loss_terms"])
    return 1.0


def _check_representable(path, meta: dict) -> None:
    """kronfluence's conventions hold for every layer of the file.

    Raises:
        KfacError: Naming the first thing kronfluence cannot represent.
    """

    def refuse(key: str, expected: str, found: object) -> None:
        raise KfacError(path, key, f"{expected} (what kronfluence represents)", str(found))

    if meta["approx"] != "expand":
        refuse("approx", "expand", meta["approx"])
    if meta["separate_bias"]:
        refuse("separate_bias", "weight and bias as one block", "separate blocks")
    if meta["fisher_type"] not in ("empirical", "mc"):
        refuse("fisher_type", "empirical or mc", meta["fisher_type"])
    if meta["mc_samples"] != 1:
        refuse("mc_samples", "one sampled label per datum", meta["mc_samples"])
    for name, layer in meta["layers"].items():
        kind = layer["kind"]
        if kind not in ("linear", "conv2d"):
            refuse(name, "a Linear or Conv2d layer", kind)
        if len(layer["keys"]) != 1:
            refuse(name, "a layer called once per forward pass", f"{len(layer['keys'])} calls")
        samples = sum(shape[0] for shape in layer["input_shapes"])
        if samples != meta["num_data"]:
            refuse(name, "a leading axis of samples", f"{samples} rows for {meta['num_data']}")
        if kind == "conv2d":
            params = ConvParams.create(
                layer["kernel_size"], layer["stride"], _padding(layer["padding"]),
                layer["dilation"], layer["groups"], layer["padding_mode"],
            )  # fmt: skip
            if params.padding_mode != "zeros":
                refuse(f"{name}.padding_mode", "zeros", params.padding_mode)
            if any(left != right for left, right in params.pads()):
                refuse(f"{name}.padding", "equal padding on both sides", params.pads())


def _padding(value):
    return value if isinstance(value, str) else tuple(
        tuple(v) if isinstance(v, list) else v for v in value
    )  # fmt: skip
