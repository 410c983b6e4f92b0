"""CUDA check and throughput, for a machine with a GPU (one short run, a few minutes).

    $ python -m tests.benchmarks.gpu_check [--preset small] [--out FILE]

- runs the CUDA tests (``pytest -m cuda``);
- runs `kfac-cli patches` and `kfac-cli factors` with `--device cuda` and `--device cpu`
  on the benchmark workload and compares them (patches: expand bit-identical but for
  grouped layers, reduce within 1e-6; factors within float32 rounding);
- measures the in-memory patch kernels on the GPU in GB/s, and the factor kernel against
  `torch.mm` of the same patches (``Pᵀ P``) at the same sizes, in the same run;
- profiles one `patches --device cuda` run and reports how much of the host-device copying
  overlapped with compute (copy, compute and wall seconds from the CUDA profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

import torch


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("kfac-cli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kfac_cli"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from safetensors.torch import load_file

    from kfac_cli.ops.patches import conv_averaged_patches, conv_patches
    from tests.benchmarks.workload import PRESETS, layers, write

    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    folder = Path(tempfile.mkdtemp(prefix="kfac-gpu-"))
    t = time.perf_counter()
    write(folder, args.preset)
    report["workload_seconds"] = time.perf_counter() - t
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for approx in ("expand", "reduce"):
        outs = {}
        for dev in ("cpu", "cuda"):
            out = folder / f"{approx}-{dev}.safetensors"
            t = time.perf_counter()
            proc = subprocess.run(
                [
                    *cli(),
                    "patches",
                    folder / "model.pt2",
                    folder / "acts.safetensors",
                    "-o",
                    out,
                    "--approx",
                    approx,
                    "--device",
                    dev,
                    "-q",
                    "--force",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            report[f"cli {approx} {dev} seconds"] = time.perf_counter() - t
            if proc.returncode:
                report[f"cli {approx} {dev} error"] = proc.stderr[-2000:]
                continue
            outs[dev] = load_file(out)
            report[f"output {approx} GB"] = out.stat().st_size / 1e9
        if len(outs) == 2:
            a, b = outs["cpu"], outs["cuda"]
            diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
            report[f"{approx} layers where cuda != cpu"] = diffs
            spec = json.loads(
                subprocess.run(
                    [*cli(), "layers", folder / "model.pt2", "--json"], env=env, capture_output=True
                ).stdout
            )
            grouped = {la["name"] for la in spec["layers"] if la.get("groups", 1) > 1}
            report[f"{approx} differing layers all grouped (group mean on the GPU)"] = (
                set(diffs) <= grouped
            )
    # In-memory kernels on the GPU: output GB/s.
    batch = PRESETS[args.preset]
    dev = torch.device("cuda")
    total_bytes, t_expand, t_reduce, in_bytes = 0, 0.0, 0.0, 0
    t_methods = dict.fromkeys(("strided", "separable"), 0.0)  # forced, to tune reduce_method
    for layer in layers():
        params = layer.params()
        x = torch.randn(batch, layer.c_in, *layer.size, device=dev)
        shape = (batch, prod(params.output_size(layer.size)), params.patch_size(layer.c_in))
        out = torch.empty(shape, device=dev)
        for _ in range(2):
            conv_patches(x, params, out=out)
            conv_averaged_patches(x, params)
        torch.cuda.synchronize()
        s = time.perf_counter()
        for _ in range(5):
            conv_patches(x, params, out=out)
        torch.cuda.synchronize()
        t_expand += (time.perf_counter() - s) / 5
        s = time.perf_counter()
        for _ in range(5):
            conv_averaged_patches(x, params)
        torch.cuda.synchronize()
        t_reduce += (time.perf_counter() - s) / 5
        for method in t_methods:
            conv_averaged_patches(x, params, method=method)
            torch.cuda.synchronize()
            s = time.perf_counter()
            for _ in range(5):
                conv_averaged_patches(x, params, method=method)
            torch.cuda.synchronize()
            t_methods[method] += (time.perf_counter() - s) / 5
        total_bytes += out.numel() * 4
        in_bytes += x.numel() * 4
    report["gpu expand kernel GB/s (output written)"] = total_bytes / t_expand / 1e9
    report["gpu reduce kernel GB/s (input read)"] = in_bytes / t_reduce / 1e9
    report["gpu expand kernel seconds"] = t_expand
    report["gpu reduce kernel seconds"] = t_reduce
    for method, seconds in t_methods.items():
        report[f"gpu reduce kernel seconds, every layer by {method}"] = seconds
    report.update(factor_checks(folder, env, batch))
    report.update(overlap(folder))
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
    )
    report["cuda tests"] = [*tests.stdout.strip().splitlines()[-1:], f"exit {tests.returncode}"]
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def factor_checks(folder: Path, env: dict, batch: int) -> dict:
    """`factors` on cuda against cpu; the factor kernel against torch.mm of its patches."""
    from safetensors.torch import load_file

    from kfac_cli.ops.factors import conv_covariance
    from kfac_cli.ops.patches import conv_patches
    from tests.benchmarks.workload import layers

    out: dict = {}
    acts = sorted(str(p) for p in (folder / "shards").glob("acts-*.safetensors"))
    grads = sorted(str(p) for p in (folder / "shards").glob("grads-*.safetensors"))
    for approx in ("expand", "reduce"):
        files = {}
        for dev in ("cpu", "cuda"):
            files[dev] = folder / f"factors-{approx}-{dev}.safetensors"
            t = time.perf_counter()
            cmd = [*cli(), "factors", folder / "model.pt2", *acts, "--grads", *grads]
            cmd += ["-o", files[dev], "--approx", approx, "--device", dev, "-q", "--force"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            out[f"factors {approx} {dev} seconds"] = time.perf_counter() - t
            if proc.returncode:
                out[f"factors {approx} {dev} error"] = proc.stderr[-2000:]
        if all(f.exists() for f in files.values()):
            a, b = load_file(files["cpu"]), load_file(files["cuda"])
            out[f"factors {approx} max relative cuda-cpu difference"] = max(
                ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a
            )
    dev = torch.device("cuda")
    ours_t, mm_t = 0.0, 0.0
    for layer in layers():
        params = layer.params()
        x = torch.randn(batch, layer.c_in, *layer.size, device=dev)
        d = params.patch_size(layer.c_in)
        p = conv_patches(x, params).reshape(-1, d)
        acc = torch.zeros(d, d, device=dev)
        for fn in (lambda: conv_covariance(x, params, out=acc), lambda: p.T @ p):
            fn()
        timings = []
        for fn in (lambda: conv_covariance(x, params, out=acc), lambda: torch.mm(p.T, p)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) / 3)
        ours_t += timings[0]
        mm_t += timings[1]
    out["factor kernel seconds (all layers, from the input)"] = ours_t
    out["torch.mm seconds (P^T P of the same patches)"] = mm_t
    out["factor kernel throughput as a fraction of torch.mm's"] = mm_t / ours_t
    return out


def overlap(folder: Path) -> dict:
    """Profile `patches --device cuda` in-process: copy, compute and wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    from kfac_cli.jobs.patches import run_patches

    out_file = folder / "profiled.safetensors"
    run_patches(
        folder / "model.pt2", folder / "acts.safetensors", str(out_file), device="cuda", force=True
    )  # warm up
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_patches(
            folder / "model.pt2",
            folder / "acts.safetensors",
            str(out_file),
            device="cuda",
            force=True,
        )
    wall = time.perf_counter() - start
    spans = {"copy": [], "compute": []}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        kind = "copy" if "Memcpy" in e.name or "memcpy" in e.name else "compute"
        spans[kind].append((e.time_range.start, e.time_range.end))

    def busy(intervals):
        total, last = 0, None
        for a, b in sorted(intervals):
            if last is None or a > last:
                total += b - a
                last = b
            elif b > last:
                total += b - last
                last = b
        return total / 1e6

    both = busy(spans["copy"]) + busy(spans["compute"])
    union = busy(spans["copy"] + spans["compute"])
    prof.export_chrome_trace(str(folder / "patches-cuda-trace.json"))
    return {
        "patches cuda: copy seconds": busy(spans["copy"]),
        "patches cuda: compute seconds": busy(spans["compute"]),
        "patches cuda: GPU busy seconds": union,
        "patches cuda: overlapped seconds (copy and compute at once)": both - union,
        "patches cuda: wall seconds": wall,
        "patches cuda: trace": str(folder / "patches-cuda-trace.json"),
    }


if __name__ == "__main__":
    main()
