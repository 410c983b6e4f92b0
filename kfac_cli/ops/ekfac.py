"""EKFAC's eigenvalue corrections: second moments of per-example gradients in the
Kronecker eigenbasis (George et al. 2018; curvlinops 3.0.1's ``EKFACLinearOperator``).

A layer's per-example gradient for sample ``n`` and backpropagated vector ``v`` is
``∇ = Σ_s g_s a_sᵀ`` (``[D1, D2]``; ``s`` runs over the sample's weight-sharing locations,
``a``: expand patches, averaged over channel groups, with a ones column for a joint bias),
and the corrections are ``E = Σ_{n,v} (Q_Gᵀ ∇ Q_A)²``. :func:`add_corrections` adds one
chunk of samples' share to an accumulator by one of two routes (curvlinops' issue #217 and
PR #219 compare them):

- ``per_example``: each rotated ``∇`` formed (``[n, D1, D2]`` for a chunk of samples, one
  vector at a time), squared and summed. Each side is rotated before the product (``S``
  rows of ``a`` or ``g``) or after it (the ``∇``), whichever costs fewer operations;
  ``a``'s rotation is shared by all vectors.
- ``gramian``: ``E = Σ_n Σ_{s,t} (ỹ_s ∘ ỹ_t)(x̃_s ∘ x̃_t)ᵀ`` with ``x̃ = a Q_A``,
  ``ỹ = g Q_G``: over the ``S(S+1)/2`` pairs ``s <= t`` only (symmetry, off-diagonal pairs
  twice), the ``g`` side summed over the vectors first, then one product for the chunk.
  Without weight sharing (``S = 1``) it is the product of the squared rotated rows.

:func:`strategy` picks the cheaper by an operation count. Memory: a chunk's rows and its
``[n, D1, D2]`` (per example) or ``[n, pairs, D1 + D2]`` (Gramian), never more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from kfac_cli.ops.conv import ConvParams
from kfac_cli.ops.patches import conv_patches, linear_patches

# One pass over memory (square, sum) counted as this many multiply-adds of a product.
ELEMENT_FLOPS = 8
# Products whose rows are a multiple of this many elements (64 bytes of float32) run at
# the GEMM kernels' full rate; odd widths (a joint bias column) are padded to it.
GEMM_ALIGN = 16


def sample_inputs(
    x: Tensor,
    params: ConvParams | None,
    bias_column: bool,
    fold: int,
    out: Tensor | None = None,
) -> Tensor:
    """The rows ``a`` of each sample's per-example gradient, ``[n, S, D (+1)]``.

    Args:
        x: A chunk of a layer input, ``[n·fold, C_in, *I]`` (conv) or ``[n·fold, ..., d]``.
        params: The conv's hyper-parameters (``None``: linear).
        bias_column: Append the joint bias's ones column.
        fold: Rows of ``x`` per sample (windows of a folded batch; else 1): ``S`` counts
            every location of all of them.
        out: A reused buffer ``[n·fold, S/fold, W]``, ``W >= D``, whose columns past ``D``
            are zero: the rows are written into it and returned zero-padded to ``W``
            (what :func:`add_corrections` pads them to), ``[n, S, W]``.
    """
    d = (x.shape[-1] if params is None else params.patch_size(x.shape[1])) + bias_column
    into = None if out is None else out[..., :d]  # the rows' own columns of the buffer
    rows = (
        linear_patches(x, bias_column, into)
        if params is None
        else conv_patches(x, params, bias_column, out=into)
    )
    wide = rows if out is None else out
    return wide.reshape(x.shape[0] // fold, -1, wide.shape[-1])


def sample_gradients(g: Tensor, conv: bool, fold: int) -> Tensor:
    """Output gradients ``[V, n·fold, C_out, *O]`` (conv) or ``[V, n·fold, ..., C_out]``
    as ``[V, n, S, C_out]`` (channels last, locations in the order of the patches)."""
    if conv:
        g = rearrange(g, "v b c ... -> v b (...) c")
    else:
        g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
    return g.reshape(g.shape[0], g.shape[1] // fold, -1, g.shape[-1])


def strategy(locations: int, d_out: int, d_in: int, vectors: int) -> str:
    """``per_example`` or ``gramian``, whichever needs fewer operations per sample for
    ``S`` locations, ``[D1, D2]`` gradients and ``V`` vectors (rotations excluded: the
    Gramian needs both sides rotated first, counted in its cost)."""
    s, d1, d2, v = locations, d_out, d_in, vectors
    pairs = s * (s + 1) // 2
    rotate_a = min(s * d2 * d2, v * d1 * d2 * d2)
    rotate_g = v * min(s * d1 * d1, d1 * d1 * d2)
    per_example = rotate_a + rotate_g + v * d1 * d2 * (s + ELEMENT_FLOPS)
    gramian = s * d2 * d2 + v * s * d1 * d1 + pairs * (d1 * d2 + (v + 1) * (d1 + d2))
    return "gramian" if gramian < per_example else "per_example"


def padded_width(d: int) -> int:
    """``d`` rounded up to whole :data:`GEMM_ALIGN` columns: a product whose output rows
    are that wide runs at the core's rate (2305 columns, a joint bias's ``A``, ran a
    quarter slower than 2320)."""
    return -(-d // GEMM_ALIGN) * GEMM_ALIGN


def pad_square(q: Tensor, width: int) -> Tensor:
    """``q: [D, D]`` in the top-left corner of zeros ``[width, width]`` (``q`` itself when
    ``width == D``)."""
    if width == q.shape[0]:
        return q
    out = q.new_zeros(width, width)
    out[: q.shape[0], : q.shape[1]] = q
    return out


def add_corrections(
    out: Tensor,
    a: Tensor | None,
    g: Tensor,
    q_g: Tensor,
    q_a: Tensor | None,
    alpha: float = 1.0,
    method: str | None = None,
    budget: int = 2**21,
) -> Tensor:
    """Add ``alpha · Σ_{n,v} (Q_Gᵀ ∇_{n,v} Q_A)²`` over one chunk of samples to ``out``.

    Args:
        out: ``[D1, D2]`` (a weight or joint block) or ``[D1]`` (a bias block), any float
            dtype: in ``g``'s, squares are added to it as they come (fastest; a float32
            partial of a few samples), in another (float64 for long sums) once per call.
        a: ``[n, S, D2]`` (:func:`sample_inputs`), or zero-padded to ``[n, S, W]``, or
            ``None`` for a bias block, whose per-example gradient is ``Σ_s g_s``.
        g: ``[V, n, S, D1]`` (:func:`sample_gradients`).
        q_g: ``G``'s eigenvectors ``[D1, D1]`` (columns), in ``g``'s dtype.
        q_a: ``A``'s eigenvectors ``[D2, D2]``, or zero-padded to ``[W, W]``, ``W > D2``
            (:func:`pad_square` to :func:`padded_width`: ``a`` is padded alike and the
            products run at full rate); ``None`` for no rotation of ``a`` (or a bias block).
        alpha: The scale (the loss correction ``c``).
        method: ``per_example`` or ``gramian`` (default: :func:`strategy`).
        budget: Elements of ``[·, D1, W]`` per-example gradients formed at once.

    Returns:
        ``out``.
    """
    if a is None:
        rotated = g.sum(2) @ q_g  # [V, n, D1]
        out.add_(rotated.square_().sum((0, 1)), alpha=alpha)
        return out
    vectors, n, s, d1 = g.shape
    d2 = out.shape[-1]
    method = method or strategy(s, d1, d2, vectors)
    if q_a is not None and q_a.shape[0] > a.shape[-1]:
        a = torch.nn.functional.pad(a, (0, q_a.shape[0] - a.shape[-1]))
    if method == "gramian":
        out.add_(_gramian(a if q_a is None else a @ q_a, g @ q_g)[:, :d2], alpha=alpha)
        return out
    if method != "per_example":
        raise ValueError(f"method must be per_example or gramian, not {method!r}")
    a_first = q_a is None or s * d2 < vectors * d1 * d2
    g_first = s < d2
    x = a @ q_a if a_first and q_a is not None else a
    # Squares added straight into ``out`` where it has g's dtype (a float32 partial sum,
    # see jobs.ekfac), else into one such partial first.
    acc, scale = (out, alpha) if out.dtype == g.dtype else (g.new_zeros(d1, d2), 1.0)
    step = max(1, budget // (d1 * a.shape[-1]))
    for v in range(vectors):
        y = g[v] @ q_g if g_first else g[v]
        for i in range(0, n, step):  # one sample: 2-D products (a batch of one is slower)
            yi, xi = (y[i], x[i]) if step == 1 else (y[i : i + step], x[i : i + step])
            grad = yi.mT @ xi  # [(step,) D1, W]
            if not g_first:
                grad = q_g.T @ grad
            if not a_first:
                grad = grad @ q_a
            if step == 1:
                acc.addcmul_(grad[:, :d2], grad[:, :d2], value=scale)
            else:
                acc.add_(grad.square_().sum(0)[:, :d2], alpha=scale)
    if acc is not out:
        out.add_(acc, alpha=alpha)
    return out


@dataclass(frozen=True)
class Eigenbasis:
    """``A``'s eigenvectors with their exact ± unit columns split off: a factor's zero rows
    (kernel taps that read only padding) have them (:func:`kfac_cli.ops.eigh.factor_eigh`),
    and rotating by a unit vector is a copy, so only ``live`` (rows ``live_rows`` and
    columns ``live_cols`` of ``Q_A``, zero-padded to :func:`padded_width`) is multiplied;
    unit column ``unit_cols[k]`` is the input column ``unit_rows[k]`` up to sign."""

    live: Tensor
    live_rows: Tensor
    live_cols: Tensor
    unit_rows: Tensor
    unit_cols: Tensor


def split_eigenbasis(q: Tensor, eigenvalues: Tensor) -> Eigenbasis:
    """:class:`Eigenbasis` of eigenvectors ``q: [D, D]`` (columns) with ``eigenvalues``
    ``[D]``: only the columns of eigenvalue exactly 0 (a zero row's) are looked at."""
    candidates = (eigenvalues == 0).nonzero()[:, 0]
    nonzero = q.index_select(1, candidates).ne(0)  # (row-major scans: torch's fast ones)
    unit = nonzero.sum(0, dtype=torch.int32) == 1
    unit_cols = candidates[unit]
    hits = nonzero[:, unit].nonzero()  # (row, column) of each one's single entry
    rows = torch.empty_like(unit_cols)
    rows[hits[:, 1]] = hits[:, 0]  # the row each one hits
    live_cols = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
    live_cols[unit_cols] = False
    if bool((q[rows][:, live_cols] != 0).any()):  # (not for eigenvectors: split nothing)
        unit_cols, rows, live_cols = unit_cols[:0], rows[:0], torch.ones_like(live_cols)
    live_rows = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    live_rows[rows] = False
    live_rows, live_cols = live_rows.nonzero()[:, 0], live_cols.nonzero()[:, 0]
    live = q[live_rows][:, live_cols] if unit_cols.numel() else q
    live = pad_square(live, padded_width(live.shape[0]))
    return Eigenbasis(live, live_rows, live_cols, rows, unit_cols)


def add_weight_corrections(
    out: Tensor,
    a: Tensor,
    g: Tensor,
    q_g: Tensor,
    basis: Eigenbasis,
    alpha: float = 1.0,
    budget: int = 2**21,
) -> Tensor:
    """:func:`add_corrections` of a weight block in a split ``basis``: the live columns
    rotated, the unit ones copied (skipped where ``a`` is zero there, as padding is)."""
    if not basis.unit_cols.numel():
        return add_corrections(out, a, g, q_g, basis.live, alpha, budget=budget)
    part = out.new_zeros(out.shape[0], basis.live_cols.numel())
    out[:, basis.live_cols] += add_corrections(
        part, a[..., basis.live_rows], g, q_g, basis.live, alpha, budget=budget
    )
    copied = a[..., basis.unit_rows]
    if bool(copied.any()):
        part = out.new_zeros(out.shape[0], basis.unit_cols.numel())
        out[:, basis.unit_cols] += add_corrections(part, copied, g, q_g, None, alpha, budget=budget)
    return out


def _gramian(x: Tensor, y: Tensor) -> Tensor:
    """``Σ_{n,s,t} (Σ_v y_vs ∘ y_vt)(x_s ∘ x_t)ᵀ`` of rotated rows ``x: [n, S, D2]`` and
    ``y: [V, n, S, D1]``, over the pairs ``s <= t`` (each ``s < t`` twice)."""
    s = x.shape[1]
    if s == 1:
        return y.square().sum(0)[:, 0].T @ x[:, 0].square()
    first, second = torch.triu_indices(s, s, device=x.device)
    weight = torch.where(first == second, 1.0, 2.0).to(x.dtype)
    xs = x[:, first] * x[:, second] * weight[:, None]  # [n, pairs, D2]
    ys = (y[:, :, first] * y[:, :, second]).sum(0)  # [n, pairs, D1]
    return ys.reshape(-1, ys.shape[-1]).T @ xs.reshape(-1, xs.shape[-1])


def chunk_samples(
    locations: int, d_out: int, d_in: int, vectors: int, budget: int, method: str
) -> int:
    """Samples per chunk so that a chunk's rows, their rotations and (``gramian``) their
    pair products fit ``budget`` elements (per-example gradients are formed a few at a
    time, see :func:`add_corrections`)."""
    d_in = padded_width(d_in)
    per_sample = 2 * locations * (d_in + vectors * d_out)
    if method == "gramian":
        per_sample += locations * (locations + 1) // 2 * (d_in + d_out)
    return max(1, budget // max(per_sample, 1))
