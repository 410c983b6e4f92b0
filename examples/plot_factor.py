"""A picture of one layer's KFAC input factor: heat map of A and its eigenvalue spectrum,
both from `kfac-cli factors --eigh` (forward-only: no gradients needed).

Needs matplotlib (an optional extra: pip install -e '.[plot]'); without it the script says
so and exits 0.

    $ python examples/plot_factor.py [FOLDER]      # writes FOLDER/factor.png
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
    [(acts, _)] = record(
        model, [(x, None)], nn.MSELoss(), folder, fisher_type="forward-only", force=True
    )
    out = folder / "factors.safetensors"
    cmd = ["factors", folder / "model.pt2", acts, "-o", out, "--layer", "2", "--eigh"]
    subprocess.run([*kfac_cli(), *cmd, "--force", "-q"], check=True)
    f = load_file(out)
    factor, eig = f["2.A"].double(), f["2.A.eigenvalues"].double().flip(0)
    assert torch.equal(factor, factor.T) and eig.min() > -1e-5  # symmetric PSD

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
