"""Model checkpoints to layer tables, by format, never executing untrusted code.

- ``.pt2``: torch.export archives, read through their graph JSON (:mod:`.pt2`).
- ``.safetensors`` and ``*.safetensors.index.json``: state dicts, read by header only.
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)``.
- A pickled whole module (``torch.save(model)``): only with ``unsafe_pickle=True``, and then
  the table comes from ``named_modules()`` (:mod:`.modules`). A failed safe load never falls
  back to it.

State dicts carry no conv hyper-parameters; a layer ``spec`` (``kfac-cli layers --json`` of
the exported model) adds them (:mod:`.state_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path

from kfac_cli.errors import KfacError
from kfac_cli.files.inputs import is_stdin, open_readable
from kfac_cli.files.kinds import TORCH_SAVE_SUFFIXES as SUFFIXES
from kfac_cli.files.kinds import identify, require
from kfac_cli.models.pt2 import layer_table_from_pt2
from kfac_cli.models.table import LayerTable

MAX_SPEC_BYTES = 64 * 2**20


def read_spec(path: Path) -> LayerTable:
    """Read a layer spec (the JSON of ``kfac-cli layers --json``)."""
    with open_readable(path) as fh:
        raw = fh.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise KfacError(path, None, f"a layer spec of at most {MAX_SPEC_BYTES} bytes", "more")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise KfacError(path, None, "a JSON layer spec", "deeper nesting than any spec") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise KfacError(path, None, "a JSON layer spec", f"invalid JSON ({e})"[:120]) from None
    return LayerTable.from_json(data, path)


def load_layer_table(
    path: Path | str, spec: Path | str | None = None, unsafe_pickle: bool = False
) -> LayerTable:
    """The layer table of a checkpoint.

    Args:
        path: ``.pt2``, ``.safetensors``, ``*.index.json``, or ``.pt``/``.pth``/``.bin``.
        spec: A layer spec (``kfac-cli layers --json``) for state dicts.
        unsafe_pickle: Allow unpickling a whole module (runs the file's code!).

    Raises:
        KfacError: For unreadable, unsafe or inconsistent checkpoints.
    """
    if is_stdin(path):
        raise KfacError("stdin", None, "a model file with random access", "a stream")
    path = Path(path)
    suffix = path.suffix.lower()
    require(path, identify(path), "model")
    if suffix == ".pt2":
        table = layer_table_from_pt2(path)
    elif suffix in (".safetensors", ".json") or (suffix in SUFFIXES and not unsafe_pickle):
        from kfac_cli.models.state_dict import layers_from_state_dict, merge_spec, read_entries

        entries = read_entries(path)
        if spec is not None:
            return merge_spec(entries, read_spec(Path(spec)), path, spec)
        return layers_from_state_dict(entries, str(path))
    elif suffix in SUFFIXES:
        from kfac_cli.models.modules import load_pickled_module

        open_readable(path).close()
        table = load_pickled_module(path)
    else:
        raise KfacError(
            path,
            None,
            "a .pt2, .safetensors, .index.json, .pt, .pth or .bin checkpoint",
            f"suffix {suffix or '(none)'!r}",
        )
    if spec is not None:
        from kfac_cli.models.state_dict import Entry, merge_spec

        entries = {n: Entry(s, True) for n, s in table.parameters.items()}
        return merge_spec(entries, read_spec(Path(spec)), path, spec)
    return table
