"""kfac-cli factors as laplace-torch 0.3's fitted ``KronLaplace``.

laplace-torch's curvlinops backends fit, per batch of ``M`` of ``N`` samples, curvlinops'
KFAC of the *summed* loss with separate weight and bias blocks, scale ``A`` by ``M/N`` and
both factors by ``sqrt(f)`` (``f``: 1 for classification, 1/2 for regression's squared
error), and add the batches up: per parameter, in the model's parameter order, a weight's
group is ``[sqrt(f) G_sum, sqrt(f) A]`` and a bias's ``[f G_sum]``, with ``A`` over all
samples (a joint-bias file's ``A`` without its bias row and column is exactly the weight's)
and ``G_sum`` the summed loss's ``G`` (``N·T`` times a ``mean`` loss's). Its ``loss`` is
``f`` times the summed training loss, ``n_data`` is ``N``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.factors_file import factors_meta, require_complete
from kfac_cli.files.sources import open_tensors


def to_kron_laplace(
    model: torch.nn.Module,
    factors: Path | str,
    likelihood: str,
    *,
    train_loader: Any = None,
    loss: float | None = None,
    n_outputs: int | None = None,
    backend: Any = None,
    **kwargs: Any,
):
    """A fitted ``laplace.KronLaplace`` of ``model`` from a kfac-cli factors file.

    Args:
        model: The model the factors were computed for (its trainable parameters must be
            exactly those of the factors' layers).
        factors: A kfac-cli factors file (KFAC; ``empirical``, ``type-2`` or ``mc``).
        likelihood: ``classification`` or ``regression``.
        train_loader: The training data, for the summed training loss (one forward pass,
            no gradients) and the number of outputs; or give ``loss`` and ``n_outputs``.
        loss: The summed training loss (of laplace-torch's loss function).
        n_outputs: The model's output size.
        backend: A laplace-torch curvature backend (default: ``CurvlinopsEF`` for empirical
            factors, else ``CurvlinopsGGN``: the one whose fit these factors equal).
        kwargs: Passed to ``KronLaplace`` (``prior_precision``, ``sigma_noise``, ...).

    Raises:
        KfacError: For a file laplace-torch's Kronecker structure cannot take (forward-only
            factors, EKFAC, a trainable parameter no layer of the file covers).
    """
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    from laplace.utils.matrix import Kron
    from torch.nn.utils import parameters_to_vector

    if train_loader is None and (loss is None or n_outputs is None):
        raise KfacError(None, "train_loader", "a train_loader, or loss and n_outputs", "neither")
    with open_tensors(factors, stream_ok=False, role="factors") as src:
        meta = factors_meta(src)
        require_complete(src, meta)
        if meta["fisher_type"] == "forward-only" or meta["ekfac"]:
            what = "EKFAC" if meta["ekfac"] else "forward-only factors"
            raise KfacError(src.path, "fisher_type", "KFAC factors with G", what)
        if backend is None:
            backend = CurvlinopsEF if meta["fisher_type"] == "empirical" else CurvlinopsGGN
        la = KronLaplace(model, likelihood, backend=backend, **kwargs)
        f = la.backend.factor
        scale = 1.0
        if meta["loss_reduction"] == "mean":
            scale = float(meta["num_data"] * meta["num_per_example_loss_terms"])
        owner = {}
        for name, layer in meta["layers"].items():
            owner[layer["weight"]] = (name, "W")
            if layer["bias"]:
                owner[layer["bias"]] = (name, "b")
        kfacs, cache = [], {}
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if pname not in owner:
                raise KfacError(src.path, pname, "factors of every trainable parameter", "none")
            name, role = owner[pname]
            if name not in cache:
                layer = meta["layers"][name]
                a = src.read(f"{name}.A").double()
                if layer["bias_column"]:
                    a = a[:-1, :-1]  # the weight's A of a separate-bias fit, exactly
                cache[name] = (src.read(f"{name}.G").double() * scale, a)
            g, a = cache[name]
            cast = {"dtype": la._dtype, "device": la._device}
            if role == "b":
                kfacs.append([(f * g).to(**cast)])
            elif g.numel() == a.numel() == 1:
                kfacs.append([(f * g * a).to(**cast)])
            else:
                root = math.sqrt(f)
                kfacs.append([(root * g).to(**cast), (root * a).to(**cast)])
    model.eval()
    if train_loader is not None:
        loss, n_outputs = _summed_loss(model, la, train_loader)
    la.H_facs = Kron(kfacs)
    la.H = la.H_facs.decompose(damping=la.damping)
    la.loss = f * torch.as_tensor(loss, dtype=la._dtype)
    la.n_data = meta["num_data"]
    la.n_outputs = n_outputs
    model.output_size = n_outputs
    la.mean = parameters_to_vector(la.params).detach()
    return la


@torch.no_grad()
def _summed_loss(model: torch.nn.Module, la, loader) -> tuple[torch.Tensor, int]:
    """laplace-torch's summed training loss over ``loader``, and the output size."""
    total, outputs = torch.zeros((), dtype=la._dtype), None
    for x, y in loader:
        out = model(x.to(la._device))
        outputs = out.shape[-1]
        total += la.backend.lossfunc(out, y.to(la._device)).to(la._dtype)
    return total, outputs
