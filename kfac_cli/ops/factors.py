"""Kronecker factors: sums of outer products of layer inputs and output gradients.

KFAC approximates a layer's curvature block by ``G ⊗ A`` (``docs/formats.md``, "Factors
file"). Per chunk of data these functions return *raw sums*; a job adds them up over all
chunks and files and scales once at the end:

- input factor: ``A = Σ_{b,o} a aᵀ / (N·O)`` (expand: the patches rows, ``O`` output
  locations per sample) or ``Σ_b ā āᵀ / N`` (reduce: averaged patches). With a joint bias
  the rows get a ones column, so the sum is ``[[Σ a aᵀ, Σ a], [Σ aᵀ, rows]]``: expand
  computes it without forming that column (``Σ a`` is the reduce kernel's window sum);
  reduce appends it to its few rows.
- gradient factor: ``G = c · Σ g gᵀ`` over backpropagated vectors, samples and (expand)
  output locations, or over samples of the location sums (reduce); ``c`` is
  :func:`loss_correction`.

The sums are added in place to the upper triangle of an accumulator (``out``, scaled by
``alpha``), and :func:`mirror_` makes it exactly symmetric once at the end: no temporary of a
factor's size, so memory is a chunk and one layer's factors. KFAC-reduce has a few rows per
chunk: :class:`RowGram` gathers them and folds a buffer of them at a time.

The expand input sum never materialises the patches of a stride-1 convolution: its
entries are sums of the same channel products at a few lags (``(2K-1)^N`` lags against
``K^{2N}`` tap pairs), so :func:`lag_covariance` computes one channel Gram matrix per lag
(half of them, by symmetry) on a zero-gapped channels-last copy of the input, and takes off
each tap pair's window edges with small sums over the boundary rows. Other convolutions
form their patches in cache-sized chunks and fold them at once, computing only the upper
block triangle of the symmetric product (:func:`gram`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from math import prod

import torch
from einops import rearrange
from torch import Tensor

from kfac_cli.enums import KFACType, LossReduction
from kfac_cli.ops.conv import ConvParams
from kfac_cli.ops.patches import (
    conv_averaged_patches,
    conv_patches,
    group_mean,
    linear_averaged_patches,
    pad_input,
)

# Tuned on a 2-core x86 VM (see tests/benchmarks): the symmetric product in GRAM_BLOCKS
# column blocks from GRAM_MIN columns on (6 blocks: 0.6-0.66x the time of the full
# product), patches formed PATCH_ROWS rows at a time (fewer make the product memory bound),
# and the cost of one small product in multiply-adds.
GRAM_MIN, GRAM_BLOCKS = 384, 6
PATCH_ROWS = 2048
WIDE_MAX = 1024
CROSS_ROWS = 4096
OP_OVERHEAD_FLOPS = 2e5
# A box of outputs summed apart (see conv_covariance): its few ops, and per element of its
# sum a pass over memory, in multiply-adds of a product on the same core.
BOX_OVERHEAD_FLOPS = 2e7
ELEMENT_PASS_FLOPS = 64


def gram(p: Tensor, out: Tensor | None = None, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``out = beta · out + alpha · pᵀ p`` for ``p: [R, D]`` (``out`` zeros if not given),
    ``[D, D]``; with ``beta = 0`` whatever ``out`` held is ignored (even NaN).

    Only the upper triangle of ``out`` is updated (a wide ``p`` computes only the upper
    block triangle: about half the work); call :func:`mirror_` once at the end.
    """
    d = p.shape[1]
    if out is None:
        out = p.new_zeros(d, d)
    if d < GRAM_MIN:
        return out.addmm_(p.T, p, alpha=alpha, beta=beta)
    block = -(-d // GRAM_BLOCKS // 16) * 16
    for i in range(0, d, block):
        out[i : i + block, i:].addmm_(p[:, i : i + block].T, p[:, i:], alpha=alpha, beta=beta)
    return out


class RowGram:
    """``Σ alpha · pᵀ p`` (its upper triangle) over blocks of rows ``p: [R, D]`` given in
    turn, for sums of a few rows per chunk (KFAC-reduce).

    The rows are gathered in a buffer of ``max_rows`` and folded by one product per full
    buffer (or change of ``alpha``) into the accumulator ``target()`` returns, asked for
    at the first fold (as late as possible) and overwritten by it: no zeroing, and one
    pass over a large accumulator per buffer instead of one per block.
    """

    def __init__(
        self,
        target: Callable[[], Tensor],
        max_rows: int,
        scratch: dict | None = None,
        name: str = "gram_rows",
    ) -> None:
        self.target, self.max_rows = target, max(1, max_rows)
        self.scratch, self.name = scratch, name
        self.out: Tensor | None = None
        self.buffer: Tensor | None = None
        self.filled, self.alpha = 0, 1.0

    def add(self, rows: Tensor, alpha: float = 1.0) -> None:
        if self.filled and alpha != self.alpha:
            self._fold()
        self.alpha = alpha
        if self.buffer is None:
            shape = (self.max_rows, rows.shape[1])
            self.buffer = scratch_buffer(self.scratch, self.name, shape, rows)
        while rows.shape[0]:
            take = min(rows.shape[0], self.max_rows - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled, rows = self.filled + take, rows[take:]
            if self.filled == self.max_rows:
                self._fold()

    def _fold(self) -> None:
        first = self.out is None
        if first:
            self.out = self.target()
        rows = self.buffer[: self.filled]  # type: ignore[index]
        gram(rows, self.out, self.alpha, beta=0.0 if first else 1.0)
        self.filled = 0

    def finish(self) -> Tensor:
        """The accumulator, every row folded in (zeros if there were none)."""
        if self.filled:
            self._fold()
        elif self.out is None:
            self.out = self.target().zero_()
        return self.out


def cross(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` of ``[R, C]`` matrices, in row blocks whose products are summed in float64
    (so a long sum loses no more than a block's rounding), returned in ``a``'s dtype."""
    if a.shape[0] <= CROSS_ROWS or a.dtype == torch.float64:
        return a.T @ b
    total = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], CROSS_ROWS):
        total += a[i : i + CROSS_ROWS].T @ b[i : i + CROSS_ROWS]
    return total.to(a.dtype)


def tap_order(channels: int, taps: int, bias: bool, device=None) -> Tensor:
    """``perm[i]``: the tap-major index (``k·C + c``) of the format's index ``i = c·K + k``
    (the bias, if any, last in both). Factor sums accumulate tap-major: a tap pair's
    ``C x C`` block is then contiguous."""
    perm = torch.arange(channels * taps, device=device).view(taps, channels).T.reshape(-1)
    if bias:
        perm = torch.cat([perm, perm.new_tensor([channels * taps])])
    return perm


def sum_order(
    channels: int, params: ConvParams | None, approx: KFACType | str, bias: bool, device=None
) -> Tensor | None:
    """The order :func:`input_covariance` accumulates in: tap-major (:func:`tap_order`) for
    the expand sums of a conv with several taps, the format's own (``None``) otherwise."""
    taps = 1 if params is None else prod(params.kernel_size)
    if taps == 1 or KFACType(approx) is KFACType.REDUCE:
        return None
    return tap_order(channels, taps, bias, device)


def reordered_rows(
    sym: Tensor,
    perm: Tensor | None,
    start: int = 0,
    stop: int | None = None,
    scratch: dict | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Rows ``start:stop`` of ``sym[perm][:, perm]`` (``perm`` from :func:`tap_order`;
    ``None``: no reordering, a view of ``sym``), or, given ``out`` (of the rows' shape, on
    any device: a host block for the writer), written into ``out`` and returned. Memory:
    the rows (in ``scratch`` buffers, reused from call to call, if given)."""
    if perm is None:
        rows = sym[start:stop]
        return rows if out is None else out.copy_(rows)
    t = perm[start:stop]
    rows = torch.index_select(
        sym, 0, t, out=scratch_buffer(scratch, "rows", (len(t), sym.shape[1]), sym)
    )
    if out is not None and out.device == sym.device and out.dtype == sym.dtype:
        return torch.index_select(rows, 1, perm, out=out)
    result = torch.index_select(rows, 1, perm, out=scratch_buffer(scratch, "out", rows.shape, sym))
    return result if out is None else out.copy_(result)  # from the device to the host block


def scratch_buffer(
    scratch: dict | None, name: str, shape: Sequence[int], like: Tensor, dtype=None
) -> Tensor:
    """An uninitialised ``shape`` tensor: fresh, or from ``scratch[name]`` (grown as needed),
    so that a loop over chunks does not touch fresh memory on every step."""
    dtype = dtype or like.dtype
    n = prod(shape)
    if scratch is None:
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)
    buf = scratch.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
        buf = scratch[name] = torch.empty(n, dtype=dtype, device=like.device)
    return buf[:n].view(tuple(shape))


def _taps_first(rows: Tensor, taps: int) -> Tensor:
    """``[R, C·K]`` columns ``(c, k)`` as ``(k, c)``."""
    return rows.unflatten(1, (-1, taps)).transpose(1, 2).reshape(rows.shape[0], -1)


def mirror_(s: Tensor, block: int = 256) -> Tensor:
    """Copy ``s``'s upper triangle onto its lower one, in place, block by block (no
    temporary of ``s``'s size): ``s`` becomes exactly symmetric."""
    n = s.shape[0]
    for i in range(0, n, block):
        diagonal = s[i : i + block, i : i + block]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
        for j in range(i + block, n, block):
            s[j : j + block, i : i + block] = s[i : i + block, j : j + block].T
    return s


def locations(input_shape: Sequence[int], params: ConvParams | None) -> int:
    """Output locations per sample ``O``: ``∏ O_n`` (conv) or ``∏`` middle dims (linear)."""
    if params is None:
        return prod(input_shape[1:-1])
    return prod(params.output_size(input_shape[2:]))


def input_covariance(
    x: Tensor,
    params: ConvParams | None,
    approx: KFACType | str,
    bias_column: bool = False,
    *,
    out: Tensor | None = None,
    alpha: float = 1.0,
    method: str | None = None,
    scratch: dict | None = None,
) -> Tensor:
    """``Σ a aᵀ`` over one chunk's rows: the full matrix, or added to an accumulator.

    Args:
        x: A layer input: ``[B, C_in, *I]`` (conv) or ``[B, ..., d_in]`` (linear).
        params: The conv's hyper-parameters (``None``: a linear layer).
        approx: ``expand`` (rows: every sample and output location) or ``reduce`` (rows:
            the averaged patches, one per sample).
        bias_column: Whether rows carry a ones column (joint weight and bias).
        out: An accumulator ``[D (+1), D (+1)]`` to add ``alpha`` times the sum to: its
            upper triangle, rows and columns in :func:`sum_order`.
        alpha: The scale (``1/O`` for expand, so that sums over chunks divide by ``N`` only).
        method: ``lags`` or ``patches`` (expand of a conv only; default: by geometry).
        scratch: Buffers to reuse from chunk to chunk (see :func:`scratch_buffer`).

    Returns:
        ``out``; without it, the symmetric sum in the format's order (``(c, k..)``, bias
        last).
    """
    if KFACType(approx) is KFACType.REDUCE:
        rows = reduce_rows(x, params, bias_column)
        if out is None:
            return mirror_(gram(rows))
        return gram(rows, out, alpha)
    taps = 1 if params is None else prod(params.kernel_size)
    rows = None if params is not None else x.reshape(-1, x.shape[-1])
    d = rows.shape[1] if rows is not None else params.patch_size(x.shape[1])
    full = out is None
    if full:
        out = x.new_zeros(d + bias_column, d + bias_column)
    weights = out[:d, :d]
    if rows is not None:
        gram(rows, weights, alpha)
        sums, count = rows.sum(0), rows.shape[0]
    else:
        conv_covariance(x, params, out=weights, alpha=alpha, method=method, scratch=scratch)
        o = locations(x.shape, params)
        sums = _taps_first(conv_averaged_patches(x, params).sum(0, keepdim=True), taps)[0] * o
        count = x.shape[0] * o
    if bias_column:
        out[:d, d].add_(sums, alpha=alpha)
        out[d, d] += alpha * count
    if not full:
        return out
    order = sum_order(d // taps, params, approx, bias_column, out.device)
    return reordered_rows(mirror_(out), order)


def reduce_rows(x: Tensor, params: ConvParams | None, bias_column: bool = False) -> Tensor:
    """The KFAC-reduce rows of a layer input, ``[B, D (+1)]``: the averaged patches of
    ``x: [B, C_in, *I]`` (conv) or the mean of ``x: [B, ..., d_in]`` over its middle dims
    (linear), with a ones column for a joint bias."""
    if params is None:
        return linear_averaged_patches(x, bias_column)
    return conv_averaged_patches(x, params, bias_column)


def expand_method(shape: Sequence[int], params: ConvParams) -> str:
    """``lags`` or ``patches``, whichever the operation count says is cheaper."""
    return min(_expand_costs(shape, params).items(), key=lambda kv: kv[1])[0]


def _expand_costs(shape: Sequence[int], params: ConvParams) -> dict[str, float]:
    """Estimated operations of each method that applies (``lags``: stride 1, > 1 tap)."""
    batch, channels, *size = shape
    channels //= params.groups
    if params.padding_mode != "zeros":
        size = [i + left + right for i, (left, right) in zip(size, params.pads())]
    rows = batch * prod(params.output_size(shape[2:]))
    d = channels * prod(params.kernel_size)
    costs = {"patches": rows * d * d * 0.6 + rows * d * 4}
    if any(s != 1 for s in params.stride) or prod(params.kernel_size) == 1:
        return costs
    gapped = [i + (k - 1) * dd for i, k, dd in zip(size, params.kernel_size, params.dilation)]
    lags = (prod(2 * k - 1 for k in params.kernel_size) + 1) // 2
    edge = sum((k - 1) * dd / i for i, k, dd in zip(gapped, params.kernel_size, params.dilation))
    pairs = prod(params.kernel_size) ** 2 // 2
    lag_flops = lags * batch * prod(gapped) * channels**2 * (1 + edge)
    costs["lags"] = lag_flops + pairs * (2 ** len(size)) * (channels**2 + OP_OVERHEAD_FLOPS)
    return costs


def conv_covariance(
    x: Tensor,
    params: ConvParams,
    *,
    out: Tensor | None = None,
    alpha: float = 1.0,
    method: str | None = None,
    scratch: dict | None = None,
    split: bool | None = None,
) -> Tensor:
    """``Σ_{b,o} p pᵀ`` over the expand patches of ``x: [B, C_in, *I]``, ``[D, D]``.

    With ``out``: added (times ``alpha``) to its upper triangle, rows and columns in
    tap-major order; without: the symmetric sum in the format's order ``(c, k..)``.
    Padding is never multiplied where that is cheaper: kernel taps that read only zero
    padding (large dilations) give zero rows and columns and are left out, and where
    dilated taps read padding at many outputs (a 3x3 conv of dilation 12 on a 28x28 map:
    half the patches' entries), the outputs are split into boxes inside which the same
    taps read inputs, each summed over those taps alone (:func:`_tap_boxes`); ``split``
    forces that (``True``) or its opposite (``False``), by default the operation count
    decides. ``method`` forces ``lags`` or ``patches`` (default: by the count, per box).
    """
    full = out is None
    channels = x.shape[1] // params.groups
    taps = prod(params.kernel_size)
    if full:
        out = x.new_zeros(channels * taps, channels * taps)
    boxes = _tap_boxes(x.shape[2:], params)
    if boxes is None:
        _covariance(x, params, out, alpha, method, scratch)
    plan = _cheaper_plan(x.shape, params, boxes or [], method, split)
    # boxes of a split: patches (the lags' edges would be most of a small box's sums)
    box_method = method or ("patches" if len(plan) > 1 else None)
    for outs, box_taps in plan:
        crop, sub = _box_problem(x, params, outs, box_taps)
        if prod(sub.kernel_size) == taps:  # every tap: straight into out
            _covariance(crop, sub, out, alpha, box_method, scratch)
            continue
        width = channels * prod(sub.kernel_size)
        part = scratch_buffer(scratch, "box", (width, width), x).zero_()
        _covariance(crop, sub, part, alpha, box_method, scratch)
        index = [
            sum(k * step for k, step in zip(tap, _strides(params.kernel_size)))
            for tap in itertools.product(*box_taps)
        ]
        dense = out.view(taps, channels, taps, channels)
        pieces = part.view(len(index), channels, len(index), channels)
        for a, ta in enumerate(index):
            for b in range(a, len(index)):
                dense[ta, :, index[b], :].add_(pieces[a, :, b, :])
    if not full:
        return out
    return reordered_rows(mirror_(out), tap_order(channels, taps, False, out.device))


Box = tuple[tuple[range, ...], tuple[range, ...]]  # outputs and taps, one range per dim


def _tap_boxes(size: Sequence[int], params: ConvParams) -> list[Box] | None:
    """Zero padding: the outputs split into boxes (one range of outputs per dim) inside
    which the same taps read inputs, each with those taps (a range per dim); boxes whose
    taps all read padding are left out. ``None`` for other padding modes."""
    if params.padding_mode != "zeros":
        return None
    per_dim = []
    for i, k, s, d, left, o in params.dims(size):
        cuts = {0, o}
        for j in range(k):  # tap j reads an input at outputs first..end-1
            first, end = -(-(left - j * d) // s), (i - 1 + left - j * d) // s + 1
            cuts.update(v for v in (first, end) if 0 < v < o)
        classes = []
        for a, b in itertools.pairwise(sorted(cuts)):  # the taps reading an input: a range
            reading = [j for j in range(k) if 0 <= a * s + j * d - left <= i - 1]
            taps = range(reading[0], reading[-1] + 1) if reading else range(0)
            classes.append((range(a, b), taps))
        per_dim.append(classes)
    boxes = [tuple(zip(*combo)) for combo in itertools.product(*per_dim)]
    return [(outs, taps) for outs, taps in boxes if all(len(t) for t in taps)]


def _cheaper_plan(
    shape: Sequence[int],
    params: ConvParams,
    boxes: list[Box],
    method: str | None,
    split: bool | None = None,
) -> list[Box]:
    """``boxes``, or one box of every output with the taps any of them reads (padding
    multiplied where it is read), whichever the operation count says is cheaper (or
    ``split`` says)."""
    if len(boxes) <= 1 or split:
        return boxes
    n = len(params.kernel_size)
    whole: Box = (
        tuple(range(o) for o in params.output_size(shape[2:])),
        tuple(
            range(min(b[1][m].start for b in boxes), max(b[1][m].stop for b in boxes))
            for m in range(n)
        ),
    )

    def cost(box: Box) -> float:
        crop, sub = _box_params(shape[2:], params, *box)
        costs = _expand_costs((shape[0], shape[1], *(c.stop - c.start for c in crop)), sub)
        taps = prod(sub.kernel_size)
        width = shape[1] // params.groups * taps
        scatter = 0 if taps == prod(params.kernel_size) else 2 * width * width  # zero, add
        compute = costs[method or ("patches" if box is not whole else min(costs, key=costs.get))]
        return compute + BOX_OVERHEAD_FLOPS + scatter * ELEMENT_PASS_FLOPS

    if split is False or cost(whole) <= sum(cost(b) for b in boxes):
        return [whole]
    return boxes


def _box_params(
    size: Sequence[int], params: ConvParams, outs: tuple[range, ...], taps: tuple[range, ...]
) -> tuple[tuple[slice, ...], ConvParams]:
    """The input crop and the convolution whose expand patches are those of outputs
    ``outs`` over taps ``taps`` (padding kept only where those still read it)."""
    crop, pads = [], []
    for i, s, d, (left, _), o, t in zip(
        size, params.stride, params.dilation, params.pads(), outs, taps
    ):
        start = o.start * s + t.start * d - left
        end = (o.stop - 1) * s + (t.stop - 1) * d - left + 1
        lo, hi = max(0, start), min(i, end)
        crop.append(slice(lo, hi))
        pads.append((lo - start, end - hi))
    sub = ConvParams(
        tuple(len(t) for t in taps), params.stride, tuple(pads), params.dilation, params.groups
    )
    return tuple(crop), sub


def _box_problem(
    x: Tensor, params: ConvParams, outs: tuple[range, ...], taps: tuple[range, ...]
) -> tuple[Tensor, ConvParams]:
    """:func:`_box_params` applied to ``x: [B, C, *I]``."""
    crop, sub = _box_params(x.shape[2:], params, outs, taps)
    return x[(slice(None), slice(None), *crop)], sub


def _strides(kernel: Sequence[int]) -> list[int]:
    """Row-major strides of a tap index ``(k_1, ..., k_N)``."""
    return [prod(kernel[n + 1 :]) for n in range(len(kernel))]


def _covariance(x: Tensor, params: ConvParams, out: Tensor, alpha: float, method, scratch):
    method = method or expand_method(x.shape, params)
    if method == "lags":
        if any(s != 1 for s in params.stride):
            raise ValueError("the lags method needs stride 1")
        return lag_covariance(x, params, out=out, alpha=alpha, scratch=scratch)
    if method == "patches":
        _patch_covariance(x, params, out, alpha, scratch)
        return out
    raise ValueError(f"method must be lags or patches, not {method!r}")


def _patch_covariance(
    x: Tensor, params: ConvParams, out: Tensor, alpha: float, scratch: dict | None
) -> None:
    """Patches (tap-major columns) formed :data:`PATCH_ROWS` rows at a time, each chunk's
    symmetric product added to ``out``'s upper triangle."""
    x = group_mean(x, params.groups)
    plain = ConvParams(
        params.kernel_size, params.stride, params.padding, params.dilation, 1, params.padding_mode
    )
    batch, d = x.shape[0], plain.patch_size(x.shape[1])
    rows = locations(x.shape, plain)
    step = max(1, -(-PATCH_ROWS // max(rows, 1)))
    buf = scratch_buffer(scratch, "patches", (min(step, batch) * rows * d,), x)
    # Chunks' products summed in float64 (no more rounding than one chunk's product) where
    # that sum is small beside the patches.
    wide = step < batch and x.dtype != torch.float64 and d <= WIDE_MAX
    part = scratch_buffer(scratch, "part", (d, d), x) if wide else None
    total = scratch_buffer(scratch, "total", (d, d), x, torch.float64).zero_() if wide else None
    for start in range(0, batch, step):
        xb = x[start : start + step]
        chunk = buf[: xb.shape[0] * rows * d].view(-1, rows, d)
        p = conv_patches(xb, plain, out=chunk, taps_first=True).reshape(-1, d)
        if wide:
            total += gram(p, part.zero_())
        else:
            gram(p, out, alpha)
    if wide:
        out.add_(total.to(out.dtype), alpha=alpha)


def lag_covariance(
    x: Tensor,
    params: ConvParams,
    *,
    out: Tensor | None = None,
    alpha: float = 1.0,
    scratch: dict | None = None,
) -> Tensor:
    """``Σ_{b,o} p pᵀ`` of a stride-1 convolution from channel products at shared lags.

    Tap pair ``(k, k')`` of ``p pᵀ`` sums ``x[i] x[i+δ]ᵀ`` with ``δ = (k'-k)·D`` over the
    inputs ``i`` of tap ``k``'s window, a box; all pairs with the same ``δ`` share the sum
    over every ``i`` (one Gram matrix of a flat, zero-gapped copy of ``x``), less the
    box's edges (inclusion-exclusion over the spatial dims, from sums over single boundary
    rows, cells...). Blocks ``(k', k)`` are the transposes of ``(k, k')``.

    Args:
        x: Input ``[B, C_in, *I]`` of a stride-1 convolution.
        params: Its hyper-parameters.
        out: ``[(C_in/G)·∏K, (C_in/G)·∏K]`` to add ``alpha`` times the sum to: the
            blocks of tap pairs ``k <= k'``, rows and columns tap-major ``(k.., c)``.
        alpha: The scale.

    Returns:
        ``out`` (its upper block triangle updated).
    """
    x = group_mean(x, params.groups)
    pads = params.pads()
    if params.padding_mode != "zeros":
        x = pad_input(x, pads, params.padding_mode)
        pads = tuple((0, 0) for _ in pads)
    batch, channels, *size = x.shape
    out_size = (
        params.output_size(size)
        if params.padding_mode == "zeros"
        else tuple(i - (k - 1) * d for i, k, d in zip(size, params.kernel_size, params.dilation))
    )
    kernel, dilation = params.kernel_size, params.dilation
    gaps = [(k - 1) * d for k, d in zip(kernel, dilation)]
    z = scratch_buffer(
        scratch, "gapped", (batch, *(i + g for i, g in zip(size, gaps)), channels), x
    )
    z.zero_()
    z[(slice(None), *(slice(0, i) for i in size))] = rearrange(x, "b c ... -> b ... c")
    taps = list(itertools.product(*(range(k) for k in kernel)))
    if out is None:
        out = x.new_zeros(channels * len(taps), channels * len(taps))
    result = out.view(len(taps), channels, len(taps), channels)
    by_lag: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for a, ka in enumerate(taps):
        for b in range(a, len(taps)):
            delta = tuple((kb - k) * d for k, kb, d in zip(ka, taps[b], dilation))
            by_lag.setdefault(delta, []).append((a, b))
    for delta, pairs in by_lag.items():
        edges = _Edges(z, size, delta)
        for a, b in pairs:
            window = [
                (k * d - left, k * d - left + o)
                for k, d, (left, _), o in zip(taps[a], dilation, pads, out_size)
            ]
            result[a, :, b, :].add_(edges.box(window), alpha=alpha)
    return out


class _Edges:
    """For one lag ``δ``: ``Σ x[i] x[i+δ]ᵀ`` over any box of ``i``, by inclusion-exclusion
    from the sum over all ``i`` and cached sums over single boundary rows (cells...)."""

    def __init__(self, z: Tensor, size: Sequence[int], delta: Sequence[int]) -> None:
        self.z, self.size, self.delta = z, list(size), list(delta)
        self.valid = [(max(0, -d), min(i, i - d)) for i, d in zip(size, delta)]
        self.cache: dict[tuple, Tensor] = {}

    def _sum(self, fixed: tuple[tuple[int, int], ...]) -> Tensor:
        """``Σ x[i] x[i+δ]ᵀ`` over every ``i`` with ``i_n = e`` for each ``(n, e)`` fixed."""
        if fixed in self.cache:
            return self.cache[fixed]
        dims = dict(fixed)
        left = self.z[(slice(None), *(dims.get(n, slice(None)) for n in range(len(self.size))))]
        right = self.z[
            (
                slice(None),
                *(
                    dims[n] + self.delta[n] if n in dims else slice(None)
                    for n in range(len(self.size))
                ),
            )
        ]
        rest = [n for n in range(len(self.size)) if n not in dims]
        strides, step = [], 1
        for n in reversed(rest):
            strides.append(step)
            step *= self.z.shape[1 + n]
        offset = sum(self.delta[n] * s for n, s in zip(reversed(rest), strides))
        channels = self.z.shape[-1]
        left, right = left.reshape(-1, channels), right.reshape(-1, channels)
        rows = left.shape[0]
        if offset >= 0:
            total = cross(left[: rows - offset], right[offset:])
        else:
            total = cross(left[-offset:], right[: rows + offset])
        self.cache[fixed] = total
        return total

    def box(self, window: Sequence[tuple[int, int]]) -> Tensor:
        """The sum over ``i`` in the box ``window`` (one ``(begin, end)`` per dim)."""
        excluded = []
        for (lo, hi), (w_lo, w_hi) in zip(self.valid, window):
            b_lo, b_hi = max(lo, w_lo), min(hi, w_hi)
            if b_lo >= b_hi:
                return self.z.new_zeros(self.z.shape[-1], self.z.shape[-1])
            excluded.append([*range(lo, b_lo), *range(b_hi, hi)])
        total = self._sum(())
        for subset_size in range(1, len(self.size) + 1):
            sign = -1 if subset_size % 2 else 1
            for subset in itertools.combinations(range(len(self.size)), subset_size):
                for cells in itertools.product(*(excluded[n] for n in subset)):
                    total = total + sign * self._sum(tuple(zip(subset, cells)))
        return total


def gradient_covariance(
    g: Tensor,
    conv: bool,
    approx: KFACType | str,
    *,
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """Add ``alpha · Σ g gᵀ`` over one chunk of output gradients to the upper triangle of
    ``out`` (``[C_out, C_out]``; zeros, and the result mirrored, if not given).

    Args:
        g: ``[V, B, C_out, *O]`` (conv) or ``[V, B, ..., d_out]`` (linear): the gradients
            of ``V`` backpropagated vectors w.r.t. the layer's output.
        conv: Whether the layer is a convolution (channels second).
        approx: ``expand`` (a row per vector, sample and location) or ``reduce`` (a row
            per vector and sample: the sum over locations).
        out: The sum to add to.
        alpha: The scale (:func:`loss_correction`).
    """
    rows = gradient_rows(g, conv, approx)
    if out is None:
        return mirror_(gram(rows))
    return gram(rows, out, alpha)


def gradient_rows(g: Tensor, conv: bool, approx: KFACType | str) -> Tensor:
    """The rows of :func:`gradient_covariance`'s sum: ``[V·B·O, C_out]`` (expand) or
    ``[V·B, C_out]`` (reduce: each the sum over locations) of ``g`` as it describes."""
    reduce = KFACType(approx) is KFACType.REDUCE
    if conv:
        rows = rearrange(g, "v b c ... -> (v b) c (...)")
        return rows.sum(2) if reduce else rearrange(rows, "n c o -> (n o) c")
    rows = rearrange(g, "v b ... c -> (v b) (...) c")
    return rows.sum(1) if reduce else rearrange(rows, "n o c -> (n o) c")


def loss_correction(
    reduction: LossReduction | str, batch: int, terms: int, samples: int, mc_samples: int = 1
) -> float:
    """curvlinops' scale of a loss batch's gradient sum.

    Args:
        reduction: ``sum`` or ``mean`` (how the loss combined its per-example terms).
        batch: ``B``, the loss batch's samples.
        terms: ``T``, loss terms per sample (e.g. sequence positions).
        samples: ``N``, samples over all the data.
        mc_samples: Monte-Carlo samples per datum (1 unless the Fisher type is ``mc``).

    Returns:
        ``1/mc`` for ``sum``, ``(B·T)² / (N·mc·T)`` for ``mean``.
    """
    if LossReduction(reduction) is LossReduction.SUM:
        return 1.0 / mc_samples
    return (batch * terms) ** 2 / (samples * mc_samples * terms)
