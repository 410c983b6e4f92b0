"""Three things users do with factors, each one shell command, checked against dense
matrices on a small model:

1. a damped natural-gradient step: `apply --inverse --damping` on a gradient file;
2. influence scores: per-example gradients preconditioned by EKFAC's damped inverse
   (`apply --batch-first --inverse --exact-damping`), then dot products;
3. a Laplace marginal likelihood's log-determinant: `stats --damping --json`.

    $ python examples/curvature_workflows.py [FOLDER]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli.record import record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli


def canonical(tensors: dict, layers) -> torch.Tensor:
    """Each layer's weight rows with the bias appended, flattened and concatenated
    (``[..., P]``; a leading axis kept)."""
    parts = []
    for name, module in layers:
        w = tensors[f"{name}.weight"]
        w = w.flatten(w.dim() - module.weight.dim() + 1)
        parts.append(torch.cat([w, tensors[f"{name}.bias"][..., None]], -1).flatten(-2))
    return torch.cat(parts, -1)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()
    layers = [("0", model[0]), ("3", model[3])]
    x, y = torch.randn(40, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (40,))
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    [(acts, grads)] = record(model, [(x, y)], loss_func, folder, fisher_type="empirical",
                             force=True)  # fmt: skip
    cli = kfac_cli()

    def run(*args) -> bytes:
        cmd = [*cli, *map(str, args)]
        return subprocess.run(cmd, check=True, capture_output=True).stdout

    factors, ekfac = folder / "factors.safetensors", folder / "ekfac.safetensors"
    run("factors", pt2, acts, "--grads", grads, "-o", factors, "--force")
    run("factors", pt2, acts, "--grads", grads, "-o", ekfac, "--ekfac", "--force")
    f, e = load_file(factors), load_file(ekfac)
    kfac_blocks = [torch.kron(f[f"{n}.G"], f[f"{n}.A"]) for n, _ in layers]

    # 1. A damped natural-gradient step on the full-batch gradient.
    model.zero_grad()
    loss_func(model(x), y).backward()
    grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    save_file(grad, folder / "grad.safetensors")
    lam = 1e-2
    run("apply", factors, folder / "grad.safetensors", "--inverse", "--damping", lam,
        "-o", folder / "step.safetensors", "--force")  # fmt: skip
    step = canonical(load_file(folder / "step.safetensors"), layers)
    dense = torch.block_diag(*(
        torch.kron(f[f"{n}.G"] + lam * torch.eye(len(f[f"{n}.G"]), dtype=torch.float64),
                   f[f"{n}.A"] + lam * torch.eye(len(f[f"{n}.A"]), dtype=torch.float64))
        for n, _ in layers
    ))  # fmt: skip
    torch.testing.assert_close(step, torch.linalg.solve(dense, canonical(grad, layers)))

    # 2. Influence of each training example on a test loss: g_test · (F + λI)⁻¹ g_n.
    per_example = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss_func(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            per_example[n].append(p.grad.clone())
    save_file({n: torch.stack(v) for n, v in per_example.items()}, folder / "train.safetensors")
    pre = folder / "pre.safetensors"
    run("apply", ekfac, folder / "train.safetensors", "--batch-first", "--inverse",
        "--exact-damping", "--damping", lam, "-o", pre, "--force")  # fmt: skip
    model.zero_grad()
    loss_func(model(x[:1] + 0.1), y[:1]).backward()
    test = canonical({n: p.grad for n, p in model.named_parameters()}, layers)
    scores = canonical(load_file(pre), layers) @ test
    ekfac_dense = []
    for name, _ in layers:
        q = torch.kron(e[f"{name}.G.eigenvectors"], e[f"{name}.A.eigenvectors"])
        ekfac_dense.append(q @ torch.diag(e[f"{name}.corrections"].flatten()) @ q.T)
    dense = torch.block_diag(*ekfac_dense)
    train = canonical({n: torch.stack(v) for n, v in per_example.items()}, layers)
    expected = train @ torch.linalg.solve(
        dense + lam * torch.eye(len(dense), dtype=dense.dtype), test
    )
    torch.testing.assert_close(scores, expected)

    # 3. log det(F + δI) of the KFAC curvature, as a Laplace evidence needs it.
    delta = 0.5
    stats = json.loads(run("stats", factors, "--damping", delta, "--json"))
    dense = torch.block_diag(*kfac_blocks)
    expected = torch.linalg.slogdet(dense + delta * torch.eye(len(dense), dtype=dense.dtype))[1]
    logdet = torch.tensor(stats["total"]["logdet"], dtype=torch.float64)
    torch.testing.assert_close(logdet, expected)
    print("natural-gradient step, influence scores and log-determinant: passed")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "workflows-example"))
