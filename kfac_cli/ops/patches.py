"""Patches (KFAC-expand) and averaged patches (KFAC-reduce) of convolution inputs.

Layouts, as ``docs/formats.md`` fixes them, for an input ``x: [B, C_in, I_1..I_N]``:

- ``patches``: ``[B, O_1*...*O_N, (C_in/G)*K_1*...*K_N]``; rows are output locations in
  row-major order, columns ``(c, k_1, ..., k_N)`` with ``c`` slowest, matching
  ``W.flatten(1)``. So ``patches[b] @ W.flatten(1).T == conv(x, W)[b].flatten(1).T``.
- ``averaged``: ``[B, (C_in/G)*K_1*...*K_N]``, the mean of ``patches`` over its rows,
  computed without materialising ``patches``.

Channel groups are averaged first (group index slow), and a ``bias_column`` appends a
column of ones (joint weight+bias treatment).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kfac_cli.enums import KFACType
from kfac_cli.errors import KfacError
from kfac_cli.ops.conv import ConvParams


def _check_dtype(x: Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise KfacError(None, None, "a floating-point dtype", f"dtype {x.dtype}")


def group_mean(x: Tensor, groups: int) -> Tensor:
    """Average the channel groups: ``[B, (G c), *I] -> [B, c, *I]`` (group index slow)."""
    if groups == 1:
        return x
    return rearrange(x, "b (g c) ... -> b g c ...", g=groups).mean(1)


def pad_input(x: Tensor, pads: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """Pad the spatial dims of ``[B, C, *I]`` with ``(left, right)`` per dim."""
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last dim first
    if not any(flat):
        return x
    if mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=mode)


def _with_bias_column(shape: Sequence[int], bias_column: bool, like: Tensor) -> Tensor:
    """An uninitialised ``[*shape[:-1], shape[-1] (+1)]`` buffer, the ones column filled."""
    out = torch.empty(
        (*shape[:-1], shape[-1] + int(bias_column)), dtype=like.dtype, device=like.device
    )
    if bias_column:
        out[..., -1] = 1
    return out


def conv_patches(
    x: Tensor,
    params: ConvParams,
    bias_column: bool = False,
    out: Tensor | None = None,
    *,
    taps_first: bool = False,
) -> Tensor:
    """KFAC-expand patches of a convolution input.

    Args:
        x: Input ``[B, C_in, I_1..I_N]``.
        params: The convolution's hyper-parameters (N = ``params.ndim``).
        bias_column: Append a column of ones.
        out: Optional buffer of the result's shape and dtype to write into (reusing one
            buffer avoids the cost of touching fresh memory); its rows may be columns of a
            wider one (``wide[..., :D]``).
        taps_first: Columns ``(k_1, ..., k_N, c)`` instead of the format's ``(c, k_1, ...,
            k_N)`` (the order factor sums accumulate in).

    Returns:
        ``[B, O_1*..*O_N, (C_in/G)*K_1*..*K_N (+1)]``.
    """
    _check_dtype(x)
    out_size = params.check_input(x.shape)
    x = group_mean(x, params.groups)
    batch, channels = x.shape[:2]
    cols = channels * prod(params.kernel_size)
    shape = (batch, prod(out_size), cols + int(bias_column))
    if out is None:
        out = _with_bias_column((*shape[:2], cols), bias_column, x)
    else:
        if tuple(out.shape) != shape or out.dtype != x.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be a {x.dtype} tensor of shape {shape}, rows dense")
        if bias_column:
            out[..., -1] = 1
    if taps_first:  # the same [B, O.., C, K..] view of columns (k.., c)
        dst = out[..., :cols].unflatten(2, (*params.kernel_size, channels)).movedim(-1, 2)
    else:
        dst = out[..., :cols].unflatten(2, (channels, *params.kernel_size))
    dst = dst.unflatten(1, out_size)
    if x.device.type != "cpu":  # one strided-copy kernel beats many small launches
        _copy_strided(pad_input(x, params.pads(), params.padding_mode), params, out_size, dst)
        return out
    sample_bytes = max(1, prod(shape[1:]) * out.element_size())
    step = max(1, CACHE_CHUNK_BYTES // sample_bytes)
    zeros = params.padding_mode == "zeros"
    for start in range(0, batch, step):
        xb, part = x[start : start + step], dst[start : start + step]
        if channels >= MIN_CHANNELS_FOR_TAPS:
            # Zero padding is never materialised: taps copy what they read, zero the rest.
            pads = params.pads() if zeros else tuple((0, 0) for _ in out_size)
            xp = xb if zeros else pad_input(xb, params.pads(), params.padding_mode)
            _copy_per_tap(xp, pads, params, out_size, part)
        else:
            _copy_strided(pad_input(xb, params.pads(), params.padding_mode), params, out_size, part)
    return out


# Tuned on a 2-core x86 VM (see benchmarks/): batch chunks whose output stays in cache, and
# one strided copy per kernel tap from a channels-last input once there are enough channels
# for the inner loop to pay off; for very few channels one copy of a strided view wins.
CACHE_CHUNK_BYTES = 4 * 2**20
MIN_CHANNELS_FOR_TAPS = 4


def _copy_per_tap(
    x: Tensor, pads: Sequence[tuple[int, int]], params: ConvParams, out_size, dst: Tensor
) -> None:
    """``dst[b, o.., c, k..] = x[b, c, o*S + k*D - P_left]`` (zero where that is padding).

    One strided copy per kernel tap ``k`` from a channels-last copy of ``x`` (channels
    become the inner loop); the output rows whose tap reads padding are zeroed instead.

    Args:
        x: Input ``[B, C, I_1..I_N]``, to be zero-padded by ``pads``.
        dst: View ``[B, O_1..O_N, C, K_1..K_N]`` of the output.
    """
    if prod(params.kernel_size) == 1 and not any(left or right for left, right in pads):
        window = tuple(slice(0, s * (o - 1) + 1, s) for s, o in zip(params.stride, out_size))
        src = x[(slice(None), slice(None), *window)].movedim(1, -1)
        dst[(Ellipsis, *(0,) * len(out_size))].copy_(src)
        return
    cl = x.movedim(1, -1).contiguous()  # [B, I_1..I_N, C]
    sizes = cl.shape[1:-1]
    for taps in itertools.product(*(range(k) for k in params.kernel_size)):
        tap = dst[(Ellipsis, *taps)]  # [B, O_1..O_N, C]
        src, out_rows, edges = [], [], []
        for n, (t, d, s, o, (left, _), size) in enumerate(
            zip(taps, params.dilation, params.stride, out_size, pads, sizes)
        ):
            lo, hi = _tap_outputs(size, left, t, s, d, o)
            src.append(_tap_window(size, left, t, s, d, o))
            out_rows.append(slice(lo, hi + 1))
            edges.append((n, lo, hi, o))
        if any(w is None for w in src):
            tap.zero_()
            continue
        tap[(slice(None), *out_rows)].copy_(cl[(slice(None), *src)])
        for n, lo, hi, o in edges:
            tap.narrow(1 + n, 0, lo).zero_()
            tap.narrow(1 + n, hi + 1, o - hi - 1).zero_()


def _copy_strided(xp: Tensor, params: ConvParams, out_size, dst: Tensor) -> None:
    """The same copy from one zero-copy strided view ``[B, O.., C, K..]`` of ``xp``."""
    xp = xp.contiguous()
    s_b, s_c, *s_i = xp.stride()
    view = xp.as_strided(
        dst.shape,
        (
            s_b,
            *(s * st for s, st in zip(params.stride, s_i)),
            s_c,
            *(d * st for d, st in zip(params.dilation, s_i)),
        ),
        xp.storage_offset(),
    )
    dst.copy_(view)


def _tap_outputs(size: int, pad_left: int, j: int, s: int, d: int, o: int) -> tuple[int, int]:
    """Outputs ``lo..hi`` whose tap ``j`` reads inside the input (``o*S + j*D - P_left``)."""
    first = j * d - pad_left
    lo = 0 if first >= 0 else (s - 1 - first) // s
    hi = min(o - 1, (size - 1 - first) // s) if size - 1 - first >= 0 else -1
    return lo, hi


def _tap_window(size: int, pad_left: int, j: int, s: int, d: int, o: int) -> slice | None:
    """The inputs tap ``j`` reads, as a strided slice (``None`` if it reads only padding)."""
    lo, hi = _tap_outputs(size, pad_left, j, s, d, o)
    first = j * d - pad_left
    return slice(first + lo * s, first + hi * s + 1, s) if hi >= lo else None


class DimTaps:
    """One spatial dim's kernel taps: which inputs each reads, summed over output locations."""

    def __init__(self, size: int, pad_left: int, k: int, s: int, d: int, o: int) -> None:
        self.size, self.k, self.stride, self.dilation = size, k, s, d
        self.windows = [_tap_window(size, pad_left, j, s, d, o) for j in range(k)]

    @property
    def reading(self) -> list[int]:
        """The taps that read at least one input (the others read only padding)."""
        return [j for j, w in enumerate(self.windows) if w is not None]

    @property
    def cheap_sums(self) -> bool:
        """Whether window sums read the dim about once: a single window, stride and
        dilation 1 (windows are the whole dim less a few edge rows), or windows that
        do not overlap (stride >= extent of the kernel)."""
        return (
            len(self.reading) <= 1
            or (self.stride == 1 and self.dilation == 1)
            or self.stride >= (self.k - 1) * self.dilation + 1
        )

    def counts(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The index pattern summed over output locations: ``[K, I]`` of 0/1."""
        counts = torch.zeros(self.k, self.size, dtype=dtype)
        for j, window in enumerate(self.windows):
            if window is not None:
                counts[j, window] = 1
        return counts.to(device)

    def sums(self, t: Tensor, dim: int) -> Tensor:
        """Contract dim ``dim`` of ``t`` (size ``I``) with :meth:`counts`: size ``K`` instead.

        Each tap's sum is one strided slice sum; a stride-1 window covering most of the
        dim is the dim's total minus the few rows at its edges, so the data is read about
        once, not ``K`` times.
        """
        total = None
        taps = []
        for window in self.windows:
            if window is None:
                taps.append(t.narrow(dim, 0, 0).sum(dim))
                continue
            start, stop = window.start, window.stop
            if window.step == 1 and 2 * (stop - start) > self.size:
                if total is None:
                    total = t.sum(dim)
                tap = total
                if start > 0:
                    tap = tap - t.narrow(dim, 0, start).sum(dim)
                if stop < self.size:
                    tap = tap - t.narrow(dim, stop, self.size - stop).sum(dim)
            else:
                index = [slice(None)] * t.ndim
                index[dim] = window
                tap = t[tuple(index)].sum(dim)
            taps.append(tap)
        return torch.stack(taps, dim)


def one_window(dims: Sequence[DimTaps]) -> bool:
    """Whether at most one tap per dim reads inputs (the ``window`` method applies)."""
    return all(len(d.reading) <= 1 for d in dims)


def _single_window(x: Tensor, dims: Sequence[DimTaps]) -> Tensor:
    """At most one tap per dim reads inputs (1x1 kernels, dilations beyond the input):
    one strided window sum, the other taps zero."""
    if not one_window(dims):
        raise ValueError("the window method needs at most one reading tap per dim")
    out = x.new_zeros(x.shape[0], *(d.k for d in dims))
    if all(d.reading for d in dims):
        taps = tuple(d.reading[0] for d in dims)
        window = tuple(d.windows[j] for d, j in zip(dims, taps))
        out[(slice(None), *taps)] = x[(slice(None), *window)].sum(tuple(range(1, x.ndim)))
    return out


def _strided_sums(x: Tensor, dims: Sequence[DimTaps]) -> Tensor:
    """Strided window sums, one dim after the other, slow dims first."""
    for n, d in enumerate(dims):
        x = d.sums(x, 1 + n)
    return x


def _separable_products(x: Tensor, dims: Sequence[DimTaps]) -> Tensor:
    """One small product per dim, fastest dim first: ``[K_n, I_n] @ [I_n, rest]``.

    The data as the transposed right operand runs several times faster than as the left
    one (``[rest, I_n] @ [I_n, K_n]``) and leaves each result contiguous for the next dim.
    """
    m, spatial = x.shape[0], x.shape[1:]
    t = x.reshape(-1, spatial[-1]).T
    for n in reversed(range(len(dims))):
        t = dims[n].counts(x.dtype, x.device) @ t  # [K_n, K_n+1..K_N, M, I_1..I_n-1]
        if n:
            t = t.reshape(-1, spatial[n - 1]).T
    return t.reshape(*(d.k for d in dims), m).movedim(-1, 0)


# ``[M, I_1..I_N] -> [M, K_1..K_N]``: every tap's input window summed, exactly, three ways.
REDUCE_METHODS = {
    "window": _single_window,
    "strided": _strided_sums,
    "separable": _separable_products,
}


def tap_dims(params: ConvParams, spatial: Sequence[int]) -> list[DimTaps]:
    """Each spatial dim's taps for an input of size ``spatial`` (other padding modes than
    zeros pad the input first, so their taps read no padding)."""
    out_size = params.output_size(spatial)
    pads = params.pads()
    if params.padding_mode != "zeros":
        spatial = [size + left + right for size, (left, right) in zip(spatial, pads)]
        pads = tuple((0, 0) for _ in pads)
    return [
        DimTaps(size, left, k, s, d, o)
        for size, (left, _), k, s, d, o in zip(
            spatial, pads, params.kernel_size, params.stride, params.dilation, out_size
        )
    ]


# Tuned on a 2-core x86 VM (see benchmarks/): below this many input locations the per-op
# overheads of window sums outweigh their saving over small products.
SMALL_SPATIAL = 1024


def reduce_method(dims: Sequence[DimTaps]) -> str:
    """The fastest of :data:`REDUCE_METHODS` for this geometry.

    ``window`` when one tap per dim is left; ``strided`` when window sums read a large
    input about once; else ``separable``.
    """
    if one_window(dims):
        return "window"
    if prod(d.size for d in dims) > SMALL_SPATIAL and all(d.cheap_sums for d in dims):
        return "strided"
    return "separable"


def _group_sum(x: Tensor, groups: int) -> Tensor:
    """Sum the channel groups: ``[B, (G c), *I] -> [B, c, *I]`` as one batched product
    (PyTorch sums over a middle dim at half the speed of memory). Expand keeps
    :func:`group_mean`, whose summation order matches the reference bit for bit."""
    if groups == 1:
        return x
    batch = x.shape[0]
    stacked = x.reshape(batch, groups, -1)
    ones = x.new_ones(1, 1, groups).expand(batch, 1, groups)
    return torch.bmm(ones, stacked).reshape(batch, x.shape[1] // groups, *x.shape[2:])


def conv_averaged_patches(
    x: Tensor, params: ConvParams, bias_column: bool = False, *, method: str | None = None
) -> Tensor:
    """KFAC-reduce averaged patches of a convolution input, without unfolding.

    The input contracted with each spatial dim's index pattern summed over output
    locations (Dangel, 2023), by window sums or small matrix products: extra memory of
    the order of the input, never ``K_1*..*K_N`` times it.

    Args:
        x: Input ``[B, C_in, I_1..I_N]``.
        params: The convolution's hyper-parameters.
        bias_column: Append a column of ones.
        method: One of :data:`REDUCE_METHODS` (for tests and benchmarks); by default
            the fastest for the geometry (:func:`reduce_method`).

    Returns:
        ``[B, (C_in/G)*K_1*..*K_N (+1)]``, in ``x``'s dtype (float16 and bfloat16 inputs
        are summed in float32 and cast once at the end).
    """
    _check_dtype(x)
    out_size = params.check_input(x.shape)
    dims = tap_dims(params, x.shape[2:])
    narrow = x.dtype
    x = _group_sum(x.to(accumulation_dtype(narrow)), params.groups)
    if params.padding_mode != "zeros":
        x = pad_input(x, params.pads(), params.padding_mode)
    batch, channels, *spatial = x.shape
    method = method or reduce_method(dims)
    if method not in REDUCE_METHODS:
        raise ValueError(f"method must be one of {', '.join(REDUCE_METHODS)}, not {method!r}")
    t = REDUCE_METHODS[method](x.reshape(batch * channels, *spatial), dims)
    cols = channels * prod(params.kernel_size)
    out = _with_bias_column((batch, cols), bias_column, x)
    dst = out[:, :cols].unflatten(1, (channels, *params.kernel_size))
    torch.div(t.unflatten(0, (batch, channels)), prod(out_size) * params.groups, out=dst)
    return out.to(narrow)  # summed wide, cast once


def linear_patches(x: Tensor, bias_column: bool = False, out: Tensor | None = None) -> Tensor:
    """KFAC-expand input of a linear layer: ``[B, ..., d_in] -> [B, S, d_in (+1)]``
    (written into ``out`` if given, as :func:`conv_patches` does)."""
    _check_dtype(x)
    if x.ndim < 2:
        raise KfacError(None, None, "rank >= 2 [B, ..., d_in]", f"shape {list(x.shape)}")
    flat = x.reshape(x.shape[0], prod(x.shape[1:-1]), x.shape[-1])
    if out is None and not bias_column:
        return flat.contiguous()
    if out is None:
        out = _with_bias_column(flat.shape, True, flat)
    elif bias_column:
        out[..., -1] = 1
    out[..., : flat.shape[-1]] = flat
    return out


def linear_averaged_patches(x: Tensor, bias_column: bool = False) -> Tensor:
    """KFAC-reduce input of a linear layer: ``[B, ..., d_in] -> [B, d_in (+1)]``."""
    flat = linear_patches(x)
    out = _with_bias_column((flat.shape[0], flat.shape[2]), bias_column, flat)
    out[:, : flat.shape[2]] = flat.to(accumulation_dtype(flat.dtype)).mean(1)  # summed wide
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values run in: float32 for float16 and bfloat16 (their
    sums overflow and lose digits), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def extract_patches(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] | Sequence[Sequence[int]] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    bias_column: bool = False,
) -> Tensor:
    """KFAC-expand patches ``[B, O, (C_in/G)*K (+1)]`` of a conv input ``[B, C_in, *I]``.

    Hyper-parameters as in ``torch.nn.ConvNd``; N follows from ``x.ndim - 2``.
    """
    params = ConvParams.create(
        kernel_size, stride, padding, dilation, groups, padding_mode, n=x.ndim - 2
    )
    return conv_patches(x, params, bias_column)


def extract_averaged_patches(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] | Sequence[Sequence[int]] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    bias_column: bool = False,
) -> Tensor:
    """KFAC-reduce averaged patches ``[B, (C_in/G)*K (+1)]`` of a conv input ``[B, C_in, *I]``.

    Hyper-parameters as in ``torch.nn.ConvNd``; N follows from ``x.ndim - 2``.
    """
    params = ConvParams.create(
        kernel_size, stride, padding, dilation, groups, padding_mode, n=x.ndim - 2
    )
    return conv_averaged_patches(x, params, bias_column)


def output_shape(
    input_shape: Sequence[int],
    params: ConvParams | None,
    approx: KFACType | str,
    bias_column: bool = False,
) -> tuple[int, ...]:
    """Shape of :func:`layer_patches`' result, checked and computed without any data."""
    reduce = KFACType(approx) is KFACType.REDUCE
    if params is None:
        if len(input_shape) < 2:
            raise KfacError(None, None, "rank >= 2 [B, ..., d_in]", f"shape {list(input_shape)}")
        rows = prod(input_shape[1:-1])
        cols = input_shape[-1] + int(bias_column)
        return (input_shape[0], cols) if reduce else (input_shape[0], rows, cols)
    out_size = params.check_input(input_shape)
    cols = params.patch_size(input_shape[1]) + int(bias_column)
    return (input_shape[0], cols) if reduce else (input_shape[0], prod(out_size), cols)


def layer_patches(
    x: Tensor,
    params: ConvParams | None,
    approx: KFACType | str,
    bias_column: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Dispatch on layer kind (``params is None``: linear) and approximation.

    ``out`` (expand of a conv only) is a buffer to write into; other cases ignore it.
    """
    reduce = KFACType(approx) is KFACType.REDUCE
    if params is None:
        return linear_averaged_patches(x, bias_column) if reduce else linear_patches(x, bias_column)
    if reduce:
        return conv_averaged_patches(x, params, bias_column)
    return conv_patches(x, params, bias_column, out)
