"""`kfac-cli apply` as a library function: a factors file's curvature, its damped inverse or
any real power, applied to parameter-space tensors or canonical blocks.

Each canonical block of each layer the factors cover is read a chunk of its vectors at a
time as canonical matrices ``M: [n, C_out, D]`` (weight rows with the bias column of a
joint block, for every vector of the chunk and every trailing column), multiplied by the
block's operator (:func:`kfac_cli.ops.kronecker.kfac_operator`, built once per layer in
float64 from the factors' eigendecompositions) and written back in the input's own layout:
the output has exactly the input's keys, shapes, dtypes and order. The parts of a joint
block that come later in that order (its weight, where the bias comes first, as the
safetensors library orders them) wait in memory, or in a temporary file once larger than
a chunk: memory is a chunk and one layer's factors, whatever the number of vectors.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kfac_cli.enums import ComputeDtype, Untreated
from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import factors_meta, read_factor, require_complete
from kfac_cli.files.kinds import CANONICAL, PARAMETERS
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.devices import resolve_dtype
from kfac_cli.jobs.distributed import Ranks, on_ranks
from kfac_cli.jobs.pipeline import Prefetcher, Read
from kfac_cli.jobs.skeleton import CPU, Job, Plan, Reporter, as_enums, chunks, options_of
from kfac_cli.models.table import matches
from kfac_cli.ops.kronecker import BlockOperator, Damping, Factor, SingularBlock, kfac_operator


@dataclass(frozen=True)
class ApplyOptions:
    """Everything ``apply`` takes besides its files.

    Attributes:
        power: ``1`` the curvature, ``-1`` its (damped) inverse, or any real power.
        damping: ``λ``, or ``(λ_A, λ_G)`` (Tikhonov on each factor).
        heuristic_damping: Martens & Grosse's π split of ``λ`` between the factors.
        min_damping: The heuristic's floor.
        exact_damping: ``(G ⊗ A + λI)^p`` in the Kronecker eigenbasis (EKFAC: the only
            damping; other powers than ±1: the only one besides none).
        untreated: Tensors the factors do not cover: ``keep`` (default), ``zero``,
            ``drop`` or ``error``.
        batch_first: Tensors carry a leading vector axis ``[N, *param_shape]``.
        columns: Tensors carry a trailing column axis ``[*param_shape, C]``.
        patterns: Only layers matching these globs (the others count as untreated).
        dtype: Compute and output dtype (default: float64 for float64 inputs, else
            float32, written back in each tensor's own dtype).
        device: Compute device.
        force: Replace an existing output.
        timeout: Seconds to wait for a torchrun rank that stopped responding.

    Raises:
        KfacError: For a combination curvlinops' damping rules do not define.
    """

    power: float = 1.0
    damping: float | tuple[float, float] = 0.0
    heuristic_damping: bool = False
    min_damping: float = 1e-8
    exact_damping: bool = False
    untreated: Untreated = Untreated.KEEP
    batch_first: bool = False
    columns: bool = False
    patterns: tuple[str, ...] = ()
    dtype: ComputeDtype | None = None
    device: str = "cpu"
    force: bool = False
    timeout: float = 300.0

    def __post_init__(self) -> None:
        as_enums(self, untreated=Untreated, dtype=ComputeDtype)
        pair = isinstance(self.damping, (tuple, list))
        values = tuple(self.damping) if pair else (self.damping,)
        if pair:
            object.__setattr__(self, "damping", tuple(float(v) for v in values))
        if len(values) not in (1, 2) or any(not math.isfinite(v) or v < 0 for v in values):
            raise KfacError(None, "damping", "one or two finite values >= 0", str(values))
        if self.heuristic_damping and self.exact_damping:
            raise KfacError(None, "damping", "heuristic or exact damping", "both")
        if pair and (self.heuristic_damping or self.exact_damping):
            raise KfacError(None, "damping", "one value for heuristic or exact damping", "two")
        damped = any(values) or self.heuristic_damping
        if self.power not in (1, -1) and damped and not self.exact_damping:
            raise KfacError(
                None,
                "power",
                "exact damping for a power other than 1 or -1 (damped factors' powers are "
                "no power of the damped curvature)",
                f"{self.power} with damped factors",
                fix="exact_damping",
            )

    def damping_rule(self) -> Damping:
        return Damping(self.damping, self.heuristic_damping, self.min_damping, self.exact_damping)


@dataclass
class Target:
    """One canonical block to apply: its factors' layer, its input tensors (canonical
    order: the weight, then a joint bias) and their widths in the block's ``D`` axis."""

    key: str
    layer: str
    weight: bool
    members: list[tuple[str, int]]
    c_out: int
    d: int


def run_apply(
    factors: Path | str,
    tensors: Path | str,
    out: str,
    *,
    options: ApplyOptions | None = None,
    reporter: Reporter | None = None,
    **settings: object,
) -> dict:
    """Apply ``(F + damping)^power`` of a factors file to each treated block of a tensors
    file (parameter space, or a canonical file); write the result in the input's layout.

    Raises:
        KfacError: For bad inputs (nothing is written): tensors of another model, shapes
            that match no block, a singular factor without damping.
    """
    o = options_of(ApplyOptions, options, settings)

    def run(ranks: Ranks, device: str) -> dict:
        return _run(ranks, factors, tensors, out, replace(o, device=device), reporter)

    return on_ranks(o.device, o.timeout, run)


def _run(ranks: Ranks, factors, tensors, out, o: ApplyOptions, reporter) -> dict:
    dtype = o.dtype.value if o.dtype else None
    device = o.device
    job = Job("apply", out, force=o.force, device=device, dtype=dtype, reporter=reporter,
              writer=ranks.writer)  # fmt: skip
    with (
        open_tensors(factors, stream_ok=False, role="factors") as fsrc,
        _spooled(tensors) as path,
        open_tensors(path, stream_ok=False, role="vectors") as src,
    ):
        meta = factors_meta(fsrc)
        require_complete(fsrc, meta)
        canonical = src.metadata.get("format") == CANONICAL
        lead, trail = _axes(src, canonical, o)
        targets, untreated = _targets(src, meta, canonical, lead, trail, o)
        if not targets:  # another model's tensors, or layers not selected
            raise KfacError(
                src.path,
                None,
                f"tensors of the layers of {Path(str(factors)).name}"
                + (" matching the patterns" if o.patterns else ""),
                f"none of its {len(meta['layers'])} layers",
            )
        if untreated and o.untreated is Untreated.ERROR:
            raise KfacError(src.path, untreated[0], "a tensor the factors cover", "untreated")
        if job.cast is None:
            wide = any(i.dtype == torch.float64 for i in src.infos.values())
            job.cast = torch.float64 if wide else torch.float32
        keys = [k for k in src.infos if not (k in untreated and o.untreated is Untreated.DROP)]
        plans = [Plan(k, src.infos[k].dtype, tuple(src.infos[k].shape)) for k in keys]
        applied = {
            "factors": {"file": Path(str(factors)).name, "eigenbasis": meta["eigenbasis"]},
            "ekfac": meta["ekfac"],
            "power": o.power,
            "damping": list(o.damping) if isinstance(o.damping, tuple) else o.damping,
            "heuristic_damping": o.heuristic_damping,
            "min_damping": o.min_damping,
            "exact_damping": o.exact_damping,
            "untreated": {"mode": o.untreated.value, "keys": untreated},
        }
        metadata = {**src.metadata, "format": src.metadata.get("format", PARAMETERS)}
        metadata.update(job.header(metadata["format"], applied=applied))
        if canonical:  # still a canonical file of the same blocks
            metadata["layout_version"] = src.metadata["layout_version"]
        work = _Applier(job, src, fsrc, meta, (targets, untreated, lead, trail), o, ranks)
        written = job.stream(
            plans,
            metadata,
            work.reads(plans),
            work.produce,
            lambda: _finish(ranks, src, fsrc),
            ahead=2,
            write=ranks.writer,
        )
        if ranks.writer:
            ranks.publish()
        else:
            ranks.await_writer()
    extra = {"ranks": ranks.world} if ranks.world > 1 else {}
    return job.summary(plans, written, untreated=untreated, blocks=len(targets), **extra)


def _finish(ranks: Ranks, *sources: Tensors) -> None:
    for src in sources:
        src.finish()
    ranks.agree()


class _spooled:
    """A path for ``tensors``: itself, or stdin copied to a temporary file first (apply
    reads each block's tensors together, in no stream's order)."""

    def __init__(self, path: Path | str) -> None:
        self.path, self.tmp = path, None

    def __enter__(self) -> Path | str:
        if str(self.path) != "-":
            return self.path
        import shutil
        import sys

        self.tmp = tempfile.NamedTemporaryFile(prefix="kfac-cli-", suffix=".safetensors")
        shutil.copyfileobj(sys.stdin.buffer, self.tmp, 2**22)
        self.tmp.flush()
        return self.tmp.name

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.close()


def _axes(src: Tensors, canonical: bool, o: ApplyOptions) -> tuple[bool, bool]:
    """Whether tensors carry the vector axis ``N`` first and a column axis ``C`` last: the
    options, or a canonical file's own metadata (options that contradict it are errors)."""
    if not canonical:
        return o.batch_first, o.columns
    found = {k: json.loads(src.metadata.get(k, "false")) for k in ("batch_first", "columns")}
    for k, given in (("batch_first", o.batch_first), ("columns", o.columns)):
        if given and not found[k]:
            raise KfacError(src.path, k, f"{k} as given", "false in the canonical metadata")
    return found["batch_first"], found["columns"]


def _targets(src, meta: dict, canonical: bool, lead: bool, trail: bool, o: ApplyOptions):
    """The blocks to apply, checked against the tensors' shapes, and the untreated keys."""
    by_key = {}
    for name, layer in meta["layers"].items():
        if o.patterns and not matches(name, list(o.patterns)):
            continue
        for block in layer["blocks"]:
            by_key[block["key"]] = (name, layer, block)
    targets: list[Target] = []
    covered: set[str] = set()
    blocks_meta = json.loads(src.metadata.get("blocks", "[]")) if canonical else []
    for entry in blocks_meta if canonical else ():
        found = by_key.get(entry["key"])
        if found is None or entry.get("untreated"):
            continue
        name, layer, block = found
        if (entry.get("W"), entry.get("b")) != (block["W"], block["b"]):
            raise KfacError(
                src.path,
                entry["key"],
                f"the block {block['W']}, {block['b']} of the factors",
                f"{entry.get('W')}, {entry.get('b')} (another bias mode?)",
                fix="separate_bias",
            )
        target = _target(name, layer, block, [(entry["key"], None)])
        _check_shape(src, entry["key"], (target.c_out, target.d), lead, trail, canonical=True)
        targets.append(target)
        covered.add(entry["key"])
    if not canonical:
        keys = set(src.infos)
        for name, layer, block in by_key.values():
            present = [p for p in (block["W"], block["b"]) if p]
            given = [p for p in present if p in keys]
            if not given:
                continue
            if len(given) != len(present):
                missing = next(p for p in present if p not in keys)
                raise KfacError(
                    src.path, missing, f"both parameters of block {block['key']}", "only one"
                )
            target = _target(name, layer, block, [(p, None) for p in present])
            for p, _ in target.members:
                shape = (
                    (target.c_out, *layer["weight_shape"][1:])
                    if p == block["W"]
                    else (target.c_out,)
                )
                _check_shape(src, p, shape, lead, trail)
            targets.append(target)
            covered.update(present)
    untreated = [k for k in src.infos if k not in covered]
    return targets, untreated


def _target(name: str, layer: dict, block: dict, members) -> Target:
    c_out = layer["C_out"]
    rest = math.prod(layer["weight_shape"][1:])
    widths = {block["W"]: rest, block["b"]: 1}
    if len(members) == 1 and members[0][0] not in widths:  # a canonical block
        d = (rest if block["W"] else 0) + (1 if block["b"] else 0)
        return Target(block["key"], name, "A" in block["factors"], [(members[0][0], d)], c_out, d)
    members = [(p, widths[p]) for p, _ in members]
    return Target(block["key"], name, "A" in block["factors"], members, c_out,
                  sum(w for _, w in members))  # fmt: skip


def _check_shape(src, key: str, shape, lead: bool, trail: bool, canonical: bool = False):
    """``key``'s shape is ``shape`` between the ``N`` and ``C`` axes (a canonical block:
    ``[C_out·D]`` flat or ``[C_out, D]`` matrix)."""
    s = tuple(src.infos[key].shape)
    inner = s[int(lead) : len(s) - int(trail)]
    ok = len(s) == len(inner) + int(lead) + int(trail) and (
        inner == tuple(shape) or (canonical and inner == (math.prod(shape),))
    )
    if not ok:
        want = ["N"] * lead + [str(v) for v in shape] + ["C"] * trail
        raise KfacError(
            src.path, key, f"shape [{', '.join(want)}] (from the factors)", str(list(s))
        )


class _Stash:
    """Parts of a block computed before their tensor's turn: in memory, or in a temporary
    file once larger than ``limit`` bytes; given back in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.files: dict[str, tuple[object, list[tuple[torch.dtype, tuple]]]] = {}
        self.size: dict[str, int] = {}

    def add(self, key: str, part: torch.Tensor) -> None:
        part = part.to(CPU).contiguous()
        if key in self.files:
            fh, shapes = self.files[key]
            fh.write(part.view(torch.uint8).numpy().tobytes())
            shapes.append((part.dtype, tuple(part.shape)))
            return
        self.parts.setdefault(key, []).append(part)
        self.size[key] = self.size.get(key, 0) + part.numel() * part.element_size()
        if self.size[key] > self.limit:  # spill what there is, and what follows
            fh = tempfile.TemporaryFile(prefix="kfac-cli-")  # noqa: SIM115 (closed by pop)
            shapes = []
            for p in self.parts.pop(key):
                fh.write(p.view(torch.uint8).numpy().tobytes())
                shapes.append((p.dtype, tuple(p.shape)))
            self.files[key] = (fh, shapes)

    def pop(self, key: str):
        """The parts of ``key``, in order (read back chunk by chunk from a spill)."""
        if key in self.parts:
            yield from self.parts.pop(key)
            return
        fh, shapes = self.files.pop(key)
        fh.seek(0)
        for dtype, shape in shapes:
            n = math.prod(shape) * dtype.itemsize
            yield torch.frombuffer(bytearray(fh.read(n)), dtype=torch.uint8).view(dtype).view(shape)
        fh.close()


@dataclass
class _LayerCache:
    """One layer's operators and eigendecompositions (the layer in hand only)."""

    name: str | None = None
    ops: dict[str, BlockOperator] = field(default_factory=dict)
    factors: dict[str, Factor] = field(default_factory=dict)


class _Applier:
    """Reads, multiplies and hands over every output tensor, in the plans' order."""

    def __init__(self, job: Job, src, fsrc, meta, work: tuple, o, ranks: Ranks) -> None:
        targets, untreated, lead, trail = work
        self.job, self.src, self.fsrc, self.meta, self.o = job, src, fsrc, meta, o
        self.ranks = ranks
        self.lead, self.trail = lead, trail
        self.target_of = {k: t for t in targets for k, _ in t.members}
        self.untreated = set(untreated)
        self.stash = _Stash(job.chunk_bytes)
        self.done: set[str] = set()  # targets computed (their later members stashed)
        self.layer = _LayerCache()
        self.stage = job.stage()
        self.damping = o.damping_rule()

    # ------------------------------------------------------------------ schedule

    def _steps(self, plans: list[Plan]):
        """``(plan, step)``: ``compute`` a target, take a ``stashed`` part, ``keep`` or
        ``zero`` an untreated tensor."""
        computed = set()
        for plan in plans:
            if plan.key in self.untreated and not self.ranks.writer:
                continue  # the writer reads and writes those alone
            if plan.key in self.untreated:
                yield plan, "zero" if self.o.untreated is Untreated.ZERO else "keep"
                continue
            target = self.target_of[plan.key]
            yield plan, "stashed" if target.key in computed else "compute"
            computed.add(target.key)

    def _vectors(self, key: str) -> int:
        return self.src.infos[key].shape[0] if self.lead else 1

    def _chunks(self, target: Target) -> list[tuple[int, int]]:
        """Vector ranges of about a chunk each (with room for the products)."""
        first = target.members[0][0]
        n = self._vectors(first)
        per = 4 * target.c_out * target.d * self._columns(first) * self.job.cast.itemsize
        return chunks(n, n * per, self.job.chunk_bytes)

    def _columns(self, key: str) -> int:
        return self.src.infos[key].shape[-1] if self.trail else 1

    def _untreated_chunks(self, key: str) -> list[tuple[int, int]]:
        """Ranges of an untreated tensor's leading axis (the whole tensor without one)."""
        info = self.src.infos[key]
        n = info.shape[0] if self.lead and info.shape else 1
        return chunks(n, info.nbytes, self.job.chunk_bytes)

    def _row_len(self, key: str) -> int:
        """Bytes-free length of one row of ``key`` as ``[N·C_out, -1]`` (untreated: as
        ``[N, -1]``)."""
        info = self.src.infos[key]
        if key in self.untreated:
            return math.prod(info.shape[1:]) if self.lead else math.prod(info.shape)
        target = self.target_of[key]
        return math.prod(info.shape) // (self._vectors(key) * target.c_out)

    def reads(self, plans: list[Plan]):
        for plan, step in self._steps(plans):
            if step == "keep":
                for a, b in self._untreated_chunks(plan.key):
                    yield self._read(plan.key, self._row_len(plan.key), a, b)
            elif step == "compute":
                target = self.target_of[plan.key]
                for i, (a, b) in enumerate(self._chunks(target)):
                    if i % self.ranks.world != self.ranks.rank:
                        continue  # another rank's chunk
                    for key, _ in target.members:
                        rows = target.c_out
                        yield self._read(key, self._row_len(key), a * rows, b * rows)

    def _read(self, key: str, row_len: int, a: int, b: int) -> Read:
        nbytes = (b - a) * row_len * self.src.infos[key].dtype.itemsize
        read = lambda buf, k=key, r=(row_len, a, b): self.src.read(k, buf, r)  # noqa: E731
        return Read(key, (a, b), nbytes, read)

    # ------------------------------------------------------------------ compute

    def produce(self, plan: Plan, put, prefetch: Prefetcher) -> None:
        if plan.key in self.untreated and not self.ranks.writer:
            return
        if plan.key in self.untreated:
            info = self.src.infos[plan.key]
            for a, b in self._untreated_chunks(plan.key):
                shape = (b - a, *info.shape[1:]) if self.lead else tuple(info.shape)
                if self.o.untreated is Untreated.ZERO:
                    put(plan.key, torch.zeros(shape, dtype=info.dtype))
                    continue
                x, buf = prefetch.next(plan.key, (a, b))
                put(plan.key, x.view(shape), None, lambda b=buf: prefetch.release(b))
            return
        target = self.target_of[plan.key]
        if target.key in self.done:
            if self.ranks.writer:
                for part in self.stash.pop(plan.key):
                    put(plan.key, part)
            return
        self.done.add(target.key)
        op = self._operator(target)
        for i, (a, b) in enumerate(self._chunks(target)):
            self.ranks.check()
            owner = i % self.ranks.world
            if owner != self.ranks.rank:
                if self.ranks.writer:  # computed by another rank
                    shape = (b - a, target.c_out, target.d, self._columns(target.members[0][0]))
                    y = torch.empty(shape, dtype=self.job.cast, device=self.stage.device)
                    self._hand_over(plan, put, target, a, b, self.ranks.recv_(y, owner))
                continue
            parts, bufs = [], []
            for key, width in target.members:
                x, buf = prefetch.next(key, (a * target.c_out, b * target.c_out))
                cols = self._columns(key)
                parts.append(
                    self.stage.to_device(x, self.job.cast).view(b - a, target.c_out, width, cols)
                )
                bufs.append(buf)
            m = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            y = op(m.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [n, C_out, D, C]
            del m, parts
            for buf in bufs:  # the product is in memory of its own
                prefetch.release(buf)
            if self.ranks.writer:
                self._hand_over(plan, put, target, a, b, y)
            else:
                self.ranks.send_(y.contiguous(), 0)

    def _hand_over(self, plan: Plan, put, target: Target, a: int, b: int, y) -> None:
        """A chunk's product ``[n, C_out, D, C]`` to the writer (the plan's tensor) or the
        stash (the block's other tensors), each in its own shape and dtype."""
        col = 0
        for key, width in target.members:
            info = self.src.infos[key]
            shape = (b - a, *info.shape[1:]) if self.lead else tuple(info.shape)
            part = y[:, :, col : col + width].to(CPU, info.dtype).reshape(shape)
            col += width
            if key == plan.key:
                put(key, part.contiguous())
            else:
                self.stash.add(key, part)

    def _operator(self, target: Target) -> BlockOperator:
        """The block's operator (per layer, built once: both blocks of a separate-bias layer
        share ``G``), in the compute dtype on the device.

        Raises:
            KfacError: For a power of a singular block without damping.
        """
        if self.layer.name != target.layer:
            self.layer = _LayerCache(target.layer)
        if target.key in self.layer.ops:
            return self.layer.ops[target.key]
        name, meta = target.layer, self.meta
        ekfac = meta["ekfac"]
        if meta["fisher_type"] == "forward-only":
            g = Factor.identity(target.c_out)
        else:
            g = self._factor(f"{name}.G")
        a = self._factor(f"{name}.A")
        corrections = self.fsrc.read(f"{target.key}.corrections") if ekfac else None
        if ekfac and (self.o.heuristic_damping or isinstance(self.o.damping, tuple) or (
            self.o.damping and not self.o.exact_damping
        )):  # fmt: skip
            raise KfacError(
                self.fsrc.path, "ekfac", "exact damping for EKFAC", "damped factors",
                fix="exact_damping",
            )  # fmt: skip
        eps = torch.finfo(resolve_dtype(meta["dtype"])).eps
        rtol = eps * max(target.c_out, target.d)  # the rank tolerance of the factors
        try:
            op = kfac_operator(
                g, a, self.o.power, self.damping, corrections, not target.weight, rtol
            )
        except SingularBlock as e:
            raise KfacError(
                self.fsrc.path,
                target.key,
                f"a block whose power {self.o.power:g} exists (eigenvalues > 0 after damping)",
                f"a singular block ({e})",
                fix="damping",
            ) from None
        op = op.to(self.job.cast, self.stage.device)
        self.layer.ops[target.key] = op
        return op

    def _factor(self, key: str) -> Factor:
        """A factor of the layer in hand (read when first needed, then kept)."""
        if key not in self.layer.factors:
            self.layer.factors[key] = read_factor(self.fsrc, key)
        return self.layer.factors[key]
