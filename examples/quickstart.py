"""kfac-cli's quick start: a small CNN, its export and dumps, every command.

Makes a CNN with a grouped, a dilated and a 'same'-padded even-kernel convolution and a
Linear head, exports it with torch.export, records its layer inputs and output gradients
with kfac_cli.record, then runs `kfac-cli layers`, `kfac-cli patches` (expand and reduce),
`kfac-cli canonicalize` (there and back) and `kfac-cli factors`, and checks the results
against PyTorch.

    $ python examples/quickstart.py [FOLDER]      # default folder: ./kfac-quickstart
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli.record import record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_activations import kfac_cli


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 4, 4, padding="same")  # even kernel: padding (1, 2)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.dilated(x))
        x = self.same(x)
        return self.head(x.mean((2, 3)))


def run(*args: object) -> str:
    cmd = [*kfac_cli(), *map(str, args)]
    print("$ kfac-cli " + " ".join(map(str, args)), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out, end="", flush=True)
    return out


def main(folder: Path) -> None:
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    [(acts_file, outgrads_file)] = record(
        model, [(x, y)], nn.CrossEntropyLoss(), folder, fisher_type="empirical", force=True
    )
    acts = load_file(acts_file)
    grads_file = folder / "grads.safetensors"
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    save_file({n: p.grad.clone() for n, p in model.named_parameters()}, grads_file)
    print(f"wrote {pt2}, {acts_file}, {outgrads_file} and {grads_file}\n")

    run("layers", pt2)
    expand, reduce = folder / "patches.safetensors", folder / "averaged.safetensors"
    canon, back = folder / "canonical.safetensors", folder / "grads-back.safetensors"
    run("patches", pt2, acts_file, "-o", expand, "--force", "-q")
    run("patches", pt2, acts_file, "-o", reduce, "--approx", "reduce", "--force", "-q")
    run("canonicalize", pt2, grads_file, "-o", canon, "--force", "-q")
    run("canonicalize", "--inverse", canon, "-o", back, "--force", "-q")
    factors = folder / "factors.safetensors"
    run("factors", pt2, acts_file, "--grads", outgrads_file, "-o", factors, "--force", "-q")

    # Checks: the patches reproduce each convolution, reduce is their mean, the round trip
    # is bit-exact.
    p, r = load_file(expand), load_file(reduce)
    for name in ("conv1", "dilated", "same"):
        conv = getattr(model, name)
        out = conv(acts[name]) - conv.bias[:, None, None]
        got = p[name] @ conv.weight.flatten(1).T
        torch.testing.assert_close(got, out.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r[name], p[name].mean(1), rtol=1e-5, atol=1e-6)
    assert p["grouped"].shape == (4, 16 * 16, 8 // 4 * 9)
    grads, grads_back = load_file(grads_file), load_file(back)
    assert all(torch.equal(grads[k], grads_back[k]) for k in grads)
    # The input factor A of conv1 is the mean outer product of its patches with a ones
    # column (joint bias), and its G ⊗ A block acts on the canonical gradient.
    f = load_file(factors)
    a = torch.cat([p["conv1"], torch.ones_like(p["conv1"][..., :1])], 2).flatten(0, 1)
    torch.testing.assert_close(f["conv1.A"], a.T @ a / a.shape[0], rtol=1e-4, atol=1e-6)
    assert f["conv1.G"].shape == (8, 8) and torch.equal(f["conv1.G"], f["conv1.G"].T)
    print("\nwrote " + ", ".join(str(f) for f in (expand, reduce, canon, back, factors)))
    print(
        "all checks passed: patches match torch's convolutions, reduce is their mean, "
        "canonicalize round-trips bit-exactly, A is the patches' second moment"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac-quickstart"))
