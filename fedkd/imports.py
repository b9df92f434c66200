"""The libraries that pull in ``torch.distributed`` (Opacus, torchvision, ``torch._dynamo``), imported one thread at
a time.

Flower's simulation runs nodes' ClientApps and the ServerApp in threads of one process. Two threads that import
these for the first time at once, by different routes (Opacus for a privacy ledger in one, torchvision for a
dataset or the open-set recipe in another), can meet a ``torch.distributed`` module half initialised: Python
lets a concurrent circular import through with a partial module, and the import fails (measured in CI, one run
in many: ``ImportError: cannot import name 'ShardedTensor'``, ``... '_CUSTOM_SHARDED_OPS'``). Every first import
of either in fedkd goes through :func:`load_heavy` (tests/test_layout.py checks it), which takes one lock for both.

``torch._dynamo`` is imported by torch itself, lazily, the first time a model runs on the meta device (BatchNorm's
decomposition) or is exported; it imports ``torch.distributed`` too. The ServerApp's start-up check of the student
(a forward on the meta device) met a ClientApp's import in another thread, and Python's import lock refused the
cycle (measured once in the default suite: ``deadlock detected by _ModuleLock('torch.distributed._shard._utils')``,
reported as a config error). The start-up checks and the export import it first through :func:`load_heavy`.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

HEAVY = ("opacus", "torchvision", "torch._dynamo")
_LOCK = threading.RLock()  # reentrant: importing one may import the other


def load_heavy(name: str) -> ModuleType:
    """Import ``name`` (one of :data:`HEAVY`) under the lock, once per process; later calls return it at once."""
    if name not in HEAVY:
        raise ValueError(f"{name!r} is not one of the libraries imported under the lock ({', '.join(HEAVY)})")
    with _LOCK:
        return importlib.import_module(name)
