"""Checkpoints on disk: written atomically, read with ``weights_only=True``, validated.

A corrupt file, a file that is not a fedkd checkpoint, or one holding another
architecture fails with :class:`CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.models import build_model

TEACHER_FORMAT = "fedkd.teacher.v1"
RUN_FORMAT = "fedkd.run.v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_safe(path: str | Path, expected_format: str) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects, and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a fedkd checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); delete it or point to a good copy"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {expected_format} checkpoint (found {found!r})")
    return obj


def save_teacher(path: str | Path, model: nn.Module, *, model_name: str, num_classes: int,
                 input_shape: tuple[int, int, int], num_samples: int, label_counts: list[int],
                 mean: tuple[float, ...], std: tuple[float, ...],
                 privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """A teacher with what its host needs to describe itself (input normalisation, DP guarantee).

    Returns the checkpoint as written (what :func:`load_teacher` would return with it)."""
    ckpt = {
        "format": TEACHER_FORMAT, "model": model_name, "num_classes": num_classes,
        "input_shape": list(input_shape), "num_samples": num_samples, "label_counts": list(label_counts),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "privacy": dict(privacy) if privacy else None,
        "state_dict": model.state_dict(),
    }
    save_atomic(ckpt, path)
    return ckpt


def load_teacher(path: str | Path, *, expected_model: str | None = None,
                 num_classes: int | None = None,
                 input_shape: tuple[int, int, int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a teacher from its checkpoint; fail clearly on a mismatch with what the run expects."""
    ckpt = load_safe(path, TEACHER_FORMAT)
    name, shape = ckpt["model"], tuple(ckpt["input_shape"])
    if expected_model is not None and name != expected_model:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {name!r} teacher, but the config asks for "
                              f"{expected_model!r}; set teacher-model={name} or use another checkpoint")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} has {ckpt['num_classes']} classes, the dataset "
                              f"has {num_classes}")
    if input_shape is not None and shape != tuple(input_shape):
        raise CheckpointError(f"checkpoint {str(path)!r} takes inputs {shape}, the dataset has {tuple(input_shape)}")
    if "mean" not in ckpt or "std" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} does not record its input normalisation (mean, std); "
                              "save it again with this version of fedkd")
    model = build_model(name, num_classes=ckpt["num_classes"], channels=shape[0], image_size=shape[1])
    if (ckpt.get("privacy") or {}).get("mechanism") == "dp-sgd":
        from fedkd.privacy import make_private_model

        model = make_private_model(model)  # the architecture DP-SGD trained (GroupNorm for BatchNorm)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match a {name!r} architecture: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    return model.eval(), ckpt
