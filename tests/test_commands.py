"""`kfac-cli patches` and `kfac-cli canonicalize` end to end, as subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kfac_cli.models.load import load_layer_table
from kfac_cli.ops.patches import layer_patches
from tests.conftest import CUDA, interrupt_mid_write, invoke, run_cli
from tests.models import MLPStack, ResNetLike, hook_dump, write_model_files

CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = ResNetLike()
    x = torch.randn(3, 3, 16, 16)
    files = write_model_files(model, x, tmp_path_factory.mktemp("cnn"))
    acts64 = {k: v.double() for k, v in load_file(files["acts"]).items()}
    files["acts64"] = files["acts"].with_name("acts64.safetensors")
    save_file(acts64, files["acts64"])
    return model, files


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_patches_end_to_end(cnn, tmp_path, approx, dtype):
    _, files = cnn
    acts_file = files["acts"] if dtype == "float32" else files["acts64"]
    out = tmp_path / "patches.safetensors"
    proc = run_cli("patches", files["pt2"], acts_file, "-o", out, "--approx", approx, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    table = load_layer_table(files["pt2"])
    acts = load_file(acts_file)
    got = load_file(out)
    assert set(got) == set(acts) == {s["name"] for s in summary["layers"]}
    for name, x in acts.items():
        layer = table.layer(name)
        expected = layer_patches(x, layer.conv, approx)
        if approx == "expand":
            assert torch.equal(got[name], expected), name
        else:  # batch chunks may change the matmul's summation order
            torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-7)
        if layer.is_conv and approx == "expand":
            # docs/formats.md's defining property on the groups-averaged input, with torch's conv.
            c = layer.conv
            g = c.groups
            xm = x.reshape(x.shape[0], g, -1, *x.shape[2:]).mean(1)
            w = torch.randn(4, *layer.weight_shape[1:], dtype=x.dtype)
            flat = [v for pair in reversed(c.pads()) for v in pair]
            mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
            y = CONV[layer.kind](
                F.pad(xm, flat, mode=mode), w, stride=c.stride, dilation=c.dilation
            )
            torch.testing.assert_close(got[name] @ w.flatten(1).T, y.flatten(2).transpose(1, 2))
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert torch.equal(f.get_tensor(k), got[k])
    assert meta["format"] == "kfac-cli/patches" and meta["approx"] == approx
    layers_meta = json.loads(meta["layers"])
    assert layers_meta["same"]["padding"] == "same"
    assert layers_meta["circ"]["padding_mode"] == "circular"
    assert layers_meta["stem"]["input_shape"] == list(acts["stem"].shape)


def test_patches_bytes_are_deterministic_and_stdout_matches(cnn, tmp_path):
    _, files = cnn
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("patches", files["pt2"], files["acts"], "-o", a, check=True)
    run_cli("patches", files["pt2"], files["acts"], "-o", b, check=True)
    assert a.read_bytes() == b.read_bytes()
    proc = run_cli("patches", files["pt2"], files["acts"], "-o", "-", check=True)
    assert proc.stdout == a.read_bytes()
    assert load_file(a).keys() == load_file(b).keys()


def test_patches_with_state_dict_and_spec(cnn, tmp_path):
    _, files = cnn
    spec = tmp_path / "spec.json"
    spec.write_bytes(run_cli("layers", files["pt2"], "--json", check=True).stdout)
    ref, out = tmp_path / "ref.safetensors", tmp_path / "sd.safetensors"
    run_cli("patches", files["pt2"], files["acts"], "-o", ref, "--approx", "reduce", check=True)
    run_cli(
        "patches",
        files["safetensors"],
        files["acts"],
        "--spec",
        spec,
        "-o",
        out,
        "--approx",
        "reduce",
        check=True,
    )
    a, b = load_file(ref), load_file(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    proc = run_cli("patches", files["safetensors"], files["acts"], "-o", tmp_path / "x")
    assert proc.returncode == 1 and b"--spec" in proc.stderr


def test_layer_selection_bias_column_and_dtype(cnn, tmp_path):
    _, files = cnn
    out = tmp_path / "sel.safetensors"
    run_cli(
        "patches",
        files["pt2"],
        files["acts"],
        "-o",
        out,
        "--layer",
        "branch*",
        "--layer",
        "head",
        "--bias-column",
        "--dtype",
        "float64",
        check=True,
    )
    got = load_file(out)
    assert set(got) == {"branch1d", "branch3d", "head"}
    assert all(t.dtype == torch.float64 for t in got.values())
    assert torch.equal(got["head"][..., -1], torch.ones_like(got["head"][..., -1]))


def test_unknown_keys(cnn, tmp_path):
    _, files = cnn
    acts = load_file(files["acts"])
    acts["stme"] = acts["stem"].clone()
    dump = tmp_path / "acts.safetensors"
    save_file(acts, dump)
    out = tmp_path / "out.safetensors"
    proc = run_cli("patches", files["pt2"], dump, "-o", out)
    assert proc.returncode == 1
    assert b"stme" in proc.stderr and b"nearest: stem" in proc.stderr
    assert not out.exists()
    proc = run_cli("patches", files["pt2"], dump, "-o", out, "--ignore-unknown")
    assert proc.returncode == 0 and b"Warning" in proc.stderr and "stme" not in load_file(out)


def test_existing_output_is_kept_without_force(cnn, tmp_path):
    _, files = cnn
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    proc = run_cli("patches", files["pt2"], files["acts"], "-o", out)
    assert proc.returncode == 1 and b"--force" in proc.stderr
    assert out.read_bytes() == b"precious"
    run_cli("patches", files["pt2"], files["acts"], "-o", out, "--force", check=True)
    assert set(load_file(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_sigint_mid_run_leaves_nothing(tmp_path):
    """Interrupted while writing its output: exit 130, no output and no temporary file."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 7, padding=3))
    files = write_model_files(model, torch.randn(1, 16, 8, 8), tmp_path / "m")
    save_file({"0": torch.randn(16, 16, 24, 24)}, files["acts"])
    out = tmp_path / "out" / "p.safetensors"
    out.parent.mkdir()
    fifo = tmp_path / "acts.fifo"
    args = ["patches", str(files["pt2"]), str(fifo), "-o", str(out)]
    proc, stderr = interrupt_mid_write(
        args, files["acts"].read_bytes(), fifo, out.parent, signal.SIGINT
    )
    assert proc.returncode == 130, stderr
    assert b"interrupted" in stderr
    assert list(out.parent.iterdir()) == [], stderr


def test_write_error_leaves_nothing(cnn, tmp_path):
    """A disk-full error in the middle of writing (monkeypatched in-process)."""
    from typer.testing import CliRunner

    import kfac_cli.files.writer as tf
    from kfac_cli.cli import app

    _, files = cnn
    out = tmp_path / "full.safetensors"
    original = tf.SafetensorsWriter._write
    calls = {"n": 0}

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        original(self, data)

    tf.SafetensorsWriter._write = failing
    try:
        result = CliRunner().invoke(
            app, ["patches", str(files["pt2"]), str(files["acts"]), "-o", str(out)]
        )
    finally:
        tf.SafetensorsWriter._write = original
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bounded_memory(tmp_path):
    """Many layers: peak RSS stays far below the sum of the outputs."""
    layers = [torch.nn.Conv2d(8, 8, 5, padding=2) for _ in range(12)]
    model = torch.nn.Sequential(*layers)
    files = write_model_files(model, torch.randn(1, 8, 8, 8), tmp_path)
    save_file({str(i): torch.randn(16, 8, 64, 64) for i in range(12)}, files["acts"])
    out = tmp_path / "p.safetensors"
    code = (
        "import resource, sys; from kfac_cli.cli import main; sys.argv = ['kfac-cli', 'patches',"
        f" {str(files['pt2'])!r}, {str(files['acts'])!r}, '-o', {str(out)!r}, '-q']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    base = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch, kfac_cli.jobs.patches;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(proc.stdout.split()[-1]) - int(base.stdout.split()[-1])
    total_out = out.stat().st_size // 2**20  # 12 x 16 x 4096 x 200 x 4 bytes ~ 600 MiB
    layer_in_out = total_out // 12 + 2
    assert total_out > 500
    assert peak < 4 * layer_in_out + 64, (peak, total_out)


# ------------------------------------------------------------------------- canonicalize


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(1)
    model = MLPStack()
    return model, write_model_files(model, torch.randn(2, 5, 12), tmp_path_factory.mktemp("mlp"))


def _param_file(model, folder, lead=(), trail=()):
    torch.manual_seed(2)
    tensors = {n: torch.randn(*lead, *p.shape, *trail) for n, p in model.named_parameters()}
    path = folder / f"t{len(lead)}{len(trail)}.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("which", ["cnn", "mlp"])
@pytest.mark.parametrize("layout", ["flat", "matrix"])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("axes", ["plain", "columns", "batch", "both"])
def test_canonicalize_round_trip(request, tmp_path, which, layout, separate, axes):
    model, files = request.getfixturevalue(which)
    lead = (3,) if axes in ("batch", "both") else ()
    trail = (2,) if axes in ("columns", "both") else ()
    params, tensors = _param_file(model, tmp_path, lead, trail)
    canon, back = tmp_path / "c.safetensors", tmp_path / "back.safetensors"
    args = ["--layout", layout]
    args += ["--separate-bias"] * separate + ["--columns"] * bool(trail)
    args += ["--batch-first"] * bool(lead)
    assert invoke("canonicalize", files["safetensors"], params, "-o", canon, *args).returncode == 0
    assert invoke("canonicalize", "--inverse", canon, "-o", back).returncode == 0
    got = load_file(back)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    with safe_open(back, framework="pt") as f:
        assert set(f.keys()) == set(tensors)


def test_canonical_blocks_by_hand(cnn, tmp_path):
    model, files = cnn
    params, tensors = _param_file(model, tmp_path)
    canon = tmp_path / "c.safetensors"
    run_cli("canonicalize", files["pt2"], params, "-o", canon, check=True)
    blocks = load_file(canon)
    w, b = tensors["head.weight"], tensors["head.bias"]
    rest = w[0].numel()
    for o in range(w.shape[0]):
        assert torch.equal(blocks["head"][o * (rest + 1) : o * (rest + 1) + rest], w[o].flatten())
        assert blocks["head"][o * (rest + 1) + rest] == b[o]
    assert torch.equal(blocks["stem"], tensors["stem.weight"].flatten())  # no bias
    assert torch.equal(blocks["bn.weight"], tensors["bn.weight"])
    with safe_open(canon, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["blocks"])[0] == {
        "key": "stem",
        "W": "stem.weight",
        "b": None,
        "untreated": False,
    }
    assert any(b["untreated"] for b in json.loads(meta["blocks"]))


def test_partial_extra_and_misshapen_tensors_are_errors(cnn, tmp_path):
    model, files = cnn
    _, tensors = _param_file(model, tmp_path)
    out = tmp_path / "c.safetensors"
    for change in ("half-layer", "extra", "shape"):
        t = dict(tensors)
        if change == "half-layer":
            del t["head.bias"]
        elif change == "extra":
            t["head.bais"] = t["head.bias"].clone()
        else:
            t["head.weight"] = torch.randn(5, 13)
        bad = tmp_path / f"{change}.safetensors"
        save_file(t, bad)
        proc = invoke("canonicalize", files["pt2"], bad, "-o", out)
        assert proc.returncode == 1, change
        lines = proc.stderr.decode().strip().splitlines()
        assert lines[0].startswith(f"Error: {bad}: head."), lines
        assert not out.exists()
    assert "--separate-bias" in proc_half_layer_stderr(files, tmp_path, tensors)


def proc_half_layer_stderr(files, tmp_path, tensors) -> str:
    t = {k: v for k, v in tensors.items() if k != "head.bias"}
    bad = tmp_path / "half.safetensors"
    save_file(t, bad)
    proc = invoke("canonicalize", files["pt2"], bad, "-o", tmp_path / "h.safetensors")
    assert proc.returncode == 1
    out = tmp_path / "sep.safetensors"
    ok = invoke("canonicalize", files["pt2"], bad, "-o", out, "--separate-bias")
    assert ok.returncode == 0, ok.stderr
    assert "head.weight" in load_file(out) and "head.bias" not in load_file(out)
    return proc.stderr.decode()


def test_inverse_refuses_edited_metadata(cnn, tmp_path):
    model, files = cnn
    params, _ = _param_file(model, tmp_path)
    canon = tmp_path / "c.safetensors"
    invoke("canonicalize", files["pt2"], params, "-o", canon, check=True)
    blocks = load_file(canon)
    with safe_open(canon, framework="pt") as f:
        meta = f.metadata()
    edited_meta = dict(meta)
    shapes = json.loads(meta["parameters"])
    shapes[0]["shape"][1] += 1
    edited_meta["parameters"] = json.dumps(shapes)
    bad = tmp_path / "edited.safetensors"
    save_file(blocks, bad, metadata=edited_meta)
    proc = invoke("canonicalize", "--inverse", bad, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 1 and b"expected a block of shape" in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
    proc = invoke("canonicalize", "--inverse", files["pt2"], canon, "-o", tmp_path / "o2")
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "other.pt2"
    torch.export.save(torch.export.export(MLPStack(), (torch.randn(1, 2, 12),)), other)
    proc = invoke("canonicalize", "--inverse", other, canon, "-o", tmp_path / "o3")
    assert proc.returncode == 1 and b"expected the parameters of" in proc.stderr


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradient_equals_sum_of_outer_products(tmp_path, kind):
    """Per-sample joint gradient (canonical, matrix) == sum_o g_o a_o^T with patches' a_o."""
    torch.manual_seed(3)
    if kind == "linear":
        model = torch.nn.Sequential(torch.nn.Linear(6, 4))
        x = torch.randn(3, 5, 6, dtype=torch.float64)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3, stride=2, padding=1, groups=1))
        x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    model = model.double()
    files = write_model_files(model, x, tmp_path)
    save_file(hook_dump(model, x), files["acts"])
    out = model(x)
    g_out = torch.randn_like(out)
    grads = {}
    for n in range(x.shape[0]):
        model.zero_grad()
        model(x[n : n + 1]).backward(g_out[n : n + 1])
        for name, p in model.named_parameters():
            grads.setdefault(name, []).append(p.grad.clone())
    save_file({k: torch.stack(v) for k, v in grads.items()}, tmp_path / "grads.safetensors")
    run_cli(
        "patches",
        files["pt2"],
        files["acts"],
        "-o",
        tmp_path / "p.safetensors",
        "--bias-column",
        check=True,
    )
    run_cli(
        "canonicalize",
        files["pt2"],
        tmp_path / "grads.safetensors",
        "-o",
        tmp_path / "c.safetensors",
        "--layout",
        "matrix",
        "--batch-first",
        check=True,
    )
    a = load_file(tmp_path / "p.safetensors")["0"]  # [B, O, D+1]
    canon = load_file(tmp_path / "c.safetensors")["0"]  # [B, C_out, D+1]
    g = (
        g_out.reshape(g_out.shape[0], -1, g_out.shape[-1])
        if kind == "linear"
        else g_out.flatten(2).transpose(1, 2)
    )  # [B, O, C_out]
    expected = torch.einsum("boc,bod->bcd", g, a)
    torch.testing.assert_close(canon, expected, rtol=1e-10, atol=1e-12)


def test_help_does_not_import_torch():
    code = (
        "import sys; from kfac_cli.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0;"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
    proc = run_cli("--version", check=True)
    assert proc.stdout.decode().startswith("kfac-cli ")


@pytest.mark.parametrize(
    "args",
    [
        ["patches", "m.pt2", "a.safetensors"],
        ["patches", "m.pt2", "a.safetensors", "-o", "-", "--json"],
        ["patches", "m.pt2", "a.safetensors", "-o", "x", "--approx", "middle"],
        ["canonicalize", "m.pt2", "-o", "x"],
        ["canonicalize", "--inverse", "c", "-o", "x", "--columns"],
        ["layers", "m.pt2", "--bogus"],
    ],
    ids=[
        "no-output",
        "json-and-stdout",
        "bad-approx",
        "one-input",
        "inverse-with-layout",
        "unknown-option",
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_patches_on_cuda_match_cpu(cnn, tmp_path, approx):
    _, files = cnn
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / f"{dev}.safetensors"
        run_cli(
            "patches",
            files["pt2"],
            files["acts"],
            "-o",
            outs[dev],
            "--approx",
            approx,
            "--device",
            dev,
            check=True,
        )
    a, b = load_file(outs["cpu"]), load_file(outs["cuda"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_unavailable_device_is_a_clear_error(cnn, tmp_path):
    _, files = cnn
    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    proc = invoke("patches", files["pt2"], files["acts"], "-o", tmp_path / "o", "--device", bad)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("Error: --device: expected an available")
    proc = invoke("patches", files["pt2"], files["acts"], "-o", tmp_path / "o", "--device", "tpu")
    assert proc.returncode == 1 and b"cpu, cuda, cuda:N, mps or auto" in proc.stderr


def test_canonicalize_weights_only_pt_tensors(cnn, tmp_path):
    model, files = cnn
    _, tensors = _param_file(model, tmp_path)
    pt = tmp_path / "grads.pt"
    torch.save(tensors, pt)
    canon, back = tmp_path / "c.safetensors", tmp_path / "back.safetensors"
    assert invoke("canonicalize", files["pt2"], pt, "-o", canon).returncode == 0
    assert invoke("canonicalize", "--inverse", canon, "-o", back).returncode == 0
    got = load_file(back)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
