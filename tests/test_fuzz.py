"""A seeded sweep of random valid models through every command (docs/formats.md), each
result checked against an oracle that shares no code with kfac-cli: PyTorch's own
convolution (through the module's forward, padding modes and pre-pads included), brute-force
sums over the patches and the recorded gradients, symmetry, bit-exact round trips. 50 cases
in the full suite (20 of them in the inner loop, ``-m 'not slow'``) and 300 more marked slow.

Every case ends in one of two ways: exit 0 with outputs equal to their oracles, or (for
inputs whose squares overflow the accumulation dtype) one error line naming the layer and
``--dtype float64``. Never an internal error, never a non-finite output from finite inputs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kfac_cli import record
from tests.conftest import invoke

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ("zeros", "reflect", "replicate", "circular")


def _prepadded(base: type) -> type:
    class PrePadded(base):
        """A conv whose own ``forward`` pads its input with zeros first (as timm's
        Conv2dSame does): folded into its padding by kfac-cli."""

        pre: list[int]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(F.pad(x, self.pre))

    return PrePadded


PREPADDED = {n: _prepadded(cls) for n, cls in CONV.items()}


class Net(nn.Module):
    """One conv (optionally called twice, or padding its own input), then a linear head
    on the spatial mean."""

    def __init__(self, conv: nn.Module, c_out: int, twice: bool) -> None:
        super().__init__()
        self.body, self.twice = conv, twice
        self.head = nn.Linear(c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.twice:
            h = self.body(torch.tanh(h))
        return self.head(h.flatten(2).mean(2))


@dataclass
class Case:
    seed: int
    n: int
    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: object
    mode: str
    size: tuple[int, ...]
    prepad: list[int] | None
    twice: bool
    dtype: torch.dtype
    scale: float
    dead: bool


def draw(seed: int) -> Case:
    """A random valid configuration (every choice PyTorch accepts)."""
    r = random.Random(seed)
    while True:
        n = r.choice([1, 2, 2, 3])
        groups = r.choice([1, 1, 2, 3])
        c_in = groups * r.randint(1, 3)
        c_out = groups * r.randint(1, 3)
        if r.random() < 0.2:  # depthwise
            c_in = c_out = groups = r.randint(1, 4)
        kmax = 3 if n == 3 else 7
        kernel = tuple(r.randint(1, kmax) for _ in range(n))
        size = tuple(r.choice([1, 2, 3, 5, 8]) for _ in range(n))
        stride = tuple(r.choice([1, 1, 2, 3, 9]) for _ in range(n))
        dilation = tuple(r.choice([1, 1, 2, 4, 12]) for _ in range(n))
        mode = r.choice(MODES)
        kind = r.choice(["int", "tuple", "same", "valid"])
        if kind == "same":
            stride = (1,) * n
            padding: object = "same"
        elif kind == "valid":
            padding = "valid"
        elif kind == "int":
            padding = r.randint(0, 3)
        else:
            padding = tuple(r.randint(0, 3) for _ in range(n))
        prepad = None
        if mode == "zeros" and padding != "same" and r.random() < 0.25:
            prepad = [r.randint(0, 2) for _ in range(2 * n)]
        twice = r.random() < 0.15 and c_in == c_out and padding == "same" and prepad is None
        dtype = r.choice([torch.float32, torch.float32, torch.float64, torch.float16])
        scale = r.choice([1.0, 1.0, 1e-20, 1e-5, 1e5, 1e20])
        if dtype == torch.float16:
            scale = r.choice([1.0, 100.0, 1e-3])
        case = Case(
            seed, n, c_in, c_out, groups, kernel, stride, dilation, padding, mode, size,
            prepad, twice, dtype, scale, r.random() < 0.3,
        )  # fmt: skip
        try:
            model, x = build(case)
            with torch.no_grad():
                model(x)
        except (RuntimeError, ValueError):
            continue  # PyTorch refuses it (kernel larger than the input, wide reflect pads)
        return case


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(case.seed)
    conv = (PREPADDED if case.prepad else CONV)[case.n](
        case.c_in,
        case.c_out,
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        padding_mode=case.mode,
    )
    if case.prepad:
        conv.pre = case.prepad
    model = Net(conv, case.c_out, case.twice)
    x = torch.randn(3, case.c_in, *case.size)
    if case.dead:
        x[:, 0] = 0  # a dead channel
        if case.c_in > 1:
            x[:, -1] = x[:, 0 if case.c_in == 1 else 1]  # a duplicated one
    x = x * case.scale
    if case.dtype == torch.float64:
        model, x = model.double(), x.double()
    return model.eval(), x


def _expand_oracle(model: Net, key: str, acts: dict) -> tuple:
    """``(input, weight W', output)`` such that patches @ W'.flatten(1).T = output: the
    module's own forward on the group-averaged input with a groups=1 copy of its conv."""
    conv = model.body
    g = conv.groups
    xin = acts[key].double()
    xg = xin.unflatten(1, (g, -1)).mean(1)
    twin = type(conv)(
        conv.in_channels // g,
        2,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        padding_mode=conv.padding_mode,
        bias=False,
    ).double()
    twin.pre = getattr(conv, "pre", None)
    with torch.no_grad():
        y = twin(xg)
    return twin.weight.detach(), y.flatten(2).transpose(1, 2)


def _case_files(case: Case, folder):
    model, x = build(case)
    loss = nn.CrossEntropyLoss(reduction="sum")
    y = torch.randint(0, 3, (x.shape[0],))
    data = [(x, y), (x.flip(0), y.flip(0))]  # a second dump, for merge
    pairs = record(model, data, loss, folder, fisher_type="empirical", run="fuzz")
    acts, grads = pairs[0]
    if case.dtype == torch.float16:  # a float16 model's dump, as far as kfac-cli sees
        save_file(
            {k: v.half() for k, v in load_file(acts).items()},
            acts,
            metadata={"format": "kfac-cli/activations", "batch_size": str(x.shape[0])},
        )
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    return model, pt2, acts, grads, pairs[1]


def _ok_or_overflow(proc, case: Case) -> bool:
    """Exit 0, or (squares beyond the dtype) one error line naming --dtype float64."""
    if proc.returncode == 0:
        return True
    text = proc.stderr.decode()
    assert "internal" not in text, text
    assert proc.returncode == 1 and "--dtype float64" in text, text
    assert case.scale >= 1e5, text  # only huge inputs may overflow
    return False


def run_case(seed: int, tmp_path) -> None:
    case = draw(seed)
    model, pt2, acts, grads, second = _case_files(case, tmp_path)
    dump = load_file(acts)
    table = json.loads(invoke("layers", pt2, "--json", check=True).stdout)
    names = {la["name"] for la in table["layers"]}
    assert set(dump) <= names | {f"{n}#1" for n in names}, (table, list(dump))
    conv_key = next(k for k in dump if not k.startswith("head"))
    # patches, expand and reduce, against PyTorch's convolution and the mean
    out = tmp_path / "P.safetensors"
    invoke("patches", pt2, acts, "-o", out, check=True)
    patches = load_file(out)
    red = tmp_path / "R.safetensors"
    invoke("patches", pt2, acts, "-o", red, "--approx", "reduce", check=True)
    reduced = load_file(red)
    for key, p in patches.items():
        assert p.dtype == dump[key].dtype
        if torch.isfinite(dump[key]).all():
            assert torch.isfinite(reduced[key]).all(), key
        # float rounding of a mean is relative to its summands, not to the mean
        eps = 1e-3 if p.dtype == torch.float16 else 1e-5 if p.dtype == torch.float32 else 1e-13
        summands = p.double().abs().amax(1)
        err = (reduced[key].double() - p.double().mean(1)).abs()
        spacing = 2.0**-24 if p.dtype == torch.float16 else 1e-300  # float16's subnormals
        assert bool((err <= eps * summands + spacing).all()), (key, float((err / summands).max()))
    w, y = _expand_oracle(model, conv_key, dump)
    got = patches[conv_key].double() @ w.flatten(1).T
    bound = (1e-2 if case.dtype == torch.float16 else 1e-5) * max(float(y.abs().max()), 1e-300)
    assert float((got - y).abs().max()) <= bound, seed
    # factors in the dumps' own dtype: exit 0 with finite factors, or a clean overflow
    proc = invoke("factors", pt2, acts, "--grads", grads, "-o", tmp_path / "F32.safetensors")
    if _ok_or_overflow(proc, case):
        assert all(
            torch.isfinite(v).all() for v in load_file(tmp_path / "F32.safetensors").values()
        )
    # factors against brute force over the patches and the recorded gradients
    fac = tmp_path / "F.safetensors"
    invoke("factors", pt2, acts, "--grads", grads, "-o", fac, "--dtype", "float64", check=True)
    factors = load_file(fac)
    p64 = tmp_path / "P64.safetensors"  # the oracle's rows in the factors' precision
    invoke("patches", pt2, acts, "-o", p64, "--dtype", "float64", check=True)
    patches = load_file(p64)
    g_dump = load_file(grads)
    for key, p in patches.items():
        layer = key.split("#")[0]
        a, gf = factors[f"{layer}.A"], factors[f"{layer}.G"]
        assert torch.equal(a, a.T) and torch.equal(gf, gf.T)
        assert torch.isfinite(a).all() and torch.isfinite(gf).all()
        if "#" in key or f"{layer}#1" in patches:
            continue  # a shared layer sums its calls: checked by test_factors
        rows = p.double()
        rows = torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], -1)
        want_a = torch.einsum("boi,boj->ij", rows, rows) / (rows.shape[0] * rows.shape[1])
        torch.testing.assert_close(a, want_a, rtol=1e-7, atol=1e-12 * float(want_a.abs().max()))
        g = g_dump[key].double().movedim(2, -1).reshape(-1, gf.shape[0])
        torch.testing.assert_close(gf, g.T @ g, rtol=1e-7, atol=1e-12 * float(gf.abs().max()))
    # merge: the factors of each dump, merged, are the factors of both
    both, halves = tmp_path / "both.safetensors", []
    for a_file, g_file in ((acts, grads), second):
        halves.append(tmp_path / f"half{len(halves)}.safetensors")
        invoke("factors", pt2, a_file, "--grads", g_file, "-o", halves[-1], "--dtype", "float64",
               check=True)  # fmt: skip
    invoke("factors", pt2, acts, second[0], "--grads", grads, second[1], "-o", both,
           "--dtype", "float64", check=True)  # fmt: skip
    merged = tmp_path / "merged.safetensors"
    invoke("merge", *halves, "-o", merged, check=True)
    want, got_m = load_file(both), load_file(merged)
    for key, value in want.items():
        torch.testing.assert_close(
            got_m[key], value, rtol=1e-10, atol=1e-12 * float(value.abs().max())
        )
    # canonicalize and back, bit for bit; info reads every output
    params = tmp_path / "params.safetensors"
    save_file({n: q.detach().clone() for n, q in model.named_parameters()}, params)
    can, back = tmp_path / "C.safetensors", tmp_path / "B.safetensors"
    invoke("canonicalize", pt2, params, "-o", can, check=True)
    invoke("canonicalize", "--inverse", can, "-o", back, check=True)
    original, again = load_file(params), load_file(back)
    assert all(torch.equal(original[k], again[k]) for k in original)
    info = json.loads(invoke("info", out, red, can, "--json", check=True).stdout)
    assert info["tensor_count"] == len(patches) + len(reduced) + len(load_file(can))


@pytest.mark.parametrize(  # 50 in the full suite, the first 20 in the inner loop
    "seed", [s if s < 20 else pytest.param(s, marks=pytest.mark.slow) for s in range(50)]
)
def test_random_valid_model(seed, tmp_path):
    run_case(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1300))
def test_random_valid_model_slow(seed, tmp_path):
    run_case(seed, tmp_path)
