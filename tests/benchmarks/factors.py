"""The factors part of the benchmark: processes, kernels, and ranks (see run.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from math import prod
from pathlib import Path

ANCHOR = r"""
import importlib.util, json, sys, torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce
from safetensors import safe_open
from safetensors.torch import load_file, save_file
spec_file, out_file, approx, *files = sys.argv[1:]
acts, grads = files[: len(files) // 2], files[len(files) // 2 :]
origin = importlib.util.find_spec("curvlinops").submodule_search_locations[0]
mod_spec = importlib.util.spec_from_file_location("kfac_utils", f"{origin}/kfac_utils.py")
ku = importlib.util.module_from_spec(mod_spec); mod_spec.loader.exec_module(ku)
layers = {la["name"]: la for la in json.load(open(spec_file))["layers"]}
n = 0
for f in acts:
    with safe_open(f, "pt") as h:
        n += h.get_slice(next(iter(h.keys()))).get_shape()[0]
A, G = {}, {}
for af, gf in zip(acts, grads):  # curvlinops' hook code, per layer, after load_file
    xs, gs = load_file(af), load_file(gf)
    for name, x in xs.items():
        la = layers[name]
        k, s, d, g, p = la["kernel_size"], la["stride"], la["dilation"], la["groups"], la["padding"]
        if p == "same":  # curvlinops refuses unequal padding: pad by hand
            tot = [di * (ki - 1) for ki, di in zip(k, d)]
            x = F.pad(x, [v for t in reversed(tot) for v in (t // 2, t - t // 2)]); p = 0
        if approx == "expand":
            x = ku.extract_patches(x, k, s, p, d, g)
            scale = x.shape[1:-1].numel()
            x = rearrange(x, "batch ... d_in -> (batch ...) d_in")
        else:
            x = ku.extract_averaged_patches(x, k, s, p, d, g)
            scale = 1.0
        if la["bias"]:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        cov = einsum(x, x, "b i,b j -> i j").div_(n * scale)
        A[name] = A[name].add_(cov) if name in A else cov
        out = rearrange(gs[name][0], "batch c ... -> batch ... c")
        if approx == "expand":
            out = rearrange(out, "batch ... d_out -> (batch ...) d_out")
        else:
            out = reduce(out, "batch ... d_out -> batch d_out", "sum")
        cov = einsum(out, out, "b i,b j->i j")  # a sum loss: correction 1
        G[name] = G[name].add_(cov) if name in G else cov
save_file({**{f"{k}.A": v for k, v in A.items()}, **{f"{k}.G": v for k, v in G.items()}}, out_file)
"""

READ_FLOOR = r"""  # after run.READ
import os, sys, torch
dst, nbytes, *files = sys.argv[1:]
buf = memoryview(bytearray(8 << 20))
for f in files:
    for _ in read_tensors(f, buf):  # every input byte, once
        pass
with open(dst, "wb") as out:
    left = int(nbytes)
    while left:
        n = min(left, len(buf)); out.write(buf[:n]); left -= n
    out.flush(); os.fsync(out.fileno())
"""


def _shards(folder: Path) -> tuple[list[str], list[str]]:
    shards = folder / "shards"
    acts = sorted(str(p) for p in shards.glob("acts-*.safetensors"))
    grads = sorted(str(p) for p in shards.glob("grads-*.safetensors"))
    return acts, grads


def bench_factor_processes(folder: Path, args, env: dict, report: dict, timed, fresh):
    """`kfac-cli factors` against the anchor and the read floor, expand and reduce."""
    from tests.benchmarks.run import READ, _has_curvlinops, process_table

    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    model, spec = folder / "model.pt2", folder / "spec.json"
    acts, grads = _shards(folder)
    runs: dict[str, list[tuple[float, int]]] = {}
    sizes = {}
    out, anchor_out, floor_out = (folder / n for n in ("F.safetensors", "anchor.st", "f.bin"))
    for approx in ("expand", "reduce"):
        cmd = [kfac, "factors", str(model), *acts, "--grads", *grads, "-o", str(out)]
        cmd += ["--approx", approx, "--force", "-q", "--device", args.device]
        subprocess.run(cmd, check=True, env=env)  # warm the page cache, learn the size
        sizes[approx] = out.stat().st_size
        variants = {
            f"kfac-cli {approx}": cmd,
            f"read floor {approx}": [
                sys.executable,
                "-c",
                READ + READ_FLOOR,
                str(floor_out),
                str(sizes[approx]),
                *acts,
                *grads,
            ],
        }
        if _has_curvlinops():
            variants[f"anchor {approx}"] = [
                sys.executable,
                "-c",
                ANCHOR,
                str(spec),
                str(anchor_out),
                approx,
                *acts,
                *grads,
            ]
        for _ in range(args.repeats):
            for name, c in variants.items():
                fresh((out, anchor_out, floor_out))
                runs.setdefault(name, []).append(timed(c, env))
    fresh((out, anchor_out, floor_out))
    bare = timed([sys.executable, "-c", "import torch"], env)[1]
    bound = _memory_bound(folder)
    print(
        f"\nfactors over {len(acts)} shards with output gradients ({args.threads} thread(s), "
        f"{args.repeats} runs; memory bound 2 x (largest chunk + its factors) = "
        f"{bound / 2**20:.0f} MiB):"
    )
    process_table(runs, bare, report, "anchor", "read floor", prefix="factors ")
    report["factors_memory_bound"] = bound


def _memory_bound(folder: Path) -> int:
    """2 x max over layers of (its largest chunk + its factors), in bytes."""
    from kfac_cli.jobs.skeleton import CHUNK_BYTES
    from tests.benchmarks.workload import PRESETS, SHARDS, layers

    info = json.loads((folder / "workload.json").read_text())
    rows = max(1, PRESETS[info["preset"]] // SHARDS)
    worst = 0
    for layer in layers():
        p = layer.params()
        d = p.patch_size(layer.c_in) + 1
        sample = layer.c_in * prod(layer.size) * 4
        chunk = max(min(CHUNK_BYTES, rows * sample), sample)
        worst = max(worst, chunk + (d * d + layer.c_out**2) * 4)
    return 2 * worst


def bench_factor_kernels(folder: Path, args, report: dict, fmt) -> None:
    """Per layer: the anchor's einsum on materialised patches, our kernel from the input,
    our symmetric product on the same patches; accuracy against float64."""
    import torch

    from kfac_cli.ops.factors import conv_covariance, gram, mirror_, reordered_rows, sum_order
    from kfac_cli.ops.patches import conv_patches
    from tests.benchmarks.workload import PRESETS, layers

    torch.set_num_threads(args.threads)
    batch = PRESETS[args.preset]
    totals: dict[str, list[float]] = {}
    worst = {"ours": 0.0, "anchor": 0.0}
    for layer in layers():
        params = layer.params()
        x = torch.randn(batch, layer.c_in, *layer.size)
        d = params.patch_size(layer.c_in)
        patches = conv_patches(x, params).reshape(-1, d)
        out = torch.zeros(d, d)

        def ours():
            out.zero_()
            conv_covariance(x, params, out=out)
            mirror_(out)

        fns = {
            "anchor einsum on patches": lambda: torch.einsum("bi,bj->ij", patches, patches),
            "ours from the input": ours,
            "ours on the same patches": lambda: mirror_(gram(patches)),
        }
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                totals.setdefault(name, []).append(time.perf_counter() - start)
        exact = patches.double().T @ patches.double()
        scale = exact.abs().max()
        ours()  # its sum is tap-major: compared in the format's order
        order = sum_order(layer.c_in // params.groups, params, "expand", False)
        got = reordered_rows(out, order).double()
        worst["ours"] = max(worst["ours"], ((got - exact).abs().max() / scale).item())
        anchor = torch.einsum("bi,bj->ij", patches, patches)
        worst["anchor"] = max(
            worst["anchor"], ((anchor.double() - exact).abs().max() / scale).item()
        )
        patches = exact = anchor = None
    per_run = {
        k: [sum(v[i :: args.repeats]) for i in range(args.repeats)] for k, v in totals.items()
    }
    med = {k: statistics.median(v) for k, v in per_run.items()}
    print(f"\nFactor kernels, expand A of all {len(layers())} layers, batch {batch} (ms per pass):")
    for name, t in per_run.items():
        print(f"  {name:28} {fmt(t, 1e3)}")
    anchor = med["anchor einsum on patches"]
    print(
        f"  ours from the input: {med['ours from the input'] / anchor:.2f}x the anchor's einsum "
        f"on materialised patches; on the same patches: "
        f"{med['ours on the same patches'] / anchor:.2f}x; max error vs float64 (relative to "
        f"the largest entry): ours {worst['ours']:.1e}, anchor {worst['anchor']:.1e}"
    )
    report["factor_kernels"] = {"seconds": per_run, "error": worst}


def bench_ranks(folder: Path, args, env: dict, report: dict, timed, fresh, fmt) -> None:
    """2 torchrun ranks x 1 thread against 1 process x 1 thread, same shards."""
    from tests.conftest import torchrun_command

    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    acts, grads = _shards(folder)
    out = folder / "ranks.safetensors"
    base = ["factors", str(folder / "model.pt2"), *acts, "--grads", *grads, "-o", str(out)]
    base += ["--force", "--json"]
    one_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    runs: dict[str, list[float]] = {}
    comm: list[float] = []
    for _ in range(args.repeats):
        for name in ("1 rank", "2 ranks"):
            fresh((out,))
            cmd = [kfac, *base] if name == "1 rank" else torchrun_command(*base)
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=one_env, capture_output=True, check=True)
            runs.setdefault(name, []).append(time.perf_counter() - start)
            if name == "2 ranks":
                line = next(x for x in proc.stdout.decode().splitlines() if x.startswith("{"))
                comm.append(json.loads(line).get("communication_seconds", float("nan")))
    fresh((out,))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nfactors expand on {len(acts)} shards, 1 thread per process:")
    for name, t in runs.items():
        print(f"  {name:10} {fmt(t)} s")
    print(
        f"  2 ranks are {med['1 rank'] / med['2 ranks']:.2f}x faster than 1; rank 0 spent "
        f"{statistics.median(comm):.3f} s in barriers and all_reduce"
    )
    report["ranks"] = {"seconds": runs, "communication_seconds": comm}
