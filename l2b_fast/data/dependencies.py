"""The optional packages of ``l2b_fast.data`` (the ``data`` extra) and the one error that says how to install them.

``pip install --no-build-isolation -e .`` installs the core only (``-e '.[data]'`` adds the extra); shards
need webdataset and Pillow (pyspng speeds up PNG decoding and is optional). Every place that needs one of them
imports it through :func:`import_data_package`, so a missing package always fails the same way: an ImportError
naming the package and the install command, never a bare ``No module named 'webdataset'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "MissingDataDependency", "import_data_package", "require_data_packages"]

INSTALL_HINT = (
    "install the data extra: pip install --no-build-isolation -e '.[data]' in the l2b_fast source "
    "tree, or pip install webdataset pillow pyspng"
)

# import name -> name on the package index
_DISTRIBUTIONS = {"webdataset": "webdataset", "PIL": "pillow", "pyspng": "pyspng"}


class MissingDataDependency(ImportError):
    """A package of the ``data`` extra is not installed (the message says what to install)."""


def import_data_package(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for a (sub)module of a data-extra package ("webdataset", "PIL.Image"),
    or :class:`MissingDataDependency`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if not (name == missing or name.startswith(missing + ".")):
            raise  # the package is there but one of its own dependencies is missing: show that error as is
        top = name.split(".")[0]
        raise MissingDataDependency(
            f"the shard tools need the {_DISTRIBUTIONS.get(top, top)!r} package, which is not installed; {INSTALL_HINT}"
        ) from error


def require_data_packages() -> None:
    """Fails early (before anything is written) unless webdataset and Pillow are importable."""
    for name in ("webdataset", "PIL"):
        import_data_package(name)
