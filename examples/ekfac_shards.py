"""EKFAC over shards: factors per shard, merged; corrections per shard in that eigenbasis,
merged; checked against one `--ekfac` run and against autograd's per-example gradients.

    factors per shard -> merge --eigh -> factors --eigenbasis per shard -> merge --eigenbasis

Each step reads its shard alone (a CI matrix job, a cluster array task). The EKFAC block of
a layer is ``(Q_G ⊗ Q_A) diag(vec E) (Q_G ⊗ Q_A)ᵀ`` with ``E = Σ_n (Q_Gᵀ ∇_n Q_A)²`` over
the per-example gradients ``∇_n`` (empirical Fisher, sum loss: no scale).

    $ python examples/ekfac_shards.py [FOLDER]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kfac_cli.record import record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli


def ekfac_block(f: dict, layer: str) -> torch.Tensor:
    """A layer's dense EKFAC block from a file's eigenvectors and corrections."""
    q = torch.kron(f[f"{layer}.G.eigenvectors"], f[f"{layer}.A.eigenvectors"])
    return q @ torch.diag(f[f"{layer}.corrections"].flatten()) @ q.T


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double()
    data = [
        (torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))) for _ in range(4)
    ]
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    shards = record(model, data, loss_func, folder, fisher_type="empirical", force=True)

    cli = kfac_cli()

    def run(*args) -> None:
        subprocess.run([*cli, *map(str, args), "--force", "-q"], check=True)

    for i, (acts, grads) in enumerate(shards):  # 1. factors per shard
        run("factors", pt2, acts, "--grads", grads, "-o", folder / f"factors-{i}.safetensors")
    basis = folder / "basis.safetensors"  # 2. merged, with eigendecompositions
    run("merge", *(folder / f"factors-{i}.safetensors" for i in range(4)), "-o", basis, "--eigh")
    for i, (acts, grads) in enumerate(shards):  # 3. corrections per shard in that basis
        out = folder / f"corrections-{i}.safetensors"
        run("factors", pt2, acts, "--grads", grads, "--eigenbasis", basis, "-o", out)
    ekfac = folder / "ekfac.safetensors"  # 4. merged
    corrections = (folder / f"corrections-{i}.safetensors" for i in range(4))
    run("merge", *corrections, "--eigenbasis", basis, "-o", ekfac)

    one = folder / "one-run.safetensors"  # the same in one run, both passes
    run("factors", pt2, *(a for a, _ in shards), "--grads", *(g for _, g in shards),
        "--ekfac", "-o", one)  # fmt: skip
    merged, single = load_file(ekfac), load_file(one)
    for layer in ("0", "3"):
        torch.testing.assert_close(ekfac_block(merged, layer), ekfac_block(single, layer))

    # The corrections by hand: each sample's gradient from autograd, rotated and squared.
    for layer, module in (("0", model[0]), ("3", model[3])):
        q_a, q_g = merged[f"{layer}.A.eigenvectors"], merged[f"{layer}.G.eigenvectors"]
        expected = 0
        for x, y in data:
            for n in range(x.shape[0]):
                model.zero_grad()
                loss_func(model(x[n : n + 1]), y[n : n + 1]).backward()
                grad = torch.cat([module.weight.grad.flatten(1), module.bias.grad[:, None]], 1)
                expected = expected + (q_g.T @ grad @ q_a) ** 2
        torch.testing.assert_close(merged[f"{layer}.corrections"], expected)
    print("EKFAC over 4 shards equals one run and autograd's per-example gradients: passed")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ekfac-example"))
