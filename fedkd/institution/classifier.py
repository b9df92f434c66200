"""An institution's own classifier as a teacher: any PyTorch model, built where the institution's code lives.

A model SPEC is one of:

- ``torchvision:NAME``: a classification model of ``torchvision.models``, built with
  ``torchvision.models.get_model(NAME, **model_args)``;
- ``PACKAGE.MODULE:CALLABLE``: the institution's own code on its ``PYTHONPATH``; the callable (a class or a
  factory: timm's and Hugging Face's work too) is called with ``model_args`` and returns an ``nn.Module``;
- a ``torch.export`` archive (a path ending in ``.pt2``): a program that needs no Python code at all (its
  weights are inside it);
- a name of fedkd's own registry (``lenet5``, ``resnet18``, ...), built for the task's input shape.

Weights are a state dict read with ``weights_only=True`` (nothing is unpickled). Every way this can go wrong is
named at start-up, before the agent dials out: a SPEC that does not import, a callable that returns no
``nn.Module``, a torchvision name that is not a classifier, weights with missing or unexpected keys or shapes
that do not fit, and a model that does not take the task's inputs or does not answer (N, classes) logits (a dry
forward on a zero batch). This code runs only at the institution: the coordinator never imports or unpickles
anything an institution sends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.checkpoint import unreadable
from fedkd.imports import load_heavy
from fedkd.models import build_model, code_classifier, is_model_name, torchvision_classifier
from fedkd.options import ConfigError
from fedkd.task import Task


class ModelError(ConfigError):
    """The institution's model cannot serve the task; the message names the SPEC or file and the problem."""


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args`` JSON: an object of keyword arguments."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"--model-args: {text!r} is not JSON ({exc.msg})") from None
    if not isinstance(args, dict):
        raise ModelError(f"--model-args: give a JSON object of keyword arguments, got {text!r}")
    return args


def build(spec: str, task: Task, model_args: Mapping[str, Any] | None = None, *, unknown_output: bool = False
          ) -> nn.Module:
    """The model a SPEC names, with fresh weights (an exported program keeps its own); a fedkd model name with
    ``unknown_output`` gets one output more than the task's classes."""
    args = dict(model_args or {})
    if spec.endswith(".pt2"):
        return _exported(Path(spec))
    if spec.startswith("torchvision:"):
        return _torchvision(spec.partition(":")[2], args)
    if ":" in spec:
        return _callable(spec, args)
    if is_model_name(spec):
        try:
            return build_model(spec, num_classes=task.num_classes + int(unknown_output), channels=task.input_shape[0],
                               image_size=task.input_shape[1:], **args)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelError(f"--model {spec!r}: {exc}") from None
    raise ModelError(f"--model {spec!r}: give torchvision:NAME, PACKAGE.MODULE:CALLABLE, an exported program "
                     "(.pt2) or a fedkd model name")


def _torchvision(name: str, args: dict[str, Any]) -> nn.Module:
    try:
        return torchvision_classifier(name, args)
    except ValueError as exc:
        raise ModelError(f"--model {exc}") from None


def _callable(spec: str, args: dict[str, Any]) -> nn.Module:
    try:
        return code_classifier(spec, args)
    except ValueError as exc:
        raise ModelError(f"--model {exc}".replace("with arguments", "with --model-args")) from None


class ExportedClassifier(nn.Module):
    """An exported program as a teacher. Its train/eval mode was fixed when it was exported (torch refuses to
    switch it), so it is held outside the module tree: ``eval()`` and ``train()`` leave it as it is, ``to()``
    moves it."""

    program: nn.Module

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "program", program)  # not a child module: see the class docstring

    def forward(self, x: torch.Tensor) -> Any:
        return self.program(x)

    def _apply(self, fn: Any, recurse: bool = True) -> ExportedClassifier:
        object.__setattr__(self, "program", self.program._apply(fn))
        return self


def as_classifier(model: Any) -> nn.Module:
    """A model as given in Python, ready to serve: a ``torch.export`` program (or its ``.module()``, whose
    train/eval mode torch refuses to switch) is held as :class:`ExportedClassifier`; an ``nn.Module`` as it is;
    anything else is refused naming its type."""
    if isinstance(model, torch.export.ExportedProgram):
        return ExportedClassifier(model.module())
    if isinstance(model, ExportedClassifier):
        return model
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # an exported program's module: its mode was fixed when it was exported
            return ExportedClassifier(model)
        return model
    raise ModelError(f"a teacher must be a torch.nn.Module or a torch.export program, got a {type(model).__name__}")


def _exported(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelError(f"--model {str(path)!r}: the exported program does not exist")
    load_heavy("torch._dynamo")  # (torch.export imports it: under the lock, see fedkd.imports)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises many kinds for a file that is not an exported program
        raise ModelError(f"--model {str(path)!r} is not a torch.export program ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'unreadable'})") from None
    return ExportedClassifier(program.module())


def load_weights(model: nn.Module, path: str | Path) -> None:
    """A state dict (or a ``{"state_dict": ...}`` checkpoint) into ``model``, strictly: missing or unexpected
    keys and shapes that do not fit are named."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"--weights {str(path)!r} does not exist") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ModelError(f"--weights {str(path)!r} is not a state dict torch can read safely "
                         f"({unreadable(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {str(path)!r} is not a state dict (a table of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{what} keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelError(f"--weights {str(path)!r} do not fit the model: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} (the model's {tuple(v.shape)})" for k, v in own.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelError(f"--weights {str(path)!r} do not fit the model: {'; '.join(wrong[:3])}")
    model.load_state_dict(state)


def dry_forward(model: nn.Module, task: Task, what: str, *, unknown_output: bool = False) -> None:
    """One zero batch of the task's shape through the model: it must answer (2, classes) finite logits, (2, classes
    + 1) with ``unknown_output``."""
    x = torch.zeros(2, *task.input_shape)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the institution's own code: anything may fail, and is named
        raise ModelError(f"{what} does not take the task's inputs (2, {', '.join(map(str, task.input_shape))}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    width = task.num_classes + int(unknown_output)
    if not isinstance(out, torch.Tensor) or out.shape != (2, width):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        extra = " and 'unknown' (--unknown-output)" if unknown_output else ""
        raise ModelError(f"{what} answers {shape} for a batch of 2; the task has {task.num_classes} classes{extra}, "
                         f"so logits must be (2, {width})")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise ModelError(f"{what} answers logits that are not finite floats on a zero batch")


def load_classifier(spec: str, task: Task, *, weights: str | Path | None = None,
                    model_args: Mapping[str, Any] | None = None, unknown_output: bool = False) -> nn.Module:
    """The institution's classifier, checked against the task, in eval mode."""
    model = build(spec, task, model_args, unknown_output=unknown_output)
    if weights is not None:
        if spec.endswith(".pt2"):
            raise ModelError(f"--weights: an exported program ({spec}) carries its own weights; drop --weights")
        load_weights(model, weights)
    elif not spec.endswith(".pt2"):
        raise ModelError(f"--weights: the model {spec!r} needs its trained weights (a state dict)")
    model.eval()
    dry_forward(model, task, f"the model {spec!r}", unknown_output=unknown_output)
    return model
