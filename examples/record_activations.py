"""Record activation and output-gradient dumps from your own model with kfac_cli.record.

`record(model, batches, loss_func, folder, fisher_type=...)` runs the model with forward
hooks on its Linear and Conv1d/2d/3d layers and writes, per batch, `acts-NNNNN.safetensors`
(each layer's input, keyed by module name: the names `kfac-cli layers` shows) and
`grads-NNNNN.safetensors` (the gradients w.r.t. each layer's output of the vectors KFAC
backpropagates, exactly as curvlinops would). This script records a small CNN, exports it,
checks the dump's keys against the layer table and computes the Kronecker factors.

    $ python examples/record_activations.py [FOLDER]     # default: ./kfac-example
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kfac_cli.record import record


def kfac_cli() -> list[str]:
    """The kfac-cli installed beside this Python (or ``python -m kfac_cli``)."""
    exe = Path(sys.executable).with_name("kfac-cli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kfac_cli"]


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    torch.export.save(torch.export.export(model, (batches[0][0],)), folder / "model.pt2")
    dumps = record(
        model, batches, nn.CrossEntropyLoss(), folder, fisher_type="mc", mc_samples=2, force=True
    )

    table = json.loads(
        subprocess.run(
            [*kfac_cli(), "layers", folder / "model.pt2", "--json"], check=True, capture_output=True
        ).stdout
    )
    names = [layer["name"] for layer in table["layers"]]
    acts, grads = load_file(dumps[0][0]), load_file(dumps[0][1])
    assert sorted(acts) == sorted(grads) == sorted(names), (sorted(acts), names)
    assert grads["0"].shape == (2, 4, 8, 8, 8)  # [V = mc samples, B, C_out, H, W]
    subprocess.run(
        [
            *kfac_cli(),
            "factors",
            folder / "model.pt2",
            *[a for a, _ in dumps],
            "--grads",
            *[g for _, g in dumps],
            "-o",
            folder / "factors.safetensors",
            "--force",
            "-q",
        ],
        check=True,
    )
    factors = load_file(folder / "factors.safetensors")
    print(
        f"wrote {len(dumps)} activation and gradient dumps to {folder}: "
        + ", ".join(f"{k} {list(v.shape)}" for k, v in acts.items())
    )
    print("factors: " + ", ".join(f"{k} {list(v.shape)}" for k, v in factors.items()))
    print("check passed: the dump's keys are the layer names of `kfac-cli layers`")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-example"))
