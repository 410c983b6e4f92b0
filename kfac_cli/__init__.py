"""kfac-cli: KFAC curvature preprocessing from the shell.

The public Python API (imported lazily, so that ``import kfac_cli`` and the command line's help
do not import torch):

- :func:`extract_patches`, :func:`extract_averaged_patches` (KFAC-expand / -reduce inputs),
- :func:`to_canonical`, :func:`from_canonical` (the canonical parameter layout),
- :class:`KFACType`, :class:`FisherType`, :class:`ConvParams`, :class:`KfacError`,
- :func:`load_layer_table` (a model checkpoint's layer table),
- the commands as library functions: :func:`run_patches`, :func:`run_canonicalize`,
  :func:`run_uncanonicalize`, :func:`run_factors`, :func:`run_merge`, :func:`run_info`,
  :func:`run_stats`, :func:`run_apply`,
- :mod:`kfac_cli.interop`: :func:`~kfac_cli.interop.export_kronfluence`,
  :func:`~kfac_cli.interop.to_kron_laplace` (kronfluence and laplace-torch, optional),
- :func:`record` (activation and output-gradient dumps from a model and its data),
- :func:`identify` (what a file is, from its first bytes and header).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "extract_patches": "kfac_cli.ops.patches",
    "extract_averaged_patches": "kfac_cli.ops.patches",
    "to_canonical": "kfac_cli.ops.canonical",
    "from_canonical": "kfac_cli.ops.canonical",
    "ParamGroup": "kfac_cli.ops.canonical",
    "KFACType": "kfac_cli.enums",
    "FisherType": "kfac_cli.enums",
    "LossReduction": "kfac_cli.enums",
    "ConvParams": "kfac_cli.ops.conv",
    "KfacError": "kfac_cli.errors",
    "load_layer_table": "kfac_cli.models.load",
    "LayerTable": "kfac_cli.models.table",
    "run_patches": "kfac_cli.jobs.patches",
    "run_canonicalize": "kfac_cli.jobs.canonicalize",
    "run_uncanonicalize": "kfac_cli.jobs.canonicalize",
    "run_factors": "kfac_cli.jobs.factors",
    "run_merge": "kfac_cli.jobs.merge",
    "run_info": "kfac_cli.jobs.info",
    "run_stats": "kfac_cli.jobs.stats",
    "run_apply": "kfac_cli.jobs.apply",
    "record": "kfac_cli.record",
    "identify": "kfac_cli.files.kinds",
}

__all__ = [  # noqa: RUF022 (grouped as above, not sorted)
    "__version__",
    "extract_patches",
    "extract_averaged_patches",
    "to_canonical",
    "from_canonical",
    "ParamGroup",
    "KFACType",
    "FisherType",
    "LossReduction",
    "ConvParams",
    "KfacError",
    "load_layer_table",
    "LayerTable",
    "run_patches",
    "run_canonicalize",
    "run_uncanonicalize",
    "run_factors",
    "run_merge",
    "run_info",
    "run_stats",
    "run_apply",
    "record",
    "identify",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        # Kept as the package's attribute: importing kfac_cli.record set the submodule
        # there, and ``from kfac_cli import record`` means the function.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kfac_cli' has no attribute {name!r}")
