"""Choosing the compute device and dtype from the command line's words."""

from __future__ import annotations

import torch

from kfac_cli.errors import KfacCliError

COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (a GPU when there is one).

    Raises:
        KfacCliError: For an unknown or unavailable device.
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
        raise KfacCliError(None, "--device", "cpu, cuda, cuda:N, mps or auto", repr(name)) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KfacCliError(None, "--device", f"an available {name}", "no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KfacCliError(
                None,
                "--device",
                f"an available {name}",
                f"{torch.cuda.device_count()} CUDA device(s)",
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise KfacCliError(None, "--device", "an available mps device", "none")
    elif device.type != "cpu":
        raise KfacCliError(None, "--device", "cpu, cuda, cuda:N, mps or auto", repr(name))
    return device


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """A compute dtype by name, or ``None`` to keep each input's dtype."""
    if name is None:
        return None
    if name not in COMPUTE_DTYPES:
        raise KfacCliError(None, "--dtype", f"one of {', '.join(COMPUTE_DTYPES)}", repr(name))
    return COMPUTE_DTYPES[name]
