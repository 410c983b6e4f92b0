"""Record activation and output-gradient dumps from your own model, as curvlinops would.

:func:`record` runs the model over the batches, and for every Linear and Conv1d/2d/3d
module whose weight is a parameter (the layers of ``kfac-cli layers``) writes, per batch:

- ``acts-NNNNN.safetensors``: each layer's input, keyed by the module's name (``name#k``
  for the k-th extra call of a module called more than once);
- ``grads-NNNNN.safetensors``: the gradients w.r.t. each layer's *output* of the vectors
  KFAC backpropagates, ``[V, B, C_out, *O]`` (conv) or ``[V, B, ..., d_out]`` (linear).

The vectors are exactly curvlinops 3.0.1's (``KFACLinearOperator``): ``empirical``: the loss
at the true labels (``V = 1``); ``mc``: the loss at labels sampled from the model's
predictive distribution with a generator seeded once (``V = mc_samples``); ``type-2``: the
columns of the loss Hessian's square root (``V`` = output dimension); MSE and BCE losses
with a ``mean`` reduction are scaled by ``sqrt(C)``, type-2 columns by ``1/(B·T)``.
``forward-only`` writes activations only. The gradient files' metadata records the Fisher
type, loss reduction, per-example loss terms ``T`` and MC samples, so that
``kfac-cli factors`` needs no flags. Formats: ``docs/formats.md``.

Example::

    from kfac_cli.record import record
    record(model, loader, torch.nn.CrossEntropyLoss(), "dumps", fisher_type="mc")

and ``kfac-cli factors`` (or :func:`kfac_cli.jobs.factors.run_factors`) turns the dumps into
Kronecker factors.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Mapping
from math import sqrt
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from kfac_cli import __version__
from kfac_cli.enums import FisherType
from kfac_cli.errors import KfacError
from kfac_cli.files.kinds import ACTIVATIONS, GRADIENTS
from kfac_cli.files.output import atomic_output
from kfac_cli.files.writer import SafetensorsWriter

LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
VERSION = "1"  # of the dump formats (docs/formats.md)


def hessian_sqrt(output: Tensor, target: Tensor, loss_func: nn.Module) -> Tensor:
    """A square root ``S`` (``S Sᵀ`` = the loss Hessian w.r.t. one datum's output ``[C]``).

    MSE: ``sqrt(2c)·I`` (``c = 1/C`` for a mean, else 1); cross-entropy:
    ``diag(√p) - p √pᵀ`` with ``p = softmax``; BCE: ``diag(sqrt(c·σ(1-σ)))``.
    """
    c = output.numel()
    scale = 1.0 / c if getattr(loss_func, "reduction", "mean") == "mean" else 1.0
    if isinstance(loss_func, nn.MSELoss):
        return torch.eye(c, dtype=output.dtype, device=output.device) * sqrt(2 * scale)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = output.softmax(0)
        root = p.sqrt()
        return torch.diag(root) - torch.outer(p, root)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        if not set(target.unique().tolist()) <= {0, 1}:
            raise KfacError(None, "targets", "binary targets for BCEWithLogitsLoss", "others")
        s = output.sigmoid()
        return torch.diag((scale * s * (1 - s)).sqrt())
    raise KfacError(None, "loss_func", "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss", "other")


def sample_labels(output: Tensor, loss_func: nn.Module, generator: torch.Generator) -> Tensor:
    """Labels drawn from the predictive distribution the loss implies, for ``[N, C]``."""
    if isinstance(loss_func, nn.MSELoss):
        noise = torch.randn(
            output.shape, device=output.device, dtype=output.dtype, generator=generator
        )
        return output.detach() + sqrt(0.5) * noise
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return output.softmax(1).multinomial(1, generator=generator).squeeze(-1)
    return output.sigmoid().bernoulli(generator=generator)


def _flatten(output: Tensor, target: Tensor, loss_func: nn.Module) -> tuple[Tensor, Tensor]:
    """Outputs of more than two dims as rows of loss terms (``[N·T, C]``), targets alike."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return rearrange(output, "b c ... -> (b ...) c"), rearrange(target, "b ... -> (b ...)")
    return rearrange(output, "b ... c -> (b ...) c"), rearrange(target, "b ... c -> (b ...) c")


class _Recorder:
    """Forward hooks on the layers: inputs by key, and tensor hooks on the outputs."""

    def __init__(self, model: nn.Module, modules: Iterable[str] | None) -> None:
        wanted = None if modules is None else set(modules)
        self.names = {
            m: name
            for name, m in model.named_modules()
            if isinstance(m, LAYERS)
            and isinstance(m.weight, nn.Parameter)
            and (wanted is None or name in wanted)
        }
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, list[Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._forward) for m in self.names]

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        name = self.names[module]
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        key = name if call == 0 else f"{name}#{call}"
        self.inputs[key] = args[0].detach().contiguous()
        if output.requires_grad:
            output.register_hook(lambda g, key=key: self.grads.setdefault(key, []).append(g))

    def reset(self) -> None:
        self.inputs, self.grads, self.calls = {}, {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    loss_func: nn.Module,
    folder: str | Path,
    *,
    fisher_type: str = FisherType.MC,
    mc_samples: int = 1,
    seed: int = 2147483647,
    generator: torch.Generator | None = None,
    start: int = 0,
    run: str | None = None,
    modules: Iterable[str] | None = None,
    force: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Write one activation dump and one output-gradient dump per batch of ``data``.

    Args:
        model: The model (its Linear and Conv1d/2d/3d modules are recorded).
        data: Batches ``(X, y)`` as for the loss: ``loss_func(model(X), y)`` (a mapping
            ``X`` is passed as keyword arguments).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        folder: Where the dumps go (created if missing).
        fisher_type: ``type-2``, ``mc``, ``empirical`` or ``forward-only``.
        mc_samples: Labels sampled per datum (``mc`` only).
        seed: Seed of the label sampler (curvlinops' default), when no ``generator`` is
            given.
        generator: The label sampler itself (``mc``), used as it is: pass the same one to
            calls that record consecutive shards, or one restored with ``set_state`` from
            the state the last shard left (``generator.get_state()``) in another process,
            and the labels are those of one call over all batches.
        start: The index of the first batch: dumps are named ``acts-{start+i:05d}`` and
            record ``batch_index`` (consecutive shards: the number of batches before them).
        run: A name for the whole recording, written into every dump as ``run`` (give
            shards of one run the same name); default: a fresh random one per call.
        modules: Only these module names (default: every such module). A module that
            computes its weight inside ``forward`` (BiT's weight standardisation) looks like
            a layer from outside: pass the names ``kfac-cli layers`` treats to leave it out,
            e.g. ``[la.name for la in load_layer_table("model.pt2").layers]``.
        force: Replace existing dumps.

    Returns:
        ``(activations, gradients)`` paths per batch (gradients ``None`` for
        ``forward-only``).

    Raises:
        KfacError: For an unsupported loss, ``mc_samples`` with another Fisher type, a
            number of loss terms that differs between batches, or existing files.
    """
    fisher = FisherType(fisher_type)
    _check_arguments(loss_func, fisher, mc_samples, start)
    if run is None:
        import uuid

        run = uuid.uuid4().hex
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorder = _Recorder(model, modules)
    params = [p for p in model.parameters() if p.requires_grad]
    written: list[tuple[Path, Path | None]] = []
    terms_seen: int | None = None
    try:
        for index, (x, y) in enumerate(data, start):
            recorder.reset()
            backward = fisher is not FisherType.FORWARD_ONLY
            with torch.set_grad_enabled(backward):
                output = model(**x) if isinstance(x, Mapping) else model(x)
            batch = next(iter(x.values())).shape[0] if isinstance(x, Mapping) else x.shape[0]
            provenance = {"run": run, "batch_index": str(index)}
            acts = folder / f"acts-{index:05d}.safetensors"
            _write(
                acts,
                recorder.inputs,
                {"format": ACTIVATIONS, "batch_size": str(batch), **provenance},
                force,
            )
            if not backward:
                written.append((acts, None))
                continue
            if not params:
                raise KfacError(None, "model", "parameters that require gradients", "none")
            rows, target = _flatten(output, y, loss_func)
            terms = rows.shape[0] // batch
            if terms_seen is not None and terms != terms_seen:
                raise KfacError(
                    None, f"batch {index}", f"{terms_seen} loss terms per sample", str(terms)
                )
            terms_seen = terms
            if generator is None:
                generator = torch.Generator(device=rows.device)
                generator.manual_seed(seed)
            vectors = _backpropagate(rows, target, loss_func, fisher, mc_samples, generator, params)
            grads = {}  # in the order of the forward pass, as the activations
            for key, x_in in recorder.inputs.items():
                if key in recorder.grads:
                    grads[key] = torch.stack(recorder.grads[key])
                else:  # a layer the loss does not reach
                    shape = (vectors, x_in.shape[0], *_output_shape(key, recorder, x_in))
                    grads[key] = x_in.new_zeros(shape)
            meta = {
                "format": GRADIENTS,
                "fisher_type": fisher.value,
                "loss_reduction": loss_func.reduction,
                "num_per_example_loss_terms": str(terms),
                "mc_samples": str(mc_samples),
                "loss": type(loss_func).__name__,
                "batch_size": str(batch),
                **provenance,
            }
            path = folder / f"grads-{index:05d}.safetensors"
            _write(path, grads, meta, force)
            written.append((acts, path))
    finally:
        recorder.remove()
    return written


def _check_arguments(loss_func: nn.Module, fisher: FisherType, mc_samples: int, start: int):
    """What :func:`record` can record, checked before anything runs.

    Raises:
        KfacError: For another loss or reduction, MC samples of another Fisher type, or a
            negative start.
    """
    if not isinstance(loss_func, LOSSES):
        raise KfacError(
            None,
            "loss_func",
            "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss",
            type(loss_func).__name__,
        )
    if fisher is not FisherType.MC and mc_samples != 1:
        raise KfacError(None, "mc_samples", "1 unless the Fisher type is mc", str(mc_samples))
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise KfacError(
            None,
            "loss_func.reduction",
            "'mean' or 'sum' (KFAC scales G by how the loss combined its terms)",
            repr(reduction),
        )
    if start < 0:
        raise KfacError(None, "start", "a batch index >= 0", str(start))


def _backpropagate(rows, target, loss_func, fisher, mc_samples, generator, params) -> int:
    """Backpropagate curvlinops' vectors for one batch; the number of vectors ``V``."""
    mean = getattr(loss_func, "reduction", "mean") == "mean"
    rescale = sqrt(rows.shape[1]) if mean and not isinstance(loss_func, nn.CrossEntropyLoss) else 1
    if fisher is FisherType.TYPE2:
        roots = torch.stack(
            [hessian_sqrt(o, t.unsqueeze(0), loss_func) for o, t in zip(rows.detach(), target)]
        )
        if mean:
            roots = roots / rows.shape[0]
        for c in range(roots.shape[-1]):
            torch.autograd.grad(
                (rows * roots[:, :, c]).sum(),
                params,
                retain_graph=c < roots.shape[-1] - 1,
                allow_unused=True,
            )
        return roots.shape[-1]
    count = mc_samples if fisher is FisherType.MC else 1
    for i in range(count):
        labels = sample_labels(rows, loss_func, generator) if fisher is FisherType.MC else target
        loss = loss_func(rows, labels) * rescale
        torch.autograd.grad(loss, params, retain_graph=i < count - 1, allow_unused=True)
    return count


def _output_shape(key, recorder, x_in) -> tuple[int, ...]:
    module = next(m for m, n in recorder.names.items() if key.split("#")[0] == n)
    with torch.no_grad():
        return tuple(module(x_in[:1]).shape[1:])


def _write(path: Path, tensors: dict[str, Tensor], extra: dict[str, str], force: bool) -> None:
    meta = {**extra, "version": VERSION, "kfac_cli_version": __version__}
    ordered = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in ordered]
    with atomic_output(path, force=force) as fh:
        writer = SafetensorsWriter(fh, entries, meta)
        for key, t in ordered:
            writer.write(key, t.detach().contiguous().cpu())
        writer.close()


class _CallableModule(types.ModuleType):
    """This module, callable: importing ``kfac_cli.record`` makes it the package's ``record``
    attribute, so ``from kfac_cli import record`` may give the module; calling it calls
    :func:`record` either way."""

    def __call__(self, *args, **kwargs):
        return record(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
