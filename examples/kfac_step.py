"""From patches to KFAC: input factors A (expand and reduce) and one preconditioned step.

A layer's KFAC block is ``G ⊗ A`` in the canonical layout (weight rows with the bias
appended). This example builds ``A = Σ aᵀa / N`` from `kfac-cli patches --bias-column`,
``G`` from the output gradients, and the damped step ``(G + λI)⁻¹ ∇W (A + λI)⁻¹`` on the
gradient from `kfac-cli canonicalize --layout matrix`, then checks both against dense
computations that do not use kfac-cli.

    $ python examples/kfac_step.py [FOLDER]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli, record_activations


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 4 * 4, 5).double()).eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    pt2, acts = folder / "model.pt2", folder / "acts.safetensors"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    save_file(record_activations(model, x), acts)

    # Output gradients of the conv layer and the parameter gradient, by autograd.
    outs = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        outs["y"] = output

    conv.register_forward_hook(keep_output)
    loss = F.cross_entropy(model(x), torch.randint(0, 5, (6,)), reduction="sum")
    loss.backward()
    save_file(
        {n: p.grad.clone() for n, p in model.named_parameters()}, folder / "grads.safetensors"
    )
    g = outs["y"].grad.flatten(2).transpose(1, 2)  # [B, O, C_out]

    cli = kfac_cli()
    for approx in ("expand", "reduce"):
        subprocess.run(
            [
                *cli,
                "patches",
                pt2,
                acts,
                "-o",
                folder / f"{approx}.safetensors",
                "--approx",
                approx,
                "--bias-column",
                "--force",
                "-q",
            ],
            check=True,
        )
    subprocess.run(
        [
            *cli,
            "canonicalize",
            pt2,
            folder / "grads.safetensors",
            "-o",
            folder / "canonical.safetensors",
            "--layout",
            "matrix",
            "--force",
            "-q",
        ],
        check=True,
    )

    # Input factors from the patches ...
    a_exp = load_file(folder / "expand.safetensors")["0"]  # [B, O, D+1]
    a_red = load_file(folder / "reduce.safetensors")["0"]  # [B, D+1]
    A_expand = torch.einsum("bod,boe->de", a_exp, a_exp) / (a_exp.shape[0] * a_exp.shape[1])
    A_reduce = a_red.T @ a_red / a_red.shape[0]
    # ... equal the dense ones from torch's own unfold.
    u = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [B, O, D]
    u = torch.cat([u, torch.ones_like(u[..., :1])], dim=2)
    torch.testing.assert_close(A_expand, torch.einsum("bod,boe->de", u, u) / u.shape[:2].numel())
    torch.testing.assert_close(A_reduce, u.mean(1).T @ u.mean(1) / u.shape[0])

    # One damped KFAC step on the canonical gradient, against the dense Kronecker solve.
    grad = load_file(folder / "canonical.safetensors")["0"]  # [C_out, D+1]
    G = torch.einsum("boc,bod->cd", g, g) / g.shape[0]
    damp = 1e-2
    Gd = G + damp * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A_expand + damp * torch.eye(A_expand.shape[0], dtype=G.dtype)
    step = torch.linalg.solve(Gd, grad) @ torch.linalg.inv(Ad)
    dense = torch.linalg.solve(torch.kron(Gd, Ad), grad.flatten()).reshape(grad.shape)
    torch.testing.assert_close(step, dense)
    w_step, b_step = step[:, :-1].reshape(conv.weight.shape), step[:, -1]
    print(
        f"A (expand) {list(A_expand.shape)}, A (reduce) {list(A_reduce.shape)}, "
        f"G {list(G.shape)}; step for {conv.weight.shape} weight and {b_step.shape} bias, "
        f"|step| = {w_step.norm():.4f}"
    )
    print(
        "checks passed: factors equal the dense unfold ones, the Kronecker step equals the "
        "dense solve"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-example"))
