"""Scalar summaries of Kronecker-factored curvature, from the factors' eigenvalues.

A block ``G ⊗ A`` with eigenvalues ``λ_G`` (``[m]``) and ``λ_A`` (``[n]``) has the
eigenvalues ``λ_G,i λ_A,j``. So ``tr = tr(G) tr(A)``, ``‖·‖_F = ‖G‖_F ‖A‖_F``, and with
exact damping ``log det(G ⊗ A + δI) = Σ_ij log(λ_G,i λ_A,j + δ)``, as curvlinops 3.0.1's
``KFACLinearOperator`` has them (``trace``, ``frobenius_norm``, ``logdet``; ``δ = 0``).
A bias block of a separate-bias layer is ``G`` alone (``λ_A = [1]``); forward-only
factors have ``G = I``. An EKFAC block ``(Q_G ⊗ Q_A) diag(vec E) (Q_G ⊗ Q_A)ᵀ`` has the
eigenvalues ``E`` (curvlinops' ``EKFACLinearOperator`` alike).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def block_stats(vals_g: Tensor, vals_a: Tensor, damping: float = 0.0) -> dict[str, float]:
    """Summaries of a block ``F = G ⊗ A`` from ``λ_G`` ``[m]`` and ``λ_A`` ``[n]``
    (:func:`spectrum_stats` of their products)."""
    return spectrum_stats(torch.outer(vals_g.double(), vals_a.double()).flatten(), damping)


def spectrum_stats(eigenvalues: Tensor, damping: float = 0.0) -> dict[str, float]:
    """Summaries of a block from its eigenvalues (KFAC: ``λ_G,i λ_A,j``; EKFAC: its
    corrections): its ``dim``, ``trace`` and ``frobenius_norm``, the ``logdet`` of
    ``F + damping·I``, the extreme eigenvalues of ``F``, and the ``condition_number`` of
    ``F + damping·I``. An eigenvalue ``<= 0`` after damping makes the block singular:
    ``logdet`` is ``-inf`` and the condition number ``inf``. Computed in float64."""
    products = eigenvalues.double().flatten()
    return {
        "dim": products.numel(),
        "trace": float(products.sum()),
        "frobenius_norm": math.sqrt(float(products.square().sum())),
        "logdet": _logdet(products + damping),
        "eigenvalue_max": float(products.max()),
        "eigenvalue_min": float(products.min()),
        "condition_number": _condition(float(products.max()), float(products.min()), damping),
    }


def total_stats(blocks: list[dict[str, float]], damping: float = 0.0) -> dict[str, float]:
    """The same summaries of the block-diagonal curvature made of ``blocks``."""
    hi = max(b["eigenvalue_max"] for b in blocks)
    lo = min(b["eigenvalue_min"] for b in blocks)
    return {
        "dim": sum(b["dim"] for b in blocks),
        "trace": sum(b["trace"] for b in blocks),
        "frobenius_norm": math.sqrt(sum(b["frobenius_norm"] ** 2 for b in blocks)),
        "logdet": sum(b["logdet"] for b in blocks),
        "eigenvalue_max": hi,
        "eigenvalue_min": lo,
        "condition_number": _condition(hi, lo, damping),
    }


def _logdet(eigenvalues: Tensor) -> float:
    return -math.inf if float(eigenvalues.min()) <= 0 else float(eigenvalues.log().sum())


def _condition(hi: float, lo: float, damping: float) -> float:
    return math.inf if lo + damping <= 0 else (hi + damping) / (lo + damping)
