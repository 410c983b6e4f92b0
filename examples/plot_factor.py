"""A picture of one layer's KFAC input factor: heat map of A and its eigenvalue spectrum.

Needs matplotlib (an optional extra: pip install -e '.[plot]'); without it the script says
so and exits 0.

    $ python examples/plot_factor.py [FOLDER]      # writes FOLDER/factor.png
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli, record_activations


def main(folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'); skipped, check passed")
        return
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(32, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), folder / "model.pt2")
    save_file(record_activations(model, x), folder / "acts.safetensors")
    subprocess.run(
        [
            *kfac_cli(),
            "patches",
            folder / "model.pt2",
            folder / "acts.safetensors",
            "-o",
            folder / "patches.safetensors",
            "--layer",
            "2",
            "--bias-column",
            "--force",
            "-q",
        ],
        check=True,
    )
    a = load_file(folder / "patches.safetensors")["2"].double()  # [B, O, 8*3*3 + 1]
    rows = a.reshape(-1, a.shape[-1])
    factor = rows.T @ rows / rows.shape[0]  # A = sum a^T a / N
    eig = torch.linalg.eigvalsh(factor).flip(0)
    assert torch.allclose(factor, factor.T) and eig.min() > -1e-10  # symmetric PSD

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    im = left.imshow(
        factor.numpy(), cmap="RdBu_r", vmin=-factor.abs().max(), vmax=factor.abs().max()
    )
    left.set_title("A for layer '2' (columns: c, k1, k2; last: bias)")
    fig.colorbar(im, ax=left, shrink=0.8)
    right.semilogy(eig.clamp_min(1e-12).numpy(), ".-")
    right.set_title("eigenvalues of A")
    right.set_xlabel("index")
    fig.tight_layout()
    fig.savefig(folder / "factor.png", dpi=100)
    print(
        f"wrote {folder / 'factor.png'}: A is {list(factor.shape)}, eigenvalues "
        f"{eig[0]:.3g} .. {eig[-1]:.3g}; check passed"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-example"))
