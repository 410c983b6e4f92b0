"""A convolution's hyper-parameters, normalised and checked (``docs/formats.md``,
"Convolutions").

``ConvParams`` holds kernel, stride, dilation, padding and groups for N = 1, 2, 3 spatial
dims. Padding is kept as the user gave it (an int per dim, a ``(left, right)`` pair per dim,
``'same'`` or ``'valid'``) and resolved to explicit ``(left, right)`` pairs by
:meth:`ConvParams.pads`, exactly as PyTorch does: ``'same'`` has total ``D*(K-1)`` with the
odd one on the right. Pure Python: no torch import.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import prod

from kfac_cli.errors import KfacError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

Padding = str | tuple[int, ...] | tuple[tuple[int, int], ...]


def _tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    out = tuple(value)
    if len(out) == 1 and n > 1:
        out = out * n
    if len(out) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise KfacError(None, None, f"{what} as an int or {n} ints", repr(value))
    return out


@dataclass(frozen=True)
class ConvParams:
    """Hyper-parameters of an N-d convolution, N = ``len(kernel_size)``.

    Build one with :meth:`create`, which accepts PyTorch's forms (ints, tuples, strings).
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Padding
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def create(
        cls,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] | Sequence[Sequence[int]] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        n: int | None = None,
    ) -> ConvParams:
        """Normalise PyTorch-style hyper-parameters and check them.

        Args:
            kernel_size: ``K`` as an int or one int per spatial dim.
            stride: ``S``, likewise.
            padding: An int, one int per dim, one ``(left, right)`` pair per dim,
                ``'same'`` or ``'valid'``.
            dilation: ``D``, likewise.
            groups: Number of channel groups ``G``.
            padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
            n: Number of spatial dims; inferred from ``kernel_size`` if it is a tuple.

        Raises:
            KfacError: For invalid values (e.g. stride 2 with ``'same'``).
        """
        if n is None:
            n = 1 if isinstance(kernel_size, int) else len(tuple(kernel_size))
        if n not in (1, 2, 3):
            raise KfacError(None, None, "1, 2 or 3 spatial dims", f"{n}")
        k = _tuple(kernel_size, n, "kernel_size")
        s = _tuple(stride, n, "stride")
        d = _tuple(dilation, n, "dilation")
        pad: Padding
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise KfacError(None, None, "padding 'same', 'valid' or ints", repr(padding))
            pad = padding
        elif isinstance(padding, int) or all(isinstance(p, int) for p in padding):
            pad = _tuple(padding, n, "padding")  # type: ignore[arg-type]
        else:
            pairs = tuple(tuple(p) for p in padding)  # type: ignore[union-attr]
            if len(pairs) != n or not all(
                len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs
            ):
                raise KfacError(None, None, f"padding as {n} (left, right) pairs", repr(padding))
            pad = pairs  # type: ignore[assignment]
        params = cls(k, s, pad, d, int(groups), padding_mode)
        params.check()
        return params

    @property
    def ndim(self) -> int:
        """Number of spatial dims N."""
        return len(self.kernel_size)

    def check(self) -> None:
        """Raise :class:`KfacError` for values no convolution accepts."""
        for what, vals in (
            ("kernel_size", self.kernel_size),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ):
            if any(v < 1 for v in vals):
                raise KfacError(None, None, f"positive {what}", str(list(vals)))
        if self.groups < 1:
            raise KfacError(None, None, "groups >= 1", str(self.groups))
        if self.padding_mode not in PADDING_MODES:
            raise KfacError(
                None, None, f"padding_mode in {', '.join(PADDING_MODES)}", repr(self.padding_mode)
            )
        if self.padding == "same" and any(v != 1 for v in self.stride):
            raise KfacError(
                None, None, "stride 1 with padding 'same'", f"stride {list(self.stride)}"
            )
        if any(v < 0 for pair in self.pads() for v in pair):
            raise KfacError(None, None, "non-negative padding", repr(self.padding))

    def pads(self) -> tuple[tuple[int, int], ...]:
        """Explicit ``(left, right)`` padding per spatial dim."""
        if self.padding == "valid":
            return ((0, 0),) * self.ndim
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        if all(isinstance(p, int) for p in self.padding):
            return tuple((p, p) for p in self.padding)  # type: ignore[misc]
        return tuple(tuple(p) for p in self.padding)  # type: ignore[misc]

    def dims(self, input_size: Sequence[int]) -> Iterator[tuple[int, int, int, int, int, int]]:
        """Per spatial dim: input size, kernel, stride, dilation, left padding, output size."""
        lefts = (left for left, _ in self.pads())
        return zip(
            input_size,
            self.kernel_size,
            self.stride,
            self.dilation,
            lefts,
            self.output_size(input_size),
        )

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """``O = floor((I + P_l + P_r - D*(K-1) - 1) / S) + 1`` per spatial dim.

        Raises:
            KfacError: If the kernel is larger than the padded input in some dim.
        """
        out = []
        for i, k, s, d, (pl, pr) in zip(
            input_size, self.kernel_size, self.stride, self.dilation, self.pads()
        ):
            span = d * (k - 1) + 1
            if i + pl + pr < span:
                raise KfacError(
                    None,
                    None,
                    f"a padded spatial size of at least {span} (kernel {list(self.kernel_size)}, "
                    f"dilation {list(self.dilation)})",
                    f"input size {list(input_size)} with padding {[list(p) for p in self.pads()]}",
                )
            out.append((i + pl + pr - span) // s + 1)
        return tuple(out)

    def reads_every_input(self, input_size: Sequence[int]) -> bool:
        """Whether every input element lies in some output location's window (not so when
        the stride steps over the kernel's taps, or windows end before the input does)."""
        return _reads_every_input(self, tuple(input_size))

    def check_input(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Check an input shape ``[B, C_in, I_1..I_N]``; return the output size ``O``.

        Raises:
            KfacError: For a wrong rank, channels not divisible by groups, too small a size,
                or a reflect padding wider than the input.
        """
        n = self.ndim
        if len(shape) != n + 2:
            dims = ", ".join(["B", "C_in", *(f"I{i + 1}" for i in range(n))])
            raise KfacError(None, None, f"rank {n + 2} [{dims}]", f"shape {list(shape)}")
        if shape[1] % self.groups:
            raise KfacError(
                None, None, f"C_in divisible by groups={self.groups}", f"C_in={shape[1]}"
            )
        spatial = tuple(shape[2:])
        if self.padding_mode == "reflect" and any(
            max(p) >= i for i, p in zip(spatial, self.pads())
        ):
            raise KfacError(
                None, None, "reflect padding smaller than the input", f"input size {list(spatial)}"
            )
        if self.padding_mode == "circular" and any(
            max(p) > i for i, p in zip(spatial, self.pads())
        ):
            raise KfacError(
                None,
                None,
                "circular padding no larger than the input",
                f"input size {list(spatial)}",
            )
        return self.output_size(spatial)

    def patch_size(self, in_channels: int) -> int:
        """Columns of a patch: ``(C_in/G) * K_1 * ... * K_N``."""
        return in_channels // self.groups * prod(self.kernel_size)

    def to_json(self) -> dict:
        """JSON form (the layer spec's hyper-parameter fields)."""
        pad = (
            self.padding
            if isinstance(self.padding, str)
            else [list(p) if isinstance(p, tuple) else p for p in self.padding]
        )
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": pad,
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }


@lru_cache(maxsize=256)
def _reads_every_input(params: ConvParams, size: tuple[int, ...]) -> bool:
    for i, k, s, d, left, o in params.dims(size):
        read = {start + j * d - left for start in range(0, o * s, s) for j in range(k)}
        if not read.issuperset(range(i)):
            return False
    return True
