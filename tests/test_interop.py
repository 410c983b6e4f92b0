"""Interop: kfac-cli factors loaded by kronfluence as its own (influence scores equal to
those from the factors kronfluence fits itself)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kfac_cli.errors import KfacError
from kfac_cli.interop import export_kronfluence
from kfac_cli.jobs.factors import run_factors
from kfac_cli.record import record
from tests.conftest import invoke

kronfluence = pytest.importorskip("kronfluence", reason="the interop extra (see README)")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

# kronfluence 1.0.1 calls APIs torch 2.13 deprecates (torch.cuda.amp.GradScaler, ...)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # fmt: skip


class Classification(Task):
    """Summed cross-entropy for training and measurement (kronfluence's convention)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    )  # fmt: skip
    return {
        "mlp": (mlp, torch.randn(24, 6), torch.randn(5, 6)),
        "cnn": (cnn, torch.randn(24, 2, 6, 6), torch.randn(5, 2, 6, 6)),
    }


def _dtypes(dtype):
    factor = FactorArguments(
        use_empirical_fisher=True,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score = ScoreArguments(per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                           score_dtype=dtype, damping_factor=1e-3)  # fmt: skip
    return factor, score


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kronfluence_scores_from_exported_factors(tmp_path, kind, strategy, dtype):
    model, x, x_test = _models()[kind]
    model, x, x_test = model.to(dtype), x.to(dtype), x_test.to(dtype)
    y, y_test = torch.randint(0, 3, (len(x),)), torch.randint(0, 3, (len(x_test),))
    train, query = TensorDataset(x, y), TensorDataset(x_test, y_test)
    ours = tmp_path / "ours"
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    shards = record(copy.deepcopy(model), batches, nn.CrossEntropyLoss(reduction="sum"), ours,
                    fisher_type="empirical")  # fmt: skip
    pt2 = ours / "model.pt2"
    torch.export.save(torch.export.export(model, (x[:2],)), pt2)
    factors = ours / "factors.safetensors"
    run_factors(pt2, [str(a) for a, _ in shards], str(factors), grads=[str(g) for _, g in shards],
                ekfac=strategy == "ekfac")  # fmt: skip
    task = Classification()
    prepared = prepare_model(model, task)
    analyzer = Analyzer("analysis", prepared, task, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path / "kf"))  # fmt: skip
    factor_args, score_args = _dtypes(dtype)
    factor_args.strategy = strategy
    analyzer.fit_all_factors("own", train, per_device_batch_size=8, factor_args=factor_args)
    export_kronfluence(factors, analyzer.factors_output_dir("ours"))
    tol = {"rtol": 1e-8, "atol": 0} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 0}
    for name in ("own", "ours"):
        analyzer.compute_pairwise_scores(
            name, name, query, train, per_device_query_batch_size=5,
            per_device_train_batch_size=8, score_args=score_args,
        )  # fmt: skip
        analyzer.compute_self_scores(f"self-{name}", name, train, per_device_train_batch_size=8,
                                     score_args=score_args)  # fmt: skip
    for scores in ("own", "self-own"):
        own = (
            analyzer.load_pairwise_scores(scores)
            if scores == "own"
            else analyzer.load_self_scores(scores)
        )
        other = scores.replace("own", "ours")
        got = (
            analyzer.load_pairwise_scores(other)
            if scores == "own"
            else analyzer.load_self_scores(other)
        )
        expected, found = own["all_modules"], got["all_modules"]
        scale = expected.abs().max()
        torch.testing.assert_close(found, expected, rtol=tol["rtol"], atol=tol["rtol"] * scale)


# ---------------------------------------------------------------------- laplace-torch

laplace = pytest.importorskip("laplace", reason="the interop extra (see README)")


@pytest.mark.filterwarnings("ignore:By default `link_approx`:UserWarning")  # (its tuning)
@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
def test_kron_laplace_from_factors_equals_its_own_fit(tmp_path, kind, fisher, joint):
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    from kfac_cli.interop import to_kron_laplace

    model, x, x_test = _models()[kind]
    model, x, x_test = model.double(), x.double(), x_test.double()
    y = torch.randint(0, 3, (len(x),))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=8)
    backend = CurvlinopsEF if fisher == "empirical" else CurvlinopsGGN
    own = KronLaplace(copy.deepcopy(model), "classification", backend=backend)
    own.fit(loader)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    shards = record(copy.deepcopy(model), batches, nn.CrossEntropyLoss(reduction="mean"),
                    tmp_path, fisher_type=fisher)  # fmt: skip
    pt2 = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x[:2],)), pt2)
    factors = tmp_path / "factors.safetensors"
    run_factors(pt2, [str(a) for a, _ in shards], str(factors), grads=[str(g) for _, g in shards],
                separate_bias=not joint)  # fmt: skip
    ours = to_kron_laplace(copy.deepcopy(model), factors, "classification", train_loader=loader)
    assert ours.n_data == own.n_data == len(x)
    for prior in (0.1, 1.0, 7.0):
        theirs = own.log_marginal_likelihood(torch.tensor(prior, dtype=torch.float64))
        mine = ours.log_marginal_likelihood(torch.tensor(prior, dtype=torch.float64))
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=0)
    for la in (own, ours):
        la.prior_precision = 2.0
    mean_own, var_own = own._glm_predictive_distribution(x_test)
    mean_ours, var_ours = ours._glm_predictive_distribution(x_test)
    torch.testing.assert_close(mean_ours, mean_own, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(var_ours, var_own, rtol=1e-5, atol=1e-12)
    for la in (own, ours):  # laplace-torch's own tuning runs on it unchanged
        la.optimize_prior_precision(method="marglik", n_steps=20)
    torch.testing.assert_close(ours.prior_precision, own.prior_precision, rtol=1e-5, atol=0)


def test_what_the_tools_cannot_take_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    x, y = torch.randn(6, 2, 6), torch.randint(0, 2, (6,))
    shards = record(model, [(x, y)], nn.CrossEntropyLoss(reduction="sum"), tmp_path,
                    fisher_type="empirical")  # fmt: skip
    pt2 = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    factors = tmp_path / "f.safetensors"
    run_factors(pt2, [str(shards[0][0])], str(factors), grads=[str(shards[0][1])])
    with pytest.raises(KfacError, match="Conv2d"):
        export_kronfluence(factors, tmp_path / "kf")
    assert not (tmp_path / "kf").exists()
    proc = invoke("export", factors, "--to", "kronfluence", tmp_path / "kf")
    assert proc.returncode == 1 and "conv1d" in proc.stderr.decode()
    from kfac_cli.interop import to_kron_laplace

    ekfac = tmp_path / "e.safetensors"
    run_factors(pt2, [str(shards[0][0])], str(ekfac), grads=[str(shards[0][1])], ekfac=True)
    with pytest.raises(KfacError, match="EKFAC"):
        to_kron_laplace(model, ekfac, "classification", loss=1.0, n_outputs=2)
    reduce = tmp_path / "r.safetensors"
    run_factors(pt2, [str(shards[0][0])], str(reduce), grads=[str(shards[0][1])],
                approx="reduce", patterns=("2",))  # fmt: skip
    with pytest.raises(KfacError, match="expand"):
        export_kronfluence(reduce, tmp_path / "kf")
