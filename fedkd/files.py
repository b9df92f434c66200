"""Files written whole or not at all: a crash (SIGKILL, a full disk) leaves the old file or the new one, never a
truncated mix. Torch-free; checkpoints use :func:`fedkd.checkpoint.save_atomic`, which follows the same rule."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, flushed to disk, then renamed over it
    (``private``: readable by the owner only, from the moment it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
