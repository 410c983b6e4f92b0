"""The `apply` part of the benchmark (see run.py): preconditioning per-example gradients.

A CIFAR ResNet-20 (0.27 M parameters), its KFAC factors from `kfac-cli factors` on a small
recorded batch, and 1,000 random per-example gradients ``[N, *param_shape]`` (about 1 GB of
float32). Side by side, whole processes: `kfac-cli apply --batch-first --inverse --damping`,
curvlinops' `KFACInverseLinearOperator` on the same factors and vectors (load_file, its
matmat on ``[*param_shape, N]`` columns, save_file), and the floor: read the input once,
two `torch.mm` per block at the same shapes, write the output once.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

VECTORS = 1000

ANCHOR = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from tests.benchmarks.apply import resnet20
import curvlinops
factors_file, grads_file, out_file, damping = sys.argv[1:]
torch.manual_seed(0)
model = resnet20()
x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
kinds = (torch.nn.Conv2d, torch.nn.Linear)
treated = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
params = [p for _, m in treated for p in m.parameters()]
op = curvlinops.KFACLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)],
    check_deterministic=False, separate_weight_and_bias=False, num_data=1)
f = load_file(factors_file)
names = {n for n, _ in treated}
op._input_covariances = {n: f[f"{n}.A"] for n in names}
op._gradient_covariances = {n: f[f"{n}.G"] for n in names}
inv = curvlinops.KFACInverseLinearOperator(op, damping=float(damping))
grads = load_file(grads_file)
order = [f"{n}.{k}" for n, m in treated for k, _ in m.named_parameters()]
result = inv._matmat([grads[n].movedim(0, -1) for n in order])
out = dict(grads)  # the untreated (BatchNorm) gradients as they are
out.update({n: r.movedim(-1, 0).contiguous() for n, r in zip(order, result)})
save_file(out, out_file)
"""

FLOOR = r"""  # after run.READ
import json, os, sys, torch
factors_file, grads_file, out_file, blocks = sys.argv[1:]
buf = memoryview(bytearray(8 << 20))
for _ in read_tensors(grads_file, buf):  # every input byte, once
    pass
for c_out, d, n in json.loads(blocks):  # the two products per block, at apply's shapes:
    k = max(1, (8 << 20) // (16 * c_out * d))  # its chunks of vectors, in reused buffers
    g, a = torch.full((c_out, c_out), 0.5), torch.full((d, d), 0.5)
    m, t = torch.full((k * c_out, d), 0.5), torch.full((c_out, k * d), 0.5)
    right, left = torch.empty_like(m), torch.empty_like(t)
    for start in range(0, n, k):
        rows = min(k, n - start)
        if rows == k:
            torch.mm(m, a, out=right), torch.mm(g, t, out=left)
        else:
            torch.mm(m[: rows * c_out], a), torch.mm(g, t[:, : rows * d])
with open(grads_file, "rb") as src, open(out_file, "wb") as out:
    while chunk := src.read(8 << 20):  # every output byte, once
        out.write(chunk)
    out.flush(); os.fsync(out.fileno())
"""


def resnet20():
    """A CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.short = (
                nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                if stride != 1 or c_in != c_out
                else nn.Identity()
            )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    layers, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(c, width, stride if i == 0 else 1))
            c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval()


def _workload(folder: Path):
    """The model, its factors and the per-example gradients (made once)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from kfac_cli.jobs.factors import run_factors
    from kfac_cli.record import record

    factors, grads = folder / "apply-factors.safetensors", folder / "apply-grads.safetensors"
    if factors.exists() and grads.exists():
        return factors, grads
    torch.manual_seed(0)
    model = resnet20()
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))]
    shards = record(model, data, nn.CrossEntropyLoss(), folder / "apply-dumps", force=True,
                    fisher_type="empirical")  # fmt: skip
    pt2 = folder / "apply-model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    run_factors(pt2, [str(shards[0][0])], str(factors), grads=[str(shards[0][1])], force=True)
    gen = torch.Generator().manual_seed(1)
    save_file(
        {n: torch.randn(VECTORS, *p.shape, generator=gen) for n, p in model.named_parameters()},
        grads,
    )
    return factors, grads


def bench_apply(folder: Path, args, env: dict, report: dict, timed, fresh, fmt) -> None:
    from safetensors import safe_open

    from tests.benchmarks.run import READ, ROOT, _has_curvlinops

    factors, grads = _workload(folder)
    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    out, anchor_out, floor_out = (folder / n for n in ("ap.st", "an-ap.st", "fl-ap.bin"))
    with safe_open(factors, "pt") as f:
        meta = json.loads(f.metadata()["layers"])
    blocks = [(la["C_out"], la["D"], VECTORS) for la in meta.values()]
    damping = "1e-3"
    variants = {
        "kfac-cli apply": [kfac, "apply", str(factors), str(grads), "--batch-first", "--inverse",
                           "--damping", damping, "-o", str(out), "--force", "-q"],
        "floor": [sys.executable, "-c", READ + FLOOR, str(factors), str(grads), str(floor_out),
                  json.dumps(blocks)],
    }  # fmt: skip
    if _has_curvlinops():
        variants["curvlinops"] = [
            sys.executable, "-c", ANCHOR, str(factors), str(grads), str(anchor_out), damping,
        ]  # fmt: skip
    env = {**env, "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeats):
        for name, cmd in variants.items():
            fresh((out, anchor_out, floor_out))
            runs.setdefault(name, []).append(timed(cmd, env))
    fresh((out, anchor_out, floor_out))
    bare = timed([sys.executable, "-c", "import torch"], env)[1]
    med = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    size = grads.stat().st_size
    print(
        f"\napply --inverse to {VECTORS} per-example gradients of a ResNet-20 "
        f"({size / 2**30:.2f} GiB float32; {args.threads} thread(s), {args.repeats} runs, "
        "whole processes):"
    )
    for name, r in runs.items():
        rss = max(m for _, m in r) - bare
        print(f"{name:16} {fmt([t for t, _ in r]):>20}  x floor {med[name] / med['floor']:5.2f}"
              f"  peak RSS {rss / 2**20:6.0f} MiB")  # fmt: skip
        report[f"apply {name}"] = {"seconds": [t for t, _ in r], "rss_above_torch": rss}
    if "curvlinops" in med:
        speed = med["curvlinops"] / med["kfac-cli apply"]
        print(f"curvlinops / kfac-cli: {speed:.2f}x")
        report["apply x_faster_than_curvlinops"] = speed
    report["apply x_floor"] = med["kfac-cli apply"] / med["floor"]
