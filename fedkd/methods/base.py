"""What every distillation method provides to the driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedkd.config import RunConfig
from fedkd.data import DatasetSpec
from fedkd.ensemble import Ensemble
from fedkd.teacher import CurriculumState


@dataclass(frozen=True)
class MethodContext:
    """Everything a method is built from; passed explicitly, never through globals."""

    config: RunConfig
    spec: DatasetSpec
    ensemble: Ensemble
    student: nn.Module
    device: torch.device


class DistillationMethod(Protocol):
    """A data-free distillation method run by the coordinator.

    ``train_epoch`` runs one epoch and returns its scalar metrics; the driver
    evaluates, checkpoints and reports around it. ``state_dict`` holds
    everything needed to resume bit-for-bit (generator, optimisers, schedule).
    """

    name: str
    student: nn.Module

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]: ...

    def curriculum_state(self, epoch: int) -> CurriculumState: ...

    def synthetic_samples(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
