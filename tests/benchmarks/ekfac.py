"""The EKFAC part of the benchmark (see run.py): kfac-cli's two data passes against the
anchor's same work, the eigendecompositions timed apart.

Pass 1 is `kfac-cli factors` (no `--eigh`); pass 2 is `kfac-cli factors --eigenbasis B`,
the corrections alone in the eigenbasis of ``B``. The anchor is curvlinops' own code per
layer after `load_file`: `extract_patches`, the covariances, then, in the same eigenbasis
(read from ``B``: its `eigh` is not timed), `compute_eigenvalue_correction_linear_weight_sharing`
on every shard. Both sides compute the same float64 eigendecompositions; they are timed once,
in process (`kfac_cli.ops.eigh.factor_eigh` over every factor of ``B``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ANCHOR = r"""
import importlib.util, json, sys, torch
import torch.nn.functional as F
from einops import einsum, rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
spec_file, basis_file, out_file, *files = sys.argv[1:]
acts, grads = files[: len(files) // 2], files[len(files) // 2 :]
origin = importlib.util.find_spec("curvlinops").submodule_search_locations[0]
def load(name):
    spec = importlib.util.spec_from_file_location(name, f"{origin}/{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod
ku = load("kfac_utils")
import curvlinops.ekfac as ek
layers = {la["name"]: la for la in json.load(open(spec_file))["layers"]}
n = 0
for f in acts:
    with safe_open(f, "pt") as h:
        n += h.get_slice(next(iter(h.keys()))).get_shape()[0]
def rows(name, x, g):
    la = layers[name]
    k, s, d, gr, p = la["kernel_size"], la["stride"], la["dilation"], la["groups"], la["padding"]
    if p == "same":  # curvlinops refuses unequal padding: pad by hand
        tot = [di * (ki - 1) for ki, di in zip(k, d)]
        x = F.pad(x, [v for t in reversed(tot) for v in (t // 2, t - t // 2)]); p = 0
    x = ku.extract_patches(x, k, s, p, d, gr)
    if la["bias"]:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    g = rearrange(g, "batch c ... -> batch (...) c")
    return x, g
A, G, E = {}, {}, {}
for af, gf in zip(acts, grads):  # pass 1: curvlinops' KFAC hook code
    xs, gs = load_file(af), load_file(gf)
    for name, x in xs.items():
        x, g = rows(name, x, gs[name][0])
        scale = x.shape[1]
        x, g = x.flatten(0, 1), g.flatten(0, 1)
        cov = einsum(x, x, "b i,b j -> i j").div_(n * scale)
        A[name] = A[name].add_(cov) if name in A else cov
        cov = einsum(g, g, "b i,b j->i j")
        G[name] = G[name].add_(cov) if name in G else cov
with safe_open(basis_file, "pt") as h:
    Q = {k: h.get_tensor(k) for k in h.keys() if k.endswith(".eigenvectors")}
for af, gf in zip(acts, grads):  # pass 2: its EKFAC hook code, in the given eigenbasis
    xs, gs = load_file(af), load_file(gf)
    for name, x in xs.items():
        x, g = rows(name, x, gs[name][0])
        e = ek.compute_eigenvalue_correction_linear_weight_sharing(
            g, Q[f"{name}.G.eigenvectors"], x, Q[f"{name}.A.eigenvectors"])
        E[name] = E[name].add_(e) if name in E else e
out = {f"{k}.A": v for k, v in A.items()}
out.update({f"{k}.corrections": v for k, v in E.items()})
save_file(out, out_file)
"""


WORKER = r"""
import json, sys, time, torch
from kfac_cli.jobs.factors import run_factors
which, anchor_code, model, basis, out1, out2, anchor_argv, *files = sys.argv[1:]
acts, grads = files[: len(files) // 2], files[len(files) // 2 :]
torch.set_num_threads(1)
start = time.perf_counter()
if which == "pass 1":
    run_factors(model, acts, out1, grads=grads, force=True)
elif which == "pass 2":
    run_factors(model, acts, out2, grads=grads, force=True, eigenbasis=basis)
else:
    sys.argv = ["anchor", *json.loads(anchor_argv)]
    exec(compile(open(anchor_code).read(), "anchor", "exec"), {})
print(time.perf_counter() - start)
"""


def bench_ekfac(folder: Path, args, env: dict, report: dict, timed, fresh, fmt) -> None:
    """Pass 1, pass 2 and the anchor alternating, each run a process of its own timed after
    `import torch` (their work, not three interpreters' start-up, and none running in
    memory another left behind); then each as a process once, for its peak RSS; then the
    eigendecompositions."""
    from tests.benchmarks.factors import _shards
    from tests.benchmarks.run import _has_curvlinops

    kfac = str(Path(sys.executable).with_name("kfac-cli"))
    model, spec = folder / "model.pt2", folder / "spec.json"
    acts, grads = _shards(folder)
    basis = folder / "basis.safetensors"
    common = ["--force", "-q", "--device", args.device]
    eigh = [kfac, "factors", str(model), *acts, "--grads", *grads, "--eigh", "-o", str(basis)]
    subprocess.run([*eigh, *common], check=True, env=env)
    out1, out2, anchor_out = (folder / n for n in ("p1.safetensors", "p2.safetensors", "an.st"))
    anchor_file = folder / "anchor.py"
    anchor_file.write_text(ANCHOR)
    anchor_argv = [str(spec), str(basis), str(anchor_out), *acts, *grads]
    names = {"pass 1": "kfac-cli pass 1 (factors)", "pass 2": "kfac-cli pass 2 (corrections)",
             "anchor": "anchor"}  # fmt: skip
    which = list(names) if _has_curvlinops() else ["pass 1", "pass 2"]
    times: dict[str, list[float]] = {names[w]: [] for w in which}
    for _ in range(args.repeats):  # each run a process of its own, timed after import torch
        for w in which:
            fresh((out1, out2, anchor_out))  # no output replaced (its unlink) inside the time
            worker = [sys.executable, "-c", WORKER, w, str(anchor_file), str(model), str(basis),
                      str(out1), str(out2), json.dumps(anchor_argv), *acts, *grads]  # fmt: skip
            run = subprocess.run(worker, check=True, env=env, capture_output=True, text=True)
            times[names[w]].append(float(run.stdout.split()[-1]))
    processes = {
        "kfac-cli pass 1 (factors)": [kfac, "factors", str(model), *acts, "--grads", *grads,
                                      "-o", str(out1), *common],
        "kfac-cli pass 2 (corrections)": [kfac, "factors", str(model), *acts, "--grads", *grads,
                                          "--eigenbasis", str(basis), "-o", str(out2), *common],
        "anchor": [sys.executable, str(anchor_file), *anchor_argv],
    }  # fmt: skip
    bare = timed([sys.executable, "-c", "import torch"], env)[1]
    print(
        f"\nEKFAC over {len(acts)} shards ({args.threads} thread(s), {args.repeats} runs, each "
        "a process timed after `import torch`; peak RSS of one process run above `import "
        "torch`):"
    )
    for name, t in times.items():
        if not t:
            continue
        fresh((out1, out2, anchor_out))
        rss = timed(processes[name], env)[1] - bare
        print(f"{name:32} {fmt(t):>20}  peak RSS {rss / 2**20:6.0f} MiB")
        report[f"ekfac {name}"] = {"seconds": t, "rss_above_torch": rss}
    fresh((out1, out2, anchor_out))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    p1, p2 = med["kfac-cli pass 1 (factors)"], med["kfac-cli pass 2 (corrections)"]
    print(f"pass 2 / pass 1: {p2 / p1:.2f}")
    report["ekfac pass2_over_pass1"] = p2 / p1
    if "anchor" in med:
        speed = med["anchor"] / (p1 + p2)
        print(f"anchor / (pass 1 + pass 2): {speed:.2f}x")
        report["ekfac x_faster_than_anchor"] = speed
    eigh = _eigh_seconds(basis, args.threads)
    print(f"float64 eigendecompositions of every factor (both sides compute them): {eigh:.2f} s")
    report["ekfac eigh_seconds"] = eigh


def _eigh_seconds(basis: Path, threads: int) -> float:
    import torch
    from safetensors import safe_open

    from kfac_cli.ops.eigh import factor_eigh

    torch.set_num_threads(threads)
    total = 0.0
    with safe_open(basis, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle)
            if key.endswith((".A", ".G")):
                factor = f.get_tensor(key).double()
                start = time.perf_counter()
                factor_eigh(factor, basis, key)
                total += time.perf_counter() - start
    return total
