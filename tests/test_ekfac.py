"""`kfac-cli factors --ekfac`: against curvlinops' EKFACLinearOperator and brute force."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kfac_cli.jobs.factors import run_factors
from kfac_cli.jobs.stats import run_stats
from kfac_cli.ops.eigh import factor_eigh
from kfac_cli.ops.ekfac import (
    add_corrections,
    add_weight_corrections,
    pad_square,
    padded_width,
    split_eigenbasis,
    strategy,
)
from tests import test_factors
from tests.conftest import invoke, run_cli
from tests.test_factors import _conv_model, _factors, _ours, _setup, _treated

shards = test_factors.shards  # the fixture: four dumps of a CNN (mc, two vectors each)

curvlinops = pytest.importorskip("curvlinops", reason="the reference (see README)")


class _Flat(nn.Module):
    """A sequence model's [B, T, C] outputs as [B·T, C] rows (curvlinops' EKFAC takes 2d
    outputs only): T loss terms per sample."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).flatten(0, 1)


def _flat_setup(loss_name: str, reduction: str):
    model, loss, data = _setup("seq", loss_name, reduction)
    if loss_name == "ce":
        model = _Flat(model[0])
        data = [(x, y.flatten()) for x, y in data]
    else:
        model = _Flat(model)
        data = [(x, y.flatten(0, 1)) for x, y in data]
    return model, loss, data


def _dense(q_g: torch.Tensor, q_a: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
    """``(Q_G ⊗ Q_A) diag(vec E) (Q_G ⊗ Q_A)ᵀ``."""
    q = q_g if q_a is None else torch.kron(q_g, q_a)
    return q @ torch.diag(e.flatten()) @ q.T


def _reference_blocks(model, loss, data, separate: bool, basis: dict, **kw):
    return _reference(model, loss, data, separate, basis, **kw)[1]


def _reference(model, loss, data, separate: bool, basis: dict, **kw):
    """curvlinops' EKFAC blocks, its corrections computed in the eigenbasis of ``basis``
    (our file: an eigenbasis is arbitrary within a repeated eigenvalue, e.g. the zero ones
    of a factor of less rank than size), after checking its factors against ours."""
    params = [p for _, m in _treated(model) for p in m.parameters()]
    ref = curvlinops.EKFACLinearOperator(
        model,
        loss,
        params,
        data,
        check_deterministic=False,
        separate_weight_and_bias=separate,
        **kw,
    )
    ref.compute_kronecker_factors()
    for name, _ in _treated(model):
        for factor, ours in (("A", ref._input_covariances), ("G", ref._gradient_covariances)):
            torch.testing.assert_close(
                basis[f"{name}.{factor}"], ours[name], rtol=1e-10, atol=1e-14
            )
    ref._input_covariances_eigenvectors = {
        n: basis[f"{n}.A.eigenvectors"] for n, _ in _treated(model)
    }
    ref._gradient_covariances_eigenvectors = {
        n: basis[f"{n}.G.eigenvectors"] for n, _ in _treated(model)
    }
    ref.compute_eigenvalue_correction()
    blocks = {}
    for name, _ in _treated(model):
        q_g = ref._gradient_covariances_eigenvectors[name]
        q_a = ref._input_covariances_eigenvectors.get(name)
        e = ref._corrected_eigenvalues[name]
        if isinstance(e, dict):
            for p_name, pos in ref._mapping[name].items():
                key = f"{name}.{p_name}" if separate else name  # (a layer without bias)
                blocks[key] = _dense(q_g, q_a if p_name == "weight" else None, e[pos])
        else:
            blocks[name] = _dense(q_g, q_a, e)
    return ref, blocks


def _our_blocks(got: dict, model, separate: bool) -> dict[str, torch.Tensor]:
    blocks = {}
    for name, module in _treated(model):
        q_g, q_a = got[f"{name}.G.eigenvectors"], got[f"{name}.A.eigenvectors"]
        if separate and module.bias is not None:
            blocks[f"{name}.weight"] = _dense(q_g, q_a, got[f"{name}.weight.corrections"])
            blocks[f"{name}.bias"] = _dense(q_g, None, got[f"{name}.bias.corrections"])
        else:
            key = f"{name}.weight" if separate else name
            blocks[name if not separate else f"{name}.weight"] = _dense(
                q_g, q_a, got[f"{key}.corrections"]
            )
    return blocks


CASES = [
    (kind, loss, fisher, red, approx, sep)
    for kind in ("cnn", "seq")
    for loss in ("ce", "mse")
    for fisher in ("empirical", "type-2", "mc")
    for red in ("mean", "sum")
    for approx in ("expand", "reduce")
    for sep in (False, True)
    if (kind == "cnn" or approx == "expand")
    and (loss == "ce" or fisher == "type-2")
    and (not sep or red == "mean")
]


@pytest.mark.parametrize(
    "kind,loss_name,fisher,reduction,approx,sep",
    CASES,
    ids=["-".join(str(v) for v in c[:5]) + ("-separate" if c[5] else "") for c in CASES],
)
def test_ekfac_equals_curvlinops(tmp_path, kind, loss_name, fisher, reduction, approx, sep):
    if kind == "cnn":
        model, loss, data = _setup("cnn", loss_name, reduction)
    else:
        model, loss, data = _flat_setup(loss_name, reduction)
    mc = 2 if fisher == "mc" else 1
    got, summary, _ = _ours(model, loss, data, tmp_path, fisher, approx, sep, mc, ekfac=True)
    reference = _reference_blocks(
        model, loss, data, sep, got, fisher_type=fisher, mc_samples=mc, kfac_approx=approx
    )
    assert summary["ekfac"] is True
    ours = _our_blocks(got, model, sep)
    assert ours.keys() == reference.keys()
    for key, block in reference.items():
        scale = block.abs().max()
        torch.testing.assert_close(ours[key], block, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("sep", [False, True], ids=["joint", "separate"])
def test_stats_of_an_ekfac_file_equal_curvlinops(tmp_path, sep):
    model, loss, data = _setup("cnn", "ce", "mean")
    got, _, path = _ours(model, loss, data, tmp_path, "type-2", "expand", sep, ekfac=True)
    ref, blocks = _reference(model, loss, data, sep, got, fisher_type="type-2")
    stats = run_stats(path, damping=1e-3)
    assert stats["ekfac"] is True
    total = stats["total"]
    assert total["trace"] == pytest.approx(float(ref.trace), rel=1e-10)
    assert total["frobenius_norm"] == pytest.approx(float(ref.frobenius_norm), rel=1e-10)
    dense = torch.block_diag(*blocks.values())
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    assert total["logdet"] == pytest.approx(float(torch.slogdet(dense + 1e-3 * eye)[1]), rel=1e-9)
    assert total["dim"] == dense.shape[0]


@pytest.mark.parametrize("method", ["per_example", "gramian"])
@pytest.mark.parametrize(
    "shape", [(1, 3, 1, 4, 5), (3, 4, 1, 4, 5), (2, 3, 5, 4, 6), (4, 2, 7, 3, 2)]
)
def test_corrections_routes_equal_brute_force(method, shape):
    vectors, n, s, d1, d2 = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(n, s, d2, dtype=torch.float64, generator=gen)
    g = torch.randn(vectors, n, s, d1, dtype=torch.float64, generator=gen)
    q_a = torch.linalg.qr(torch.randn(d2, d2, dtype=torch.float64, generator=gen))[0]
    q_g = torch.linalg.qr(torch.randn(d1, d1, dtype=torch.float64, generator=gen))[0]
    expected = sum(
        (q_g.T @ (g[v, i].T @ a[i]) @ q_a) ** 2 for v in range(vectors) for i in range(n)
    )
    got = add_corrections(torch.zeros(d1, d2, dtype=torch.float64), a, g, q_g, q_a, 0.5, method)
    torch.testing.assert_close(got, 0.5 * expected, rtol=1e-12, atol=1e-12)
    # Q_A zero-padded to GEMM-friendly rows, per-example gradients formed one at a time
    wide = pad_square(q_a, padded_width(d2))
    got = add_corrections(
        torch.zeros(d1, d2, dtype=torch.float64), a, g, q_g, wide, 0.5, method, budget=1
    )
    torch.testing.assert_close(got, 0.5 * expected, rtol=1e-12, atol=1e-12)
    bias = sum((q_g.T @ g[v, i].sum(0)) ** 2 for v in range(vectors) for i in range(n))
    got = add_corrections(torch.zeros(d1, dtype=torch.float64), None, g, q_g, None)
    torch.testing.assert_close(got, bias, rtol=1e-12, atol=1e-12)


def test_unit_eigenvectors_are_copied_not_multiplied():
    """Zero rows of a factor (taps that read only padding) give exact unit eigenvectors:
    the split basis rotates the rest and copies those, with the same result, also where
    the data are not zero there."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 7, dtype=torch.float64, generator=gen)
    rows[:, [1, 4, 5]] = 0
    vals, q_a = factor_eigh(rows.T @ rows)
    basis = split_eigenbasis(q_a, vals)
    assert sorted(basis.unit_rows.tolist()) == [1, 4, 5] and basis.live_cols.numel() == 4
    assert basis.live.shape == (16, 16) and not basis.live[4:].any() and not basis.live[:, 4:].any()
    q_g = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))[0]
    g = torch.randn(2, 5, 6, 3, dtype=torch.float64, generator=gen)
    for a in (rows[:30].reshape(5, 6, 7), torch.randn(5, 6, 7, dtype=torch.float64, generator=gen)):
        expected = add_corrections(torch.zeros(3, 7, dtype=torch.float64), a, g, q_g, q_a)
        got = add_weight_corrections(torch.zeros(3, 7, dtype=torch.float64), a, g, q_g, basis)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_strategy_prefers_the_gramian_without_weight_sharing():
    assert strategy(1, 64, 64, 1) == "gramian"
    assert strategy(1024, 64, 576, 1) == "per_example"


# ----------------------------------------------------------------------------- files


def _blocks_of(path) -> dict[str, torch.Tensor]:
    """Every EKFAC block of a file, dense, by its corrections key."""
    got = load_file(path)
    blocks = {}
    for key, e in got.items():
        if key.endswith(".corrections"):
            layer = key.removesuffix(".corrections")
            layer = layer.rsplit(".", 1)[0] if f"{layer}.G.eigenvectors" not in got else layer
            q_a = got[f"{layer}.A.eigenvectors"] if e.ndim == 2 else None
            blocks[key] = _dense(got[f"{layer}.G.eigenvectors"], q_a, e)
    return blocks


def test_sharded_ekfac_equals_one_run(shards, tmp_path):
    pt2, acts, grads = shards
    one = tmp_path / "one.safetensors"
    _factors(pt2, acts, grads, one, "--ekfac")
    again = tmp_path / "again.safetensors"
    _factors(pt2, acts, grads, again, "--eigenbasis", one)
    assert not any(k.endswith(".eigenvectors") for k in load_file(again))  # corrections only
    completed = tmp_path / "completed.safetensors"
    assert invoke("merge", again, "--eigenbasis", one, "-o", completed).returncode == 0
    assert completed.read_bytes() == one.read_bytes()  # its own eigenbasis: the same file
    halves = [(acts[:2], grads[:2]), (acts[2:], grads[2:])]
    parts = []
    for i, (a, g) in enumerate(halves):
        _factors(pt2, a, g, tmp_path / f"f{i}.safetensors")
        parts.append(tmp_path / f"f{i}.safetensors")
    basis = tmp_path / "basis.safetensors"
    assert invoke("merge", *parts, "-o", basis, "--eigh").returncode == 0
    corrections = []
    for i, (a, g) in enumerate(halves):
        corrections.append(tmp_path / f"c{i}.safetensors")
        _factors(pt2, a, g, corrections[-1], "--eigenbasis", basis)
    merged = tmp_path / "merged.safetensors"
    proc = invoke("merge", *reversed(corrections), "--eigenbasis", basis, "-o", merged)
    assert proc.returncode == 0, proc.stderr
    expected, got = _blocks_of(one), _blocks_of(merged)
    assert expected.keys() == got.keys() and expected
    for key, block in expected.items():
        torch.testing.assert_close(got[key], block, rtol=1e-9, atol=1e-12 * block.abs().max())
    with safe_open(merged, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ekfac"]) is True and "corrections_only" not in meta
    assert json.loads(meta["corrections_num_data"]) == json.loads(meta["num_data"])
    lean = tmp_path / "lean.safetensors"  # without the eigenbasis: corrections only
    assert invoke("merge", *corrections, "-o", lean).returncode == 0
    for key, value in load_file(lean).items():
        torch.testing.assert_close(value, load_file(merged)[key], rtol=0, atol=0)
    proc = invoke("stats", lean)
    assert proc.returncode == 1 and "--eigenbasis" in proc.stderr.decode()


def test_corrections_flushed_to_float64_equal_one_partial_sum(shards, tmp_path, monkeypatch):
    """Samples summed in the accumulation dtype, moved into float64 totals every
    FLUSH_SAMPLES samples: flushing after every sample gives the same corrections."""
    from kfac_cli.jobs import ekfac as job

    pt2, acts, grads = shards
    basis = tmp_path / "basis.safetensors"
    _factors(pt2, acts, grads, basis, "--eigh")
    kept = tmp_path / "kept.safetensors"
    run_factors(str(pt2), [str(a) for a in acts], kept, grads=[str(g) for g in grads],
                eigenbasis=str(basis))  # fmt: skip
    monkeypatch.setattr(job, "FLUSH_SAMPLES", 1)
    flushed = tmp_path / "flushed.safetensors"
    run_factors(str(pt2), [str(a) for a in acts], flushed, grads=[str(g) for g in grads],
                eigenbasis=str(basis))  # fmt: skip
    expected, got = load_file(kept), load_file(flushed)
    assert expected.keys() == got.keys() and expected
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6 * value.abs().max())


def test_ekfac_misuse_gets_one_line(shards, tmp_path):
    pt2, acts, grads = shards
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    _factors(pt2, acts[:2], grads[:2], a, "--ekfac")
    _factors(pt2, acts[2:], grads[2:], b, "--ekfac")
    proc = invoke("merge", a, b, "-o", tmp_path / "m.safetensors")
    assert proc.returncode == 1 and "eigenbasis" in proc.stderr.decode()
    c = tmp_path / "c.safetensors"
    _factors(pt2, acts[2:], grads[2:], c, "--eigenbasis", a)
    proc = invoke("merge", c, "--eigenbasis", b, "-o", tmp_path / "m.safetensors")
    assert proc.returncode == 1 and "the eigenbasis of" in proc.stderr.decode()
    assert not (tmp_path / "m.safetensors").exists()
    plain = tmp_path / "plain.safetensors"
    _factors(pt2, acts, grads, plain)
    proc = invoke(
        "factors", pt2, *acts, "--grads", *grads, "--eigenbasis", plain, "-o", tmp_path / "x"
    )
    line = proc.stderr.decode()
    assert proc.returncode == 1 and "eigenvectors" in line and "--eigh" in line
    proc = invoke("factors", pt2, "-", "--grads", grads[0], "--ekfac", "-o", tmp_path / "x")
    assert proc.returncode == 2 and "--eigenbasis" in proc.stderr.decode()
    proc = invoke("factors", pt2, *acts, "--ekfac", "-o", tmp_path / "x")
    assert proc.returncode == 1 and "gradient" in proc.stderr.decode()
    reduce = tmp_path / "reduce.safetensors"
    _factors(pt2, acts, grads, reduce, "--eigh", "--approx", "reduce")
    proc = invoke(
        "factors", pt2, *acts, "--grads", *grads, "--eigenbasis", reduce, "-o", tmp_path / "x"
    )
    line = proc.stderr.decode()
    assert proc.returncode == 1 and "approx" in line and "reduce" in line
    assert not (tmp_path / "x").exists()


def test_ekfac_on_a_stream_with_an_eigenbasis(shards, tmp_path):
    pt2, acts, grads = shards
    one = tmp_path / "one.safetensors"
    _factors(pt2, acts[:1], grads[:1], one, "--ekfac")
    out = tmp_path / "stream.safetensors"
    proc = run_cli(
        "factors", pt2, "-", "--grads", grads[0], "--eigenbasis", one, "-o", out,
        "--dtype", "float64", input=acts[0].read_bytes(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    completed = tmp_path / "completed.safetensors"
    assert invoke("merge", out, "--eigenbasis", one, "-o", completed).returncode == 0
    assert completed.read_bytes() == one.read_bytes()


# ------------------------------------------------------------------- brute force


class _Twice(nn.Module):
    """One linear layer called twice (two dump keys): one per-example gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))).mean(1))


def _brute_corrections(model, layer: nn.Module, data, got: dict, name: str) -> torch.Tensor:
    """``Σ_n (Q_Gᵀ ∇_n Q_A)²`` over autograd's per-example gradients of a sum loss, the
    weight flattened and the bias as the last column (the canonical matrix)."""
    q_a, q_g = got[f"{name}.A.eigenvectors"], got[f"{name}.G.eigenvectors"]
    total = 0
    for x, y in data:
        for i in range(x.shape[0]):
            model.zero_grad()
            nn.functional.cross_entropy(
                model(x[i : i + 1]), y[i : i + 1], reduction="sum"
            ).backward()
            grad = layer.weight.grad.flatten(1)
            if layer.bias is not None:
                grad = torch.cat([grad, layer.bias.grad[:, None]], 1)
            total = total + (q_g.T @ grad @ q_a) ** 2
    return total


@pytest.mark.parametrize(
    "conv,c_in,spatial",
    [
        (nn.Conv1d(4, 3, 3, padding=1, padding_mode="reflect"), 4, (9,)),
        (nn.Conv1d(4, 2, 4, padding="same", dilation=2), 4, (11,)),
        (nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), 3, (5, 6)),
        (nn.Conv3d(2, 3, (2, 3, 3), padding=(1, 1, 0), stride=(1, 2, 1)), 2, (4, 5, 6)),
        (nn.Conv3d(2, 2, 3, padding="same"), 2, (4, 4, 5)),
        (nn.Conv2d(2, 3, 3, padding=5, dilation=5), 2, (4, 4)),
    ],
    ids=[
        "1d-reflect",
        "1d-same-even-dilated",
        "2d-circular",
        "3d-strided",
        "3d-same",
        "2d-padding-only-taps",
    ],
)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_nd_corrections_equal_brute_force(tmp_path, conv, c_in, spatial, approx):
    torch.manual_seed(4)
    model, x = _conv_model(conv, c_in, spatial)
    data = [(x, torch.randint(0, 2, (3,))), (x.flip(0) + 1, torch.randint(0, 2, (3,)))]
    loss = nn.CrossEntropyLoss(reduction="sum")
    got, _, _ = _ours(model, loss, data, tmp_path, "empirical", approx, False, ekfac=True)
    expected = _brute_corrections(model, model.conv, data, got, "conv")
    torch.testing.assert_close(got["conv.corrections"], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model", [test_factors.Mix(True), _Twice()], ids=["folded", "twice"])
def test_folded_and_shared_layers_sum_one_gradient_per_sample(tmp_path, model):
    torch.manual_seed(2)
    model = model.double()
    layer = model.mix if hasattr(model, "mix") else model.fc
    name = "mix" if hasattr(model, "mix") else "fc"
    data = [(torch.randn(b, 8, 3, dtype=torch.float64), torch.randint(0, 2, (b,))) for b in (3, 2)]
    loss = nn.CrossEntropyLoss(reduction="sum")
    got, _, _ = _ours(model, loss, data, tmp_path, "empirical", "expand", False, ekfac=True)
    expected = _brute_corrections(model, layer, data, got, name)
    torch.testing.assert_close(got[f"{name}.corrections"], expected, rtol=1e-10, atol=1e-14)
