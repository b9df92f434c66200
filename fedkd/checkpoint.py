"""Checkpoints on disk: written atomically, read with ``weights_only=True``, validated.

The teacher format (``fedkd.teacher.v1``, also the student's) and the run checkpoint (``fedkd.run.v1``). Rebuilding
a teacher from its file, DP-SGD and PATE architectures included, is the institution's
(``fedkd.institution.loading``).

A corrupt file, a file that is not a fedkd checkpoint, or one holding another
architecture fails with :class:`CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.models import is_student_spec, model_names

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


def unreadable(exc: Exception) -> str:
    """Why torch could not read a file, in fedkd's words (never torch's advice to unpickle it anyway)."""
    text = str(exc)
    if "Unsupported global" in text:
        name = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text.split("Unsupported global", 1)[1] else ""
        return (f"it holds Python objects{' (' + name + ')' if name else ''} other than tensors and plain values; "
                "fedkd never unpickles those (the file may be malicious)")
    if isinstance(exc, (EOFError, pickle.UnpicklingError, KeyError)) or "Weights only load failed" in text \
            or "failed finding central directory" in text:
        return "it is truncated or not a torch file"
    first = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}{': ' + first[:200] if first else ''}"


def load_safe(path: str | Path, expected_format: str) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects, and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); delete it or point to a good copy")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a fedkd checkpoint ({unreadable(exc)}); "
                              "delete it or point to a good copy") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {expected_format} checkpoint (found {found!r})")
    return obj


def field_error(path: Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: field {key!r} {problem}")


def check_teacher_fields(ckpt: dict[str, Any], path: Path) -> None:
    """Every field a teacher checkpoint needs, with its type and range; the first bad one is named."""
    def need(key: str) -> Any:
        if key not in ckpt:
            raise field_error(path, key, "is missing")
        return ckpt[key]

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    name = need("model")
    if not isinstance(name, str) or not is_student_spec(name):
        raise field_error(path, "model", f"is {name!r}, not a known model ({', '.join(model_names())})")
    classes = need("num_classes")
    if not integer(classes) or not 2 <= classes <= 100_000:
        raise field_error(path, "num_classes", f"is {classes!r}, not an integer from 2 to 100000")
    shape = need("input_shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(integer(d) for d in shape)
            or not all(1 <= d <= 4096 for d in shape)):
        raise field_error(path, "input_shape", f"is {shape!r}, not [channels, height, width] of positive integers")
    for key in ("mean", "std"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} does not record its input normalisation (mean, std); "
                                  "save it again with this version of fedkd")
        values = ckpt[key]
        if (not isinstance(values, (list, tuple)) or len(values) != shape[0]
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            raise field_error(path, key, f"is {values!r}, not {shape[0]} finite numbers"
                               + (" above 0" if key == "std" else ""))
    samples = ckpt.get("num_samples", 0)
    if not integer(samples) or samples < 0:
        raise field_error(path, "num_samples", f"is {samples!r}, not a non-negative integer")
    counts = ckpt.get("label_counts", [])
    if (not isinstance(counts, (list, tuple)) or (counts and len(counts) != classes)
            or not all(integer(c) and c >= 0 for c in counts)):
        raise field_error(path, "label_counts", f"is not {classes} non-negative integers")
    if not isinstance(ckpt.get("unknown_output", False), bool):
        raise field_error(path, "unknown_output", f"is {ckpt['unknown_output']!r}, not true or false")
    if "density" in ckpt and not isinstance(ckpt["density"], dict):  # its tensors are checked where it is built
        raise field_error(path, "density", f"is a {type(ckpt['density']).__name__}, not a table of tensors")
    if "class_statistics" in ckpt and not isinstance(ckpt["class_statistics"], dict):  # checked where attached
        raise field_error(path, "class_statistics", f"is a {type(ckpt['class_statistics']).__name__}, not a table of "
                          "BatchNorm layers")
    privacy = ckpt.get("privacy")
    if privacy is not None and not isinstance(privacy, dict):
        raise field_error(path, "privacy", f"is a {type(privacy).__name__}, not a table")
    if not isinstance(need("state_dict"), dict):
        raise field_error(path, "state_dict", "is not a table of tensors")


def save_teacher(path: str | Path, model: nn.Module, *, model_name: str, num_classes: int,
                 input_shape: tuple[int, int, int], num_samples: int, label_counts: list[int],
                 mean: tuple[float, ...], std: tuple[float, ...],
                 privacy: dict[str, Any] | None = None, model_args: dict[str, Any] | None = None,
                 unknown_output: bool = False, density: dict[str, Any] | None = None,
                 class_statistics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A teacher with what its host needs to describe itself (input normalisation, DP guarantee). With
    ``unknown_output`` the model has ``num_classes + 1`` outputs, the last "unknown" (teacher-recipe=open-set).
    ``density`` (teacher-density=on): the tensors of the density of the client's own images
    (``fedkd.institution.density``), kept beside the classifier's ``state_dict``; the loaded teacher answers the
    input's log-density as one output more. ``class_statistics`` (teacher-class-statistics=on): per BatchNorm layer
    the channel statistics of the client's own images of each class (``fedkd.institution.terms``), released only
    by a host told to (``--class-statistics``).

    Returns the checkpoint as written (what :func:`load_teacher` would return with it)."""
    ckpt = {
        "format": TEACHER_FORMAT, "model": model_name, "num_classes": num_classes,
        "input_shape": list(input_shape), "num_samples": num_samples, "label_counts": list(label_counts),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "privacy": dict(privacy) if privacy else None,
        "state_dict": model.state_dict(),
    }
    if unknown_output:
        ckpt["unknown_output"] = True
    if density is not None:
        ckpt["density"] = dict(density)
    if class_statistics is not None:
        ckpt["class_statistics"] = {name: dict(entry) for name, entry in class_statistics.items()}
    if model_args:
        ckpt["model_args"] = dict(model_args)  # a torchvision student's arguments (plain values only)
    save_atomic(ckpt, path)
    return ckpt


# What a run checkpoint holds (fedkd.coordinator.distillation.distill writes it after every epoch), and the type of
# each.
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,), "method": (dict,), "history": (list,), "stage_epochs": (list,), "stage_images": (list,),
    "rng": (torch.Tensor,), "elapsed": (int, float), "answers": (dict, type(None)), "query_stats": (list,),
}


def load_run_state(path: str | Path) -> dict[str, Any]:
    """A run checkpoint with every field present and of the right type; CheckpointError names the first that
    is not."""
    path = Path(path)
    state = load_safe(path, RUN_FORMAT)
    for key, types in RUN_FIELDS.items():
        if key not in state:
            raise field_error(path, key, "is missing")
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise field_error(path, key, f"is a {type(state[key]).__name__}, not a "
                               f"{' or '.join(t.__name__ for t in types)}")
    if state["epoch"] < 0 or len(state["stage_epochs"]) != len(state["stage_images"]):
        raise CheckpointError(f"checkpoint {str(path)!r} is inconsistent (epoch {state['epoch']}, "
                              f"{len(state['stage_epochs'])} stage epochs for {len(state['stage_images'])} images)")
    if state["rng"].dtype != torch.uint8:
        raise field_error(path, "rng", "is not a random-number-generator state (uint8 tensor)")
    if state["answers"] is not None and not (isinstance(state["answers"].get("ensemble"), torch.Tensor)
                                             and isinstance(state["answers"].get("members"), list)):
        raise field_error(path, "answers", "does not hold the ensemble's and members' test answers")
    if not all(isinstance(s, dict) for s in state["query_stats"]):
        raise field_error(path, "query_stats", "is not a list of per-teacher tables")
    clients = state.get("clients")  # whose teachers, in the pool's order (absent from older checkpoints)
    if clients is not None and not (isinstance(clients, list) and all(type(c) is int for c in clients)
                                    and len(clients) == len(state["query_stats"])):
        raise field_error(path, "clients", "is not a list of client indices, one per teacher")
    return state
