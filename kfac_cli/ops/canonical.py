"""The canonical parameter layout (``docs/formats.md``, "Canonical layout").

A tensor in parameter space is one tensor per parameter, ``[*lead, *param_shape, *trail]``,
with ``lead`` leading axes (e.g. a per-sample axis ``N``) and ``trail`` trailing columns
(``C`` vectors at once). Canonical form is one tensor per parameter group (KFAC block):

- joint ``{"W": w, "b": b}``: ``cat([W.reshape(C_out, rest), b[:, None]], 1)``, i.e.
  ``[*lead, C_out, rest+1, *trail]`` (``layout="matrix"``) or flattened to
  ``[*lead, C_out*(rest+1), *trail]`` (``layout="flat"``). The bias of output unit ``o``
  sits at flat index ``o*(rest+1) + rest``.
- separate ``{"W": w}`` or ``{"b": b}``: the parameter flattened, ``[*lead, numel, *trail]``
  (``matrix`` keeps ``[C_out, rest]`` for a weight and ``[C_out, 1]`` for a bias).

Example: Conv2d(6→5, k=4) joint is one block of length ``5*(6*4*4+1) = 485``.
:func:`from_canonical` is the exact inverse and, being a permutation, the adjoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

from kfac_cli.enums import Layout
from kfac_cli.errors import KfacError


@dataclass(frozen=True)
class ParamGroup:
    """One KFAC block: a weight and/or a bias, by parameter name."""

    W: str | None = None
    b: str | None = None

    @classmethod
    def parse(cls, group: ParamGroup | Mapping[str, str]) -> ParamGroup:
        """Accept ``ParamGroup`` or the format's ``{"W": ..., "b": ...}`` dicts."""
        if isinstance(group, ParamGroup):
            return group
        unknown = set(group) - {"W", "b"}
        if unknown or not group:
            raise KfacError(None, None, 'a group {"W": name, "b": name}', repr(dict(group)))
        return cls(group.get("W"), group.get("b"))

    @property
    def names(self) -> tuple[str, ...]:
        """The group's parameter names, weight first."""
        return tuple(n for n in (self.W, self.b) if n is not None)

    @property
    def joint(self) -> bool:
        """Whether weight and bias form one block."""
        return self.W is not None and self.b is not None


def check_groups(
    shapes: Mapping[str, Sequence[int]], groups: Sequence[ParamGroup | Mapping[str, str]]
) -> list[ParamGroup]:
    """Parse the groups and check that they partition ``shapes`` consistently.

    Args:
        shapes: Parameter name to shape, in the model's order.
        groups: The parameter groups.

    Returns:
        The groups as :class:`ParamGroup`.

    Raises:
        KfacError: A parameter in no group or in two, an unknown name, or a joint bias
            whose length is not the weight's first dimension.
    """
    parsed = [ParamGroup.parse(g) for g in groups]
    seen: dict[str, int] = {}
    for i, g in enumerate(parsed):
        for name in g.names:
            if name not in shapes:
                raise KfacError(None, name, "a parameter of the model", "an unknown name")
            if name in seen:
                raise KfacError(
                    None,
                    name,
                    "each parameter in exactly one group",
                    f"groups {seen[name]} and {i}",
                )
            seen[name] = i
        if g.joint:
            w, b = tuple(shapes[g.W]), tuple(shapes[g.b])  # type: ignore[index]
            if len(w) < 2 or len(b) != 1 or b[0] != w[0]:
                raise KfacError(
                    None,
                    g.b,
                    f"a bias of shape [{w[0] if w else '?'}] for weight {g.W} {list(w)}",
                    f"shape {list(b)}",
                )
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise KfacError(
            None,
            missing[0],
            "each parameter in exactly one group",
            f"{len(missing)} parameter(s) in none: {', '.join(missing)}",
        )
    return parsed


def block_shape(g: ParamGroup, shapes: Mapping[str, Sequence[int]], layout: str) -> tuple[int, ...]:
    """Shape of a group's canonical block, without lead or trail axes."""
    if layout not in Layout:
        raise KfacError(None, None, f"layout in {', '.join(Layout)}", repr(layout))
    if g.joint:
        w = shapes[g.W]  # type: ignore[index]
        rows, cols = w[0], prod(w[1:]) + 1
    else:
        s = shapes[g.names[0]]
        if g.W is not None and len(s) >= 1:
            rows, cols = s[0], prod(s[1:])
        else:
            rows, cols = prod(s), 1
    return (rows, cols) if layout == "matrix" else (rows * cols,)


def _param_axes(t: Tensor, name: str, shape: Sequence[int], lead: int, trail: int) -> None:
    expected = len(shape) + lead + trail
    if t.ndim != expected or tuple(t.shape[lead : lead + len(shape)]) != tuple(shape):
        want = ["*lead"] * bool(lead) + [str(s) for s in shape] + ["C"] * trail
        raise KfacError(None, name, f"shape [{', '.join(want)}]", f"{list(t.shape)}")


def group_to_canonical(
    g: ParamGroup,
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]],
    *,
    lead: int = 0,
    trail: int = 0,
    layout: str = "flat",
) -> Tensor:
    """One group's tensors ``[*lead, *param_shape, *trail]`` to its canonical block.

    Returns:
        ``[*lead, *block_shape(g, shapes, layout), *trail]``.
    """
    for name in g.names:
        _param_axes(tensors[name], name, shapes[name], lead, trail)
    first = tensors[g.names[0]]
    lead_shape, trail_shape = first.shape[:lead], first.shape[first.ndim - trail :]
    for name in g.names[1:]:
        t = tensors[name]
        if t.shape[:lead] != lead_shape or t.shape[t.ndim - trail :] != trail_shape:
            raise KfacError(None, name, f"lead/trail axes as {g.names[0]}", f"{list(t.shape)}")
    rows_cols = block_shape(g, shapes, "matrix")
    if g.joint:
        w = tensors[g.W].reshape(*lead_shape, rows_cols[0], rows_cols[1] - 1, *trail_shape)  # type: ignore[index]
        b = tensors[g.b].unsqueeze(lead + 1)  # type: ignore[index]
        block = torch.cat([w, b], dim=lead + 1)
    else:
        block = first.reshape(*lead_shape, *rows_cols, *trail_shape)
    shape = block_shape(g, shapes, layout)
    return block.reshape(*lead_shape, *shape, *trail_shape)


def group_from_canonical(
    g: ParamGroup,
    block: Tensor,
    shapes: Mapping[str, Sequence[int]],
    *,
    lead: int = 0,
    trail: int = 0,
    layout: str = "flat",
) -> dict[str, Tensor]:
    """Inverse of :func:`group_to_canonical`: a block to ``{name: [*lead, *shape, *trail]}``."""
    shape = block_shape(g, shapes, layout)
    core = tuple(block.shape[lead : block.ndim - trail])
    if block.ndim != lead + len(shape) + trail or core != shape:
        raise KfacError(
            None,
            "/".join(g.names),
            f"a block of shape {list(shape)} (lead {lead}, trail {trail})",
            f"{list(block.shape)}",
        )
    lead_shape, trail_shape = block.shape[:lead], block.shape[block.ndim - trail :]
    rows, cols = block_shape(g, shapes, "matrix")
    m = block.reshape(*lead_shape, rows, cols, *trail_shape)
    if g.joint:
        w, b = m.split([cols - 1, 1], dim=lead + 1)
        return {
            g.W: w.reshape(*lead_shape, *shapes[g.W], *trail_shape).contiguous(),  # type: ignore[dict-item]
            g.b: b.reshape(*lead_shape, *shapes[g.b], *trail_shape).contiguous(),  # type: ignore[dict-item]
        }
    name = g.names[0]
    return {name: m.reshape(*lead_shape, *shapes[name], *trail_shape).contiguous()}


def to_canonical(
    tensors: Mapping[str, Tensor],
    groups: Sequence[ParamGroup | Mapping[str, str]],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    lead: int = 0,
    trail: int = 0,
    layout: str = "flat",
) -> list[Tensor]:
    """Parameter-space tensors to canonical blocks, in group order.

    Args:
        tensors: Name to ``[*lead, *param_shape, *trail]``.
        groups: The KFAC blocks, e.g. ``[{"W": "fc.weight", "b": "fc.bias"}]``.
        shapes: Parameter shapes; by default read off ``tensors`` (needs ``lead``/``trail``).
        lead: Number of leading axes (per-sample gradients: 1).
        trail: Number of trailing column axes (0 or 1).
        layout: ``flat`` or ``matrix``.

    Returns:
        One block per group, ``[*lead, *block, *trail]``.
    """
    if shapes is None:
        shapes = {n: tuple(t.shape[lead : t.ndim - trail]) for n, t in tensors.items()}
    parsed = check_groups(shapes, groups)
    extra = [n for n in tensors if n not in shapes]
    if extra:
        raise KfacError(None, extra[0], "only parameters of the groups", "an extra tensor")
    return [
        group_to_canonical(g, tensors, shapes, lead=lead, trail=trail, layout=layout)
        for g in parsed
    ]


def from_canonical(
    blocks: Sequence[Tensor],
    groups: Sequence[ParamGroup | Mapping[str, str]],
    shapes: Mapping[str, Sequence[int]],
    *,
    lead: int = 0,
    trail: int = 0,
    layout: str = "flat",
) -> dict[str, Tensor]:
    """Canonical blocks back to parameter space, in the order of ``shapes``.

    The exact inverse of :func:`to_canonical` and its adjoint.
    """
    parsed = check_groups(shapes, groups)
    if len(blocks) != len(parsed):
        raise KfacError(None, None, f"{len(parsed)} blocks", f"{len(blocks)}")
    out: dict[str, Tensor] = {}
    for g, block in zip(parsed, blocks):
        out.update(group_from_canonical(g, block, shapes, lead=lead, trail=trail, layout=layout))
    return {n: out[n] for n in shapes}
