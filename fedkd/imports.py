"""The libraries that pull in ``torch.distributed`` (Opacus, torchvision), imported one thread at a time.

Flower's simulation runs nodes' ClientApps and the ServerApp in threads of one process. Two threads that import
these for the first time at once, by different routes (Opacus for a privacy ledger in one, torchvision for a
dataset or the open-set recipe in another), can meet a ``torch.distributed`` module half initialised: Python
lets a concurrent circular import through with a partial module, and the import fails (measured in CI, one run
in many: ``ImportError: cannot import name 'ShardedTensor'``, ``... '_CUSTOM_SHARDED_OPS'``). Every first import
of either in fedkd goes through :func:`load_heavy` (tests/test_layout.py checks it), which takes one lock for both.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

HEAVY = ("opacus", "torchvision")
_LOCK = threading.RLock()  # reentrant: importing one may import the other


def load_heavy(name: str) -> ModuleType:
    """Import ``name`` (one of :data:`HEAVY`) under the lock, once per process; later calls return it at once."""
    if name not in HEAVY:
        raise ValueError(f"{name!r} is not one of the libraries imported under the lock ({', '.join(HEAVY)})")
    with _LOCK:
        return importlib.import_module(name)
