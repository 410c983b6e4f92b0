"""Patches and averaged patches against independent oracles.

Oracles: PyTorch's own convolutions (docs/formats.md's defining property), brute-force loops on
tiny inputs, and the published curvlinops reference where it is defined.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kfac_cli.errors import KfacError
from kfac_cli.ops.conv import ConvParams
from kfac_cli.ops.patches import (
    REDUCE_METHODS,
    conv_averaged_patches,
    conv_patches,
    extract_averaged_patches,
    extract_patches,
    linear_averaged_patches,
    linear_patches,
    one_window,
    reduce_method,
    tap_dims,
)
from tests.conftest import DEVICES

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (id, N, C_in, input size, kwargs); kwargs as torch.nn.ConvNd takes them.
CASES = [
    ("1d-basic", 1, 3, (11,), dict(kernel_size=3)),
    ("1d-s2-d2-p", 1, 4, (13,), dict(kernel_size=3, stride=2, dilation=2, padding=2)),
    ("1d-same-k4", 1, 2, (9,), dict(kernel_size=4, padding="same")),
    ("1d-reflect", 1, 2, (10,), dict(kernel_size=3, padding=2, padding_mode="reflect")),
    ("2d-basic", 2, 3, (7, 6), dict(kernel_size=3)),
    ("2d-stride2", 2, 3, (9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ("2d-dil2", 2, 2, (10, 9), dict(kernel_size=3, dilation=2, padding=2)),
    ("2d-groups2", 2, 4, (6, 7), dict(kernel_size=3, groups=2, padding=1)),
    ("2d-depthwise", 2, 4, (6, 6), dict(kernel_size=3, groups=4, padding=1)),
    ("2d-same-k4", 2, 3, (7, 8), dict(kernel_size=4, padding="same")),
    ("2d-same-k4-d3", 2, 2, (9, 9), dict(kernel_size=(4, 2), dilation=(3, 1), padding="same")),
    ("2d-valid", 2, 2, (6, 5), dict(kernel_size=(2, 3), padding="valid")),
    ("2d-asym-kernel", 2, 3, (8, 9), dict(kernel_size=(1, 5), stride=(2, 1), padding=(0, 2))),
    ("2d-reflect", 2, 2, (6, 7), dict(kernel_size=3, padding=1, padding_mode="reflect")),
    ("2d-replicate", 2, 2, (6, 7), dict(kernel_size=3, padding=2, padding_mode="replicate")),
    (
        "2d-circular",
        2,
        4,
        (6, 7),
        dict(kernel_size=3, padding=1, padding_mode="circular", groups=2),
    ),
    (
        "2d-circular-same-k4",
        2,
        2,
        (6, 7),
        dict(kernel_size=4, padding="same", padding_mode="circular"),
    ),
    ("2d-stem-7x7-s2", 2, 3, (16, 16), dict(kernel_size=7, stride=2, padding=3)),
    ("2d-patchify", 2, 3, (16, 16), dict(kernel_size=4, stride=4)),
    ("3d-basic", 3, 2, (5, 6, 4), dict(kernel_size=3, padding=1)),
    (
        "3d-mixed",
        3,
        4,
        (6, 7, 5),
        dict(kernel_size=(2, 3, 1), stride=(1, 2, 1), dilation=(2, 1, 1), groups=2),
    ),
    ("3d-same-k2", 3, 2, (4, 5, 4), dict(kernel_size=2, padding="same")),
    ("3d-replicate", 3, 2, (4, 4, 5), dict(kernel_size=3, padding=1, padding_mode="replicate")),
    # Enough channels (after the group mean) for the per-tap copy path.
    ("1d-wide-d3", 1, 6, (17,), dict(kernel_size=4, dilation=3, padding=5, stride=2)),
    ("2d-wide-same-k4", 2, 8, (7, 6), dict(kernel_size=4, padding="same")),
    ("2d-wide-big-pad", 2, 6, (5, 6), dict(kernel_size=3, padding=(4, 7), dilation=(3, 4))),
    ("2d-wide-1x1-s2", 2, 5, (7, 8), dict(kernel_size=1, stride=2)),
    ("2d-wide-1x1-pad", 2, 5, (4, 3), dict(kernel_size=1, padding=1)),
    ("2d-wide-groups", 2, 12, (6, 6), dict(kernel_size=3, padding=1, groups=2)),
    ("2d-wide-reflect", 2, 6, (6, 7), dict(kernel_size=3, padding=2, padding_mode="reflect")),
    ("3d-wide", 3, 5, (5, 6, 4), dict(kernel_size=(3, 2, 3), padding=(1, 0, 2), stride=(2, 1, 1))),
    # Inputs large enough for every reduce method to be picked by default.
    ("2d-large-s1", 2, 2, (40, 33), dict(kernel_size=3, padding=1)),
    ("1d-long-s1", 1, 3, (1100,), dict(kernel_size=4, padding="same")),
    ("2d-large-s2", 2, 3, (23, 22), dict(kernel_size=3, stride=2, padding=1)),
    ("2d-large-dil4", 2, 2, (25, 21), dict(kernel_size=3, dilation=4, padding=4)),
    ("2d-large-dil-beyond", 2, 2, (21, 20), dict(kernel_size=3, dilation=24, padding=24)),
    ("1d-long", 1, 3, (450,), dict(kernel_size=5, stride=3, dilation=2, padding=4)),
    ("3d-large", 3, 2, (8, 9, 10), dict(kernel_size=3, stride=(1, 2, 1), padding=1)),
]
IDS = [c[0] for c in CASES]
DTYPES = [torch.float32, torch.float64]


def _conv_module(n: int, c_in: int, c_out: int, kwargs: dict, dtype) -> torch.nn.Module:
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[n]
    return cls(c_in, c_out, bias=False, dtype=dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_defining_property_against_torch_conv(case, dtype):
    """Groups = 1: ``patches[b] @ W.flatten(1).T == conv(x, W)[b]`` (docs/formats.md)."""
    _, n, c_in, size, kwargs = case
    kwargs = {**kwargs, "groups": 1}
    torch.manual_seed(0)
    x = torch.randn(3, c_in, *size, dtype=dtype)
    conv = _conv_module(n, c_in, 5, kwargs, dtype)
    with torch.no_grad():
        y = conv(x)
        p = extract_patches(x, **kwargs)
    w = conv.weight.detach().flatten(1)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p @ w.T, y.flatten(2).transpose(1, 2), **tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_groups_are_the_mean_of_per_group_patches(case):
    """Groups > 1: the mean over groups of the groups = 1 patches of each channel slice."""
    _, _, c_in, size, kwargs = case
    g = kwargs.get("groups", 1)
    x = torch.randn(2, c_in, *size, dtype=torch.float64)
    single = {**kwargs, "groups": 1}
    per_group = [extract_patches(s, **single) for s in x.chunk(g, dim=1)]
    expected = torch.stack(per_group).mean(0)
    torch.testing.assert_close(extract_patches(x, **kwargs), expected, rtol=1e-12, atol=1e-12)


def _brute_force(x, kwargs):
    """Patches by explicit loops over (b, o, c, k) on the padded input."""
    n = x.ndim - 2
    p = ConvParams.create(
        kwargs["kernel_size"],
        kwargs.get("stride", 1),
        kwargs.get("padding", 0),
        kwargs.get("dilation", 1),
        kwargs.get("groups", 1),
        kwargs.get("padding_mode", "zeros"),
        n=n,
    )
    g = p.groups
    c = x.shape[1] // g
    xm = sum(x[:, i * c : (i + 1) * c] for i in range(g)) / g
    pads = p.pads()
    size = x.shape[2:]
    mode = p.padding_mode
    if mode != "zeros":
        flat = [v for pair in reversed(pads) for v in pair]
        xm = F.pad(xm, flat, mode=mode)
        pads = tuple((0, 0) for _ in pads)
        size = xm.shape[2:]
    out_size = [
        (i + pl + pr - d * (k - 1) - 1) // s + 1
        for i, (pl, pr), k, s, d in zip(size, pads, p.kernel_size, p.stride, p.dilation)
    ]
    rows = []
    for o in itertools.product(*map(range, out_size)):
        row = []
        for ch in range(c):
            for k in itertools.product(*map(range, p.kernel_size)):
                idx = [
                    oi * s + ki * d - pl
                    for oi, ki, s, d, (pl, _) in zip(o, k, p.stride, p.dilation, pads)
                ]
                inside = all(0 <= i < sz for i, sz in zip(idx, size))
                row.append(
                    xm[(slice(None), ch, *idx)]
                    if inside
                    else torch.zeros(x.shape[0], dtype=x.dtype)
                )
        rows.append(torch.stack(row, dim=1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_against_brute_force(case):
    _, _, c_in, size, kwargs = case
    x = torch.randn(2, c_in, *size, dtype=torch.float64)
    expected = _brute_force(x, kwargs)
    assert torch.equal(extract_patches(x, **kwargs), expected)
    torch.testing.assert_close(
        extract_averaged_patches(x, **kwargs), expected.mean(1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reduce_is_mean_of_expand(case, dtype, device):
    _, _, c_in, size, kwargs = case
    x = torch.randn(4, c_in, *size, dtype=dtype, device=device)
    expected = extract_patches(x, **kwargs).mean(1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(extract_averaged_patches(x, **kwargs), expected, **tol)


def _forced(x, kwargs, method):
    params = ConvParams.create(**kwargs, n=x.ndim - 2)
    return conv_averaged_patches(x, params, method=method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", REDUCE_METHODS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_reduce_method(case, method, device):
    """Each way of summing windows, forced on every geometry, equals mean(expand)."""
    _, _, c_in, size, kwargs = case
    x = torch.randn(3, c_in, *size, dtype=torch.float64, device=device)
    params = ConvParams.create(**kwargs, n=len(size))
    if method == "window" and not one_window(tap_dims(params, size)):
        with pytest.raises(ValueError, match="one reading tap"):
            _forced(x, kwargs, method)
        return
    expected = extract_patches(x, **kwargs).mean(1)
    torch.testing.assert_close(_forced(x, kwargs, method), expected, rtol=1e-12, atol=1e-12)


def test_unknown_reduce_method_is_refused():
    with pytest.raises(ValueError, match="one of window, strided, separable"):
        conv_averaged_patches(torch.ones(1, 1, 4), ConvParams.create(2, n=1), method="fft")


def test_the_cases_reach_every_reduce_method_by_default():
    """Every method the default choice can make is exercised by the reference cases (each
    method's numbers are checked by test_every_reduce_method, whichever is chosen)."""
    picked = set()
    for _, _, _, size, kwargs in CASES:
        params = ConvParams.create(**kwargs, n=len(size))
        picked.add(reduce_method(tap_dims(params, size)))
    assert picked == set(REDUCE_METHODS)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_bias_column(approx):
    x = torch.randn(2, 3, 6, 6)
    fn = extract_patches if approx == "expand" else extract_averaged_patches
    plain = fn(x, 3, padding=1)
    with_bias = fn(x, 3, padding=1, bias_column=True)
    assert with_bias.shape[-1] == plain.shape[-1] + 1
    assert torch.equal(with_bias[..., :-1], plain)
    assert torch.equal(with_bias[..., -1], torch.ones_like(with_bias[..., -1]))


def test_linear_layouts():
    x = torch.randn(4, 3, 5, 7)
    assert torch.equal(linear_patches(x), x.reshape(4, 15, 7))
    torch.testing.assert_close(linear_averaged_patches(x), x.reshape(4, 15, 7).mean(1))
    assert torch.equal(linear_patches(torch.ones(2, 3), bias_column=True), torch.ones(2, 1, 4))
    assert linear_averaged_patches(torch.ones(2, 3), bias_column=True).shape == (2, 4)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    batch=st.integers(1, 3),
    c=st.integers(1, 6),
    g=st.integers(1, 3),
    k=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    s=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    d=st.lists(st.integers(1, 2), min_size=3, max_size=3),
    p=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=3, max_size=3),
    extra=st.lists(st.integers(0, 5), min_size=3, max_size=3),
)
def test_hypothesis_shapes(n, batch, c, g, k, s, d, p, extra):
    """Random geometry, unequal padding included: conv property and reduce == mean(expand)."""
    k, s, d, p = k[:n], s[:n], d[:n], p[:n]
    size = [di * (ki - 1) + 1 + e for ki, di, e in zip(k, d, extra)]
    x = torch.randn(batch, c * g, *size, dtype=torch.float64)
    params = ConvParams.create(k, s, tuple(p), d, g)
    patches = conv_patches(x, params)
    xm = x.reshape(batch, g, c, *size).mean(1)
    w = torch.randn(2, c, *k, dtype=torch.float64)
    flat = [v for pair in reversed(p) for v in pair]
    y = CONV[n](F.pad(xm, flat), w, stride=s, dilation=d)
    torch.testing.assert_close(patches @ w.flatten(1).T, y.flatten(2).transpose(1, 2))
    single = one_window(tap_dims(params, size))
    for method in [None, *REDUCE_METHODS]:
        if method != "window" or single:
            averaged = conv_averaged_patches(x, params, method=method)
            torch.testing.assert_close(averaged, patches.mean(1))


def _curvlinops_kfac_utils():
    """The published reference's ``kfac_utils`` module, loaded without its heavy package."""
    import importlib.util

    spec = importlib.util.find_spec("curvlinops")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("curvlinops-for-pytorch is not installed")
    path = f"{next(iter(spec.submodule_search_locations))}/kfac_utils.py"
    mod_spec = importlib.util.spec_from_file_location("curvlinops_kfac_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


REFERENCE_CASES = [c for c in CASES if c[1] == 2 and "padding_mode" not in c[4]]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c[0])
def test_agrees_with_curvlinops(case):
    ref = _curvlinops_kfac_utils()
    _, _, c_in, size, kwargs = case
    kw = dict(
        kernel_size=kwargs["kernel_size"],
        stride=kwargs.get("stride", 1),
        padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1),
        groups=kwargs.get("groups", 1),
    )
    params = ConvParams.create(**kw, n=2)
    if any(left != right for left, right in params.pads()):
        pytest.skip("the reference refuses unequal padding")
    x = torch.randn(3, c_in, *size)
    assert torch.equal(extract_patches(x, **kw), ref.extract_patches(x, **kw))
    torch.testing.assert_close(
        extract_averaged_patches(x, **kw),
        ref.extract_averaged_patches(x, **kw),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (
            dict(kernel_size=3, stride=2, padding="same"),
            (1, 2, 8, 8),
            "stride 1 with padding 'same'",
        ),
        (dict(kernel_size=3, groups=2), (1, 3, 8, 8), "divisible by groups=2"),
        (dict(kernel_size=5), (1, 2, 4, 8), "padded spatial size of at least 5"),
        (dict(kernel_size=3), (1, 2, 8), "rank 4"),
        (dict(kernel_size=3, padding=4, padding_mode="reflect"), (1, 2, 4, 4), "reflect padding"),
        (dict(kernel_size=3, padding_mode="mirror"), (1, 2, 4, 4), "padding_mode in"),
        (dict(kernel_size=0), (1, 2, 4, 4), "positive kernel_size"),
    ],
    ids=["same-stride2", "groups", "too-small", "rank", "reflect-too-wide", "mode", "k0"],
)
def test_invalid_hyper_parameters(kwargs, shape, match):
    x = torch.randn(*shape)
    for fn in (extract_patches, extract_averaged_patches):
        with pytest.raises(KfacError, match=match):
            fn(x, **kwargs) if len(shape) == 4 else conv_patches(
                x, ConvParams.create(n=2, **kwargs)
            )


def test_integer_input_is_refused():
    with pytest.raises(KfacError, match="floating-point"):
        extract_patches(torch.ones(1, 1, 4, 4, dtype=torch.int64), 3)


def test_reduce_never_materialises_the_unfolded_tensor():
    """Peak RSS of reduce, by every method, stays of the order of the input, far below
    the expand size."""
    code = """
import resource, torch
from kfac_cli.ops.conv import ConvParams
from kfac_cli.ops.patches import conv_averaged_patches
torch.set_num_threads(1)
x = torch.randn(8, 64, 128, 128)  # 32 MiB; expand with 7x7 taps would be about 1.5 GiB
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for method in ("strided", "separable"):
    conv_averaged_patches(x, ConvParams.create(7, 1, 3, 1, 1, n=2), method=method)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra_mib = int(out.stdout.strip())
    assert extra_mib < 4 * 32, f"reduce used {extra_mib} MiB on top of a 32 MiB input"
