"""`kfac-cli factors`: against curvlinops' KFACLinearOperator, einconv and brute force."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli.errors import KfacError
from kfac_cli.jobs.factors import run_factors
from kfac_cli.jobs.merge import run_merge
from kfac_cli.ops.conv import ConvParams
from kfac_cli.ops.factors import (
    conv_covariance,
    input_covariance,
    mirror_,
    reordered_rows,
    tap_order,
)
from kfac_cli.ops.patches import conv_patches
from kfac_cli.record import record
from tests.conftest import DEVICES, invoke, run_cli

curvlinops = pytest.importorskip("curvlinops", reason="the reference (see README)")


class SeqModel(nn.Module):
    """Linear layers on a sequence [B, S, d]: T = S loss terms per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).double()


def _setup(kind: str, loss_name: str, reduction: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "cnn":
        model, xs = _cnn(), [torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
        out_shape = (5, 5)
    else:
        model, xs = (
            SeqModel().double(),
            [torch.randn(4, 7, 4, dtype=torch.float64) for _ in range(2)],
        )
        out_shape = (4, 7, 3)
    if loss_name == "ce":
        loss = nn.CrossEntropyLoss(reduction=reduction)
        if kind == "seq":  # classes second, as CrossEntropyLoss wants them
            model = nn.Sequential(model, _Transpose())
            ys = [torch.randint(0, 3, (4, 7)) for _ in xs]
        else:
            ys = [torch.randint(0, 5, (5,)) for _ in xs]
    else:
        loss = nn.MSELoss(reduction=reduction)
        ys = [torch.randn(*out_shape, dtype=torch.float64) for _ in xs]
    return model, loss, list(zip(xs, ys))


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def _treated(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _reference(model, loss, data, params=None, **kw):
    """curvlinops' KFACLinearOperator with its factors computed (joint bias by default)."""
    kw.setdefault("separate_weight_and_bias", False)
    reference = curvlinops.KFACLinearOperator(
        model, loss, params or list(model.parameters()), data, check_deterministic=False, **kw
    )
    reference.compute_kronecker_factors()
    return reference


def _ours(model, loss, data, folder, fisher, approx, sep, mc=1, dtype="float64", **kw):
    shards = record(model, data, loss, folder, fisher_type=fisher, mc_samples=mc, force=True)
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    grads = [str(g) for _, g in shards] if fisher != "forward-only" else None
    out = folder / "F.safetensors"
    summary = run_factors(
        pt2,
        [str(a) for a, _ in shards],
        str(out),
        grads=grads,
        approx=approx,
        separate_bias=sep,
        dtype=dtype,
        force=True,
        **kw,
    )
    return load_file(out), summary, out


CASES = [
    (kind, loss, fisher, red, approx, sep)
    for kind in ("cnn", "seq")
    for loss in ("ce", "mse")
    for fisher in ("empirical", "type-2", "mc", "forward-only")
    for red in ("mean", "sum")
    for approx in ("expand", "reduce")
    for sep in (False, True)
    if (kind == "cnn" or approx == "expand") and (not sep or (fisher == "mc" and red == "mean"))
]


@pytest.mark.parametrize(
    "kind,loss_name,fisher,reduction,approx,sep",
    CASES,
    ids=["-".join(str(v) for v in c[:5]) + ("-separate" if c[5] else "") for c in CASES],
)
def test_factors_equal_curvlinops_kfac(tmp_path, kind, loss_name, fisher, reduction, approx, sep):
    model, loss, data = _setup(kind, loss_name, reduction)
    mc = 2 if fisher == "mc" else 1
    names = [n for n, _ in _treated(model)]
    params = [p for _, m in _treated(model) for p in m.parameters()]
    reference = _reference(
        model,
        loss,
        data,
        params,
        fisher_type=fisher,
        mc_samples=mc,
        kfac_approx=approx,
        separate_weight_and_bias=sep,
    )
    got, summary, _ = _ours(model, loss, data, tmp_path, fisher, approx, sep, mc)
    assert summary["num_data"] == sum(x.shape[0] for x, _ in data)
    for name in names:
        a, ref_a = got[f"{name}.A"], reference._input_covariances[name]
        torch.testing.assert_close(a, ref_a, rtol=1e-12, atol=1e-14)
        assert torch.equal(a, a.T)
        if fisher == "forward-only":
            assert f"{name}.G" not in got
            continue
        g, ref_g = got[f"{name}.G"], reference._gradient_covariances[name]
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-14)
        assert torch.equal(g, g.T)


def test_float32_factors_are_as_accurate_as_the_reference(tmp_path):
    model, loss, data = _setup("cnn", "ce", "mean")
    exact, _, _ = _ours(model, loss, data, tmp_path / "64", "empirical", "expand", False)
    model32 = model.float()
    data32 = [(x.float(), y) for x, y in data]
    got, _, _ = _ours(
        model32, loss, data32, tmp_path / "32", "empirical", "expand", False, dtype="float32"
    )
    for key, value in exact.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6)


def _conv_model(conv: nn.Module, c_in: int, spatial: tuple[int, ...]):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv
            self.head = nn.Linear(1, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y.mean(tuple(range(1, y.ndim))).unsqueeze(1))

    return M().double(), torch.randn(3, c_in, *spatial, dtype=torch.float64)


@pytest.mark.parametrize(
    "conv,c_in,spatial",
    [
        (nn.Conv1d(4, 3, 3, padding=1, padding_mode="reflect"), 4, (9,)),
        (nn.Conv1d(4, 2, 4, padding="same", dilation=2), 4, (11,)),
        (nn.Conv2d(4, 6, (3, 2), padding="same", groups=2), 4, (6, 7)),
        (nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), 3, (5, 6)),
        (nn.Conv3d(2, 3, (2, 3, 3), padding=(1, 1, 0), stride=(1, 2, 1)), 2, (4, 5, 6)),
        (nn.Conv3d(2, 2, 3, padding="same"), 2, (4, 4, 5)),
    ],
    ids=[
        "1d-reflect",
        "1d-same-even-dilated",
        "2d-same-groups",
        "2d-circular",
        "3d-strided",
        "3d-same",
    ],
)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_nd_factors_against_patches_and_brute_force(tmp_path, conv, c_in, spatial, approx):
    """A from `kfac-cli patches` (Σ aᵀa), G from the dumped gradients by hand."""
    torch.manual_seed(4)
    model, x = _conv_model(conv, c_in, spatial)
    data = [(x, torch.randint(0, 2, (3,))), (x.flip(0) + 1, torch.randint(0, 2, (3,)))]
    got, _, _ = _ours(model, nn.CrossEntropyLoss(), data, tmp_path, "empirical", approx, False)
    shards = sorted(tmp_path.glob("acts-*.safetensors"))
    p = tmp_path / "p.safetensors"
    a_sum = 0
    for shard in shards:
        run = invoke(
            "patches",
            tmp_path / "model.pt2",
            shard,
            "-o",
            p,
            "--approx",
            approx,
            "--bias-column",
            "--force",
            "--layer",
            "conv",
        )
        assert run.returncode == 0, run.stderr
        rows = load_file(p)["conv"]
        o = 1 if approx == "reduce" else rows.shape[1]
        flat = rows.reshape(-1, rows.shape[-1])
        a_sum = a_sum + flat.T @ flat / o
    torch.testing.assert_close(got["conv.A"], a_sum / 6, rtol=1e-12, atol=1e-13)
    g_sum = 0
    for shard in sorted(tmp_path.glob("grads-*.safetensors")):
        g = load_file(shard)["conv"]  # [1, B, C_out, *O]
        rows = g.flatten(3).sum(3) if approx == "reduce" else g.flatten(3).transpose(2, 3)
        rows = rows.reshape(-1, g.shape[2])
        g_sum = g_sum + rows.T @ rows * (3**2 / 6)  # mean loss: (B T)^2 / N
    torch.testing.assert_close(got["conv.G"], g_sum, rtol=1e-12, atol=1e-13)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_expand_kernels_equal_brute_force(data):
    """Every expand method on random N-d geometries, against Σ p pᵀ of the patches."""
    n = data.draw(st.integers(1, 3))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    d = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    s = tuple(data.draw(st.integers(1, 2)) for _ in range(n))
    size = tuple(data.draw(st.integers(kk * dd, kk * dd + 5)) for kk, dd in zip(k, d))
    groups = data.draw(st.sampled_from([1, 2]))
    mode = data.draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]))
    pads = tuple(
        (data.draw(st.integers(0, (kk - 1) * dd)), data.draw(st.integers(0, (kk - 1) * dd)))
        for kk, dd in zip(k, d)
    )
    if mode != "zeros":
        pads = tuple((min(a, i - 1), min(b, i - 1)) for (a, b), i in zip(pads, size))
    params = ConvParams.create(k, s, pads, d, groups, mode, n=n)
    x = torch.randn(2, 2 * groups, *size, dtype=torch.float64)
    patches = conv_patches(x, params).reshape(-1, params.patch_size(x.shape[1]))
    expected = patches.T @ patches
    methods = ["patches"] + (["lags"] if all(v == 1 for v in s) else [])
    for method, split in itertools.product(methods, (False, True)):
        # split: the outputs in boxes where the same taps read inputs (padding left out)
        got = conv_covariance(x, params, method=method, split=split)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)
        assert torch.equal(got, got.T)


def test_dilated_taps_reading_padding_are_split_off():
    """A DeepLab ASPP conv (3x3, dilation 12, 'same', 28x28 map): half the patches'
    entries read padding; the outputs are summed in boxes of the taps that read inputs
    there (chosen by the operation count at 256 channels, not at a 3x3 of dilation 1), and
    the sum equals the patches'."""
    from kfac_cli.ops.factors import _cheaper_plan, _tap_boxes

    aspp = ConvParams.create(3, 1, 12, 12, n=2)
    boxes = _tap_boxes((28, 28), aspp)
    assert len(boxes) == 9 and _cheaper_plan((2, 256, 28, 28), aspp, boxes, None) == boxes
    plain = ConvParams.create(3, 1, 1, 1, n=2)
    assert len(_cheaper_plan((2, 64, 56, 56), plain, _tap_boxes((56, 56), plain), None)) == 1
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    patches = conv_patches(x, aspp).reshape(-1, aspp.patch_size(3))
    for split in (True, False, None):
        got = conv_covariance(x, aspp, split=split)
        torch.testing.assert_close(got, patches.T @ patches, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,padding",
    [
        ((9,), (3,), (2,), (1,)),
        ((7, 6), (3, 2), (2, 1), (1, 1)),
        ((5, 4, 6), (2, 2, 3), (1, 1, 1), (1, 0, 1)),
    ],
)
def test_expand_and_reduce_sums_equal_einconv(spatial, kernel, dilation, padding):
    """einconv's KFC and KFAC-reduce contractions, an independent tensor-network reference."""
    from einconv.expressions import convNd_kfac_reduce, convNd_kfc

    x = torch.randn(3, 4, *spatial, dtype=torch.float64)
    params = ConvParams.create(kernel, 1, padding, dilation, n=len(spatial))
    for expression, approx in ((convNd_kfc, "expand"), (convNd_kfac_reduce, "reduce")):
        eq, ops, shape = expression.einsum_expression(
            x, kernel, stride=1, padding=padding, dilation=dilation
        )
        ref = torch.einsum(eq, *ops).reshape(shape)[0] * x.shape[0]
        got = input_covariance(x, params, approx)
        # einconv builds its 1/B scale in float32: agreement to that rounding
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_is_the_symmetric_product(device):
    from kfac_cli.ops.factors import gram

    p = torch.randn(300, 700, dtype=torch.float64, device=device)
    torch.testing.assert_close(mirror_(gram(p)), p.T @ p, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_gradient_covariance_against_einsum(approx):
    """Σ g gᵀ over vectors, samples and locations (expand), or of the location sums."""
    from kfac_cli.ops.factors import gradient_covariance

    g = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64)  # [V, B, C_out, O1, O2]
    seq = torch.randn(2, 3, 7, 5, dtype=torch.float64)  # [V, B, S, d_out]
    if approx == "expand":
        conv_ref = torch.einsum("vbiyx,vbjyx->ij", g, g)
        linear_ref = torch.einsum("vbsi,vbsj->ij", seq, seq)
    else:
        conv_ref = torch.einsum("vbi,vbj->ij", g.sum((3, 4)), g.sum((3, 4)))
        linear_ref = torch.einsum("vbi,vbj->ij", seq.sum(2), seq.sum(2))
    for got, ref in (
        (gradient_covariance(g, True, approx), conv_ref),
        (gradient_covariance(seq, False, approx), linear_ref),
    ):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(got, got.T)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_row_gram_folds_like_one_sum(data):
    """Rows in blocks of any size, folded a buffer at a time into an accumulator full of
    garbage (the first fold overwrites it), with the scale changing between blocks: the
    upper triangle of Σ alpha·pᵀp in float64; no rows: zeros."""
    from kfac_cli.ops.factors import RowGram

    width = data.draw(st.integers(1, 9))
    blocks = data.draw(st.lists(st.integers(0, 7), max_size=6))
    alphas = [data.draw(st.sampled_from([1.0, 0.5, 3.0])) for _ in blocks]
    out = torch.full((width, width), float("nan"), dtype=torch.float64)
    fold = RowGram(lambda: out, data.draw(st.integers(1, 8)))
    expected = torch.zeros(width, width, dtype=torch.float64)
    for rows, alpha in zip(blocks, alphas):
        p = torch.randn(rows, width, dtype=torch.float64)
        fold.add(p, alpha)
        expected += alpha * p.T @ p
    got = fold.finish()
    assert got is out
    torch.testing.assert_close(mirror_(got), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_reads_every_input_against_autograd(data):
    """An input element is read iff some window covers it: iff the gradient of the sum of a
    conv with a ones kernel is non-zero there."""
    n = data.draw(st.integers(1, 2))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    s = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    d = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    pads = tuple((data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))) for _ in k)
    size = tuple(
        data.draw(st.integers(max(1, kk_span), kk_span + 6))
        for kk_span in (dd * (kk - 1) + 1 - a - b for kk, dd, (a, b) in zip(k, d, pads))
    )
    params = ConvParams.create(k, s, pads, d, n=n)
    x = torch.zeros(1, 1, *size, dtype=torch.float64, requires_grad=True)
    padded = torch.nn.functional.pad(x, [v for pair in reversed(pads) for v in pair])
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d)[n - 1]
    conv(padded, torch.ones(1, 1, *k, dtype=torch.float64), stride=s, dilation=d).sum().backward()
    assert params.reads_every_input(size) == bool((x.grad > 0).all())


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    model, loss, data = _setup("cnn", "ce", "mean", seed=7)
    data = data + [(x * 0.5, y) for x, y in data]
    pairs = record(model, data, loss, folder, fisher_type="mc", mc_samples=2)
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    return pt2, [a for a, _ in pairs], [g for _, g in pairs]


def _factors(pt2, acts, grads, out, *extra):
    args = ["factors", pt2, *acts, "-o", out, "--dtype", "float64", *extra]
    if grads:
        args += ["--grads", *grads]
    proc = invoke(*args)
    assert proc.returncode == 0, proc.stderr
    return load_file(out)


def test_merged_halves_equal_one_run_and_order_does_not_matter(shards, tmp_path):
    pt2, acts, grads = shards
    whole = _factors(pt2, acts, grads, tmp_path / "all.safetensors")
    _factors(pt2, acts[:1], grads[:1], tmp_path / "h1.safetensors")
    _factors(pt2, acts[1:], grads[1:], tmp_path / "h2.safetensors")
    assert (
        invoke(
            "merge",
            tmp_path / "h1.safetensors",
            tmp_path / "h2.safetensors",
            "-o",
            tmp_path / "m.safetensors",
        ).returncode
        == 0
    )
    merged = load_file(tmp_path / "m.safetensors")
    assert merged.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-13, atol=1e-15)
        assert torch.equal(merged[key], merged[key].T)
    meta = [safe_open(tmp_path / f, "pt").metadata() for f in ("all.safetensors", "m.safetensors")]
    assert meta[0] == meta[1]  # counts exact, conventions and layers the same, to the byte
    shuffled = _factors(pt2, acts[::-1], grads[::-1], tmp_path / "rev.safetensors")
    for key in whole:
        torch.testing.assert_close(shuffled[key], whole[key], rtol=1e-13, atol=1e-15)


def test_eigh_reconstructs_each_factor(shards, tmp_path):
    pt2, acts, grads = shards
    got = _factors(pt2, acts, grads, tmp_path / "e.safetensors", "--eigh")
    for key in [k for k in got if k.endswith((".A", ".G"))]:
        vals, vecs = got[f"{key}.eigenvalues"], got[f"{key}.eigenvectors"]
        torch.testing.assert_close(
            vecs @ torch.diag(vals) @ vecs.T, got[key], rtol=1e-10, atol=1e-12
        )


def test_output_metadata_says_how_to_apply_the_factors(shards, tmp_path):
    pt2, acts, grads = shards
    out = tmp_path / "f.safetensors"
    _factors(pt2, acts, grads, out)
    meta = safe_open(out, "pt").metadata()
    assert meta["format"] == "kfac-cli/factors" and meta["fisher_type"] == "mc"
    assert json.loads(meta["num_data"]) == 20 and json.loads(meta["mc_samples"]) == 2
    layers = json.loads(meta["layers"])
    assert layers["0"]["blocks"] == [
        {"key": "0", "W": "0.weight", "b": "0.bias", "factors": ["G", "A"]}
    ]
    assert layers["0"]["D"] == 3 * 9 + 1 and layers["2"]["D"] == 4 * 9  # no bias
    assert layers["0"]["rows"] == 20 * 64


def test_kronecker_block_acts_on_the_canonical_matrix(shards, tmp_path):
    """G @ M @ A on `canonicalize --layout matrix` equals the dense (G ⊗ A) vec(M)."""
    pt2, acts, grads = shards
    f = _factors(pt2, acts, grads, tmp_path / "f.safetensors")
    model = _cnn()
    tensors = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file(tensors, tmp_path / "v.safetensors")
    assert (
        invoke(
            "canonicalize",
            pt2,
            tmp_path / "v.safetensors",
            "-o",
            tmp_path / "c.safetensors",
            "--layout",
            "matrix",
        ).returncode
        == 0
    )
    m = load_file(tmp_path / "c.safetensors")["4"]
    g, a = f["4.G"], f["4.A"]
    dense = torch.kron(g, a) @ m.flatten()
    torch.testing.assert_close((g @ m @ a).flatten(), dense)


def test_stream_input_gives_the_same_file(shards, tmp_path):
    pt2, acts, grads = shards
    files = tmp_path / "files.safetensors"
    _factors(pt2, acts[:1], grads[:1], files)
    out = tmp_path / "stream.safetensors"
    proc = run_cli(
        "factors",
        pt2,
        "-",
        "--grads",
        grads[0],
        "-o",
        out,
        "--dtype",
        "float64",
        input=acts[0].read_bytes(),
    )
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(files), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bad(tmp_path, name, tensors, meta=None):
    path = tmp_path / name
    save_file(tensors, path, metadata=meta)
    return path


def test_bad_gradient_dumps(shards, tmp_path):
    pt2, acts, grads = shards
    g = load_file(grads[0])
    meta = safe_open(grads[0], "pt").metadata()
    out = tmp_path / "o.safetensors"
    cases = {
        "batch": ({**g, "0": g["0"][:, :-1].contiguous()}, meta, "output gradients of shape"),
        "layer": ({k: v for k, v in g.items() if k != "4"}, meta, "no such tensor"),
        "vectors": ({**g, "4": torch.cat([g["4"], g["4"]])}, meta, "one batch size"),
        "fisher": (g, {**meta, "fisher_type": "empirical"}, "as in the other"),
        "no-meta": (g, None, "the conventions"),
    }
    for name, (tensors, m, message) in cases.items():
        bad = _bad(tmp_path, f"{name}.safetensors", tensors, m)
        proc = invoke("factors", pt2, acts[0], acts[1], "--grads", grads[1], bad, "-o", out)
        assert proc.returncode == 1, name
        assert message in proc.stderr.decode(), (name, proc.stderr)
        assert not out.exists()
    proc = invoke(
        "factors", pt2, acts[0], "--grads", grads[0], "-o", out, "--fisher-type", "type-2"
    )
    assert proc.returncode == 1 and b"type-2 (as given)" in proc.stderr
    proc = invoke("factors", pt2, acts[0], "--grads", grads[0], grads[1], "-o", out)
    assert proc.returncode == 1 and b"one per activation dump" in proc.stderr
    proc = invoke("factors", pt2, acts[0], "-o", out, "--fisher-type", "mc")
    assert proc.returncode == 1 and b"output-gradient dumps" in proc.stderr
    # Bare gradient files (no metadata) need the conventions as options.
    bare = _bad(tmp_path, "bare.safetensors", g)
    proc = invoke("factors", pt2, acts[0], "--grads", bare, "-o", out)
    assert proc.returncode == 1 and b"fisher_type in the metadata or as an option" in proc.stderr
    flags = ["--fisher-type", "mc", "--loss-reduction", "mean", "--mc-samples", "2"]
    assert invoke("factors", pt2, acts[0], "--grads", bare, "-o", out, *flags).returncode == 0
    ref = tmp_path / "ref.safetensors"
    assert invoke("factors", pt2, acts[0], "--grads", grads[0], "-o", ref).returncode == 0
    a, b = load_file(out), load_file(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_samples_nan_and_mixed_models(shards, tmp_path):
    pt2, acts, grads = shards
    out = tmp_path / "o.safetensors"
    empty = _bad(
        tmp_path,
        "empty.safetensors",
        {k: v[:0].contiguous() for k, v in load_file(acts[0]).items()},
    )
    proc = invoke("factors", pt2, empty, "-o", out)
    assert proc.returncode == 1 and b"at least one sample" in proc.stderr
    nan = load_file(acts[0])
    nan["0"][0, 0, 0, 0] = float("nan")
    nan_file = _bad(tmp_path, "nan.safetensors", nan)
    proc = invoke("factors", pt2, nan_file, "-o", out, "--strict")
    assert proc.returncode == 1 and b"NaN" in proc.stderr and not out.exists()
    proc = invoke("factors", pt2, nan_file, "-o", out)
    assert proc.returncode == 0 and b"NaN" in proc.stderr
    out.unlink()
    # factor files of different models or conventions do not merge
    a = tmp_path / "a.safetensors"
    _factors(pt2, acts[:1], grads[:1], a)
    b = tmp_path / "b.safetensors"
    _factors(pt2, acts[1:2], None, b, "--layer", "0")
    proc = invoke("merge", a, b, "-o", out)
    assert proc.returncode == 1 and not out.exists()
    c = tmp_path / "c.safetensors"
    _factors(pt2, acts[1:2], grads[1:2], c, "--approx", "reduce")
    proc = invoke("merge", a, c, "-o", out)
    assert proc.returncode == 1 and b"approx" in proc.stderr


def test_nan_counted_exactly_where_no_window_reads_it(tmp_path):
    """KFAC-reduce checks its averaged rows for NaN/Inf instead of the inputs where every
    input element is in a window. A 1x1 stride-2 conv reads only even positions: its inputs
    are counted one by one. Every NaN/Inf is found, in inputs and gradients, and counted."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 2, 1, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()
    batch = [(torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    ((acts_file, grads_file),) = record(model, batch, nn.CrossEntropyLoss(), tmp_path)
    pt2 = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (batch[0][0],)), pt2)
    acts, grads = load_file(acts_file), load_file(grads_file)
    acts["1"][0, 0, 1, 1] = float("nan")  # odd positions: no window of layer 1 reads them
    acts["1"][1, 2, 3, 5] = float("inf")
    acts["0"][2, 1, 4, 4] = float("nan")
    grads["3"][0, 1, 0] = float("nan")
    bad_acts = _bad(tmp_path, "bad-acts.safetensors", acts, safe_open(acts_file, "pt").metadata())
    bad_grads = _bad(
        tmp_path, "bad-grads.safetensors", grads, safe_open(grads_file, "pt").metadata()
    )
    out = tmp_path / "o.safetensors"
    for approx, dtype in itertools.product(("reduce", "expand"), ("float64", "float32")):
        args = ("factors", pt2, bad_acts, "--grads", bad_grads, "-o", out, "--approx", approx)
        args += ("--dtype", dtype)  # float32: the float64 dumps are counted before the cast
        proc = invoke(*args, "--force")
        assert proc.returncode == 0, proc.stderr
        stderr = proc.stderr.decode()
        assert f": 1: expected finite values but found 2 NaN/Inf of {acts['1'].numel()}" in stderr
        assert f": 0: expected finite values but found 1 NaN/Inf of {acts['0'].numel()}" in stderr
        assert f": 3: expected finite values but found 1 NaN/Inf of {grads['3'].numel()}" in stderr
        out.unlink()
        proc = invoke(*args, "--strict")
        assert proc.returncode == 1 and b"NaN/Inf" in proc.stderr and not out.exists()


def test_sums_are_reused_only_once_written(shards, tmp_path, monkeypatch):
    """Layer after layer the sums share one buffer, written from there by the writer
    thread: a slow writer still writes each layer's factors, not the next layer's sums."""
    import time

    from kfac_cli.files.writer import SafetensorsWriter

    pt2, acts, grads = shards
    for approx in ("reduce", "expand"):
        ref, out = tmp_path / f"ref-{approx}.safetensors", tmp_path / f"{approx}.safetensors"
        run_factors(pt2, acts, str(ref), grads=grads, approx=approx)
        with monkeypatch.context() as m:
            write = SafetensorsWriter.write

            def slow(self, name, chunk, write=write):
                time.sleep(0.05)
                write(self, name, chunk)

            m.setattr(SafetensorsWriter, "write", slow)
            run_factors(pt2, acts, str(out), grads=grads, approx=approx)
        assert out.read_bytes() == ref.read_bytes()


def test_shared_layer_accumulates_every_call(tmp_path):
    """A module called twice: both calls' inputs and gradients, as curvlinops sums them."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.fc(torch.tanh(self.fc(x))))

    torch.manual_seed(5)
    model = Twice().double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))) for _ in range(2)]
    loss = nn.CrossEntropyLoss()
    reference = _reference(model, loss, data, fisher_type="empirical")
    got, _, _ = _ours(model, loss, data, tmp_path, "empirical", "expand", False)
    assert "fc#1" in load_file(tmp_path / "acts-00000.safetensors")
    for name in ("fc", "out"):
        torch.testing.assert_close(got[f"{name}.A"], reference._input_covariances[name])
        torch.testing.assert_close(got[f"{name}.G"], reference._gradient_covariances[name])


class Windows(nn.Module):
    """A conv, then a linear layer on 2x2 windows with the batch folded in (``[B·4, N, C]``,
    batch slowest, as Swin's and MobileViT's attention see it), a positional conv computed
    once per batch (``[1, ...]``, as XCiT's), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Conv2d(2, 4, 1)
        self.register_buffer("grid", torch.randn(1, 2, 4, 4))
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 16, 3)

    def forward(self, x):
        b = x.shape[0]
        x = torch.tanh(self.conv(x) + self.pos(self.grid))  # [B, 4, 4, 4]
        x = x.reshape(b, 4, 2, 2, 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(b * 4, 4, 4)
        return self.head(torch.tanh(self.mix(x)).reshape(b, -1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_folded_batch_layers_count_samples_from_the_metadata(tmp_path, approx, reduction):
    """Layers whose leading axis folds the batch, or is 1: rows as curvlinops sums them, N
    the samples. curvlinops' mean correction takes the layer's leading axis for the loss
    batch (16x too large for ``mix``, B² too small for ``pos``); ours the batch the
    recorder records, so that a mean loss's G is the sum loss's G / N for every layer."""
    torch.manual_seed(3)
    model = Windows().double()
    data = [
        (torch.randn(b, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (b,))) for b in (2, 3)
    ]
    loss = nn.CrossEntropyLoss(reduction=reduction)
    reference = _reference(model, loss, data, fisher_type="empirical", kfac_approx=approx)
    got, summary, _ = _ours(model, loss, data, tmp_path, "empirical", approx, False)
    assert summary["num_data"] == 5
    assert load_file(tmp_path / "acts-00000.safetensors")["mix"].shape == (8, 4, 4)
    assert load_file(tmp_path / "acts-00000.safetensors")["pos"].shape == (1, 2, 4, 4)
    for name in ("conv", "pos", "mix", "head"):
        # expand: A averages over the P·S locations of a sample (curvlinops: over the S of
        # a row, P = 4 times too large; see test_folding_the_batch_changes_no_curvature)
        per_row = 4 if name == "mix" and approx == "expand" else 1
        torch.testing.assert_close(got[f"{name}.A"], reference._input_covariances[name] / per_row)
        if name == "pos" and reduction == "mean":
            continue
        fold = 16 if name == "mix" and reduction == "mean" else 1
        torch.testing.assert_close(got[f"{name}.G"], reference._gradient_covariances[name] / fold)
    if reduction == "mean":
        summed, _, _ = _ours(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            data,
            tmp_path / "sum",
            "empirical",
            approx,
            False,
        )
        for name in ("conv", "pos", "mix", "head"):
            torch.testing.assert_close(got[f"{name}.G"], summed[f"{name}.G"] / 5)


class Mix(nn.Module):
    """A linear layer over P windows of S tokens, with the batch folded into the leading
    axis (``[B·P, S, C]``, as Swin's window attention) or not (``[B, P·S, C]``): the same
    function, so the same curvature."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        self.folded = folded
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 8, 2)

    def forward(self, x):  # x: [B, P·S = 8, 3], P = 4 windows of S = 2
        b = x.shape[0]
        h = self.mix(x.reshape(b * 4, 2, 3) if self.folded else x)
        return self.head(torch.tanh(h).reshape(b, -1))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_folding_the_batch_changes_no_curvature(tmp_path, reduction):
    """G ⊗ A of a layer is the same whether or not the model folds the batch into the
    layer's leading axis (KFAC-expand averages A over the locations of a sample)."""
    torch.manual_seed(0)
    data = [(torch.randn(b, 8, 3, dtype=torch.float64), torch.randint(0, 2, (b,))) for b in (3, 2)]
    loss = nn.CrossEntropyLoss(reduction=reduction)
    kron = {}
    for folded in (False, True):
        model = Mix(folded).double()
        torch.manual_seed(1)
        for p in model.parameters():
            nn.init.normal_(p)
        got, _, _ = _ours(model, loss, data, tmp_path / str(folded), "empirical", "expand", False)
        kron[folded] = torch.kron(got["mix.G"], got["mix.A"])
    torch.testing.assert_close(kron[True], kron[False], rtol=1e-12, atol=1e-12)


def test_library_errors_name_no_flags(shards, tmp_path):
    pt2, acts, _ = shards
    with pytest.raises(KfacError) as info:
        run_factors(pt2, [str(acts[0])], str(tmp_path / "o"), fisher_type="mc")
    assert "--" not in info.value.line()
    with pytest.raises(KfacError):
        run_merge([str(pt2)], str(tmp_path / "o"))


def test_factors_json_summary_describes_the_file(shards, tmp_path):
    """The --json summary names every tensor of the file with its shape, dtype and bytes,
    the sample count and conventions of its metadata, and the bytes on disk."""
    pt2, acts, grads = shards
    out = tmp_path / "f.safetensors"
    proc = run_cli("factors", pt2, *acts, "--grads", *grads, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        on_disk = {
            k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
            for k in f.keys()  # noqa: SIM118
        }
    listed = {t["name"]: (t["shape"], t["dtype"]) for t in summary["factors"]}
    dtype_names = {"float32": "F32", "float64": "F64"}
    assert {k: (s, dtype_names[d]) for k, (s, d) in listed.items()} == on_disk
    for t in summary["factors"]:
        assert t["bytes"] == math.prod(t["shape"]) * {"float32": 4, "float64": 8}[t["dtype"]]
    assert summary["bytes"] == out.stat().st_size
    assert summary["num_data"] == int(meta["num_data"]) == 20
    assert summary["fisher_type"] == meta["fisher_type"] == "mc"
    assert summary["dtype"] == meta["dtype"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_on_cuda_match_the_cpu(shards, tmp_path, approx):
    """Each device in a process of its own (in one process, a host block left unwritten
    could hold the CPU run's values by chance: it did, and hid that the device's reordered
    rows never reached the file)."""
    pt2, acts, grads = shards
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"{device}.safetensors"
        proc = run_cli(
            "factors",
            pt2,
            *acts,
            "--grads",
            *grads,
            "-o",
            outs[device],
            "--approx",
            approx,
            "--device",
            device,
        )
        assert proc.returncode == 0, proc.stderr
    a, b = load_file(outs["cpu"]), load_file(outs["cuda"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6 * a[key].abs().max())
        assert torch.equal(b[key], b[key].T)


@pytest.mark.parametrize("bias", [False, True])
def test_reordered_rows_into_a_given_block(bias):
    """The writer's host block receives exactly rows start:stop of sym[perm][:, perm]: the
    block itself is written, whether or not its device or dtype is the sums' (on a GPU the
    rows were once reordered into a scratch buffer of the device and the block left as it
    was)."""
    torch.manual_seed(0)
    channels, taps = 3, 4
    perm = tap_order(channels, taps, bias)
    n = len(perm)
    sym = torch.randn(n, n, dtype=torch.float64)
    full = sym[perm][:, perm]
    for start, stop in [(0, n), (2, 7), (n - 1, n)]:
        for dtype in (torch.float64, torch.float32):
            block = torch.full((stop - start, n), float("nan"), dtype=dtype)
            got = reordered_rows(sym, perm, start, stop, {}, out=block)
            assert got.data_ptr() == block.data_ptr()
            torch.testing.assert_close(block, full[start:stop].to(dtype))
    block = torch.full((2, n), float("nan"), dtype=torch.float64)
    reordered_rows(sym, None, 1, 3, {}, out=block)
    assert torch.equal(block, sym[1:3])
