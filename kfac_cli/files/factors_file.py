"""Factors files (``kfac-cli/factors``, docs/formats.md): their metadata, as the commands
that read them (``merge``, ``stats``) need it."""

from __future__ import annotations

import json

from kfac_cli.errors import KfacError
from kfac_cli.files.digest import json_fingerprint
from kfac_cli.files.kinds import FACTORS
from kfac_cli.files.sources import Tensors

COUNTS = ("rows", "gradient_rows", "input_shapes")
# The fields that name what an eigenbasis was computed from (see :func:`eigenbasis_id`).
BASIS_FIELDS = ("approx", "conventions", "separate_bias", "dtype", "model", "activations",
                "grads", "layers")  # fmt: skip
CONVENTIONS = ("fisher_type", "loss_reduction", "num_per_example_loss_terms", "mc_samples")


def factors_meta(src: Tensors) -> dict:
    """A factors file's metadata, decoded (JSON values parsed) and checked.

    Raises:
        KfacError: For another format, or metadata kfac-cli did not write.
    """
    meta = src.metadata
    if meta.get("format") != FACTORS:
        raise KfacError(src.path, "__metadata__.format", repr(FACTORS), repr(meta.get("format")))
    try:
        out = {k: meta[k] for k in ("approx", "fisher_type", "dtype", "model", "layout_version")}
        out["loss_reduction"] = None if meta["loss_reduction"] == "null" else meta["loss_reduction"]
        for key in (
            "num_per_example_loss_terms",
            "mc_samples",
            "separate_bias",
            "num_data",
            "layers",
            "activations",
            "grads",
        ):
            out[key] = json.loads(meta[key])
        out["eigh"] = json.loads(meta.get("eigh", "false"))
        out["ekfac"] = json.loads(meta.get("ekfac", "false"))
        out["corrections_only"] = json.loads(meta.get("corrections_only", "false"))
        if out["ekfac"]:
            out["eigenbasis"] = meta["eigenbasis"]
            out["corrections_num_data"] = json.loads(meta["corrections_num_data"])
        else:
            out["eigenbasis"] = eigenbasis_id(
                {**out, "conventions": {k: out[k] for k in CONVENTIONS}}
            )
    except (KeyError, ValueError) as e:
        raise KfacError(
            src.path,
            "__metadata__",
            "factors metadata as kfac-cli writes it",
            f"{type(e).__name__}: {e}"[:100],
        ) from None
    if not isinstance(out["num_data"], int) or out["num_data"] < 0:
        raise KfacError(src.path, "num_data", "a sample count", repr(out["num_data"]))
    return out


def eigenbasis_id(fields: dict) -> str:
    """``sha256:`` of what a factors file's eigendecompositions were computed from (its
    :data:`BASIS_FIELDS`: the dumps' fingerprints, model, conventions, layers): it names
    the eigenbasis in the EKFAC files made in it, the same on every torchrun rank."""
    named = {k: fields[k] for k in BASIS_FIELDS}
    if isinstance(named["model"], str):  # as a file's metadata holds it
        named["model"] = json.loads(named["model"])
    return json_fingerprint(named)


def require_complete(src: Tensors, meta: dict) -> None:
    """A factors file that holds its factors (not the corrections alone).

    Raises:
        KfacError: For a corrections-only file, saying how to complete it.
    """
    if meta["corrections_only"]:
        raise KfacError(
            src.path,
            "corrections_only",
            "a factors file with its factors (merge the corrections with --eigenbasis "
            "FACTORS to complete them)",
            "EKFAC corrections alone",
        )


def read_factor(src: Tensors, key: str):
    """A factor of a factors file (``LAYER.A`` or ``LAYER.G``) as a
    :class:`~kfac_cli.ops.kronecker.Factor`: its matrix and its stored eigendecomposition
    (``--eigh``) read when first needed, or that computed in float64 from the matrix.

    Raises:
        KfacError: For a factor the file lacks.
    """
    from kfac_cli.ops.kronecker import Factor

    if key not in src.infos:
        raise KfacError(src.path, key, "the factor its layer's blocks name", "no such tensor")
    stored = f"{key}.eigenvectors" in src.infos and f"{key}.eigenvalues" in src.infos
    return Factor(read=lambda part: src.read(f"{key}{part}"), stored=stored, where=(src.path, key))
