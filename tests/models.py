"""Real models for end-to-end tests, and how to record their activation dumps."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class ResNetLike(nn.Module):
    """A small CNN with every conv flavour the layer table must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),  # dilated
        )
        self.down = nn.Conv2d(8, 16, 1, stride=2)  # 1x1 downsample
        self.same = nn.Conv2d(16, 16, 4, padding="same", groups=2)  # even kernel, 'same'
        self.circ = nn.Conv2d(16, 8, 3, padding=1, padding_mode="circular")
        self.branch1d = nn.Conv1d(8, 4, 3, padding=1, padding_mode="reflect")
        self.branch3d = nn.Conv3d(1, 2, (2, 3, 3), padding=(1, 1, 1))
        self.head = nn.Linear(8 + 4 + 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = x + self.block(x)
        x = self.circ(self.same(self.down(x)))
        a = x.mean((2, 3))
        b = self.branch1d(x.flatten(2)).mean(2)
        c = self.branch3d(x[:, None, :4]).mean((2, 3, 4))
        return self.head(torch.cat([a, b, c], 1))


class MLPStack(nn.Module):
    """A transformer-style MLP stack: Linear layers on [B, S, d] inputs and a LayerNorm."""

    def __init__(self, d: int = 12, depth: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d, bias=False))
            for _ in range(depth)
        )
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


KFAC_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def record_activations(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each Linear/Conv module's input, keyed by module path, via forward hooks."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: acts.__setitem__(name, inp[0].detach().clone())
        )
        for name, m in model.named_modules()
        if type(m) in KFAC_MODULES
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acts


def write_model_files(model: nn.Module, x: torch.Tensor, folder: Path) -> dict[str, Path]:
    """Export ``model`` in every checkpoint format, plus an activation dump."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    files = {
        "pt2": folder / "model.pt2",
        "safetensors": folder / "model.safetensors",
        "pt": folder / "model.pt",
        "pickle": folder / "module.pt",
        "acts": folder / "acts.safetensors",
        "params": folder / "params.safetensors",
    }
    torch.export.save(torch.export.export(model, (x,)), files["pt2"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, files["safetensors"])
    torch.save(state, files["pt"])
    torch.save(model, files["pickle"])
    save_file(record_activations(model, x), files["acts"])
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, files["params"])
    return files
