"""fedkd: one student distilled from many institutions' teachers, no data or weights pooled.

The package has three parts: the coordinator's (``fedkd.coordinator``, entry points in ``fedkd.server``), the
institution's (``fedkd.institution``, entry points in ``fedkd.client``) and the floor both share (the contract,
the codec, options, config, data, models).

In a source tree (a clone, or the bundle Flower builds of this app) the entry points' folders ``server/`` and
``client/`` sit beside this package; a wheel installs them inside it (``fedkd/server``, ``fedkd/client``), so no
generic top-level ``server`` or ``client`` package reaches site-packages. Either way they are imported as
``fedkd.server`` and ``fedkd.client``: in a source tree the finder below maps those two names to the sibling
folders, and nothing else.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

_PACKAGE = Path(__file__).resolve().parent
_ENTRY_POINTS = ("server", "client")


class _SourceTreeEntryPoints(importlib.abc.MetaPathFinder):
    """``fedkd.server`` and ``fedkd.client`` from the folders beside this package, in a source tree."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, side = fullname.partition(".")
        if package != __name__ or side not in _ENTRY_POINTS:
            return None
        folder = _PACKAGE.parent / side
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not (_PACKAGE / "server").is_dir() and (_PACKAGE.parent / "server" / "__init__.py").is_file():
    if not any(isinstance(finder, _SourceTreeEntryPoints) for finder in sys.meta_path):
        sys.meta_path.append(_SourceTreeEntryPoints())


_API = {"Task": "fedkd.task", "TaskError": "fedkd.task", "distill": "fedkd.api", "serve": "fedkd.api",
        "Distilled": "fedkd.api", "load_student": "fedkd.api"}


def __getattr__(name: str) -> Any:
    """The Python API (``fedkd.Task``, ``fedkd.distill``, ``fedkd.serve``, ``fedkd.load_student``), imported
    when first used: ``import fedkd`` alone loads neither side."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedkd' has no attribute {name!r}")
