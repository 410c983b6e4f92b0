"""`kfac-cli stats` (docs/formats.md): against curvlinops' own KFACLinearOperator
(trace, frobenius_norm, logdet) and against the dense block-diagonal curvature built from
the file's factors (eigenvalues, damped log-determinant, condition number)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kfac_cli.jobs.stats import run_stats
from tests.conftest import invoke
from tests.test_factors import _ours, _reference, _setup


@pytest.mark.parametrize("sep", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("kind", ["cnn", "seq"])
def test_stats_equal_curvlinops(tmp_path, kind, sep):
    model, loss, data = _setup(kind, "mse", "mean")
    reference = _reference(
        model, loss, data, fisher_type="empirical", kfac_approx="expand",
        separate_weight_and_bias=sep,
    )  # fmt: skip
    _, _, out = _ours(model, loss, data, tmp_path, "empirical", "expand", sep)
    total = run_stats(out)["total"]
    assert math.isclose(total["trace"], float(reference.trace), rel_tol=1e-10)
    assert math.isclose(total["frobenius_norm"], float(reference.frobenius_norm), rel_tol=1e-10)
    ref_logdet = float(reference.logdet)
    if math.isfinite(ref_logdet) and total["logdet"] != -math.inf:
        assert math.isclose(total["logdet"], ref_logdet, rel_tol=1e-8)


def _dense(factors: dict, meta_layers: dict) -> torch.Tensor:
    """The block-diagonal curvature, every block G ⊗ A (a separate bias: G) built densely."""
    blocks = []
    for name, layer in meta_layers.items():
        g = factors[f"{name}.G"]
        for block in layer["blocks"]:
            blocks.append(torch.kron(g, factors[f"{name}.A"]) if "A" in block["factors"] else g)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("sep", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_stats_equal_the_dense_curvature(tmp_path, sep, damping):
    model, loss, data = _setup("cnn", "ce", "sum")
    got, _, out = _ours(model, loss, data, tmp_path, "empirical", "reduce", sep)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    f_dense = _dense(load_file(out), layers)
    eig = torch.linalg.eigvalsh(f_dense)
    summary = run_stats(out, damping=damping)
    total = summary["total"]
    assert total["dim"] == f_dense.shape[0]
    assert math.isclose(total["trace"], float(f_dense.trace()), rel_tol=1e-10)
    assert math.isclose(total["frobenius_norm"], float(f_dense.norm()), rel_tol=1e-10)
    assert math.isclose(total["eigenvalue_max"], float(eig.max()), rel_tol=1e-8)
    assert abs(total["eigenvalue_min"] - float(eig.min())) <= 1e-10 * float(eig.max())
    if damping:
        sign, logdet = torch.linalg.slogdet(f_dense + damping * torch.eye(f_dense.shape[0]))
        assert sign == 1 and math.isclose(total["logdet"], float(logdet), rel_tol=1e-8)
        cond = float((eig.max() + damping) / (eig.min() + damping))
        assert math.isclose(total["condition_number"], cond, rel_tol=1e-6)
    for name, stats in summary["layers"].items():  # layers add up to the total
        assert stats["dim"] == sum(
            math.prod(got[f"{name}.G"].shape[:1])
            * (got[f"{name}.A"].shape[0] if "A" in b["factors"] else 1)
            for b in layers[name]["blocks"]
        )
    assert math.isclose(sum(s["trace"] for s in summary["layers"].values()), total["trace"])


def test_stats_command(tmp_path):
    model, loss, data = _setup("cnn", "ce", "mean")
    _, _, out = _ours(model, loss, data, tmp_path, "empirical", "expand", False, eigh=True)
    proc = invoke("stats", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # strict JSON: a -inf is the string "-inf"
    assert set(summary["total"]) >= {"trace", "frobenius_norm", "logdet", "condition_number"}
    text = invoke("stats", out, "--damping", "0.01").stdout.decode()
    assert text.splitlines()[0].endswith("damping 0.01")
    assert any(line.startswith("total ") for line in text.splitlines())
    assert invoke("stats", out, "--damping", "-1").returncode == 2
    proc = invoke("stats", tmp_path / "acts-00000.safetensors")
    assert proc.returncode == 1 and b"expected a factors file" in proc.stderr
