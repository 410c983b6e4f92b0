"""Valid but unusual inputs (docs/formats.md): convolutions that pad their own input are
folded exactly or refused by name, never silently wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kfac_cli.models.load import load_layer_table
from kfac_cli.ops.patches import layer_patches
from tests.conftest import invoke


class PrePadConv(nn.Conv2d):
    """A Conv2d whose ``forward`` pads its input first (as timm's Conv2dSame does)."""

    def __init__(self, pad, mode="constant", value=0.0, **kwargs) -> None:
        super().__init__(3, 4, 3, **kwargs)
        self.pre, self.pre_mode, self.value = pad, mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {"value": self.value} if self.pre_mode == "constant" else {}
        return super().forward(F.pad(x, self.pre, mode=self.pre_mode, **kw))


FOLDED = {
    "zero+numeric": (PrePadConv([1, 0, 2, 0], padding=1), "zeros"),
    "zero+same": (PrePadConv([1, 0, 2, 0], padding="same"), "zeros"),
    "zero+valid": (PrePadConv([1, 2, 0, 1], padding="valid"), "zeros"),
    "reflect-alone": (PrePadConv([1, 1, 2, 0], "reflect"), "reflect"),
    "replicate+replicate": (
        PrePadConv([1, 0, 1, 0], "replicate", padding=1, padding_mode="replicate"),
        "replicate",
    ),
    "circular-mode": (PrePadConv([0, 0, 0, 0], padding=1, padding_mode="circular"), "circular"),
}
REFUSED = {
    "reflect+numeric": PrePadConv([1, 1, 1, 1], "reflect", padding=1),
    "zero+reflect-mode": PrePadConv([1, 1, 1, 1], padding=1, padding_mode="reflect"),
    "reflect+replicate-mode": PrePadConv(
        [1, 1, 1, 1], "reflect", padding=1, padding_mode="replicate"
    ),
    "value-one": PrePadConv([1, 1, 1, 1], value=1.0),
    "crop": PrePadConv([-1, -1, 0, 0], padding=1),
    "reflect+reflect-mode": PrePadConv([1, 1, 1, 1], "reflect", padding=1, padding_mode="reflect"),
}


def _export(model: nn.Module, x: torch.Tensor, folder):
    model.eval()
    pt2 = folder / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    return pt2


@pytest.mark.parametrize("case", FOLDED, ids=str)
def test_a_pad_the_module_applies_is_folded_exactly(case, tmp_path):
    """The folded layer's patches times the weight are the module's own output (PyTorch's
    convolution through the module's forward)."""
    torch.manual_seed(0)
    conv, mode = FOLDED[case]
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 7, 6)
    layer = load_layer_table(_export(model, x, tmp_path)).layer("0")
    assert layer is not None and layer.conv.padding_mode == mode
    with torch.no_grad():
        y = conv(x) - conv.bias[:, None, None]
        p = layer_patches(x, layer.conv, "expand")
    assert p.shape[1] == y.shape[2] * y.shape[3]
    got = p @ conv.weight.flatten(1).T.detach()
    torch.testing.assert_close(got, y.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_a_pad_that_does_not_fold_leaves_the_layer_untreated(case, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(REFUSED[case])
    x = torch.randn(2, 3, 7, 6)
    pt2 = _export(model, x, tmp_path)
    table = load_layer_table(pt2)
    assert table.layer("0") is None
    (untreated,) = [u for u in table.untreated_layers if u["name"] == "0"]
    assert "pad" in untreated["reason"] or "crop" in untreated["reason"]
    assert b"0 (" in invoke("layers", pt2).stdout  # listed with the reason
    dump = tmp_path / "acts.safetensors"
    save_file({"0": x}, dump)
    for command in (["patches"], ["factors"]):
        out = tmp_path / "out.safetensors"
        proc = invoke(*command, pt2, dump, "-o", out)
        assert proc.returncode == 1 and b"0: expected a layer KFAC treats" in proc.stderr
        assert not out.exists()


def _dump(tmp_path, model, x, dtype=torch.float32, name="acts.safetensors"):
    pt2 = _export(model, x.float(), tmp_path)
    dump = tmp_path / name
    save_file({"0": x.to(dtype).contiguous()}, dump)
    return pt2, dump


def test_float16_reduce_sums_in_float32(tmp_path):
    """A float16 dump of magnitude ~100 on a 32x32 map: the window sums overflow float16;
    summed in float32 and cast once, the averages are exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = (torch.rand(2, 2, 32, 32) * 100 + 100).half()
    pt2, dump = _dump(tmp_path, nn.Sequential(conv), x, torch.float16)
    out = tmp_path / "r.safetensors"
    invoke("patches", pt2, dump, "-o", out, "--approx", "reduce", check=True)
    from safetensors.torch import load_file

    got = load_file(out)["0"]
    layer = load_layer_table(pt2).layer("0")
    want = layer_patches(x.double(), layer.conv, "reduce")
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


def test_an_overflow_is_an_error_naming_the_layer_and_the_fix(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    x = torch.randn(4, 2, 6, 6) * 1e20  # finite in float32; A's sums are not
    pt2, dump = _dump(tmp_path, model, x)
    out = tmp_path / "F.safetensors"
    proc = invoke("factors", pt2, dump, "-o", out)
    line = proc.stderr.decode().strip()
    assert proc.returncode == 1 and "0.A" in line and "--dtype float64" in line, line
    assert not out.exists()
    invoke("factors", pt2, dump, "-o", out, "--dtype", "float64", "--eigh", check=True)
    big = (torch.rand(2, 2, 32, 32) * 60000).half()  # reduce: fits float32, not float16
    pt2, dump16 = _dump(tmp_path, model, big, torch.float16, "big16.safetensors")
    proc = invoke("patches", pt2, dump16, "-o", tmp_path / "p.safetensors", "--approx", "reduce")
    assert proc.returncode == 0  # averages of float16 values fit float16


def test_nan_inputs_with_eigh_are_one_clear_line(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    x = torch.randn(4, 2, 6, 6)
    x[1, 0, 2, 2] = float("nan")
    pt2, dump = _dump(tmp_path, model, x)
    out = tmp_path / "F.safetensors"
    proc = invoke("factors", pt2, dump, "-o", out, "--eigh")
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("Error: 0.A: expected a finite factor")
    assert "internal" not in proc.stderr.decode() and not out.exists()


def test_taps_that_read_only_padding_decompose(tmp_path):
    """A dilated conv on a small map (DeepLab's ASPP): most rows of A are exactly zero;
    --eigh splits them off and the decomposition gives A back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=12, dilation=12))
    x = torch.randn(5, 3, 7, 7)
    pt2, dump = _dump(tmp_path, model, x)
    out = tmp_path / "F.safetensors"
    invoke("factors", pt2, dump, "-o", out, "--eigh", "--dtype", "float64", check=True)
    from safetensors.torch import load_file

    f = load_file(out)
    a, vals, vecs = f["0.A"], f["0.A.eigenvalues"], f["0.A.eigenvectors"]
    assert (a == 0).all(dim=1).sum() > 0  # some taps read only padding
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, a, rtol=0, atol=1e-12)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(len(vals), dtype=vals.dtype))
    assert torch.all(vals[1:] >= vals[:-1])


def test_eigh_falls_back_when_lapack_fails(monkeypatch):
    from kfac_cli.ops import eigh as module

    torch.manual_seed(0)
    m = torch.randn(6, 4, dtype=torch.float64)
    a = m @ m.T  # rank 4: two zero eigenvalues, no zero rows
    calls = {"n": 0}

    def failing(x):
        calls["n"] += 1
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(module.torch.linalg, "eigh", failing)
    vals, vecs = module.factor_eigh(a)
    assert calls["n"] == 2  # plain, then rescaled, then the SVD
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, a)
    torch.testing.assert_close(
        vals, torch.sort(torch.linalg.eigvalsh(a)).values, atol=1e-10, rtol=0
    )


def test_a_pickled_conv_with_its_own_forward_is_not_guessed(tmp_path):
    """A pickled module shows no graph: a conv class that overrides forward (and may pad
    its input) is listed as untreated with the reason, never treated with a guess."""
    torch.manual_seed(0)
    model = nn.Sequential(FOLDED["zero+same"][0], nn.Conv2d(4, 2, 1))
    path = tmp_path / "module.pt"
    torch.save(model, path)
    table = load_layer_table(path, unsafe_pickle=True)
    assert table.layer("0") is None and table.layer("1") is not None
    (untreated,) = table.untreated_layers
    assert untreated["name"] == "0" and "overrides forward" in untreated["reason"]
