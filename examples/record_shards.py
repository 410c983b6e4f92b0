"""Record one run's dumps in shards, in separate processes, with the labels of one call.

MC Fisher dumps depend on the labels `record` samples from the model's predictive
distribution with one generator (curvlinops' seed). Shards recorded in separate processes
get the labels of a single call over all batches when each process starts at its first
batch's index (`start`), shares the run's name (`run`), and continues the generator the
previous shard left behind (`generator`, its state saved with `get_state`). This script
records 4 batches in two processes of 2 batches each, then all 4 in one call, and checks
that the dumps are the same bytes; `kfac-cli merge` of the shards' factors then equals the
factors of all the dumps.

    $ python examples/record_shards.py [FOLDER]     # default: ./kfac-shards
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from kfac_cli import record

BATCHES = 4


def setup() -> tuple[nn.Module, list, nn.Module]:
    """The same model and data in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    data = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(BATCHES)]
    return model, data, nn.CrossEntropyLoss()


def shard(folder: Path, start: int, stop: int) -> None:
    """One process: batches ``start:stop``, continuing the generator of the shard before."""
    model, data, loss = setup()
    generator = torch.Generator().manual_seed(2147483647)  # curvlinops' seed
    if start:
        generator.set_state(torch.load(folder / f"generator-{start}.pt"))
    record(model, data[start:stop], loss, folder, fisher_type="mc", generator=generator,
           start=start, run="example")  # fmt: skip
    torch.save(generator.get_state(), folder / f"generator-{stop}.pt")


def kfac_cli() -> list[str]:
    exe = Path(sys.executable).with_name("kfac-cli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kfac_cli"]


def main(folder: Path) -> None:
    sharded, whole = folder / "sharded", folder / "whole"
    for f in (sharded, whole):
        f.mkdir(parents=True, exist_ok=True)
    for start, stop in ((0, 2), (2, BATCHES)):  # each shard in a process of its own
        args = [sys.executable, __file__, "--shard", str(sharded), str(start), str(stop)]
        subprocess.run(args, check=True)
    model, data, loss = setup()
    record(model, data, loss, whole, fisher_type="mc", run="example")
    for i in range(BATCHES):
        for kind in ("acts", "grads"):
            name = f"{kind}-{i:05d}.safetensors"
            assert (sharded / name).read_bytes() == (whole / name).read_bytes(), name
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (data[0][0],)), pt2)
    parts = []
    for start, stop in ((0, 2), (2, BATCHES)):
        acts = [str(sharded / f"acts-{i:05d}.safetensors") for i in range(start, stop)]
        grads = [a.replace("acts-", "grads-") for a in acts]
        parts.append(str(folder / f"F{start}.safetensors"))
        cmd = [*kfac_cli(), "factors", str(pt2), *acts, "--grads", *grads, "-o", parts[-1]]
        subprocess.run([*cmd, "--dtype", "float64", "-q", "--force"], check=True)
    merged, one = folder / "merged.safetensors", folder / "one.safetensors"
    subprocess.run([*kfac_cli(), "merge", *parts, "-o", str(merged), "-q", "--force"], check=True)
    acts = [str(whole / f"acts-{i:05d}.safetensors") for i in range(BATCHES)]
    grads = [a.replace("acts-", "grads-") for a in acts]
    cmd = [*kfac_cli(), "factors", str(pt2), *acts, "--grads", *grads, "-o", str(one)]
    subprocess.run([*cmd, "--dtype", "float64", "-q", "--force"], check=True)
    from safetensors.torch import load_file

    a, b = load_file(merged), load_file(one)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14)
    print(f"shards recorded in 2 processes equal one call ({BATCHES} batches); merge equal: passed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--shard"]:  # one shard's process
        shard(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-shards"))
