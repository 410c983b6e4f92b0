"""A deterministic benchmark workload modelled on the conv layers of real networks.

Every conv input of ResNet-18 at 224x224 (7x7/s2 stem, 3x3, 1x1/s2 downsample),
MobileNetV2 depthwise blocks, ResNeXt groups=32, ConvNeXt's 7x7 depthwise and 4x4/s4 stem,
DeepLabV3's dilated convs (d = 2, 4, 12, 36), 'same' with even kernels, Inception's 1x7/7x1,
a ViT 16x16/s16 patch embedding and ResNet-50's 1x1 bottleneck inputs.
Presets: ``small`` (batch 8) and ``large`` (batch 32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from torch import nn

PRESETS = {"small": 8, "large": 32, "tiny": 4}


@dataclass(frozen=True)
class ConvLayer:
    name: str
    c_in: int
    c_out: int
    size: tuple[int, int]
    kwargs: dict

    def module(self) -> nn.Conv2d:
        return nn.Conv2d(self.c_in, self.c_out, **self.kwargs)

    def params(self):
        """The layer's :class:`kfac_cli.ops.conv.ConvParams`."""
        from kfac_cli.ops.conv import ConvParams

        kw = self.kwargs
        return ConvParams.create(
            kw["kernel_size"],
            kw.get("stride", 1),
            kw.get("padding", 0),
            kw.get("dilation", 1),
            kw.get("groups", 1),
            n=2,
        )


def _resnet18() -> list[ConvLayer]:
    layers = [
        ConvLayer(
            "resnet18.conv1",
            3,
            64,
            (224, 224),
            dict(kernel_size=7, stride=2, padding=3, bias=False),
        )
    ]
    c, s = 64, 56
    for stage, c_out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            down = stage > 1 and block == 0
            c_block_in = c
            stride = 2 if down else 1
            layers.append(
                ConvLayer(
                    f"resnet18.layer{stage}.{block}.conv1",
                    c,
                    c_out,
                    (s, s),
                    dict(kernel_size=3, stride=stride, padding=1, bias=False),
                )
            )
            s_out = s // stride
            layers.append(
                ConvLayer(
                    f"resnet18.layer{stage}.{block}.conv2",
                    c_out,
                    c_out,
                    (s_out, s_out),
                    dict(kernel_size=3, padding=1, bias=False),
                )
            )
            if down:
                layers.append(
                    ConvLayer(
                        f"resnet18.layer{stage}.{block}.downsample",
                        c_block_in,
                        c_out,
                        (s, s),
                        dict(kernel_size=1, stride=2, bias=False),
                    )
                )
            c, s = c_out, s_out
    return layers


def layers() -> list[ConvLayer]:
    """The workload's layers (inputs per sample: ``[c_in, *size]``)."""
    out = _resnet18()
    out += [
        ConvLayer(
            "mobilenetv2.dw1",
            96,
            96,
            (112, 112),
            dict(kernel_size=3, stride=2, padding=1, groups=96),
        ),
        ConvLayer(
            "mobilenetv2.dw2", 144, 144, (56, 56), dict(kernel_size=3, padding=1, groups=144)
        ),
        ConvLayer(
            "mobilenetv2.dw3", 192, 192, (28, 28), dict(kernel_size=3, padding=1, groups=192)
        ),
        ConvLayer("resnext.conv2", 128, 128, (56, 56), dict(kernel_size=3, padding=1, groups=32)),
        ConvLayer("convnext.stem", 3, 96, (224, 224), dict(kernel_size=4, stride=4)),
        ConvLayer("convnext.dwconv", 96, 96, (56, 56), dict(kernel_size=7, padding=3, groups=96)),
        *(
            ConvLayer(
                f"deeplabv3.aspp_d{d}",
                256,
                256,
                (28, 28),
                dict(kernel_size=3, padding=d, dilation=d),
            )
            for d in (2, 4, 12, 36)
        ),
        ConvLayer("same.k4", 64, 64, (56, 56), dict(kernel_size=4, padding="same")),
        ConvLayer("same.k2", 128, 128, (28, 28), dict(kernel_size=2, padding="same")),
        ConvLayer("inception.1x7", 128, 128, (17, 17), dict(kernel_size=(1, 7), padding=(0, 3))),
        ConvLayer("inception.7x1", 128, 128, (17, 17), dict(kernel_size=(7, 1), padding=(3, 0))),
        ConvLayer("vit.patch_embed", 3, 384, (224, 224), dict(kernel_size=16, stride=16)),
        *(
            ConvLayer(f"resnet50.layer1.{i}.conv1", 256, 64, (56, 56), dict(kernel_size=1))
            for i in range(3)
        ),
    ]
    return out


class Workload(nn.Module):
    """Every layer as a parallel branch (a module path per layer)."""

    def __init__(self, convs: list[ConvLayer]) -> None:
        super().__init__()
        self.specs = convs
        self.convs = nn.ModuleDict({c.name.replace(".", "_"): c.module() for c in convs})

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs.values(), xs)]


SHARDS = 4


def write(folder: Path, preset: str) -> dict:
    """Write ``model.pt2``, ``acts.safetensors`` (every layer's input, streamed,
    deterministic) and ``shards/acts-i``, ``shards/grads-i`` (the same samples in
    :data:`SHARDS` shards, with output gradients of an empirical Fisher and a sum loss)."""
    from kfac_cli.files.writer import SafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    batch = PRESETS[preset]
    convs = layers()
    torch.manual_seed(0)
    model = Workload(convs).eval()
    examples = tuple(torch.zeros(1, c.c_in, *c.size) for c in convs)
    torch.export.save(torch.export.export(model, examples), folder / "model.pt2")
    names = [f"convs.{c.name.replace('.', '_')}" for c in convs]
    outputs = [(c.c_out, *c.params().output_size(c.size)) for c in convs]
    gen = torch.Generator().manual_seed(1)

    def dump(path: Path, rows: int, grads: bool, meta: dict) -> int:
        shapes = outputs if grads else [(c.c_in, *c.size) for c in convs]
        lead = (1, rows) if grads else (rows,)
        entries = [(n, torch.float32, (*lead, *s)) for n, s in zip(names, shapes)]
        with open(path, "wb") as fh:
            writer = SafetensorsWriter(fh, entries, meta)
            for name, _, shape in entries:
                for _ in range(rows):
                    writer.write(
                        name, torch.randn(*lead[:-1], 1, *shape[len(lead) :], generator=gen)
                    )
            writer.close()
        return sum(prod(s) * 4 for _, _, s in entries)

    in_bytes = dump(folder / "acts.safetensors", batch, False, {"workload": preset})
    (folder / "shards").mkdir(exist_ok=True)
    grad_meta = {
        "format": "kfac-cli/output-gradients",
        "fisher_type": "empirical",
        "loss_reduction": "sum",
        "num_per_example_loss_terms": "1",
        "mc_samples": "1",
    }
    rows = max(1, batch // SHARDS)
    grad_bytes = 0
    for i in range(SHARDS):
        dump(folder / "shards" / f"acts-{i}.safetensors", rows, False, {"workload": preset})
        grad_bytes += dump(folder / "shards" / f"grads-{i}.safetensors", rows, True, grad_meta)
    info = {
        "preset": preset,
        "batch": batch,
        "layers": len(convs),
        "input_bytes": in_bytes,
        "shards": SHARDS,
        "gradient_bytes": grad_bytes,
    }
    (folder / "workload.json").write_text(json.dumps(info))
    return info
