"""The canonical layout against docs/formats.md's formula written out by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kfac_cli.errors import KfacError
from kfac_cli.ops.canonical import block_shape, check_groups, from_canonical, to_canonical

SHAPES = {
    "conv.weight": (5, 6, 4, 4),
    "conv.bias": (5,),
    "c1.weight": (3, 2, 5),
    "c3.weight": (2, 3, 2, 2, 2),
    "c3.bias": (2,),
    "bn.weight": (5,),
    "fc.weight": (7, 9),
    "fc.bias": (7,),
}
JOINT = [
    {"W": "conv.weight", "b": "conv.bias"},
    {"W": "c1.weight"},
    {"W": "c3.weight", "b": "c3.bias"},
    {"b": "bn.weight"},
    {"W": "fc.weight", "b": "fc.bias"},
]
SEPARATE = [
    {"W": "conv.weight"},
    {"b": "conv.bias"},
    *JOINT[1:2],
    {"W": "c3.weight"},
    {"b": "c3.bias"},
    {"b": "bn.weight"},
    {"W": "fc.weight"},
    {"b": "fc.bias"},
]


def _tensors(lead=(), trail=(), dtype=torch.float64):
    return {n: torch.randn(*lead, *s, *trail, dtype=dtype) for n, s in SHAPES.items()}


def test_spec_example_block_length():
    blocks = to_canonical(_tensors(), JOINT)
    assert blocks[0].shape == (5 * (6 * 4 * 4 + 1),) == (485,)


def test_joint_block_by_hand():
    """Index o*(rest+1)+j holds W[o].flatten()[j] for j < rest and b[o] for j == rest."""
    t = _tensors()
    block = to_canonical(t, JOINT)[0]
    w, b = t["conv.weight"], t["conv.bias"]
    rest = 6 * 4 * 4
    for o in range(5):
        for j in range(rest):
            assert block[o * (rest + 1) + j] == w[o].flatten()[j]
        assert block[o * (rest + 1) + rest] == b[o]


def test_columns_and_matrix_layout_by_hand():
    t = _tensors(trail=(3,))
    flat = to_canonical(t, JOINT, trail=1)[4]
    mat = to_canonical(t, JOINT, trail=1, layout="matrix")[4]
    w, b = t["fc.weight"], t["fc.bias"]
    assert mat.shape == (7, 10, 3) and flat.shape == (70, 3)
    for c in range(3):
        expected = torch.cat([w[..., c], b[:, None, c]], dim=1)
        assert torch.equal(mat[..., c], expected)
        assert torch.equal(flat[:, c], expected.flatten())


@pytest.mark.parametrize("layout", ["flat", "matrix"])
@pytest.mark.parametrize("groups", [JOINT, SEPARATE], ids=["joint", "separate"])
@pytest.mark.parametrize(
    "lead, trail",
    [((), ()), ((), (4,)), ((3,), ()), ((3,), (2,))],
    ids=["vector", "columns", "batch", "batch-columns"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_round_trip_is_bit_exact(layout, groups, lead, trail, dtype):
    t = _tensors(lead, trail, dtype)
    kw = dict(lead=len(lead), trail=len(trail), layout=layout)
    blocks = to_canonical(t, groups, SHAPES, **kw)
    back = from_canonical(blocks, groups, SHAPES, **kw)
    assert list(back) == list(SHAPES)
    for name in SHAPES:
        assert back[name].dtype == dtype
        assert torch.equal(back[name], t[name])


@pytest.mark.parametrize("groups", [JOINT, SEPARATE], ids=["joint", "separate"])
def test_from_canonical_is_the_adjoint(groups):
    """<P v, w> == <v, P^T w> with P = to_canonical and P^T = from_canonical."""
    v = _tensors(trail=(2,))
    blocks_w = [torch.randn_like(b) for b in to_canonical(v, groups, trail=1)]
    lhs = sum((p * w).sum() for p, w in zip(to_canonical(v, groups, trail=1), blocks_w))
    back = from_canonical(blocks_w, groups, SHAPES, trail=1)
    rhs = sum((v[n] * back[n]).sum() for n in SHAPES)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_separate_blocks_are_flattened_parameters():
    t = _tensors()
    blocks = to_canonical(t, SEPARATE)
    assert torch.equal(blocks[0], t["conv.weight"].flatten())
    assert torch.equal(blocks[1], t["conv.bias"])


@settings(max_examples=40, deadline=None)
@given(
    c_out=st.integers(1, 4),
    rest=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    cols=st.integers(0, 2),
    joint=st.booleans(),
)
def test_hypothesis_round_trip(c_out, rest, cols, joint):
    shapes = {"w": (c_out, *rest), "b": (c_out,)}
    groups = [{"W": "w", "b": "b"}] if joint else [{"W": "w"}, {"b": "b"}]
    trail = (cols,) if cols else ()
    t = {n: torch.randn(*s, *trail) for n, s in shapes.items()}
    blocks = to_canonical(t, groups, shapes, trail=len(trail))
    n = sum(b.shape[0] for b in blocks)
    assert n == c_out * (torch.tensor(rest).prod().item() + 1)
    back = from_canonical(blocks, groups, shapes, trail=len(trail))
    assert all(torch.equal(back[k], t[k]) for k in shapes)


@pytest.mark.parametrize(
    "groups, match",
    [
        (JOINT[:-1], "in none: fc.weight, fc.bias"),
        ([*JOINT, {"b": "fc.bias"}], "exactly one group"),
        ([*JOINT, {"W": "nope.weight"}], "unknown name"),
        ([{"W": "conv.weight", "b": "fc.bias"}, *JOINT[1:]], "a bias of shape \\[5\\]"),
        ([{"X": "conv.weight"}], "a group"),
    ],
    ids=["missing", "twice", "unknown", "bias-length", "bad-key"],
)
def test_inconsistent_groups(groups, match):
    with pytest.raises(KfacError, match=match):
        check_groups(SHAPES, groups)


def test_wrong_tensor_shape_is_refused():
    t = _tensors()
    t["fc.weight"] = torch.randn(7, 8)
    with pytest.raises(KfacError, match=r"fc.weight: expected shape \[7, 9\]"):
        to_canonical(t, JOINT, SHAPES)


def test_block_shapes():
    assert block_shape(check_groups(SHAPES, JOINT)[0], SHAPES, "matrix") == (5, 97)
    assert block_shape(check_groups(SHAPES, JOINT)[3], SHAPES, "matrix") == (5, 1)
