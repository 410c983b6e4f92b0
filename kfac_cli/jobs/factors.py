"""`kfac-cli factors` as library functions: dumps in, Kronecker factors out; and merging.

Layer after layer, every input file's chunks of that layer are read, folded into the
layer's sums and dropped; then the layer's factors are scaled, written and dropped: memory
is a few chunks and one layer's factors, whatever the number and size of the dumps.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from kfac_cli.enums import ComputeDtype, FisherType, KFACType, LossReduction
from kfac_cli.errors import KfacError
from kfac_cli.files.digest import PENDING
from kfac_cli.files.factors_file import eigenbasis_id
from kfac_cli.files.kinds import FACTORS, GRADIENTS
from kfac_cli.files.sources import Tensors, fingerprint, open_tensors
from kfac_cli.jobs.devices import resolve_dtype
from kfac_cli.jobs.distributed import Ranks, on_ranks
from kfac_cli.jobs.ekfac import BASIS_KEYS, Corrections, Eigenbasis, block_keys
from kfac_cli.jobs.pipeline import BufferPool, Prefetcher, Read, view
from kfac_cli.jobs.skeleton import (
    CPU,
    FLOAT_DTYPES,
    Finite,
    Job,
    Plan,
    Reporter,
    as_enums,
    check_input,
    chunks,
    layer_meta,
    model_ref,
    options_of,
    select_keys,
)
from kfac_cli.models.load import load_layer_table
from kfac_cli.models.table import Layer
from kfac_cli.ops.eigh import factor_eigh
from kfac_cli.ops.factors import (
    RowGram,
    gradient_rows,
    gram,
    input_covariance,
    locations,
    loss_correction,
    mirror_,
    reduce_rows,
    reordered_rows,
    sum_order,
)

WRITE_BYTES = 2 * 2**20  # rows of a factor made symmetric and reordered at a time


@dataclass(frozen=True)
class Conventions:
    """How the output gradients were made: what ``G``'s scale depends on."""

    fisher_type: FisherType
    loss_reduction: LossReduction | None = None
    terms: int = 1
    mc_samples: int = 1

    def to_json(self) -> dict:
        return {
            "fisher_type": self.fisher_type.value,
            "loss_reduction": None if self.loss_reduction is None else self.loss_reduction.value,
            "num_per_example_loss_terms": self.terms,
            "mc_samples": self.mc_samples,
        }


@dataclass(frozen=True)
class FactorsOptions:
    """Everything ``factors`` takes besides its files: one value, built once (by the command
    line, or from :func:`run_factors`' keywords) and passed down whole.

    Attributes:
        approx: ``expand`` or ``reduce``.
        fisher_type, loss_reduction, loss_terms, mc_samples: What the gradient files do not
            record (options that contradict them are errors); no ``fisher_type`` and no
            gradient files means forward-only.
        separate_bias: No ones column in ``A`` (weight and bias as separate blocks).
        eigh: Also write each factor's eigendecomposition (computed in float64).
        ekfac: Also write EKFAC's eigenvalue corrections (a second pass over the dumps, in
            the eigenbasis of the factors; implies ``eigh``).
        eigenbasis: A factors file with eigendecompositions: only the second pass, in its
            eigenbasis; the output holds the corrections alone (``merge`` with the same
            eigenbasis completes them; implies ``ekfac``).
        dtype: Accumulation and output dtype, ``float32`` or ``float64`` (default: float64
            if the selected layers' dumps are, else float32: float16 and bfloat16 dumps
            accumulate in float32).
        device: Compute device.
        patterns: Only layers matching these globs.
        ignore_unknown: Skip dump keys that name no layer KFAC treats.
        strict: Fail on NaN/Inf in the dumps (default: warn).
        force: Replace an existing output.
        spec: A state dict's layer spec.
        unsafe_pickle: Allow unpickling a whole module.
        timeout: Seconds to wait for a torchrun rank that stopped responding.

    Raises:
        KfacError: For a dtype factors cannot accumulate in, or an unknown enum value.
    """

    approx: KFACType = KFACType.EXPAND
    fisher_type: FisherType | None = None
    loss_reduction: LossReduction | None = None
    loss_terms: int | None = None
    mc_samples: int | None = None
    separate_bias: bool = False
    eigh: bool = False
    ekfac: bool = False
    eigenbasis: Path | str | None = None
    dtype: ComputeDtype | None = None
    device: str = "cpu"
    patterns: tuple[str, ...] = ()
    ignore_unknown: bool = False
    strict: bool = False
    force: bool = False
    spec: Path | str | None = None
    unsafe_pickle: bool = False
    timeout: float = 300.0

    def __post_init__(self) -> None:
        as_enums(
            self,
            approx=KFACType,
            fisher_type=FisherType,
            loss_reduction=LossReduction,
            dtype=ComputeDtype,
        )
        if self.dtype not in (None, ComputeDtype.FLOAT32, ComputeDtype.FLOAT64):
            raise KfacError(
                None, "dtype", "float32 or float64 to accumulate factors in", self.dtype
            )
        if self.eigenbasis is not None:
            object.__setattr__(self, "ekfac", True)
        if self.ekfac:
            object.__setattr__(self, "eigh", True)


@dataclass
class Inputs:
    """A run's open dump files, activations and their output gradients (same order)."""

    acts: list[Tensors]
    grads: list[Tensors]

    @property
    def all(self) -> list[Tensors]:
        return self.acts + self.grads

    def close(self) -> None:
        for src in self.all:
            src.close()


@dataclass
class Work:
    """One layer's inputs: its dump keys, factor sizes and row counts."""

    layer: Layer
    keys: list[str]
    d: int
    c_out: int
    rows: int = 0  # rows of A's sum (expand: samples x locations; reduce: samples)
    grad_rows: int = 0


def conventions(grads: list[Tensors], opts: FactorsOptions) -> Conventions:
    """The conventions the gradient files record, checked against the options given.

    Raises:
        KfacError: For files that disagree with each other or with an option, or options
            that the files do not answer and nobody gave.
    """
    if not grads:
        given = opts.fisher_type or FisherType.FORWARD_ONLY
        if given is not FisherType.FORWARD_ONLY:
            raise KfacError(None, "grads", f"output-gradient dumps for fisher type {given}", "none")
        return Conventions(given)
    options = {
        "fisher_type": opts.fisher_type,
        "loss_reduction": opts.loss_reduction,
        "num_per_example_loss_terms": opts.loss_terms,
        "mc_samples": opts.mc_samples,
    }
    found: dict[str, object] = {}
    recorded = {k for k in options if k in grads[0].metadata}
    for src in grads:
        meta = src.metadata
        if {k for k in options if k in meta} != recorded:
            raise KfacError(
                src.path,
                "__metadata__",
                f"the conventions {grads[0].path} records "
                f"({', '.join(sorted(recorded)) or 'none'})",
                ", ".join(sorted(k for k in options if k in meta)) or "none",
            )
        if meta and meta.get("format") != GRADIENTS:
            raise KfacError(
                src.path, "__metadata__.format", repr(GRADIENTS), repr(meta.get("format"))
            )
        for key, option in options.items():
            value = meta.get(key)
            if value is None:
                continue
            if key in found and str(found[key]) != value:
                raise KfacError(
                    src.path, key, f"{found[key]} as in the other gradient files", value
                )
            if option is not None and str(option) != value:
                raise KfacError(src.path, key, f"{option} (as given)", value)
            found[key] = value
    merged = {k: found.get(k, v) for k, v in options.items()}
    for key in ("fisher_type", "loss_reduction"):
        if merged[key] is None:
            raise KfacError(grads[0].path, key, f"{key} in the metadata or as an option", "neither")
    try:
        fisher = FisherType(str(merged["fisher_type"]))
        reduction = LossReduction(str(merged["loss_reduction"]))
        t = int(merged["num_per_example_loss_terms"] or 1)
        mc = int(merged["mc_samples"] or 1)
    except ValueError as e:
        raise KfacError(grads[0].path, None, "valid conventions", str(e)[:100]) from None
    if fisher is FisherType.FORWARD_ONLY:
        raise KfacError(grads[0].path, "fisher_type", "no gradient files for forward-only", "some")
    if t < 1 or mc < 1 or (mc != 1 and fisher is not FisherType.MC):
        raise KfacError(
            grads[0].path, None, "T >= 1 and mc_samples 1 unless the fisher type is mc", str(merged)
        )
    return Conventions(fisher, reduction, t, mc)


def _batch(src: Tensors, keys: list[str], axis: int) -> int:
    """The batch size all of a file's tensors share (on ``axis``)."""
    sizes = {src.infos[k].shape[axis] if len(src.infos[k].shape) > axis else -1 for k in keys}
    if len(sizes) != 1 or -1 in sizes:
        shapes = {k: list(src.infos[k].shape) for k in keys}
        raise KfacError(
            src.path,
            None,
            "one batch size in every tensor (or the samples as batch_size in the metadata)",
            str(shapes)[:120],
        )
    return sizes.pop()


def _samples(src: Tensors, keys: list[str]) -> int:
    """The samples ``B`` an activation dump holds: its metadata's ``batch_size`` (then a
    tensor's leading axis may fold the batch with other axes, as window attention does, or
    not be per sample at all, as a positional encoding computed once per batch), else the
    leading size all its tensors share."""
    recorded = src.metadata.get("batch_size")
    if recorded is None:
        return _batch(src, keys, 0)
    if not recorded.isdigit() or int(recorded) == 0:
        raise KfacError(src.path, "__metadata__.batch_size", "a positive integer", recorded)
    for k in keys:
        if not src.infos[k].shape:
            raise KfacError(src.path, k, "a tensor with a leading axis", "a scalar")
    return int(recorded)


def _output_shape(layer: Layer, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A layer output's shape less the batch: ``[C_out, *O]`` or ``[..., d_out]``."""
    if layer.conv is None:
        return (*input_shape[1:-1], layer.weight_shape[0])
    return (layer.weight_shape[0], *layer.conv.output_size(input_shape[2:]))


def run_factors(
    model: Path | str,
    activations: list[Path | str],
    out: str,
    *,
    grads: list[Path | str] | None = None,
    options: FactorsOptions | None = None,
    reporter: Reporter | None = None,
    **settings: object,
) -> dict:
    """Compute each layer's Kronecker factors ``A`` and ``G`` from dumps; write them.

    Args:
        model: The checkpoint.
        activations: Activation dumps, each holding whole samples (at most one ``-``).
        out: The output file, or ``-``.
        grads: The matching output-gradient dumps, one per activation dump.
        options: Every other setting (:class:`FactorsOptions`), or them as keywords
            (``approx="reduce"``, ``separate_bias=True``, ...).
        reporter: Progress and warnings.

    Returns:
        A summary: factors with shapes, ``N``, bytes written, seconds.

    Raises:
        KfacError: For bad inputs (nothing is written).
    """
    opts = options_of(FactorsOptions, options, settings)

    def run(ranks: Ranks, device: str) -> dict:
        o = replace(opts, device=device)
        return _run(ranks, model, activations, out, grads or [], o, reporter)

    return on_ranks(opts.device, opts.timeout, run)


def _open_all(paths: list[Path | str], role: str) -> list[Tensors]:
    """Open every file for ``role`` (see :func:`open_tensors`), or none of them."""
    sources: list[Tensors] = []
    try:
        for path in paths:
            sources.append(open_tensors(path, role=role, hashed=True))
    except BaseException:
        for src in sources:
            src.close()
        raise
    return sources


def _one_stream(sources: list[Tensors]) -> None:
    """At most one of a run's inputs is a stream (each is read once, in its own order).

    Raises:
        KfacError: Naming the second stream.
    """
    streams = [s.path for s in sources if s.sequential]
    if len(streams) > 1:
        raise KfacError(streams[1], None, "at most one input stream", str(len(streams)))


def _run(ranks: Ranks, model, activations, out, grads, opts: FactorsOptions, reporter) -> dict:
    dtype = opts.dtype.value if opts.dtype else None
    job = Job(
        "factors",
        out,
        force=opts.force,
        device=opts.device,
        dtype=dtype,
        reporter=reporter,
        writer=ranks.writer,
    )
    table = load_layer_table(model, opts.spec, opts.unsafe_pickle)
    if grads and len(grads) != len(activations):
        expected = f"{len(activations)} gradient dumps, one per activation dump"
        raise KfacError(None, "grads", expected, str(len(grads)))
    inputs = Inputs(_open_all(activations, "activations"), [])
    basis = None
    try:
        inputs.grads = _open_all(grads, "grads")
        _one_stream(inputs.all)
        agreed = conventions(inputs.grads, opts)
        if opts.ekfac:
            _check_ekfac(inputs, agreed, opts)
        works, batches = _plan(table, inputs, model, opts, job)
        if opts.eigenbasis is not None:
            basis = Eigenbasis(opts.eigenbasis)
            _basis_dtype(job, basis, opts)
        fields = _fields(job, inputs, works, batches, agreed, opts)
        fields["model"] = model_ref(model, table)
        if basis is not None:
            basis.check(fields)
            fields["layers"] = {name: basis.meta["layers"][name] for name in fields["layers"]}
            fields["num_data"] = basis.meta["num_data"]
            fields["eigenbasis"] = basis.identity()
            fields["corrections_only"], fields["eigh"] = True, False
        plans = _plans(works, job.cast, agreed.fisher_type is FisherType.FORWARD_ONLY, opts, fields)
        accumulate = _Accumulator(job, inputs, (works, batches), agreed, opts, ranks, basis, fields)
        written = _stream(job, inputs, plans, fields, accumulate, ranks)
    finally:
        inputs.close()
        if basis is not None:
            basis.close()
    extra = {"ranks": ranks.world, "communication_seconds": round(ranks.waited, 4)}
    return job.summary(
        plans,
        written,
        items="factors",
        num_data=fields["num_data"],
        **agreed.to_json(),
        forward_only=agreed.fisher_type is FisherType.FORWARD_ONLY,
        dtype=fields["dtype"],
        **(
            {"ekfac": True, "corrections_num_data": fields["corrections_num_data"]}
            if opts.ekfac
            else {}
        ),
        **(extra if ranks.world > 1 else {}),
    )


def _check_ekfac(inputs: Inputs, agreed: Conventions, opts: FactorsOptions) -> None:
    """EKFAC needs output gradients, and a stream (read once) needs ``eigenbasis``.

    Raises:
        KfacError: Naming what is missing.
    """
    if agreed.fisher_type is FisherType.FORWARD_ONLY:
        raise KfacError(None, "grads", "output-gradient dumps for EKFAC", "none")
    stream = next((s for s in inputs.all if s.sequential), None)
    if stream is not None and opts.eigenbasis is None:
        raise KfacError(
            stream.path,
            None,
            "files EKFAC can read twice, or the eigenbasis of a factors file (eigenbasis)",
            "a stream, which can be read once",
            fix="eigenbasis",
        )


def _basis_dtype(job: Job, basis: Eigenbasis, opts: FactorsOptions) -> None:
    """The run accumulates in the eigenbasis file's dtype (its eigenvectors as stored).

    Raises:
        KfacError: For a dtype option that differs.
    """
    if opts.dtype is not None and opts.dtype.value != basis.dtype:
        raise KfacError(basis.src.path, "dtype", f"{opts.dtype.value} (as given)", basis.dtype)
    job.cast = resolve_dtype(basis.dtype)


def _fields(job: Job, inputs: Inputs, works, batches, agreed: Conventions, opts) -> dict:
    """The factors file's metadata fields (fingerprints :data:`PENDING`); sets the job's
    accumulation dtype (the dumps' own precision, never narrower than float32) and says
    when it writes forward-only factors without being asked to."""
    n = sum(batches)
    if n == 0:
        raise KfacError(inputs.acts[0].path, None, "at least one sample", "0")
    if job.cast is None:
        wide = any(
            s.infos[k].dtype == torch.float64 for s in inputs.acts for w in works for k in w.keys
        )
        job.cast = torch.float64 if wide else torch.float32
    forward_only = agreed.fisher_type is FisherType.FORWARD_ONLY
    if forward_only and not opts.fisher_type:
        job.reporter.note(
            "no output-gradient dumps given: writing forward-only factors (A only; G is "
            "the identity)"
        )
    return dict(
        approx=opts.approx.value,
        conventions=agreed.to_json(),
        separate_bias=opts.separate_bias,
        num_data=n,
        dtype=str(job.cast).removeprefix("torch."),
        eigh=opts.eigh,
        **({"ekfac": True, "eigenbasis": PENDING, "corrections_num_data": n} if opts.ekfac else {}),
        model={},
        activations=[PENDING] * len(inputs.acts),
        grads=[PENDING] * len(inputs.grads),
        layers={
            w.layer.name: _layer_meta(w, inputs.acts, opts.separate_bias, forward_only)
            for w in works
        },
    )


def _stream(job: Job, inputs: Inputs, plans, fields: dict, accumulate, ranks: Ranks) -> int:
    """Sum every layer and write the factors (the writer rank), or sum this rank's share
    and wait for the writer (the others); the bytes written."""

    def commit() -> dict[str, str] | None:
        prints = _finish_fingerprinted(inputs.all, ranks)
        if prints is None:
            return None
        n = len(inputs.acts)
        final = {**fields, "activations": prints[:n], "grads": prints[n:]}
        if final.get("eigenbasis") == PENDING:  # made here: named by what it was made of
            final["eigenbasis"] = eigenbasis_id(final)
        return factors_header(job, final)

    header = factors_header(job, fields)
    written = job.stream(
        plans, header, accumulate.reads(), accumulate.produce, commit, ahead=2, write=ranks.writer
    )
    if ranks.writer:
        ranks.publish()
    else:
        ranks.await_writer()
    return written


def factors_header(job: Job, fields: dict) -> dict[str, str]:
    """The factors file's metadata, in one order (runs and merges give the same bytes):
    ``fields`` holds approx, conventions, separate_bias, num_data, dtype, eigh, model,
    activations, grads and layers."""
    order = ("approx", "separate_bias", "num_data", "dtype", "eigh", "ekfac", "eigenbasis",
             "corrections_num_data", "corrections_only", "model", "activations", "grads",
             "layers")  # fmt: skip
    f = {k: fields[k] for k in order if k in fields}
    return job.header(FACTORS, approx=f.pop("approx"), **fields["conventions"], **f)


def _finish(sources: list[Tensors], ranks: Ranks) -> None:
    for src in sources:
        src.finish()
    ranks.agree()


def _finish_fingerprinted(sources: list[Tensors], ranks: Ranks) -> list[str] | None:
    """Read every source to its end; the fingerprints of all of them on the writer
    (``None`` elsewhere). Source ``i`` is fingerprinted by rank ``i % world``, which reads
    what it did not read itself (other ranks' rows of a file split by rows)."""
    for src in sources:
        src.finish()
    mine = {i: fingerprint(s) for i, s in enumerate(sources) if i % ranks.world == ranks.rank}
    prints = ranks.gather_strings("fingerprint", mine, len(sources))
    ranks.agree()
    return prints


def _plan(table, inputs: Inputs, model, opts: FactorsOptions, job: Job):
    """Which layers, under which keys, from which files, checked against each other; in
    table order, or in the order their bytes arrive from a stream."""
    acts, grads, approx, separate_bias = inputs.acts, inputs.grads, opts.approx, opts.separate_bias
    keys_of: list[list[str]] = []
    for src in acts:
        keys_of.append(
            select_keys(table, src, model, list(opts.patterns), opts.ignore_unknown, job.reporter)
        )
    first = set(keys_of[0])
    for src, keys in zip(acts[1:], keys_of[1:]):
        if set(keys) != first:
            odd = sorted(set(keys) ^ first)[0]
            raise KfacError(
                src.path, odd, f"the layers of {acts[0].path}", "a different set of layers"
            )
    batches = [_samples(src, keys) for src, keys in zip(acts, keys_of)]
    works: dict[str, Work] = {}
    for key in keys_of[0]:
        layer = table.layer(key)
        for src in acts:
            info = src.infos[key]
            check_input(key, layer, info.shape, job.cast or info.dtype, src.path, model)
        bias = layer.bias is not None and not separate_bias
        d = math.prod(layer.weight_shape[1:]) + bias
        work = works.setdefault(layer.name, Work(layer, [], d, layer.weight_shape[0]))
        work.keys.append(key)
        for src in acts:
            shape = src.infos[key].shape
            o = locations(shape, layer.conv)
            work.rows += shape[0] * (1 if approx is KFACType.REDUCE else o)
    for src, act, batch in zip(grads, acts, batches):
        if set(src.infos) != set(act.infos):  # the same layers, whatever was selected
            odd = sorted(set(src.infos) ^ set(act.infos))[0]
            found = "a tensor the activations lack" if odd in src.infos else "no such tensor"
            raise KfacError(src.path, odd, f"the layers of {act.path}", found)
        src.expect(first)
        recorded = src.metadata.get("batch_size")
        if recorded is not None and recorded != str(batch):
            raise KfacError(
                src.path, "__metadata__.batch_size", f"{batch} as in {act.path}", recorded
            )
        vectors = _batch(src, list(first), 0)
        for key in first:
            layer = table.layer(key)
            shape = act.infos[key].shape
            want = (vectors, shape[0], *_output_shape(layer, shape))
            info = src.infos[key]
            if info.shape != want:
                raise KfacError(
                    src.path,
                    key,
                    f"output gradients of shape {list(want)} [V, B, ...]",
                    f"{list(info.shape)}",
                )
            if info.dtype not in FLOAT_DTYPES:
                raise KfacError(src.path, key, "a floating-point dtype", str(info.dtype))
            work = works[layer.name]
            o = 1 if approx is KFACType.REDUCE else locations(shape, layer.conv)
            work.grad_rows += vectors * shape[0] * o
    order = {la.name: i for i, la in enumerate(table.layers)}
    stream = next((s for s in inputs.all if s.sequential), None)
    if opts.ekfac:
        _check_per_sample(inputs, batches, list(works.values()), stream)
    if stream is not None:  # layers in the order their bytes arrive
        order = {w.layer.name: min(stream.infos[k].begin for k in w.keys) for w in works.values()}
    return sorted(works.values(), key=lambda w: order[w.layer.name]), batches


def _check_per_sample(inputs: Inputs, batches: list[int], works: list[Work], stream) -> None:
    """EKFAC's second pass reads whole samples of each layer's inputs and gradients
    together: every input is per sample, and a stream delivers them in that order.

    Raises:
        KfacError: For an input computed once per batch, or a stream it cannot read so.
    """
    for src, batch in zip(inputs.acts, batches):
        for w in works:
            for key in w.keys:
                lead = src.infos[key].shape[0]
                if lead % batch:
                    raise KfacError(
                        src.path,
                        key,
                        f"whole samples on the leading axis (a multiple of {batch}) for "
                        "EKFAC's per-example gradients",
                        str(lead),
                    )
    if stream is None:
        return
    shared = next((w for w in works if len(w.keys) > 1), None)
    if shared is not None:
        raise KfacError(
            stream.path,
            shared.keys[1],
            "one dump key per layer in a stream, for EKFAC (the calls of a layer are read "
            "together)",
            f"{len(shared.keys)} keys of {shared.layer.name}",
        )
    if stream in inputs.grads:
        vectors = stream.infos[works[0].keys[0]].shape[0] if works else 1
        if vectors > 1:
            raise KfacError(
                stream.path,
                None,
                "one backpropagated vector in a gradient stream, for EKFAC (read by "
                "sample); stream the activations instead",
                f"{vectors} vectors",
            )


def _plans(works: list[Work], dtype, forward_only: bool, opts, fields: dict) -> list[Plan]:
    """Per layer: ``A``, ``G`` (each with its eigendecomposition), then (EKFAC) each
    canonical block's corrections."""
    plans = []
    for w in works:
        sizes = {"A": w.d} if forward_only else {"A": w.d, "G": w.c_out}
        meta = {"layer": w.layer.name}
        for factor, size in sizes.items() if opts.eigenbasis is None else ():
            key = f"{w.layer.name}.{factor}"
            plans.append(Plan(key, dtype, (size, size), meta))
            if opts.eigh:
                plans.append(Plan(f"{key}.eigenvalues", dtype, (size,), meta))
                plans.append(Plan(f"{key}.eigenvectors", dtype, (size, size), meta))
        if opts.ekfac:
            for key, weight in block_keys(fields["layers"][w.layer.name]):
                shape = (w.c_out, w.d) if weight else (w.c_out,)
                plans.append(Plan(f"{key}.corrections", dtype, shape, meta))
    return plans


def _layer_meta(w: Work, acts, separate_bias: bool, forward_only: bool) -> dict:
    layer = w.layer
    meta = layer_meta(layer, acts[0].infos[w.keys[0]].shape)
    meta.pop("input_shape")
    bias = layer.bias is not None
    if bias and not separate_bias:
        blocks = [{"key": layer.name, "W": layer.weight, "b": layer.bias, "factors": ["G", "A"]}]
    else:
        blocks = [
            {
                "key": layer.weight if separate_bias else layer.name,
                "W": layer.weight,
                "b": None,
                "factors": ["G", "A"],
            }
        ]
        if bias:
            blocks.append({"key": layer.bias, "W": None, "b": layer.bias, "factors": ["G"]})
    meta.update(
        {
            "keys": w.keys,
            "input_shapes": [list(src.infos[k].shape) for src in acts for k in w.keys],
            "D": w.d,
            "C_out": w.c_out,
            "bias_column": bias and not separate_bias,
            "rows": w.rows,
            "gradient_rows": 0 if forward_only else w.grad_rows,
            "blocks": blocks,
        }
    )
    return meta


class _Accumulator:
    """Reads, folds and scales one layer at a time, in the order of the plans."""

    def __init__(
        self,
        job: Job,
        inputs: Inputs,
        plan: tuple[list[Work], list[int]],
        agreed: Conventions,
        opts,
        ranks,
        basis: Eigenbasis | None = None,
        fields: dict | None = None,
    ) -> None:
        works, batches = plan
        self.job, self.acts, self.grads = job, inputs.acts, inputs.grads
        self.batches, self.n, self.units = batches, sum(batches), ranks.share(batches)
        self.works = {w.layer.name: w for w in works}
        self.approx, self.agreed = opts.approx, agreed
        self.ranks, self.separate_bias, self.eigh = ranks, opts.separate_bias, opts.eigh
        self.finite = {id(src): Finite(src.path, opts.strict, job.reporter) for src in inputs.all}
        self.dtype = job.cast or torch.float32
        self.stage = job.stage()
        self.done: dict[str, torch.Tensor] = {}
        self.summed: set[str] = set()
        self.scratch: dict[str, torch.Tensor] = {}  # buffers the sums reuse chunk to chunk
        self.flat: torch.Tensor | None = None  # the sums (see _sums)
        self.unwritten, self.pending = threading.Condition(), 0  # items of flat being written
        self.out_pool = BufferPool(3, CPU)
        self.prefetch: Prefetcher | None = None  # the job's, given with each plan
        self.ekfac, self.basis = opts.ekfac, basis
        if basis is not None:
            self.basis_ahead = basis.layers(list(self.works), self.dtype)
        self.layer_metas = (fields or {}).get("layers", {})
        self.second = Corrections(self)

    def _rows(self, info, start: int, stop: int, grads: bool):
        """``(row_len, first, end)`` chunks of a unit's batch rows ``start:stop``: of the
        tensor as ``[B, -1]``, or for gradients ``[V, B, ...]`` as ``[V·B, -1]``."""
        vectors, batch = (info.shape[0], info.shape[1]) if grads else (1, 0)
        row_len = math.prod(info.shape[2:] if grads else info.shape[1:])
        nbytes = (stop - start) * row_len * info.dtype.itemsize
        for v in range(vectors if stop > start else 0):
            for a, b in chunks(stop - start, nbytes, self.job.chunk_bytes):
                yield row_len, v * batch + start + a, v * batch + start + b

    def _inputs(self, w: Work, grads: bool):
        """``(source, key, info, rows, B)`` of every chunk of a layer, in reading order: a
        unit's samples ``start:stop`` of a file of ``B`` samples are the rows ``k·start:k·stop``
        of a tensor whose leading axis folds ``k`` rows per sample; a tensor whose leading
        axis is no multiple of ``B`` (not per sample) is read whole by the file's first unit."""
        sources = self.grads if grads else self.acts
        for f, start, stop in self.units:
            src, samples = sources[f], self.batches[f]
            for key in src.order(w.keys):
                info = src.infos[key]
                lead = info.shape[1 if grads else 0]
                k = lead // samples
                a, b = (k * start, k * stop) if lead % samples == 0 else (0, lead * (start == 0))
                for rows in self._rows(info, a, b, grads):
                    yield src, key, info, rows, samples

    def reads(self):
        """The :class:`Read` of every chunk of every layer, in the order it is summed; each
        tagged with its file and key (activations and gradients share layer keys)."""
        passes = (False, True) if self.grads else (False,)
        for w in self.works.values():
            for grads in passes if self.basis is None else ():  # the factors' pass
                for src, key, info, (row_len, a, b), _ in self._inputs(w, grads):
                    nbytes = (b - a) * row_len * info.dtype.itemsize
                    read = lambda buf, s=src, k=key, r=(row_len, a, b): s.read(k, buf, r)  # noqa: E731
                    yield Read(f"{src.path}:{key}", (a, b), nbytes, read)
            if self.ekfac:  # the corrections' pass
                yield from self.second.reads(w)

    def produce(self, plan: Plan, put, prefetch: Prefetcher) -> None:
        self.prefetch = prefetch
        layer = plan.meta["layer"]
        if layer not in self.summed:
            self.done.clear()
            self._layer(self.works[layer])
            self.summed.add(layer)
        value = self.done.pop(plan.key, None)
        if value is None or not self.ranks.writer:  # another rank's sums: nothing to write
            return
        if not isinstance(value, tuple):  # an eigendecomposition
            put(plan.key, value.to(CPU, self.dtype))
            return
        sym, perm = value
        if perm is None and sym.device == CPU:  # written from the sums themselves (see _sums)
            put(plan.key, sym, None, self._written)
            with self.unwritten:  # counted once handed over (the writer may have written it
                self.pending += 1  # already: the count then passes -1; only we wait on it)
            return
        width = sym.shape[1]  # else in row blocks, in the format's order, each copied out
        step = max(1, WRITE_BYTES // (width * sym.element_size()))
        for start in range(0, sym.shape[0], step):
            rows = min(step, sym.shape[0] - start)
            buf = self.out_pool.get(rows * width * self.dtype.itemsize)
            block = view(buf, self.dtype, (rows, width))  # on the host, whatever the device
            reordered_rows(sym, perm, start, start + rows, self.scratch, out=block)
            put(plan.key, block, None, lambda b=buf: self.out_pool.put(b))

    def _layer(self, w: Work) -> None:
        """One layer's outputs into ``self.done``: its factors (unless given an eigenbasis
        file), then (EKFAC) its corrections in their eigenbasis."""
        if self.basis is None:
            self._sum_factors(w)
        if not self.ekfac:
            return
        if self.basis is not None:  # read while the last layer was computed
            name, bases = next(self.basis_ahead)
            if name != w.layer.name:
                raise RuntimeError(f"eigenbasis read out of step: {name}, not {w.layer.name}")
        else:  # the writer's bytes on every rank
            bases = []
            for key, shape in zip(BASIS_KEYS, ((w.d,), (w.d, w.d), (w.c_out, w.c_out))):
                key = f"{w.layer.name}.{key}"
                if self.ranks.writer:
                    value = self.done[key] = self.done[key].to(CPU, self.dtype)
                else:
                    value = torch.empty(shape, dtype=self.dtype)
                bases.append(value)
        # one layout on every rank: the same rounding
        vals_a, q_a, q_g = (v.to(self.stage.device).contiguous() for v in bases)
        if self.basis is None:
            for value in (vals_a, q_a, q_g):
                self.ranks.broadcast_(value)
        meta = self.layer_metas[w.layer.name]
        sums = self.second.layer(w, meta, q_a, q_g, vals_a, check=self.basis is not None)
        if self.ranks.writer:
            for key, total in sums.items():
                self.done[f"{key}.corrections"] = total.to(self.dtype)

    def _sum_factors(self, w: Work) -> None:
        """Sum, combine over ranks, scale, symmetrise (and decompose) one layer's factors.

        One buffer holds both sums (one collective per layer), reused from layer to layer
        (fresh memory is slow to touch) once the writer is done with it: their upper
        triangles, ``A``'s in :func:`~kfac_cli.ops.factors.sum_order`, each chunk's sum
        added already scaled, then mirrored in place. KFAC-reduce gathers its few rows per
        chunk and folds a buffer of them at a time (:class:`RowGram`), so the previous
        layer is written while this one is read; it checks those rows for NaN/Inf instead
        of the inputs where every input element is in one of them (a pass fewer)."""
        self.scratch.clear()  # buffers are reused across a layer's chunks, not kept after
        conv, reduce = w.layer.conv, self.approx is KFACType.REDUCE
        n_a, n_g = w.d * w.d, w.c_out * w.c_out if self.grads else 0
        bias = w.layer.bias is not None and not self.separate_bias

        def a_sum() -> torch.Tensor:
            return self._sums(n_a + n_g)[:n_a].view(w.d, w.d)

        def g_sum() -> torch.Tensor:
            return self._sums(n_a + n_g)[n_a:].view(w.c_out, w.c_out)

        def rows_per_fold(width: int) -> int:
            return self.job.chunk_bytes // (width * self.dtype.itemsize)

        if reduce:
            a_fold = RowGram(a_sum, rows_per_fold(w.d), self.scratch, "a_rows")
            for _, _, x, check in self._chunks_of(w, grads=False):
                rows = reduce_rows(x, conv, bias)
                check(rows if conv is None or conv.reads_every_input(x.shape[2:]) else None)
                a_fold.add(rows, 1.0 / self.n)
        else:
            a = a_sum().zero_()
            a_scale = partial(self._a_scale, conv)
            for x, alpha in self._coalesced(self._chunks_of(w, grads=False), a_scale, 0):
                input_covariance(
                    x, conv, self.approx, bias, out=a, alpha=alpha, scratch=self.scratch
                )
        if self.grads:
            if reduce:
                g_fold = RowGram(g_sum, rows_per_fold(w.c_out), self.scratch, "g_rows")
            else:
                g = g_sum().zero_()
            if reduce:
                for samples, _, grad, check in self._chunks_of(w, grads=True):
                    rows = gradient_rows(grad, conv is not None, self.approx)
                    check(rows)  # a reduce row sums every location of its sample
                    g_fold.add(rows, self.loss_scale(samples))
            else:
                chunks = self._chunks_of(w, grads=True)
                for grad, c in self._coalesced(chunks, self.loss_scale, 1):
                    gram(gradient_rows(grad, conv is not None, self.approx), g, c)
        factors = {"A": a_fold.finish() if reduce else a}
        if self.grads:
            factors["G"] = g_fold.finish() if reduce else g
        bad_inputs = any(k in f.bad for f in self.finite.values() for k in w.keys)
        for src in self.acts + self.grads:
            for key in w.keys:
                self.finite[id(src)].report(key, math.prod(src.infos[key].shape))
        self.ranks.sum_(self._sums(n_a + n_g))
        if not self.ranks.writer:  # its sums are in the writer's total now
            return
        taps = 1 if conv is None else math.prod(conv.kernel_size)
        device = self.stage.device
        orders = {"A": sum_order((w.d - bias) // taps, conv, self.approx, bias, device)}
        for name, upper in factors.items():
            key = f"{w.layer.name}.{name}"
            sym = mirror_(upper)
            if not bad_inputs:
                self._check_fits(key, sym)
            self.done[key] = (sym, orders.get(name))
            if self.eigh:
                full = reordered_rows(sym, orders.get(name))
                vals, vecs = factor_eigh(full, None, key)
                self.done[f"{key}.eigenvalues"] = vals
                self.done[f"{key}.eigenvectors"] = vecs

    def _a_scale(self, conv, samples: int, info) -> float:
        """``A``'s scale of a chunk of a file of ``samples`` samples: per sample, its rows'
        locations and the rows a leading axis folds into one sample (Swin's windows; 1
        for an input computed once per batch)."""
        lead = info.shape[0]
        fold = lead // samples if lead % samples == 0 else 1
        return 1.0 / (locations(info.shape, conv) * fold * self.n)

    def loss_scale(self, samples: int, _info=None) -> float:
        """The loss correction ``c`` of a file of ``samples`` samples: ``G``'s scale, and
        EKFAC's corrections' (:class:`~kfac_cli.jobs.ekfac.Corrections`)."""
        return loss_correction(
            self.agreed.loss_reduction, samples, self.agreed.terms, self.n, self.agreed.mc_samples
        )

    def _coalesced(self, chunks, scale, dim: int):
        """``(tensor, scale)`` of a layer's chunks (:meth:`_chunks_of`, each checked),
        consecutive small ones of one shape and scale joined along ``dim`` up to a chunk's
        bytes (the shards of a few samples each: a sum's fixed cost paid once, not per
        file); ``scale(samples, info)`` is a chunk's."""
        limit, group, size, last = self.job.chunk_bytes, [], 0, None
        for samples, info, x, check in chunks:
            check()
            tag = (scale(samples, info), x.shape[:dim], x.shape[dim + 1 :])
            if group and (tag != last or size + x.nbytes > limit):
                yield torch.cat(group, dim) if len(group) > 1 else group[0], last[0]
                group, size = [], 0
            if x.nbytes * 2 > limit:  # large: summed as it is, from the reader's buffer
                yield x, tag[0]
                continue
            group.append(x.clone())  # (its buffer goes back to the reader)
            size, last = size + x.nbytes, tag
        if group:
            yield torch.cat(group, dim) if len(group) > 1 else group[0], last[0]

    def _check_fits(self, key: str, factor: torch.Tensor) -> None:
        """A factor of finite inputs is finite, or its sums overflowed the dtype.

        Raises:
            KfacError: Naming the factor and the wider dtype that fixes it.
        """
        if bool(torch.isfinite(factor.sum())) or bool(torch.isfinite(factor).all()):
            return  # (a finite sum: every element finite; else count exactly)
        found = "NaN/Inf from finite inputs (an overflow)"
        if self.ranks.world > 1:
            found = "NaN/Inf: an overflow, or NaN/Inf inputs on another rank"
        dtype = str(self.dtype).removeprefix("torch.")
        wider = "dtype_float64" if self.dtype != torch.float64 else None
        raise KfacError(None, key, f"a factor that fits {dtype}", found, fix=wider)

    def _sums(self, numel: int) -> torch.Tensor:
        """``numel`` elements of the sums' buffer (uninitialised), once the writer has
        written what :meth:`produce` gave it from there. The buffer is reused by a layer of
        about its size (fresh memory is slow to touch), else replaced: memory follows the
        layer in hand, never a larger one's sums beside its own chunks."""
        with self.unwritten:
            self.unwritten.wait_for(lambda: self.pending == 0)
        if self.flat is None or not numel <= self.flat.numel() <= numel + numel // 4:
            self.flat = None  # the old one freed before the new one is touched
            self.flat = torch.empty(numel, dtype=self.dtype, device=self.stage.device)
        return self.flat[:numel]

    def _written(self) -> None:
        with self.unwritten:
            self.pending -= 1
            self.unwritten.notify_all()

    def _chunks_of(self, w: Work, grads: bool):
        """``(samples of its file, info, chunk on the device, check)`` of a layer's inputs
        (or gradients), each chunk's host buffer back to the reader once the chunk has been
        used. ``check(probe=None)`` counts the chunk's NaN/Inf (:meth:`Finite.check`; a
        chunk cast to another dtype is counted as stored, before the cast)."""
        for src, key, info, (_, a, b), samples in self._inputs(w, grads):
            self.ranks.check()
            x_host, buf = self.prefetch.next(f"{src.path}:{key}", (a, b))
            shape = (1, b - a, *info.shape[2:]) if grads else (b - a, *info.shape[1:])
            x_host = x_host.view(shape)
            finite, cast = self.finite[id(src)], x_host.dtype != self.dtype
            if cast:
                finite.check(key, x_host)
            x = self.stage.to_device(x_host, self.dtype)
            self.stage.wait_copied()  # a device copy has left the host buffer
            if x.data_ptr() != x_host.data_ptr():
                self.prefetch.release(buf)
                buf = None
            yield samples, info, x, _checked if cast else partial(finite.check, key, x)
            if buf is not None:  # the sum read the buffer itself: it is free now
                self.prefetch.release(buf)


def _checked(probe: torch.Tensor | None = None) -> None:
    """A chunk's NaN/Inf check when it has been counted already."""
