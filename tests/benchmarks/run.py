"""kfac-cli's benchmark: whole processes and in-memory kernels, side by side in one run.

    $ .venv/bin/python -m tests.benchmarks.run --preset small --threads 1

Times, alternating and repeated: `kfac-cli patches` (expand, reduce), the users' baseline
script (curvlinops' extract_patches / extract_averaged_patches + safetensors.save_file; needs
curvlinops-for-pytorch), and the floor (a process that imports torch, reads every input
byte once into a reused buffer and writes each layer's output bytes from one reused buffer,
then fsyncs). Then `kfac-cli factors` (expand and reduce, with output
gradients, over shards) against the anchor (curvlinops' hook code: extract_patches + einsum
per layer after load_file) and a read floor, the factor kernels against the anchor's einsum
on materialised patches, 2 torchrun ranks against 1, the in-memory patch kernels against
curvlinops and one read pass (`x.sum()`), `canonicalize` of a large parameter file against
its read+write floor, and the start-up of `--help`, `layers` and `info` against bare
interpreters. Reports medians (min-max), ratios, and each process's
peak RSS (ru_maxrss) above a bare `import torch`.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

READ = r"""
import json, struct
def read_tensors(path, buf):
    '''Each tensor's name, once its bytes have been read into ``buf`` (a reused buffer):
    the least any reader does. (safetensors' get_tensor maps the file and reads nothing.)'''
    with open(path, "rb", buffering=0) as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                fh.seek(8 + n + begin)
                while end > begin:
                    begin += fh.readinto(buf[: min(end - begin, len(buf))])
                yield key
"""

FLOOR = (
    READ
    + r"""
import json, os, sys, torch
src, dst, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
buf = memoryview(bytearray(8 << 20))
with open(dst, "wb") as out:
    for key in read_tensors(src, buf):  # every input byte, once
        left = sizes.get(key, 0)
        while left:  # the layer's output bytes, from one reused buffer
            n = min(left, len(buf)); out.write(buf[:n]); left -= n
    out.flush(); os.fsync(out.fileno())
"""
)

BASELINE = r"""
import importlib.util, json, os, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
spec_file, acts_file, out_file, approx = sys.argv[1:5]
origin = importlib.util.find_spec("curvlinops").submodule_search_locations[0]
mod_spec = importlib.util.spec_from_file_location("kfac_utils", f"{origin}/kfac_utils.py")
ku = importlib.util.module_from_spec(mod_spec); mod_spec.loader.exec_module(ku)
layers = {la["name"]: la for la in json.load(open(spec_file))["layers"]}
acts = load_file(acts_file)
out = {}
for name, x in acts.items():
    la = layers[name]
    k, s, d, g, p = la["kernel_size"], la["stride"], la["dilation"], la["groups"], la["padding"]
    if p == "same":  # curvlinops refuses unequal padding: pad by hand
        tot = [di * (ki - 1) for ki, di in zip(k, d)]
        x = F.pad(x, [v for t in reversed(tot) for v in (t // 2, t - t // 2)]); p = 0
    fn = ku.extract_patches if approx == "expand" else ku.extract_averaged_patches
    out[name] = fn(x, k, s, p, d, g).contiguous()
save_file(out, out_file)
"""


# Runs each timed process. Linux records the old memory's peak in a process's ru_maxrss at
# exec, and subprocess starts children with vfork, in the parent's memory: a child of this
# process (torch imported, kernels run) would report this process's peak if larger than
# its own. This launcher, started before this process grows, stays small.
LAUNCHER = r"""
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    cmd, env = json.loads(line)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        message = err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps([seconds, usage.ru_maxrss * 1024, code, message]), flush=True)
"""
_launcher: subprocess.Popen | None = None


def start_launcher() -> None:
    """Start the launcher (see :data:`LAUNCHER`) while this process is small."""
    global _launcher
    _launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, run by the launcher."""
    if _launcher is None:
        start_launcher()
    _launcher.stdin.write(json.dumps([[str(c) for c in cmd], env]) + "\n")
    _launcher.stdin.flush()
    seconds, rss, code, message = json.loads(_launcher.stdout.readline())
    if code:
        raise RuntimeError(f"{cmd[:3]} failed ({code}):\n{message}")
    return seconds, rss


def _fresh(paths) -> None:
    """Every process writes a new file: no old output's pages to reclaim on the way."""
    for p in paths:
        p.unlink(missing_ok=True)


def fmt_stats(values: list[float], scale: float = 1.0) -> str:
    med, lo, hi = (scale * v for v in (statistics.median(values), min(values), max(values)))
    return f"{med:7.2f} ({lo:.2f}-{hi:.2f})"


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's byte count, from a safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def bench_processes(folder: Path, args, env: dict, report: dict) -> None:
    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    model, acts, spec = folder / "model.pt2", folder / "acts.safetensors", folder / "spec.json"
    spec.write_bytes(
        subprocess.run(
            [kfac, "layers", str(model), "--json"], check=True, capture_output=True
        ).stdout
    )
    have_baseline = _has_curvlinops()
    runs: dict[str, list[tuple[float, int]]] = {}
    digests = set()
    out_sizes = {}
    for approx in ("expand", "reduce"):
        out = folder / f"{approx}.safetensors"
        cmd = [
            kfac,
            "patches",
            str(model),
            str(acts),
            "-o",
            str(out),
            "--approx",
            approx,
            "--force",
            "-q",
            "--device",
            args.device,
        ]
        subprocess.run(cmd, check=True, env=env)  # warm the page cache, learn the size
        out_sizes[approx] = out.stat().st_size
        variants = {
            f"kfac-cli {approx}": cmd,
            f"floor {approx}": [
                sys.executable,
                "-c",
                FLOOR,
                str(acts),
                str(folder / "floor.bin"),
                json.dumps(tensor_bytes(out)),
            ],
        }
        if have_baseline:
            variants[f"baseline {approx}"] = [
                sys.executable,
                "-c",
                BASELINE,
                str(spec),
                str(acts),
                str(folder / "base.safetensors"),
                approx,
            ]
        outputs = (out, folder / "floor.bin", folder / "base.safetensors")
        for _ in range(args.repeats):
            for name, c in variants.items():
                _fresh(outputs)
                runs.setdefault(name, []).append(timed(c, env))
                if name == "kfac-cli expand":
                    digests.add(sha(out))
        _fresh(outputs)
    bare = timed([sys.executable, "-c", "import torch"], env)[1]
    largest = max((prod(s) * 4 for s in _layer_shapes(folder)), default=0)
    print(
        f"\nWhole processes ({args.threads} thread(s), {args.repeats} runs, seconds: median "
        f"(min-max); RSS above bare `import torch` = {bare / 2**20:.0f} MiB):"
    )
    process_table(runs, bare, report, "baseline", "floor")
    report["largest_layer_input_bytes"] = largest
    report["output_bytes"] = out_sizes
    report["expand_bytes_identical_across_runs"] = len(digests) == 1
    print(
        f"largest layer input {largest / 2**20:.0f} MiB; expand output "
        f"{out_sizes['expand'] / 2**30:.2f} GiB; output bytes identical across runs: "
        f"{len(digests) == 1}"
    )


def process_table(
    runs: dict[str, list[tuple[float, int]]],
    bare: int,
    report: dict,
    reference: str,
    floor: str,
    prefix: str = "",
) -> None:
    """Print (and report under ``prefix + name``) kfac-cli, ``reference`` and ``floor`` runs
    ``(seconds, peak RSS)`` of expand and reduce: median seconds, x the floor, x faster
    than the reference, peak RSS above a bare ``import torch`` (``bare``)."""
    x_floor, x_ref = f"x {floor}", f"x faster than {reference}"
    print(
        f"{'':22} {'seconds':>20} {x_floor:>{len(x_floor) + 1}} {x_ref:>{len(x_ref) + 1}} "
        f"{'peak RSS MiB':>13}"
    )
    for approx in ("expand", "reduce"):
        base = statistics.median(t for t, _ in runs[f"{floor} {approx}"])
        ref = runs.get(f"{reference} {approx}")
        for kind in ("kfac-cli", reference, floor):
            r = runs.get(f"{kind} {approx}")
            if not r:
                continue
            t = [x for x, _ in r]
            med = statistics.median(t)
            speed = statistics.median(x for x, _ in ref) / med if ref else float("nan")
            rss = max(m for _, m in r) - bare
            print(
                f"{kind + ' ' + approx:22} {fmt_stats(t):>20} "
                f"{med / base:{len(x_floor) + 1}.2f} {speed:{len(x_ref) + 1}.2f} "
                f"{rss / 2**20:13.0f}"
            )
            report[f"{prefix}{kind} {approx}"] = {
                "seconds": t,
                x_floor.replace(" ", "_"): med / base,
                x_ref.replace(" ", "_"): speed,
                "rss_above_torch": rss,
            }


def _has_curvlinops() -> bool:
    import importlib.util

    return importlib.util.find_spec("curvlinops") is not None


def _layer_shapes(folder: Path):
    from kfac_cli.files.sources import TensorSource

    with TensorSource(folder / "acts.safetensors") as src:
        return [info.shape for info in src.infos.values()]


def bench_kernels(folder: Path, args, report: dict) -> None:
    """In-memory kernels, layer by layer, alternating; sums over layers, medians over runs."""
    import torch

    from kfac_cli.jobs.skeleton import CHUNK_BYTES
    from kfac_cli.ops.patches import conv_averaged_patches, conv_patches
    from tests.benchmarks.workload import PRESETS, layers

    torch.set_num_threads(args.threads)
    ku = _kfac_utils() if _has_curvlinops() else None
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = PRESETS[args.preset]
    totals: dict[str, list[float]] = {}
    worst_reduce_diff = 0.0
    accuracy = {"ours": 0.0, "ref": 0.0}
    expand_identical = True
    buf = None
    for layer in layers():
        params = layer.params()
        x = torch.randn(batch, layer.c_in, *layer.size, device=dev)
        shape = (batch, prod(params.output_size(layer.size)), params.patch_size(layer.c_in))
        nbytes = prod(shape) * 4
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes // 4, device=dev)
        step = max(1, CHUNK_BYTES // (nbytes // batch))

        def ours_expand():
            for i in range(0, batch, step):
                n = min(step, batch - i)
                conv_patches(
                    x[i : i + n], params, out=buf[: n * nbytes // 4 // batch].view(n, *shape[1:])
                )

        pads = params.pads()
        same = any(a != b for a, b in pads)
        xr = torch.nn.functional.pad(x, [v for p in reversed(pads) for v in p]) if same else x
        pr = 0 if same else params.padding
        hp = (params.kernel_size, params.stride, pr, params.dilation, params.groups)
        fns = {
            "ours expand": ours_expand,
            "ours reduce": lambda: conv_averaged_patches(x, params),
            "x.sum()": lambda: x.sum(),
        }
        if ku is not None:
            fns["curvlinops expand+contiguous"] = lambda: ku.extract_patches(xr, *hp).contiguous()
            fns["curvlinops reduce"] = lambda: ku.extract_averaged_patches(xr, *hp)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                totals.setdefault(name, []).append(time.perf_counter() - start)
        if ku is not None:
            ref = ku.extract_patches(xr, *hp).contiguous()
            expand_identical &= torch.equal(conv_patches(x, params), ref)
            del ref
            red, red_ref = conv_averaged_patches(x, params), ku.extract_averaged_patches(xr, *hp)
            exact = conv_averaged_patches(x.double(), params)
            worst_reduce_diff = max(worst_reduce_diff, (red - red_ref).abs().max().item())
            accuracy["ours"] = max(accuracy["ours"], (red.double() - exact).abs().max().item())
            accuracy["ref"] = max(accuracy["ref"], (red_ref.double() - exact).abs().max().item())
    # totals[name] holds, layer after layer, one time per run: sum each run over the layers.
    per_run = {
        k: [sum(v[i :: args.repeats]) for i in range(args.repeats)] for k, v in totals.items()
    }
    print(
        f"\nIn-memory kernels on {args.device}, all {len(layers())} layers, batch {batch} "
        f"(milliseconds per pass: median (min-max)):"
    )
    for name, t in per_run.items():
        print(f"  {name:32} {fmt_stats(t, 1e3)}")
    med = {k: statistics.median(v) for k, v in per_run.items()}
    if ku is not None:
        print(
            f"  expand: {med['curvlinops expand+contiguous'] / med['ours expand']:.1f}x faster "
            f"than extract_patches + .contiguous(); bit-identical: {expand_identical}"
        )
        print(
            f"  reduce: {med['curvlinops reduce'] / med['ours reduce']:.1f}x faster than "
            f"extract_averaged_patches; max |ours - curvlinops| = {worst_reduce_diff:.1e}; "
            f"max error vs float64: ours {accuracy['ours']:.1e}, curvlinops "
            f"{accuracy['ref']:.1e}"
        )
    print(
        f"  reduce: {med['ours reduce'] / med['x.sum()']:.2f}x the time of one read pass (x.sum())"
    )
    report["kernels"] = {
        "seconds": per_run,
        "expand_bit_identical": expand_identical,
        "reduce_max_abs_diff": worst_reduce_diff,
        "reduce_error": accuracy,
    }


def _kfac_utils():
    import importlib.util

    origin = importlib.util.find_spec("curvlinops").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("kfac_utils", f"{origin}/kfac_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_canonicalize(folder: Path, args, env: dict, report: dict) -> None:
    import torch

    from kfac_cli.files.writer import SafetensorsWriter

    n_layers = 8 if args.preset == "large" else 2
    params = folder / "params.safetensors"
    entries = []
    for i in range(n_layers):
        entries += [
            (f"fc{i}.weight", torch.float32, (4096, 8192)),
            (f"fc{i}.bias", torch.float32, (4096,)),
        ]
    with open(params, "wb") as fh:
        w = SafetensorsWriter(fh, entries, {})
        for name, _, shape in entries:
            w.write(name, torch.randn(shape))
        w.close()
    size = params.stat().st_size
    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    out = folder / "canonical.safetensors"
    cmds = {
        "kfac-cli canonicalize": [
            kfac,
            "canonicalize",
            str(params),
            str(params),
            "-o",
            str(out),
            "--force",
            "-q",
        ],
        "floor read+write": [
            sys.executable,
            "-c",
            FLOOR,
            str(params),
            str(folder / "f.bin"),
            json.dumps(tensor_bytes(params)),
        ],
    }
    runs: dict[str, list[tuple[float, int]]] = {}
    subprocess.run(cmds["kfac-cli canonicalize"], check=True, env=env)
    for _ in range(args.repeats):
        for name, c in cmds.items():
            _fresh((out, folder / "f.bin"))
            runs.setdefault(name, []).append(timed(c, env))
    bare = timed([sys.executable, "-c", "import torch"], env)[1]
    floor = statistics.median(t for t, _ in runs["floor read+write"])
    print(
        f"\ncanonicalize of a {size / 2**30:.2f} GiB parameter file (largest block "
        f"{4096 * 8193 * 4 / 2**20:.0f} MiB):"
    )
    for name, r in runs.items():
        t = [x for x, _ in r]
        print(
            f"  {name:24} {fmt_stats(t)}  x floor {statistics.median(t) / floor:5.2f}  "
            f"peak RSS above torch {(max(m for _, m in r) - bare) / 2**20:6.0f} MiB"
        )
        report[name] = {"seconds": t, "rss_above_torch": max(m for _, m in r) - bare}
    for p in (out, folder / "f.bin", params):
        p.unlink(missing_ok=True)


def bench_startup(folder: Path, env: dict, report: dict) -> None:
    """Commands that need no tensor maths against bare interpreters, alternating, 7 times:
    ``python -c pass``, ``python -c "import torch"``, ``kfac-cli --help``, ``layers`` of the
    workload's ``.pt2`` and ``info`` of its activation dump."""
    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    acts = next(iter(sorted(folder.glob("acts*.safetensors"))), None)
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "kfac-cli --help": [kfac, "--help"],
        "kfac-cli layers model.pt2": [kfac, "layers", str(folder / "model.pt2")],
    }
    if acts is not None:
        cmds["kfac-cli info ACTS"] = [kfac, "info", str(acts)]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(7):
        for name, cmd in cmds.items():
            times[name].append(timed(cmd, env)[0])
    bare = statistics.median(times["python -c pass"])
    print("\nstart-up (median (min-max), and above a bare `python -c pass`):")
    for name, t in times.items():
        print(f"  {name:28s} {fmt_stats(t)} s   +{statistics.median(t) - bare:.3f} s")
    report["startup_seconds"] = times
    report["help_seconds"] = times["kfac-cli --help"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small", "large"], default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="where to put the workload (default: a temporary folder)",
    )
    parser.add_argument(
        "--only",
        choices=[
            "processes",
            "kernels",
            "canonicalize",
            "startup",
            "factors",
            "factor-kernels",
            "ranks",
            "ekfac",
            "apply",
        ],
        action="append",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    start_launcher()
    # As an installed package is: compiled once (where PYTHONDONTWRITEBYTECODE is set, an
    # editable install would otherwise compile every module in every timed process).
    compileall.compile_dir(ROOT / "kfac_cli", quiet=1)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONWARNINGS": "ignore",
    }
    folder = args.folder or Path(tempfile.mkdtemp(prefix="kfac-bench-"))
    from tests.benchmarks.workload import write

    info_file = folder / "workload.json"
    if not (info_file.exists() and json.loads(info_file.read_text())["preset"] == args.preset):
        info = write(folder, args.preset)
    else:
        info = json.loads(info_file.read_text())
    print(
        f"workload {args.preset}: {info['layers']} layers, batch {info['batch']}, "
        f"{info['input_bytes'] / 2**30:.2f} GiB of activations, in {folder}"
    )
    report: dict = {"preset": args.preset, "threads": args.threads, "device": args.device}
    only = set(
        args.only
        or [
            "processes",
            "factors",
            "factor-kernels",
            "ranks",
            "ekfac",
            "apply",
            "kernels",
            "canonicalize",
            "startup",
        ]
    )
    spec = folder / "spec.json"
    spec.write_bytes(
        subprocess.run(
            [
                str(Path(sys.executable).with_name("kfac-cli")),
                "layers",
                str(folder / "model.pt2"),
                "--json",
            ],
            check=True,
            capture_output=True,
        ).stdout
    )
    from tests.benchmarks import factors

    if "processes" in only:
        bench_processes(folder, args, env, report)
    if "factors" in only:
        factors.bench_factor_processes(folder, args, env, report, timed, _fresh)
    if "factor-kernels" in only:
        factors.bench_factor_kernels(folder, args, report, fmt_stats)
    if "ranks" in only:
        factors.bench_ranks(folder, args, env, report, timed, _fresh, fmt_stats)
    if "ekfac" in only:
        from tests.benchmarks.ekfac import bench_ekfac

        bench_ekfac(folder, args, env, report, timed, _fresh, fmt_stats)
    if "apply" in only:
        from tests.benchmarks.apply import bench_apply

        bench_apply(folder, args, env, report, timed, _fresh, fmt_stats)
    if "kernels" in only:
        bench_kernels(folder, args, report)
    if "canonicalize" in only:
        bench_canonicalize(folder, args, env, report)
    if "startup" in only:
        bench_startup(folder, env, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.folder is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
