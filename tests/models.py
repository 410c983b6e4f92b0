"""Real models for end-to-end tests, and how to record their activation dumps."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
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
    save_file(hook_dump(model, x), files["acts"])
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, files["params"])
    return files


class TinyGPT(nn.Module):
    """A language model as people have them: a tied output head, a frozen positional
    table, LayerNorm, and a Linear MLP on [B, S, d] inputs."""

    def __init__(self, vocab: int = 17, d: int = 8, seq: int = 5) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(seq, d), requires_grad=False)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids) + self.wpe[: ids.shape[1]]
        h = h + self.proj(torch.relu(self.fc(self.ln(h))))
        return self.lm_head(h)


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardised convolution: the weight is computed in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ComputedWeights(nn.Module):
    """A weight-standardised stem, a weight-normalised positional conv (Wav2Vec2) and a
    transposed conv: layers KFAC cannot treat, between layers it can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3, padding=1), dim=2)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.conv(self.gn(self.stem(x))))
        s = h.flatten(2)
        s = s + self.pos(s)
        return self.head(s.mean(2))


class BNNet(nn.Module):
    """A ResNet-style block with BatchNorm (running statistics, num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class SharedPart(nn.Module):
    """CoaT's shared positional conv: one module registered as ``cpe`` and again inside
    each block (``blocks.0.pos``), and called only through the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.blocks = nn.ModuleList(_Block(self.cpe) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, pos: nn.Module) -> None:
        super().__init__()
        self.pos = pos
        self.mix = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.relu(x + self.pos(x)))


class Conv2dSame(nn.Conv2d):
    """TensorFlow's 'same' as timm's ``Conv2dSame`` computes it: zero padding, the extra
    row and column at the end, applied in ``forward`` before a conv of padding 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(
            x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]
        ):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PaddedOutside(nn.Module):
    """A stride-2 'same' conv as timm builds it, and a plain conv whose input the parent
    module pads (the hook on it records the padded input)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 4, 3, stride=2)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.pad(torch.relu(self.stem(x)), [1, 0, 1, 0]))
        return self.head(h.mean((2, 3)))


def hook_dump(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each nn.Linear and convolution module's input keyed by module name, as a user's
    forward hooks record it (every such module, including those KFAC cannot treat)."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: acts.__setitem__(name, inp[0].detach().clone())
        )
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return acts
