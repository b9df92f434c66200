"""Which fedkd produced a result: the installed version and, in a git checkout, the commit (torch-free)."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent  # the checkout, when fedkd runs from one


@cache
def version() -> str:
    """fedkd's version as installed (pyproject.toml), or "unknown" when it runs from a tree never installed."""
    try:
        return installed_version("fedkd")
    except PackageNotFoundError:
        return "unknown"


@cache
def source_commit() -> str | None:
    """The commit of the checkout fedkd runs from, "+changes" when tracked files differ from it; None outside a
    git checkout (an installed wheel) or without git."""
    if not (SOURCE / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance() -> dict[str, str | None]:
    """What summary.json and the student's model card record about the code that made them."""
    return {"fedkd_version": version(), "commit": source_commit()}
