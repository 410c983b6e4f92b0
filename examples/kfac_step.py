"""From dumps to a KFAC step: `kfac-cli factors`, then one damped preconditioned step.

A layer's KFAC block is ``G ⊗ A`` in the canonical layout (weight rows with the bias
appended). This example records a model's dumps with kfac_cli.record (empirical Fisher,
sum loss), computes ``A`` and ``G`` with `kfac-cli factors` (expand and reduce), checks
them against dense computations from torch's own unfold and autograd, and applies the damped
step ``(G + λI)⁻¹ ∇W (A + λI)⁻¹`` to the gradient from `kfac-cli canonicalize --layout
matrix`, checked against the dense Kronecker solve.

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

from kfac_cli.record import record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 4 * 4, 5).double())
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    [(acts, grads)] = record(
        model, [(x, y)], loss_func, folder, fisher_type="empirical", force=True
    )

    # The dense references: the conv's output gradient and parameter gradient by autograd.
    outs = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        outs["y"] = output

    conv.register_forward_hook(keep_output)
    model.zero_grad()
    loss_func(model(x), y).backward()
    save_file({n: p.grad.clone() for n, p in model.named_parameters()}, folder / "pg.safetensors")
    g = outs["y"].grad.flatten(2).transpose(1, 2)  # [B, O, C_out]

    cli = kfac_cli()
    for approx in ("expand", "reduce"):
        out = folder / f"factors-{approx}.safetensors"
        cmd = ["factors", pt2, acts, "--grads", grads, "-o", out, "--approx", approx]
        subprocess.run([*cli, *cmd, "--dtype", "float64", "--force", "-q"], check=True)
    canonical = folder / "canonical.safetensors"
    cmd = ["canonicalize", pt2, folder / "pg.safetensors", "-o", canonical, "--layout", "matrix"]
    subprocess.run([*cli, *cmd, "--force", "-q"], check=True)

    # The factors equal the dense ones from torch's own unfold and the autograd gradients.
    expand, reduce = (load_file(folder / f"factors-{a}.safetensors") for a in ("expand", "reduce"))
    u = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [B, O, D]
    u = torch.cat([u, torch.ones_like(u[..., :1])], dim=2)
    n, o = u.shape[:2]
    torch.testing.assert_close(expand["0.A"], torch.einsum("bod,boe->de", u, u) / (n * o))
    torch.testing.assert_close(reduce["0.A"], u.mean(1).T @ u.mean(1) / n)
    torch.testing.assert_close(expand["0.G"], torch.einsum("boc,bod->cd", g, g))
    torch.testing.assert_close(reduce["0.G"], g.sum(1).T @ g.sum(1))

    # One damped KFAC step on the canonical gradient, against the dense Kronecker solve.
    grad = load_file(canonical)["0"]  # [C_out, D+1]
    A, G = expand["0.A"], expand["0.G"]
    damp = 1e-2
    Gd = G + damp * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A + damp * torch.eye(A.shape[0], dtype=G.dtype)
    step = torch.linalg.solve(Gd, grad) @ torch.linalg.inv(Ad)
    dense = torch.linalg.solve(torch.kron(Gd, Ad), grad.flatten()).reshape(grad.shape)
    torch.testing.assert_close(step, dense)
    w_step, b_step = step[:, :-1].reshape(conv.weight.shape), step[:, -1]
    print(
        f"A {list(A.shape)}, G {list(G.shape)}; step for {list(conv.weight.shape)} weight "
        f"and {list(b_step.shape)} bias, |step| = {w_step.norm():.4f}"
    )
    print(
        "checks passed: factors equal the dense unfold and autograd ones, the Kronecker step "
        "equals the dense solve"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-example"))
