"""The enumerations of docs/formats.md, as string enums whose ``in`` accepts values.

>>> "reduce" in KFACType, "foo" in KFACType
(True, False)
>>> FisherType("type-2") is FisherType.TYPE2
True
"""

from __future__ import annotations

from enum import Enum, EnumMeta


class _ValueContains(EnumMeta):
    """Enum metaclass whose ``in`` also accepts a member's value (``"expand" in KFACType``)."""

    def __contains__(cls, item: object) -> bool:
        if isinstance(item, cls):
            return True
        return any(item == member.value for member in cls)  # type: ignore[attr-defined]


class _Named(str, Enum, metaclass=_ValueContains):
    """A string enum that prints as its value (``str(KFACType.EXPAND) == "expand"``)."""

    def __str__(self) -> str:
        return self.value


class KFACType(_Named):
    """How a convolution's weight sharing is treated (Eschenhagen et al., 2023).

    - ``expand``: every output location is its own row; the input factor is built from
      patches ``[B, O, (C_in/G)·K]``.
    - ``reduce``: patches are averaged over output locations first; the input factor is
      built from averaged patches ``[B, (C_in/G)·K]``.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class FisherType(_Named):
    """Which curvature the gradient factor approximates.

    - ``type-2``: the exact Hessian of the loss w.r.t. the model outputs, one backward pass
      per output dimension.
    - ``mc``: gradients at labels sampled from the model's predictive distribution.
    - ``empirical``: gradients at the true labels (uncentred gradient covariance).
    - ``forward-only``: the gradient factor is the identity (FOOF, Benzing 2022; ISAAC,
      Petersen et al. 2023).
    """

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class LossReduction(_Named):
    """How a loss batch's per-example terms were combined: ``mean`` or ``sum``."""

    MEAN = "mean"
    SUM = "sum"


class Layout(_Named):
    """Canonical block layout: ``flat`` ``[C_out*(rest+1)]`` or ``matrix`` ``[C_out, rest+1]``."""

    FLAT = "flat"
    MATRIX = "matrix"


class ComputeDtype(_Named):
    """Floating-point dtypes a computation can run in, by name."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Untreated(_Named):
    """What ``apply`` does with tensors of parameters the factors do not cover."""

    KEEP = "keep"
    ZERO = "zero"
    DROP = "drop"
    ERROR = "error"
