"""The run directory: claimed by one run, checked before it is resumed, and the resume state it holds.

A run directory holds ``config.json`` (the settings, written when the run is
claimed), ``checkpoint.pt`` (the method's state after every epoch),
``queries.json`` (the coordinator's count of each teacher's queries, after
every round), ``metrics.jsonl``, ``student.pt``, ``plots/`` and, once the run
is finished, ``summary.json``. Every coordinator (``fedkd run``, ``fedkd
distill``, the Flower ServerApp) opens it through :func:`claim_run_dir`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedkd.checkpoint import load_run_state
from fedkd.config import RunConfig
from fedkd.contract import QueryStats
from fedkd.files import write_atomic
from fedkd.options import ConfigError

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"device", "num-threads", "resume-from"}
QUERY_LEDGER = "queries.json"  # the coordinator's per-teacher query counts, after every round


class RunDirectoryError(FileExistsError):
    """The run directory cannot be used as asked (exists without --resume, or nothing to resume)."""


def _check_resume_config(saved: dict[str, Any], config: RunConfig, path: Path) -> None:
    current = config.to_dict()
    changed = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        why = (" The student's learning-rate schedule and the curriculum span the run's epochs, so a longer run is "
               "a new run, not a continuation." if "epochs" in changed else "")
        raise ConfigError(f"cannot resume {str(path)!r} with a different config ({detail}): a run continues with "
                          f"the settings it started with (its config.json; no --set needed), and only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES - {'resume-from'}))} may change.{why} Drop those "
                          "--set, or start a new run directory with them")


def read_config_json(path: Path) -> dict[str, Any]:
    """The settings a run directory records (``config.json``), or RunDirectoryError naming what is wrong."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{str(path)!r} is corrupt ({exc}); it records the run's settings, so the run cannot "
                                "be resumed safely: restore it from a copy or start a new run directory") from None
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{str(path)!r} holds a {type(saved).__name__}, not the run's settings; restore it "
                                "from a copy or start a new run directory")
    return saved


def open_run_dir(config: RunConfig, run_dir: Path, *, resume: bool) -> dict[str, Any] | None:
    """Claim ``run_dir`` for a new run, or check it for resumption; returns the saved state if any."""
    ckpt_path = run_dir / "checkpoint.pt"
    config_path = run_dir / "config.json"
    saved_state: dict[str, Any] | None = None
    if resume:
        if not config_path.exists():
            raise RunDirectoryError(f"nothing to resume in {str(run_dir)!r} (no config.json); run without --resume")
        _check_resume_config(read_config_json(config_path), config, config_path)
        if ckpt_path.exists():
            saved_state = load_run_state(ckpt_path)
            if saved_state["epoch"] >= config.epochs and (run_dir / "summary.json").exists():
                raise RunDirectoryError(f"the run in {str(run_dir)!r} is finished (all {config.epochs} epochs); its "
                                        f"results are in {str(run_dir / 'summary.json')!r}; nothing to resume")
    elif config_path.exists() or ckpt_path.exists():
        raise RunDirectoryError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue "
                                "it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config_path, json.dumps(config.to_dict(), indent=2) + "\n")
    return saved_state


def _has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds work worth resuming: a run checkpoint or a trained teacher."""
    return (run_dir / "checkpoint.pt").exists() or any((run_dir / "clients").glob("*/teacher.pt"))


@contextmanager
def claim_run_dir(config: RunConfig, run_dir: Path, *, resume: bool) -> Iterator[dict[str, Any] | None]:
    """:func:`open_run_dir` for the duration of a run: a new run that fails before it has made any progress
    gives the directory back (its config.json removed), so the same command can run again once the cause is
    fixed. An interrupt keeps it: the operator was told to --resume."""
    saved_state = open_run_dir(config, run_dir, resume=resume)
    try:
        yield saved_state
    except Exception:
        if not resume and not _has_progress(run_dir):
            (run_dir / "config.json").unlink(missing_ok=True)
        raise


def write_query_ledger(stats: Sequence[QueryStats], path: Path) -> None:
    """The coordinator's count of each teacher's queries, replaced atomically (after every round)."""
    write_atomic(path, json.dumps([s.as_dict() for s in stats]))


def read_query_ledger(path: Path, teachers: int) -> list[dict[str, int]] | None:
    """The ledger if it is readable and fits ``teachers`` (else None: the checkpoint's counts are used)."""
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    defaults = QueryStats().as_dict()
    # (a count a ledger predates is 0: density_samples came after the others)
    core = {"forward_calls", "backward_calls", "samples"}
    if (not isinstance(stats, list) or len(stats) != teachers
            or not all(isinstance(s, dict) and core <= set(s) <= set(defaults) for s in stats)):
        logger.warning("%s does not fit this run; using the checkpoint's query counts", path)
        return None
    return [{**defaults, **s} for s in stats]
