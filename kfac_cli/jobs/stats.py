"""`kfac-cli stats` as a library function: trace, Frobenius norm, log-determinant and
eigenvalue range of the curvature a factors file holds, per layer and in total."""

from __future__ import annotations

from pathlib import Path

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import factors_meta, read_factor, require_complete
from kfac_cli.files.sources import open_tensors
from kfac_cli.ops.kronecker import block_stats, spectrum_stats, total_stats


def run_stats(factors: Path | str, *, damping: float = 0.0) -> dict:
    """Per layer (summed over its canonical blocks) and in total: ``dim``, ``trace``,
    ``frobenius_norm``, ``logdet`` of ``F + damping·I`` (exact damping), the extreme
    eigenvalues of ``F`` and the ``condition_number`` of ``F + damping·I``
    (:mod:`kfac_cli.ops.kronecker`). Forward-only factors have ``G = I``; an EKFAC file's
    blocks have its corrections for eigenvalues.

    Raises:
        KfacError: For a file that is no factors file, a negative damping, or a factor
            that cannot be decomposed (NaN/Inf).
    """
    if damping < 0:
        raise KfacError(None, "damping", "a damping >= 0", str(damping))
    with open_tensors(factors, stream_ok=False, role="factors") as src:
        meta = factors_meta(src)
        require_complete(src, meta)
        layers, blocks_all, notes = {}, [], []
        for name, layer in meta["layers"].items():
            if meta["fisher_type"] == "forward-only":
                vals_g = torch.ones(layer["C_out"], dtype=torch.float64)
            elif not meta["ekfac"]:
                vals_g = read_factor(src, f"{name}.G").eigenvalues()
            if not meta["ekfac"]:
                vals_a = read_factor(src, f"{name}.A").eigenvalues()
            if meta["ekfac"]:  # each block's eigenvalues are its corrections
                blocks = [
                    spectrum_stats(src.read(f"{b['key']}.corrections"), damping)
                    for b in layer["blocks"]
                ]
            else:
                blocks = [
                    block_stats(
                        vals_g, vals_a if "A" in b["factors"] else vals_a.new_ones(1), damping
                    )
                    for b in layer["blocks"]
                ]
            layers[name] = total_stats(blocks, damping)
            blocks_all += blocks
            if layers[name]["logdet"] == -float("inf"):
                notes.append(f"{name}: singular (logdet -inf): give a damping, or a larger one")
        total = total_stats(blocks_all, damping)
    return {
        "command": "stats",
        "file": str(factors),
        "damping": damping,
        "num_data": meta["num_data"],
        "ekfac": meta["ekfac"],
        "layers": layers,
        "total": total,
        "notes": notes,
    }
