"""kfac-cli factors in kronfluence and laplace-torch, each checked against the tool's own fit.

1. `kfac-cli factors --ekfac`, then `kfac-cli export --to kronfluence`: kronfluence's
   pairwise influence scores from the exported factors equal those from the factors it
   fits itself (empirical Fisher, summed loss).
2. `kfac_cli.interop.to_kron_laplace`: laplace-torch's KronLaplace from the factors has its
   own fit's log marginal likelihood.

Needs the interop extra (README: kronfluence 1.0.1, laplace-torch 0.3).

    $ python examples/interop.py [FOLDER]
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfac_cli.interop import to_kron_laplace
from kfac_cli.record import record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli

warnings.simplefilter("ignore", FutureWarning)  # kronfluence 1.0.1 on a newer torch


def main(folder: Path) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()
    x, y = torch.randn(32, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    shards = record(copy.deepcopy(model), batches, nn.CrossEntropyLoss(reduction="sum"), folder,
                    fisher_type="empirical", force=True)  # fmt: skip
    cli = kfac_cli()
    factors = folder / "ekfac.safetensors"
    subprocess.run([*cli, "factors", pt2, *(a for a, _ in shards), "--grads",
                    *(g for _, g in shards), "--ekfac", "-o", factors, "--force", "-q"],
                   check=True)  # fmt: skip

    # 1. kronfluence: its own EKFAC fit against the exported factors.
    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = Classification()
    analyzer = Analyzer("demo", prepare_model(copy.deepcopy(model), task), task, cpu=True,
                        disable_tqdm=True, output_dir=str(folder / "influence"))  # fmt: skip
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True,
        activation_covariance_dtype=torch.float64, gradient_covariance_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float64, lambda_dtype=torch.float64,
    )  # fmt: skip
    score_args = ScoreArguments(
        damping_factor=1e-3,
        per_sample_gradient_dtype=torch.float64,
        precondition_dtype=torch.float64,
        score_dtype=torch.float64,
    )
    train, query = TensorDataset(x, y), TensorDataset(x[:4] + 0.1, y[:4])
    analyzer.fit_all_factors("own", train, per_device_batch_size=16, factor_args=factor_args)
    subprocess.run([*cli, "export", factors, "--to", "kronfluence",
                    analyzer.factors_output_dir("kfac_cli"), "--force"], check=True)  # fmt: skip
    scores = {}
    for name in ("own", "kfac_cli"):
        analyzer.compute_pairwise_scores(
            name,
            name,
            query,
            train,
            per_device_query_batch_size=4,
            per_device_train_batch_size=16,
            score_args=score_args,
        )
        scores[name] = analyzer.load_pairwise_scores(name)["all_modules"]
    torch.testing.assert_close(scores["kfac_cli"], scores["own"], rtol=1e-8, atol=0)

    # 2. laplace-torch: its own KronLaplace fit against the factors.
    kfac = folder / "kfac.safetensors"
    subprocess.run([*cli, "factors", pt2, *(a for a, _ in shards), "--grads",
                    *(g for _, g in shards), "-o", kfac, "--force", "-q"], check=True)  # fmt: skip
    loader = DataLoader(train, batch_size=16)
    own = KronLaplace(copy.deepcopy(model), "classification", backend=CurvlinopsEF)
    own.fit(loader)
    ours = to_kron_laplace(copy.deepcopy(model), kfac, "classification", train_loader=loader)
    for prior in (0.5, 5.0):
        p = torch.tensor(prior, dtype=torch.float64)
        torch.testing.assert_close(ours.log_marginal_likelihood(p), own.log_marginal_likelihood(p))
    print("kronfluence influence scores and laplace-torch evidence from kfac-cli factors: passed")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "interop-example"))
