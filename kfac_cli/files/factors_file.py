"""Factors files (``kfac-cli/factors``, docs/formats.md): their metadata, as the commands
that read them (``merge``, ``stats``) need it."""

from __future__ import annotations

import json

from kfac_cli.errors import KfacError
from kfac_cli.files.kinds import FACTORS
from kfac_cli.files.sources import Tensors

COUNTS = ("rows", "gradient_rows", "input_shapes")
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
        if out["ekfac"]:
            out["eigenbasis"] = meta["eigenbasis"]
            out["corrections_num_data"] = json.loads(meta["corrections_num_data"])
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
