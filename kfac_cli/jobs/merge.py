"""`kfac-cli merge` as a library function: factors files of disjoint data combined into
the file one run over all of it gives.

KFAC files: ``A`` (and ``G`` of a ``mean`` loss) are averages over samples, combined
weighted by each file's ``N``; ``G`` of a ``sum`` loss is a plain sum; counts add up.
EKFAC files made in one eigenbasis (``eigenbasis``): their corrections add up like ``G``
(weighted by each file's corrections samples for a ``mean`` loss), and the factors and
eigendecompositions come from the inputs that hold them (equal in each, checked) or from
the eigenbasis file itself; without either the output holds corrections only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import CONVENTIONS, COUNTS, factors_meta
from kfac_cli.files.sources import Tensors
from kfac_cli.jobs.devices import resolve_dtype
from kfac_cli.jobs.distributed import Ranks
from kfac_cli.jobs.ekfac import Eigenbasis, block_keys
from kfac_cli.jobs.factors import _finish, _one_stream, _open_all, factors_header
from kfac_cli.jobs.skeleton import Job, Plan, Reporter
from kfac_cli.ops.eigh import factor_eigh
from kfac_cli.ops.factors import mirror_


def run_merge(
    inputs: list[Path | str],
    out: str,
    *,
    eigh: bool = False,
    eigenbasis: Path | str | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Combine factors files from disjoint data into the file one run over all would give.

    Args:
        inputs: Factors files (KFAC, or EKFAC files of one eigenbasis).
        out: The output file, or ``-``.
        eigh: KFAC: also write each merged factor's eigendecomposition.
        eigenbasis: EKFAC corrections alone: the factors file they were made in, whose
            factors and eigendecompositions complete the output.
        force: Replace an existing output.
        reporter: Progress and warnings.

    Raises:
        KfacError: For files of different models, approximations, conventions or
            eigenbases, or files that share data (:func:`_check_disjoint`).
    """
    job = Job("merge", out, force=force, reporter=reporter)
    sources = _open_all(inputs, "factors")
    basis = None
    try:
        _one_stream(sources)
        metas = [factors_meta(src) for src in sources]
        _check_mergeable(sources, metas)
        try:
            dtype = resolve_dtype(metas[0]["dtype"])
        except KfacError as e:
            raise e.with_context(sources[0].path) from None
        if metas[0]["ekfac"]:
            if eigenbasis is not None:
                basis = Eigenbasis(eigenbasis)
                _check_basis(basis, metas[0], sources[0])
            plans, fields, produce = _ekfac_merge(sources, metas, basis, dtype)
        else:
            if eigenbasis is not None:
                raise KfacError(
                    sources[0].path, "ekfac", "EKFAC corrections for eigenbasis", "KFAC factors"
                )
            plans, fields, produce = _kfac_merge(sources, metas, eigh, dtype)
        written = job.write(
            plans, factors_header(job, fields), produce, lambda: _finish(sources, Ranks())
        )
    finally:
        for src in sources:
            src.close()
        if basis is not None:
            basis.close()
    return job.summary(plans, written, items="factors", num_data=fields["num_data"])


def _kfac_merge(sources: list[Tensors], metas: list[dict], eigh: bool, dtype):
    """``(plans, fields, produce)`` of merged KFAC factors."""
    factor_keys = [k for k in sources[0].infos if k.endswith((".A", ".G"))]
    sizes = {k: sources[0].infos[k].shape for k in factor_keys}
    _require(sources, factor_keys)
    plans = []
    for key in factor_keys:
        plans.append(Plan(key, dtype, sizes[key]))
        if eigh:
            plans.append(Plan(f"{key}.eigenvalues", dtype, sizes[key][:1]))
            plans.append(Plan(f"{key}.eigenvectors", dtype, sizes[key]))
    return plans, _merged_fields(metas, eigh), _merger(sources, metas, sizes, eigh)


def _require(sources: list[Tensors], keys: list[str]) -> None:
    for src in sources:
        missing = [k for k in keys if k not in src.infos]
        if missing:
            raise KfacError(src.path, missing[0], "every tensor of the first file", "none")


def _check_basis(basis: Eigenbasis, meta: dict, first: Tensors) -> None:
    """The eigenbasis file the corrections were made in (its identity names its model,
    conventions, layers and data), with its eigendecompositions.

    Raises:
        KfacError: For another one, or one without eigendecompositions.
    """
    if basis.identity() != meta["eigenbasis"]:
        raise KfacError(
            basis.src.path,
            "eigenbasis",
            f"the eigenbasis of {first.path} ({meta['eigenbasis'][:19]}...)",
            f"{basis.identity()[:19]}...",
        )
    for name in meta["layers"]:
        for factor in ("A", "G"):
            key = f"{name}.{factor}.eigenvectors"
            if key not in basis.src.infos:
                raise KfacError(basis.src.path, key, "eigendecompositions (--eigh)", "none")


def _ekfac_merge(sources: list[Tensors], metas: list[dict], basis: Eigenbasis | None, dtype):
    """``(plans, fields, produce)`` of merged EKFAC files: per layer its factors and
    eigendecompositions (from the inputs that hold them, or the eigenbasis file), then its
    blocks' summed corrections."""
    holders = [src for src, meta in zip(sources, metas) if not meta["corrections_only"]]
    factors_from = holders[0] if holders else (basis.src if basis is not None else None)
    plans, copied = [], []
    for name, layer in metas[0]["layers"].items():
        if factors_from is not None:
            for factor in ("A", "G"):
                for part in ("", ".eigenvalues", ".eigenvectors"):
                    key = f"{name}.{factor}{part}"
                    if key in factors_from.infos:
                        info = factors_from.infos[key]
                        plans.append(Plan(key, dtype, tuple(info.shape)))
                        copied.append(key)
        for key, _ in block_keys(layer):
            info = sources[0].infos.get(f"{key}.corrections")
            if info is None:
                raise KfacError(sources[0].path, f"{key}.corrections", "corrections", "none")
            plans.append(Plan(f"{key}.corrections", dtype, tuple(info.shape)))
    _require(holders, copied)
    _require(sources, [p.key for p in plans if p.key.endswith(".corrections")])
    first = metas[0]
    fields = dict(
        approx=first["approx"],
        conventions={k: first[k] for k in CONVENTIONS},
        separate_bias=first["separate_bias"],
        num_data=first["num_data"],
        dtype=first["dtype"],
        eigh=factors_from is not None,
        ekfac=True,
        eigenbasis=first["eigenbasis"],
        corrections_num_data=sum(m["corrections_num_data"] for m in metas),
        model=first["model"],
        activations=[a for m in metas for a in m["activations"]],
        grads=[g for m in metas for g in m["grads"]],
        layers=first["layers"],
    )
    if factors_from is None:
        fields["corrections_only"] = True
    return plans, fields, _ekfac_merger(sources, metas, holders, factors_from)


def _ekfac_merger(sources, metas, holders: list[Tensors], factors_from: Tensors | None):
    """``produce`` for :meth:`Job.write`: factors copied (the same bytes in every input
    that holds them), corrections summed in float64, weighted by corrections samples for a
    ``mean`` loss."""
    n = sum(m["corrections_num_data"] for m in metas)
    weighted = metas[0]["loss_reduction"] == "mean"

    def produce(plan: Plan, put) -> None:
        if not plan.key.endswith(".corrections"):
            value = factors_from.read(plan.key)
            for src in holders:
                if src is not factors_from and not torch.equal(src.read(plan.key), value):
                    raise KfacError(
                        src.path, plan.key, f"the same factor as {factors_from.path}", "another"
                    )
            put(plan.key, value)
            return
        total = torch.zeros(plan.shape, dtype=torch.float64)
        for src, meta in zip(sources, metas):
            weight = meta["corrections_num_data"] / n if weighted else 1.0
            total += src.read(plan.key).double() * weight
        put(plan.key, total.to(plan.dtype))

    return produce


def _check_mergeable(sources: list[Tensors], metas: list[dict]) -> None:
    """Files of one model, approximation, conventions and dtype, of disjoint data.

    Raises:
        KfacError: Naming the first file and key that differ.
    """
    first = metas[0]
    same = ("approx", *CONVENTIONS, "separate_bias", "dtype", "layout_version", "ekfac")
    if first["ekfac"]:  # corrections of one eigenbasis, from the same factors
        same += ("eigenbasis", "num_data")
    for src, meta in zip(sources[1:], metas[1:]):
        for key in same:
            if meta[key] != first[key]:
                raise KfacError(
                    src.path, key, f"{first[key]} as in {sources[0].path}", str(meta[key])
                )
        if set(meta["layers"]) != set(first["layers"]):
            odd = sorted(set(meta["layers"]) ^ set(first["layers"]))[0]
            raise KfacError(src.path, odd, f"the layers of {sources[0].path}", "others")
        for name, layer in meta["layers"].items():
            mine = {k: v for k, v in layer.items() if k not in COUNTS}
            theirs = {k: v for k, v in first["layers"][name].items() if k not in COUNTS}
            if mine != theirs:
                odd = next(
                    k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)
                )
                raise KfacError(
                    src.path,
                    f"{name}.{odd}",
                    f"{theirs.get(odd)} as in {sources[0].path}",
                    str(mine.get(odd)),
                )
    _check_disjoint(sources, metas)


def _merged_fields(metas: list[dict], eigh: bool) -> dict:
    """The merged file's metadata fields: counts added, lists concatenated."""
    first = metas[0]
    layers = {}
    for name, layer in first["layers"].items():
        merged = dict(layer)
        for count in ("rows", "gradient_rows"):
            merged[count] = sum(m["layers"][name][count] for m in metas)
        merged["input_shapes"] = [s for m in metas for s in m["layers"][name]["input_shapes"]]
        layers[name] = merged
    return dict(
        approx=first["approx"],
        conventions={k: first[k] for k in CONVENTIONS},
        separate_bias=first["separate_bias"],
        num_data=sum(m["num_data"] for m in metas),
        dtype=first["dtype"],
        eigh=eigh,
        model=first["model"],
        activations=[a for m in metas for a in m["activations"]],
        grads=[g for m in metas for g in m["grads"]],
        layers=layers,
    )


def _merger(sources: list[Tensors], metas: list[dict], sizes: dict, eigh: bool):
    """``produce`` for :meth:`Job.write`: each factor summed over the files in float64,
    weighted by ``N`` where it is an average (``A``; ``G`` of a mean loss)."""
    n = sum(m["num_data"] for m in metas)
    first = metas[0]
    weighted = first["fisher_type"] == "forward-only" or first["loss_reduction"] == "mean"
    done: dict[str, torch.Tensor] = {}

    def produce(plan: Plan, put) -> None:
        if plan.key not in done:
            base = plan.key.removesuffix(".eigenvalues").removesuffix(".eigenvectors")
            total = torch.zeros(sizes[base], dtype=torch.float64)
            for src, meta in zip(sources, metas):
                value = src.read(base).double()
                average = base.endswith(".A") or weighted
                total += value * (meta["num_data"] / n if average else 1.0)
            done[base] = mirror_(total)
            if eigh:
                vals, vecs = factor_eigh(done[base], None, base)
                done[f"{base}.eigenvalues"], done[f"{base}.eigenvectors"] = vals, vecs
        put(plan.key, done.pop(plan.key).to(plan.dtype))

    return produce


def _check_disjoint(sources: list[Tensors], metas: list[dict]) -> None:
    """No activation dump (by its fingerprint) in two of the files: the same file twice,
    or a file merged with one of its own parts.

    Raises:
        KfacError: Naming both files and the dump's fingerprint.
    """
    seen: dict[str, object] = {}
    for src, meta in zip(sources, metas):
        for fp in set(meta["activations"]):
            if fp in seen:
                raise KfacError(
                    src.path,
                    "activations",
                    f"factors of data disjoint from {seen[fp]}",
                    f"activation dump {fp[:19]}... in both",
                )
        seen.update(dict.fromkeys(meta["activations"], src.path))
