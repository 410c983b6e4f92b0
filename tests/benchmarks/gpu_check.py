"""CUDA check and throughput, for a machine with a GPU (one short run).

    $ python -m tests.benchmarks.gpu_check [--preset small] [--out FILE]

Runs `kfac-cli patches --device cuda` and `--device cpu` on the benchmark workload and
compares them (expand bit-identical, reduce within 1e-6), times both, and measures the
in-memory kernels on the GPU in GB/s of output written.
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
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
