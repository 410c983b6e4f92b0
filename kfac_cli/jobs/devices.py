"""Choosing the compute device and dtype by name."""

from __future__ import annotations

import torch

from kfac_cli.enums import ComputeDtype
from kfac_cli.errors import KfacError

COMPUTE_DTYPES = {name.value: getattr(torch, name.value) for name in ComputeDtype}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (a GPU when there is one).

    Raises:
        KfacError: For an unknown or unavailable device.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KfacError(None, "device", "cpu, cuda, cuda:N, mps or auto", repr(name)) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KfacError(None, "device", f"an available {name}", "no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KfacError(
                None,
                "device",
                f"an available {name}",
                f"{torch.cuda.device_count()} CUDA device(s)",
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise KfacError(None, "device", "an available mps device", "none")
    elif device.type != "cpu":
        raise KfacError(None, "device", "cpu, cuda, cuda:N, mps or auto", repr(name))
    return device


def resolve_dtype(name: str | ComputeDtype | None) -> torch.dtype | None:
    """A compute dtype by name, or ``None`` to keep each input's dtype."""
    if name is None:
        return None
    if str(name) not in COMPUTE_DTYPES:
        raise KfacError(None, "dtype", f"one of {', '.join(COMPUTE_DTYPES)}", repr(str(name)))
    return COMPUTE_DTYPES[str(name)]
