"""``torch.save`` files of tensors, loaded weights-only: never a pickle that runs code.

``torch.load(weights_only=True)`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot turn it off; it memory-maps zip files, so a large state dict is not read up front.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from kfac_cli.errors import KfacError
from kfac_cli.files.inputs import open_readable, sniff

PICKLE_HINT = (
    "unpickling runs code chosen by whoever wrote the file; re-save it as a state dict "
    "(torch.save(model.state_dict())) or a torch.export archive"
)


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat ``{name: tensor}`` dict, memory-mapped."""
    with open_readable(path) as fh:
        head = fh.read(8)
    if not head:
        raise KfacError(path, None, "a torch.save file", "an empty file")
    kw = {"map_location": "cpu", "weights_only": True}
    try:
        try:
            obj = torch.load(path, mmap=True, **kw)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, **kw)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0] if str(e) else "a forbidden object"
        if "Weights only load failed" in str(e):
            detail = "a pickle that needs code execution to load (a whole module?)"
        raise KfacError(
            path,
            None,
            "a weights-only state dict",
            detail[:160],
            hint=PICKLE_HINT,
            fix="unsafe_pickle",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError) as e:
        found = sniff(head) if sniff(head) == "unrecognised bytes" else str(e).splitlines()[0]
        raise KfacError(path, None, "a readable torch.save file", found[:160]) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise KfacError(path, None, "a flat {name: tensor} state dict", f"a {type(obj).__name__}")
    return obj
