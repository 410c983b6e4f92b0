"""Record an activation dump from your own model: forward hooks -> safetensors.

The keys are the module paths of the Linear and Conv1d/2d/3d layers, exactly the names
`kfac-cli layers` shows; each value is that layer's input ``[B, C_in, *spatial]`` (conv)
or ``[B, ..., d_in]`` (linear). Run it to write ``model.pt2`` and ``acts.safetensors``
into a folder (default: ./kfac-example) and check the dump against the layer table.

    $ python examples/record_activations.py [FOLDER]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

KFAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def record_activations(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` once and return each KFAC layer's input, keyed by module path."""
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def save(module, args, output):
            acts[name] = args[0].detach().contiguous().clone()

        return save

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, KFAC_LAYERS)
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return acts


def kfac_cli() -> list[str]:
    """The kfac-cli installed beside this Python (or ``python -m kfac_cli``)."""
    exe = Path(sys.executable).with_name("kfac-cli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kfac_cli"]


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()
    x = torch.randn(4, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), folder / "model.pt2")
    acts = record_activations(model, x)
    save_file(acts, folder / "acts.safetensors")

    table = json.loads(
        subprocess.run(
            [*kfac_cli(), "layers", folder / "model.pt2", "--json"], check=True, capture_output=True
        ).stdout
    )
    names = [layer["name"] for layer in table["layers"]]
    assert sorted(acts) == sorted(names), (sorted(acts), names)
    print(
        f"wrote {folder / 'acts.safetensors'}: "
        + ", ".join(f"{k} {list(v.shape)}" for k, v in acts.items())
    )
    print("check passed: the dump's keys are the layer names of `kfac-cli layers`")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-example"))
