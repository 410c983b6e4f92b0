"""`kfac-cli apply`: against curvlinops' KFACLinearOperator, EKFACLinearOperator and
KFACInverseLinearOperator, dense matrix powers, and itself across layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import invoke, run_cli
from tests.test_ekfac import _reference as _ekfac_reference
from tests.test_factors import _ours, _reference, _setup, _treated

curvlinops = pytest.importorskip("curvlinops", reason="the reference (see README)")

MODES = {  # name: (apply's options, KFACInverseLinearOperator's keywords or None: F itself)
    "curvature": ([], None),
    "tikhonov": (["--inverse", "--damping", "0.01"], {"damping": 0.01}),
    "tikhonov-pair": (["--inverse", "--damping", "0.01,0.003"], {"damping": (0.01, 0.003)}),
    "heuristic": (
        ["--inverse", "--damping", "0.01", "--heuristic-damping", "--min-damping", "1e-4"],
        {"damping": 0.01, "use_heuristic_damping": True, "min_damping": 1e-4},
    ),
    "exact": (
        ["--inverse", "--damping", "0.01", "--exact-damping"],
        {"damping": 0.01, "use_exact_damping": True},
    ),
}


def _vectors(model, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*p.shape, k, dtype=torch.float64, generator=gen)
        for name, p in model.named_parameters()
    }


def _apply(factors, tensors: dict, folder, *options) -> dict[str, torch.Tensor]:
    """``kfac-cli apply`` on ``tensors``; the output's keys in the input's order (all of
    them unless dropped)."""
    src, out = folder / "v.safetensors", folder / "out.safetensors"
    save_file(tensors, src)
    proc = invoke("apply", factors, src, "-o", out, "--force", *options)
    assert proc.returncode == 0, proc.stderr.decode()
    with safe_open(out, "pt") as f, safe_open(src, "pt") as g:
        kept = [k for k in g.keys() if "drop" not in options or k != "extra.scale"]  # noqa: SIM118
        assert list(f.keys()) == kept
    return load_file(out)


CASES = [
    (approx, sep, mode)
    for approx in ("expand", "reduce")
    for sep in (False, True)
    for mode in MODES
    if approx == "expand" or mode in ("curvature", "exact")
]


@pytest.mark.parametrize(
    "approx,sep,mode",
    CASES,
    ids=[f"{a}-{'separate' if s else 'joint'}-{m}" for a, s, m in CASES],
)
def test_apply_equals_curvlinops_kfac(tmp_path, approx, sep, mode):
    model, loss, data = _setup("cnn", "ce", "mean")
    options, inverse = MODES[mode]
    params = [p for _, m in _treated(model) for p in m.parameters()]
    ref = _reference(
        model, loss, data, params, fisher_type="mc", mc_samples=2, kfac_approx=approx,
        separate_weight_and_bias=sep,
    )  # fmt: skip
    if inverse is not None:
        ref = curvlinops.KFACInverseLinearOperator(ref, **inverse)
    _, _, path = _ours(model, loss, data, tmp_path, "mc", approx, sep, 2)
    vectors = _vectors(model, 3)
    got = _apply(path, vectors, tmp_path, "--columns", *options)
    expected = ref._matmat([vectors[n] for n, _ in model.named_parameters()])
    for (name, _), value in zip(model.named_parameters(), expected):
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * value.abs().max())


@pytest.mark.parametrize("sep", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("mode", ["curvature", "exact"])
def test_apply_equals_curvlinops_ekfac(tmp_path, sep, mode):
    model, loss, data = _setup("cnn", "ce", "mean")
    got_file, _, path = _ours(model, loss, data, tmp_path, "type-2", "expand", sep, ekfac=True)
    ref, _ = _ekfac_reference(model, loss, data, sep, got_file, fisher_type="type-2")
    options, inverse = MODES[mode]
    if inverse is not None:
        ref = curvlinops.KFACInverseLinearOperator(ref, **inverse)
    vectors = _vectors(model, 2)
    got = _apply(path, vectors, tmp_path, "--columns", *options)
    expected = ref._matmat([vectors[n] for n, _ in model.named_parameters()])
    for (name, _), value in zip(model.named_parameters(), expected):
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * value.abs().max())


def _dense_blocks(factors: dict, layers: list[str]) -> list[torch.Tensor]:
    return [torch.kron(factors[f"{n}.G"], factors[f"{n}.A"]) for n in layers]


@pytest.mark.parametrize("power", [0.5, -0.5, -1.0, 2.0])
def test_powers_equal_dense_matrix_powers(tmp_path, power):
    """Joint blocks of canonical vectors (batch first) against the dense damped block's
    power from its own eigendecomposition, and the round trip F^-1 F v = v."""
    model, loss, data = _setup("cnn", "ce", "sum")
    factors, _, path = _ours(model, loss, data, tmp_path, "empirical", "expand", False)
    vectors = {n: v.movedim(-1, 0).contiguous() for n, v in _vectors(model, 4).items()}
    got = _apply(path, vectors, tmp_path, "--batch-first", "--power", str(power),
                 "--exact-damping", "--damping", "0.1")  # fmt: skip
    for name, module in _treated(model):
        block = torch.kron(factors[f"{name}.G"], factors[f"{name}.A"])
        vals, vecs = torch.linalg.eigh(block)
        dense = (vecs * (vals + 0.1).pow(power)) @ vecs.T

        def joint(t, name=name, module=module):
            w = t[f"{name}.weight"].flatten(2)
            if module.bias is None:
                return w.flatten(1)
            return torch.cat([w, t[f"{name}.bias"][:, :, None]], 2).flatten(1)

        expected = joint(vectors) @ dense.T
        torch.testing.assert_close(
            joint(got), expected, rtol=1e-9, atol=1e-9 * expected.abs().max()
        )
    back = _apply(path, got, tmp_path / "..", "--batch-first", "--power", str(-power),
                  "--exact-damping", "--damping", "0.1")  # fmt: skip
    for name, value in vectors.items():
        torch.testing.assert_close(back[name], value, rtol=1e-8, atol=1e-8)


def test_batch_first_equals_one_at_a_time_and_canonical_input(tmp_path):
    model, loss, data = _setup("cnn", "ce", "mean")
    _, _, path = _ours(model, loss, data, tmp_path, "empirical", "expand", False)
    many = {n: v.movedim(-1, 0).contiguous() for n, v in _vectors(model, 5).items()}
    options = ["--inverse", "--damping", "0.01"]
    batched = _apply(path, many, tmp_path, "--batch-first", *options)
    for i in range(5):
        one = _apply(path, {n: v[i] for n, v in many.items()}, tmp_path, *options)
        for name, value in one.items():
            torch.testing.assert_close(batched[name][i], value, rtol=1e-12, atol=1e-14)
    pt2 = tmp_path / "model.pt2"
    src, canon = tmp_path / "many.safetensors", tmp_path / "canon.safetensors"
    save_file(many, src)
    proc = invoke("canonicalize", pt2, src, "--batch-first", "--layout", "matrix", "-o", canon)
    assert proc.returncode == 0, proc.stderr.decode()
    out = tmp_path / "applied-canon.safetensors"
    assert invoke("apply", path, canon, "-o", out, *options).returncode == 0
    back = tmp_path / "back.safetensors"
    assert invoke("canonicalize", "--inverse", out, "-o", back).returncode == 0
    for name, value in load_file(back).items():
        torch.testing.assert_close(value, batched[name], rtol=1e-12, atol=1e-14)


def test_untreated_tensors_and_errors(tmp_path):
    model, loss, data = _setup("cnn", "ce", "mean")
    _, _, path = _ours(model, loss, data, tmp_path, "empirical", "expand", False)
    vectors = {n: v[..., 0].contiguous() for n, v in _vectors(model, 1).items()}
    vectors["extra.scale"] = torch.ones(3, dtype=torch.float64)
    kept = _apply(path, vectors, tmp_path)
    assert torch.equal(kept["extra.scale"], vectors["extra.scale"])
    zero = _apply(path, vectors, tmp_path, "--untreated", "zero")
    assert torch.equal(zero["extra.scale"], torch.zeros(3, dtype=torch.float64))
    dropped = _apply(path, vectors, tmp_path, "--untreated", "drop")
    assert "extra.scale" not in dropped and dropped.keys() == set(vectors) - {"extra.scale"}
    src = tmp_path / "v.safetensors"
    proc = invoke("apply", path, src, "-o", tmp_path / "x", "--untreated", "error")
    assert proc.returncode == 1 and "extra.scale" in proc.stderr.decode()
    bad = dict(vectors, **{"0.weight": torch.zeros(4, 3, 2, 2, dtype=torch.float64)})
    save_file(bad, src)
    proc = invoke("apply", path, src, "-o", tmp_path / "x")
    assert proc.returncode == 1 and "0.weight" in proc.stderr.decode()
    save_file(vectors, src)
    proc = invoke("apply", path, src, "-o", tmp_path / "x", "--inverse")  # singular: N < D
    line = proc.stderr.decode()
    assert proc.returncode == 1 and "--damping" in line and "singular" in line, line
    proc = invoke("apply", path, src, "-o", tmp_path / "x", "--power", "0.5", "--damping", "1")
    assert proc.returncode == 1 and "--exact-damping" in proc.stderr.decode()
    assert not (tmp_path / "x").exists()


def test_layers_stdout_and_another_models_tensors(tmp_path):
    model, loss, data = _setup("cnn", "ce", "mean")
    _, _, path = _ours(model, loss, data, tmp_path, "empirical", "expand", False)
    vectors = {n: v[..., 0].contiguous() for n, v in _vectors(model, 1).items()}
    src = tmp_path / "v.safetensors"
    save_file(vectors, src)
    proc = run_cli("apply", path, src, "-o", "-", "--layer", "4", "--damping", "0.1", "--inverse")
    assert proc.returncode == 0, proc.stderr.decode()
    from safetensors.torch import load

    got = load(proc.stdout)
    for name, value in vectors.items():  # layer 4 applied, the others kept
        assert torch.equal(got[name], value) == (not name.startswith("4."))
    save_file({"encoder.weight": torch.zeros(3, 3)}, src)
    proc = invoke("apply", path, src, "-o", tmp_path / "x")
    assert proc.returncode == 1 and "none of its 3 layers" in proc.stderr.decode()
