"""`kfac-cli factors --ekfac`: against curvlinops' EKFACLinearOperator and brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_cli.ops.ekfac import add_corrections, strategy
from tests.test_factors import _ours, _setup, _treated

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
    return blocks


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
    bias = sum((q_g.T @ g[v, i].sum(0)) ** 2 for v in range(vectors) for i in range(n))
    got = add_corrections(torch.zeros(d1, dtype=torch.float64), None, g, q_g, None)
    torch.testing.assert_close(got, bias, rtol=1e-12, atol=1e-12)


def test_strategy_prefers_the_gramian_without_weight_sharing():
    assert strategy(1, 64, 64, 1) == "gramian"
    assert strategy(1024, 64, 576, 1) == "per_example"
