"""kfac-cli files for the tools people already use: kronfluence and laplace-torch.

Neither is a dependency of kfac-cli: each is imported only here, when asked for
(``pip install 'kfac-cli[interop]'``).

- :func:`export_kronfluence`: a factors file as kronfluence 1.0.1's factors folder.
- :func:`to_kron_laplace`: a factors file as laplace-torch 0.3's fitted ``KronLaplace``.
"""

from __future__ import annotations

from typing import Any

from kfac_cli.errors import KfacError


def export_kronfluence(factors, folder, **kwargs: Any) -> dict:
    """See :func:`kfac_cli.interop.kronfluence.export_kronfluence`."""
    _require("kronfluence", "1.0.1")
    from kfac_cli.interop.kronfluence import export_kronfluence as export

    return export(factors, folder, **kwargs)


def to_kron_laplace(model, factors, likelihood, **kwargs: Any):
    """See :func:`kfac_cli.interop.laplace.to_kron_laplace`."""
    _require("laplace", "0.3")
    from kfac_cli.interop.laplace import to_kron_laplace as convert

    return convert(model, factors, likelihood, **kwargs)


def _require(module: str, version: str) -> None:
    """The optional library is importable.

    Raises:
        KfacError: Saying how to install it.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise KfacError(
            None,
            module,
            f"{module} {version} installed (the interop extra, see README)",
            "not installed",
        )


__all__ = ["export_kronfluence", "to_kron_laplace"]
