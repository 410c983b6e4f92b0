"""EKFAC's second pass as a job: the dumps read again, sample by sample, and each layer's
eigenvalue corrections summed in the eigenbasis of its factors (:mod:`kfac_cli.ops.ekfac`).

:class:`Corrections` plans and consumes the reads of one layer: per chunk of samples, the
activations' rows, then the output gradients' rows of the same samples for each
backpropagated vector. :class:`Eigenbasis` is the factors file ``--eigenbasis`` names
(and ``merge --eigenbasis`` completes corrections with): checked against the run, its
eigenvectors the ones the second pass rotates with, its ``eigenbasis`` the outputs' name
for them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import CONVENTIONS, COUNTS, factors_meta
from kfac_cli.files.sources import Tensors, open_tensors
from kfac_cli.jobs.pipeline import Read
from kfac_cli.ops.ekfac import (
    add_corrections,
    add_weight_corrections,
    chunk_samples,
    sample_gradients,
    sample_inputs,
    split_eigenbasis,
    strategy,
)
from kfac_cli.ops.factors import locations

# Samples summed in the accumulation dtype before the float64 total takes them: float32's
# rounding over so few stays within a few units of 1e-6, and the float64 total keeps it so.
FLUSH_SAMPLES = 64
# What the second pass rotates with, per layer: A's eigenvalues (exact zeros: unit
# eigenvectors), A's and G's eigenvectors.
BASIS_KEYS = ("A.eigenvalues", "A.eigenvectors", "G.eigenvectors")


def block_keys(layer_meta: dict) -> list[tuple[str, bool]]:
    """``(key, weight)`` of each canonical block of a layer (its metadata's ``blocks``):
    whether the block has a weight (``[C_out, D]`` corrections) or is a bias (``[C_out]``)."""
    return [(b["key"], b["W"] is not None) for b in layer_meta["blocks"]]


class Eigenbasis:
    """The factors file ``--eigenbasis`` names, checked against the run.

    Raises:
        KfacError: For a file without eigendecompositions, of another model, approximation
            or conventions, or lacking a selected layer.
    """

    def __init__(self, path) -> None:
        self.src: Tensors = open_tensors(path, role="factors")
        try:
            self.meta = factors_meta(self.src)
        except BaseException:
            self.src.close()
            raise

    def check(self, fields: dict) -> None:
        """Against this run's factors-file ``fields``: the same approximation, conventions,
        bias mode, model and layers, with eigendecompositions of each."""
        path, meta = self.src.path, self.meta
        run = {**fields, **fields["conventions"]}
        for key in ("approx", *CONVENTIONS, "separate_bias"):
            if meta[key] != run[key]:
                raise KfacError(path, key, f"{run[key]} (as in this run)", str(meta[key]))
        if json.loads(meta["model"]) != run["model"]:
            raise KfacError(path, "model", f"the model {run['model']['file']}", "another model")
        for name, mine in fields["layers"].items():
            theirs = meta["layers"].get(name)
            if theirs is None:
                raise KfacError(path, name, "the factors of every selected layer", "none")
            for k in sorted(set(mine) | set(theirs)):
                if k not in COUNTS and mine.get(k) != theirs.get(k):
                    raise KfacError(
                        path, f"{name}.{k}", f"{mine.get(k)} (as in this run)", str(theirs.get(k))
                    )
            for factor in ("A", "G"):
                key = f"{name}.{factor}.eigenvectors"
                if key not in self.src.infos:
                    raise KfacError(
                        path, key, "eigendecompositions (factors --eigh or --ekfac)", "none"
                    )

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    def identity(self) -> str:
        """What names this eigenbasis in the outputs made in it (``merge`` adds up only
        corrections of one): an EKFAC file's own ``eigenbasis``, else what its
        eigendecompositions were computed from (:func:`eigenbasis_id`)."""
        return self.meta["eigenbasis"]

    def read(self, key: str) -> torch.Tensor:
        return self.src.read(key)

    def layers(
        self, names: list[str], dtype: torch.dtype
    ) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """Each named layer's name and ``A`` eigenvalues, ``A`` and ``G`` eigenvectors in
        ``dtype``, in order; the next layer's read on a thread while this one's is used."""

        def load(name: str) -> list[torch.Tensor]:
            return [self.read(f"{name}.{k}").to(dtype) for k in BASIS_KEYS]

        with ThreadPoolExecutor(1, thread_name_prefix="kfac-cli-eigenbasis") as pool:
            ahead = [pool.submit(load, name) for name in names[:1]]
            for i in range(len(names)):
                values = ahead.pop().result()
                ahead += [pool.submit(load, name) for name in names[i + 1 : i + 2]]
                yield names[i], values

    def close(self) -> None:
        self.src.close()


class Corrections:
    """The second pass over one layer's dumps, on this rank's share of the samples.

    Args:
        acc: The factors job's accumulator (its files, shares, reader, device stage).
    """

    def __init__(self, acc) -> None:
        self.acc = acc

    def _chunks(self, w):
        """``(parts, keys, vector groups)`` of a layer's chunks, ``parts`` a list of
        ``(file, first sample, end sample)``: a layer called several times (several dump
        keys) sums every call into one per-example gradient, so each chunk holds the same
        samples of all its keys; consecutive files' samples of one key, shape and loss
        scale share a chunk up to its size (shards of a few samples each: larger products
        at the GEMM kernels' rate)."""
        acc = self.acc
        budget = acc.job.chunk_bytes // acc.dtype.itemsize
        held, held_groups, tag, size = [], [], None, 0
        for f, start, stop in acc.units:
            act, grad, samples = acc.acts[f], acc.grads[f], acc.batches[f]
            keys = act.order(w.keys)
            vectors = grad.infos[keys[0]].shape[0]
            s = 0
            for key in keys:
                info = act.infos[key]
                s += info.shape[0] // samples * locations(info.shape, w.layer.conv)
            group = vectors
            if s * vectors * w.c_out > budget // 2:  # one sample's gradients are large
                group = max(1, budget // 2 // max(s * w.c_out, 1))
            method = strategy(s, w.c_out, w.d, group)
            per = chunk_samples(s, w.c_out, w.d, group, budget, method)
            groups = [range(v, min(v + group, vectors)) for v in range(0, vectors, group)]
            shapes = tuple((act.infos[k].shape[0] // samples, act.infos[k].shape[1:]) for k in keys)
            mine = (keys, shapes, vectors, acc.loss_scale(samples), per)
            for s0 in range(start, stop, per):
                s1 = min(stop, s0 + per)
                joinable = len(keys) == 1 and len(groups) == 1 and mine == tag
                if held and not (joinable and size + s1 - s0 <= per):
                    yield held, tag[0], held_groups
                    held, size = [], 0
                held.append((f, s0, s1))
                held_groups, tag, size = groups, mine, size + s1 - s0
        if held:
            yield held, tag[0], held_groups

    def _row_reads(self, parts, keys: list[str], groups):
        """``(source, key, rows, shape, row length)`` of one chunk: each part's activations
        of each key, then per vector each part's gradients of each key (rows of
        ``[V·B·fold, -1]``)."""
        acc = self.acc
        for f, s0, s1 in parts:
            act, samples = acc.acts[f], acc.batches[f]
            for key in keys:
                info = act.infos[key]
                k = info.shape[0] // samples
                shape = (k * (s1 - s0), *info.shape[1:])
                yield act, key, (k * s0, k * s1), shape, math.prod(shape[1:])
        for group in groups:
            for v in group:
                for f, s0, s1 in parts:
                    grad, samples = acc.grads[f], acc.batches[f]
                    for key in keys:
                        ginfo = grad.infos[key]
                        lead = ginfo.shape[1]
                        k = lead // samples
                        rows = (v * lead + k * s0, v * lead + k * s1)
                        shape = (1, k * (s1 - s0), *ginfo.shape[2:])
                        yield grad, key, rows, shape, math.prod(shape[2:])

    def reads(self, w):
        """The :class:`Read` of every chunk of a layer's second pass, in the order
        :meth:`layer` takes them."""
        for chunk in self._chunks(w):
            for src, key, rows, _, row_len in self._row_reads(*chunk):
                nbytes = (rows[1] - rows[0]) * row_len * src.infos[key].dtype.itemsize
                read = lambda buf, s=src, k=key, r=(row_len, *rows): s.read(k, buf, r)  # noqa: E731
                yield Read(f"{src.path}:{key}", rows, nbytes, read)

    def layer(self, w, layer_meta: dict, q_a, q_g, vals_a, check: bool):
        """Each block's corrections ``{key: [C_out, D] or [C_out]}`` (float64 for more than
        :data:`FLUSH_SAMPLES` samples), summed over this rank's samples, then over the
        ranks; ``q_a``, ``q_g``: the eigenvectors (columns) in the accumulation dtype on
        the device, ``vals_a`` ``A``'s eigenvalues (exact zeros: unit eigenvectors);
        ``check``: count NaN/Inf (a pass of its own: no factors were summed from these
        reads)."""
        acc = self.acc
        conv, device = w.layer.conv, acc.stage.device
        blocks = block_keys(layer_meta)
        joint = layer_meta["bias_column"]
        # Chunks add into partial sums in the accumulation dtype; every FLUSH_SAMPLES
        # samples those move into float64 totals (made only for so many samples).
        partial = {
            key: torch.zeros(
                (w.c_out, w.d) if weight else (w.c_out,), dtype=acc.dtype, device=device
            )
            for key, weight in blocks
        }
        sums: dict[str, torch.Tensor] = {}
        pending = 0
        basis = split_eigenbasis(q_a, vals_a)
        budget = acc.job.chunk_bytes // acc.dtype.itemsize
        rows = _RowsBuffer(w.d if basis.unit_cols.numel() else basis.live.shape[0])
        for parts, keys, groups in self._chunks(w):
            acc.ranks.check()
            reads = self._row_reads(parts, keys, groups)
            sizes = [s1 - s0 for _, s0, s1 in parts]
            n = sum(sizes)
            if len(keys) == 1:  # written zero-padded into the layer's reused buffer
                a = self._rows(reads, sizes, conv, joint, check, rows)
            else:  # (one part)
                a = _joined([self._inputs(next(reads), conv, joint, n, check) for _ in keys], 1)
            alpha = acc.loss_scale(acc.batches[parts[0][0]])
            for group in groups:
                g = _joined(
                    [
                        _joined(
                            [
                                _joined(
                                    [self._gradients(next(reads), conv, m, check) for _ in keys],
                                    2,
                                )
                                for m in sizes
                            ],
                            1,
                        )
                        for _ in group
                    ],
                    0,
                )
                for key, weight in blocks:
                    if weight:
                        add_weight_corrections(partial[key], a, g, q_g, basis, alpha, budget)
                    else:
                        add_corrections(partial[key], None, g, q_g, None, alpha)
            pending += n
            if pending >= FLUSH_SAMPLES:
                pending = _flush(partial, sums)
        if sums:
            _flush(partial, sums)
        else:  # few samples: the partial sums are the totals
            sums = partial
        if check:
            for sources in (acc.acts, acc.grads):
                for src in sources:
                    for key in w.keys:
                        acc.finite[id(src)].report(key, math.prod(src.infos[key].shape))
        for total in sums.values():
            acc.ranks.sum_(total)
        return sums

    def _inputs(self, read: tuple, conv, joint: bool, n: int, check: bool):
        """One key's activations of a chunk (``read``: from :meth:`_row_reads`) as
        ``[n, S_key, D]`` rows."""
        return sample_inputs(self._take(read, check), conv, joint, read[3][0] // n)

    def _rows(self, reads, sizes: list[int], conv, joint: bool, check: bool, rows):
        """The one key's activations of each part of a chunk (``sizes``: its samples) as
        ``[n, S, W]`` rows, written zero-padded into ``rows`` (a :class:`_RowsBuffer`)."""
        xs = [self._take(next(reads), check) for _ in sizes]
        fold = xs[0].shape[0] // sizes[0]
        out = rows.get((sum(x.shape[0] for x in xs), locations(xs[0].shape, conv)), xs[0])
        start = 0
        for x in xs:
            sample_inputs(x, conv, joint, fold, out[start : start + x.shape[0]])
            start += x.shape[0]
        return out.reshape(sum(sizes), -1, out.shape[-1])

    def _gradients(self, read: tuple, conv, n: int, check: bool):
        """One key's gradients of one vector as ``[1, n, S_key, C_out]``."""
        g = self._take(read, check)
        return sample_gradients(g, conv is not None, read[3][1] // n)

    def _take(self, read: tuple, check: bool) -> torch.Tensor:
        """The next read (``(source, key, rows, shape, row length)``) on the device in the
        accumulation dtype, as a tensor of its own (its buffer back to the reader)."""
        src, key, rows, shape, _ = read
        acc = self.acc
        x_host, buf = acc.prefetch.next(f"{src.path}:{key}", rows)
        x_host = x_host.view(shape)
        if check:
            acc.finite[id(src)].check(key, x_host)
        x = acc.stage.to_device(x_host, acc.dtype)
        acc.stage.wait_copied()
        if x.data_ptr() == x_host.data_ptr():
            x = x.clone()
        acc.prefetch.release(buf)
        return x


class _RowsBuffer:
    """One layer's reused buffer of a chunk's rows ``[rows, S, width]``, its columns past
    the rows' width zero (padding the products want, see :func:`padded_width`)."""

    def __init__(self, width: int) -> None:
        self.width, self.buf = width, None

    def get(self, lead: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(lead) * self.width
        if self.buf is None or self.buf.numel() < n:
            self.buf = like.new_zeros(n)
        return self.buf[:n].view(*lead, self.width)


def _flush(partial: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> int:
    """Add each partial sum to its float64 total (made at the first flush) and zero it;
    0 samples pending."""
    for key, part in partial.items():
        if key in sums:
            sums[key] += part
        else:
            sums[key] = part.to(torch.float64, copy=True)
        part.zero_()
    return 0


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` of several parts; a single part as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
