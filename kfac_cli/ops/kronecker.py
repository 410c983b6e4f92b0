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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_cli.ops.eigh import factor_eigh


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


@dataclass(frozen=True)
class Damping:
    """curvlinops 3.0.1's ``KFACInverseLinearOperator`` damping.

    Attributes:
        value: ``λ`` for both factors, or ``(λ_A, λ_G)``.
        heuristic: Martens & Grosse's π: ``λ_A = max(π √λ, min_damping)``,
            ``λ_G = max(√λ / π, min_damping)``, ``π = sqrt((tr A / dim A) / (tr G / dim G))``.
        min_damping: The heuristic's floor.
        exact: ``λ`` added to the block's eigenvalues (``(G ⊗ A + λI)^p``), not the factors.
    """

    value: float | tuple[float, float] = 0.0
    heuristic: bool = False
    min_damping: float = 1e-8
    exact: bool = False

    def factors(self, mean_a: float, mean_g: float) -> tuple[float, float]:
        """``(λ_A, λ_G)`` for a layer whose factors' mean eigenvalues (``tr / dim``) are
        these."""
        if self.heuristic and mean_a >= 0 and mean_g > 0:
            pi = math.sqrt(mean_a / mean_g)
            root = math.sqrt(float(self.value))  # type: ignore[arg-type]
            return max(pi * root, self.min_damping), max(root / pi, self.min_damping)
        if isinstance(self.value, tuple):
            return self.value
        return float(self.value), float(self.value)


@dataclass
class BlockOperator:
    """A block's matrix function acting on its canonical matrices ``M: [..., C_out, D]``:
    ``left @ M @ right`` (Kronecker form) or ``Q_G (middle ⊙ (Q_Gᵀ M Q_A)) Q_Aᵀ``
    (eigenbasis form; ``q_a`` ``None``: ``D = 1``, a bias block)."""

    left: Tensor | None = None
    right: Tensor | None = None
    q_g: Tensor | None = None
    middle: Tensor | None = None
    q_a: Tensor | None = None

    def to(self, dtype: torch.dtype, device=None) -> BlockOperator:
        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        return BlockOperator(*(cast(t) for t in (self.left, self.right, self.q_g, self.middle,
                                                 self.q_a)))  # fmt: skip

    def __call__(self, m: Tensor) -> Tensor:
        if self.q_g is None:
            out = self.left @ m
            return out if self.right is None else out @ self.right
        t = self.q_g.T @ m
        if self.q_a is not None:
            t = t @ self.q_a
        t = t * self.middle
        out = self.q_g @ t
        return out if self.q_a is None else out @ self.q_a.T


class Factor:
    """A Kronecker factor ``[n, n]``: its matrix and its float64 eigendecomposition, each
    given, read when first needed (``read(suffix)`` returns the tensor ``suffix`` names:
    ``""``, ``".eigenvalues"``, ``".eigenvectors"``; ``stored``: the eigendecomposition
    is there), or (the eigendecomposition) computed once from the matrix. ``where``: the
    file and key an error names."""

    def __init__(
        self,
        matrix: Tensor | None = None,
        eigh: tuple[Tensor, Tensor] | None = None,
        *,
        read: Callable[[str], Tensor] | None = None,
        stored: bool = False,
        where: tuple[object, str | None] = (None, None),
    ) -> None:
        self._matrix = None if matrix is None else matrix.double()
        self._eigh = None if eigh is None else (eigh[0].double(), eigh[1].double())
        self._read, self._stored, self._where = read, stored, where

    @classmethod
    def identity(cls, n: int) -> Factor:
        eye = torch.eye(n, dtype=torch.float64)
        return cls(eye, (torch.ones(n, dtype=torch.float64), eye))

    @property
    def matrix(self) -> Tensor | None:
        if self._matrix is None and self._read is not None:
            self._matrix = self._read("").double()
        return self._matrix

    def eigenvalues(self) -> Tensor:
        """The eigenvalues alone (stored ones without reading the eigenvectors)."""
        if self._eigh is None and self._stored:
            return self._read(".eigenvalues").double()  # type: ignore[misc]
        return self.eigh()[0]

    def eigh(self) -> tuple[Tensor, Tensor]:
        if self._eigh is None and self._stored:
            read = self._read
            self._eigh = (read(".eigenvalues").double(), read(".eigenvectors").double())  # type: ignore[misc]
        elif self._eigh is None:
            self._eigh = factor_eigh(self.matrix, *self._where)
        return self._eigh

    def mean(self) -> float:
        """``tr F / n`` (the heuristic damping's)."""
        if self.matrix is not None:
            return float(self.matrix.diagonal().mean())
        return float(self.eigh()[0].mean())

    def power(self, damping: float, power: float, rtol: float) -> Tensor:
        """``(F + damping·I)^power``: for ±1 from the matrix (``F + λI``, or its inverse
        from a float64 Cholesky factor where the damping alone keeps it positive
        definite), else through the eigendecomposition.

        Raises:
            SingularBlock: Where the power does not exist.
        """
        if self.matrix is not None and power == 1:
            return self.matrix + damping * torch.eye(len(self.matrix), dtype=torch.float64)
        if self.matrix is not None and power == -1:
            bound = rtol * float(self.matrix.diagonal().abs().sum())  # >= rtol · max |λ|
            if damping > bound:
                damped = self.matrix + damping * torch.eye(len(self.matrix), dtype=torch.float64)
                chol, info = torch.linalg.cholesky_ex(damped)
                if not int(info):
                    return torch.cholesky_inverse(chol)
        vals, vecs = self.eigh()
        _check_power(vals + damping, power, rtol)
        return (vecs * (vals + damping).pow(power)) @ vecs.T


def kfac_operator(
    g: Factor,
    a: Factor,
    power: float,
    damping: Damping,
    corrections: Tensor | None = None,
    bias: bool = False,
    rtol: float = 0.0,
) -> BlockOperator:
    """The float64 operator of ``(G ⊗ A + damping)^power`` for one canonical block.

    Args:
        g: ``G`` (:meth:`Factor.identity` for forward-only factors).
        a: ``A``: the block's right factor, or (``bias``) only what the heuristic damping
            reads.
        power: ``1`` (the curvature), ``-1`` (its inverse) or any real power.
        damping: How to damp (:class:`Damping`); Kronecker-form (Tikhonov, heuristic)
            damping keeps ``(G + λ_G)^p ⊗ (A + λ_A)^p``, exact damping the eigenvalues.
        corrections: EKFAC's eigenvalues ``[C_out, D]`` (or ``[C_out]``), replacing the
            products of the factors' eigenvalues (exact damping only).
        bias: The bias block of a separate-bias layer: ``G`` alone (damped with the
            layer's ``λ_G``, as curvlinops damps it).
        rtol: Eigenvalues within ``rtol`` of the largest count as 0.

    Raises:
        SingularBlock: Where the power does not exist (a singular block, undamped).
    """
    if corrections is not None or damping.exact:
        vals_g, q_g = g.eigh()
        vals_a, q_a = (None, None) if bias else a.eigh()
        if corrections is not None:
            eig = corrections.double().reshape(len(vals_g), -1)
        else:
            eig = torch.outer(vals_g, vals_a if vals_a is not None else vals_g.new_ones(1))
        lam = float(damping.value)  # type: ignore[arg-type]
        _check_power(eig + lam, power, rtol)
        return BlockOperator(q_g=q_g, middle=(eig + lam).pow(power), q_a=q_a)
    lam_a, lam_g = damping.factors(a.mean(), g.mean())
    left = g.power(lam_g, power, rtol)
    return BlockOperator(left=left, right=None if bias else a.power(lam_a, power, rtol))


class SingularBlock(ValueError):
    """A negative or fractional power of a matrix with eigenvalues <= 0 (numerically)."""


def _check_power(eigenvalues: Tensor, power: float, rtol: float) -> None:
    """Raise :class:`SingularBlock` where ``power`` of these (damped) eigenvalues does not
    exist: a negative power of one within ``rtol·max|λ|`` of 0 (rounding makes a zero
    eigenvalue ±tiny), or a fractional power of a negative one."""
    if power == int(power) and power >= 0:
        return
    floor = rtol * float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
    low = float(eigenvalues.min()) if eigenvalues.numel() else 1.0
    if (power < 0 and low <= floor) or low < -floor:
        raise SingularBlock(f"smallest eigenvalue {low:.3g} after damping")
