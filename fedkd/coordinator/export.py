"""The student leaves fedkd as plain artefacts: an exported program and a model card.

``student.pt2`` is a ``torch.export`` program with a dynamic batch dimension: ``torch.export.load(path).module()``
takes normalised (N, C, H, W) float inputs and returns logits, with no fedkd and no Python model code.
``student.json`` says what the student is and how it was made: the task, the architecture, its parameters, the
method, the teachers and what each released, the epsilon each client spent, the accuracies with where they were
measured, the query samples.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.files import write_atomic
from fedkd.imports import load_heavy
from fedkd.models import count_parameters
from fedkd.provenance import provenance
from fedkd.task import Task

logger = logging.getLogger(__name__)

CARD_FORMAT = "fedkd.student-card.v1"
MAX_BATCH = 65536


def _program(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[Any, torch.Tensor]:
    """``model`` (in eval mode) as a ``torch.export`` program with a dynamic batch dimension, and its example."""
    example = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
    (name,) = list(inspect.signature(model.forward).parameters)[:1]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes={name: {0: batch}}), example


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def export_program(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> str | None:
    """Write ``model`` (in eval mode) as an exported program with a dynamic batch dimension; None when it was
    written, else why not (the run goes on: the state dict in student.pt is still there)."""
    load_heavy("torch._dynamo")  # (torch.export imports it: under the lock, see fedkd.imports)
    was_training = model.training
    model.eval()
    try:
        program, _ = _program(model, input_shape)
        tmp = path.with_name(f".writing-{path.name}")  # torch.export wants the .pt2 ending
        torch.export.save(program, tmp)
        os.replace(tmp, path)
        return None
    except Exception as exc:  # torch.export refuses some models; the student is still saved as a state dict
        why = _why(exc)
        logger.warning("the student could not be exported (%s); student.pt holds its weights", why)
        return why
    finally:
        model.train(was_training)


def onnx_available() -> bool:
    """Whether the ``onnx`` extra (onnx and onnxscript, which torch's ONNX exporter needs) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> str | None:
    """Write ``model`` (in eval mode) as ONNX with a dynamic batch dimension (torch's exporter, from the same
    exported program as student.pt2; the file checked with ``onnx.checker``); None when it was written, else why
    not (the run goes on)."""
    was_training = model.training
    model.eval()
    tmp = path.with_name(f".writing-{path.name}")
    try:
        import onnx

        program, example = _program(model, input_shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on opsets and deprecations
            torch.onnx.export(program, (example,), str(tmp), dynamo=True, verbose=False)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
        return None
    except Exception as exc:  # an operator without an ONNX form, for instance
        tmp.unlink(missing_ok=True)
        why = _why(exc)
        logger.warning("the student could not be written as ONNX (%s); student.pt2 holds it", why)
        return why
    finally:
        model.train(was_training)


def write_onnx(mode: str, model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> str | None:
    """student.onnx as ``export-onnx`` says (yes, or auto with the extra installed); None when it was written,
    else why not."""
    if mode == "no":
        return "not asked for (export-onnx=yes writes it)"
    if mode == "auto" and not onnx_available():
        return "the onnx extra is not installed (pip install 'fedkd[onnx]')"
    return export_onnx(model, input_shape, path)


def model_card(summary: dict[str, Any], task: Task, student: nn.Module, *, export_error: str | None,
               onnx_error: str | None = "not asked for") -> dict[str, Any]:
    """The student's model card, from the run's summary."""
    test_samples = summary.get("test_samples") or 0
    federated = summary.get("federated_evaluation") or {}
    accuracy = {
        "coordinator": None if summary["student"].get("test_accuracy") is None else {
            "value": summary["student"]["test_accuracy"], "measured_on": f"the coordinator's held-out data "
                                                                          f"({test_samples} samples)"},
        "federated": None if federated.get("student_accuracy") is None else {
            "value": federated["student_accuracy"],
            "measured_on": "the institutions' own held-out data (counts released through their ledgers)"},
    }
    privacy = summary.get("privacy") or {}
    return {
        "format": CARD_FORMAT,
        **provenance(),  # fedkd_version, commit
        "task": task.to_dict(),
        "architecture": summary["config"].get("student-model"),
        "parameters": count_parameters(student),
        "files": {"state_dict": "student.pt", "exported_program": None if export_error else "student.pt2",
                  "onnx": None if onnx_error else "student.onnx"},
        "export_error": export_error,
        "onnx_error": onnx_error,  # why there is no student.onnx (the extra not installed, export-onnx=no, ...)
        "inputs": "float32 (N, C, H, W), normalised: (x - mean) / std per channel, x in [0, 1]; outputs: logits in "
                  "the task's class order",
        "method": summary["method"],
        "teachers": [{"client": t["client"], "model": t["model"], "num_samples": t["num_samples"]}
                     for t in summary["teachers"]],
        "released_by_teachers": summary["queries"].get("per_client"),
        "epsilon_spent_per_client": [
            {"client": c.get("client"), "epsilon": c.get("epsilon_spent"),
             "mechanism": c.get("mechanism", c.get("mode"))}
            for c in privacy.get("clients") or privacy.get("teachers") or []],
        "accuracy": accuracy,
        "agreement_with_ensemble": _agreement(summary),
        "query_samples": summary["queries"]["samples"],
    }


def _agreement(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The student's agreement with its ensemble, with where it was measured."""
    student, check = summary["student"], summary["student"].get("synthetic_check") or {}
    if student.get("agreement") is not None:
        return {"value": student["agreement"], "loyalty": student.get("loyalty"),
                "measured_on": f"the coordinator's held-out data ({summary.get('test_samples') or 0} samples)"}
    if check.get("agreement") is not None:
        return {"value": check["agreement"], "loyalty": check["loyalty"],
                "measured_on": f"{check['samples']} fresh synthetic samples (no labelled data at the coordinator)"}
    return None


def write_model_card(card: dict[str, Any], path: Path) -> None:
    write_atomic(path, json.dumps(card, indent=2) + "\n")
