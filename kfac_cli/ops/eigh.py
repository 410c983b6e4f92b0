"""Eigendecompositions of Kronecker factors that never crash and cost only what they must.

A factor is symmetric positive semi-definite, but it can have rows and columns that are
exactly zero (kernel taps that read only padding: a dilated conv on a small map), which
LAPACK's ``syevd`` may fail to converge on, and it can be non-finite (NaN/Inf inputs, or an
overflow). :func:`factor_eigh` splits the exactly-zero rows off (their eigenvalues are 0 and
their eigenvectors unit vectors, exactly), decomposes the rest, and where LAPACK still fails,
decomposes it rescaled, then by an SVD (for a symmetric matrix ``U S Vᵀ``, ``|λ| = S`` and
``λ``'s sign is that of ``uᵢ·vᵢ``). A non-finite factor is refused with one line naming it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_cli.errors import KfacError


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a finite symmetric ``m`` ``[n, n]``, with the fallbacks above."""
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        pass
    scale = m.abs().max()
    if scale > 0:
        try:
            vals, vecs = torch.linalg.eigh(m / scale)
            return vals * scale, vecs
        except torch.linalg.LinAlgError:
            pass
    u, s, vh = torch.linalg.svd(m)
    vals = s * torch.sign((u * vh.T).sum(0))
    order = torch.argsort(vals, stable=True)
    return vals[order], u[:, order]


def factor_eigh(
    factor: Tensor, file: object = None, key: str | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``[n]`` (ascending) and eigenvectors ``[n, n]`` (columns) of a symmetric
    factor ``[n, n]``, computed in float64.

    Raises:
        KfacError: For a factor with NaN/Inf values, naming ``file`` and ``key``.
    """
    m = factor.to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise KfacError(
            file,
            key,
            "a finite factor to decompose",
            "NaN/Inf values (from NaN/Inf inputs)",
        )
    n = m.shape[0]
    live = (m != 0).any(dim=1)
    if bool(live.all()):
        return _eigh(m)
    idx = torch.nonzero(live).flatten()
    sub_vals, sub_vecs = _eigh(m[idx][:, idx]) if len(idx) else (m.new_zeros(0), m.new_zeros(0, 0))
    dead = torch.nonzero(~live).flatten()
    vals = torch.cat([m.new_zeros(len(dead)), sub_vals])
    vecs = m.new_zeros(n, n)
    vecs[dead, torch.arange(len(dead))] = 1.0
    vecs[idx[:, None], torch.arange(len(dead), n)[None, :]] = sub_vecs
    order = torch.argsort(vals, stable=True)
    return vals[order], vecs[:, order]
