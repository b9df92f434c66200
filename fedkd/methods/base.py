"""What every distillation method provides to the driver, and the parts they share.

A method is a short file that reads like its paper: its options dataclass
(registered with it in ``fedkd.methods``, keys ``METHOD.KEY``), its losses,
and a loop over the shared building blocks: the :class:`~fedkd.synthesis.Synthesizer`
(generator, targets, best iterate), the :class:`~fedkd.synthetic_pool.SyntheticPool`
(every batch with the ensemble's answers), the :class:`~fedkd.student.StudentTrainer`
and the :class:`QueryBudget`. It reaches the teachers only through the ensemble.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedkd.config import ConfigError, RunConfig
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
    everything needed to resume bit-for-bit (generator, optimisers, schedule, pool).
    """

    name: str
    student: nn.Module

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]: ...

    def curriculum_state(self, epoch: int) -> CurriculumState: ...

    def synthetic_samples(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def require_input_gradients(ensemble: Ensemble, method: str) -> None:
    """Stop at start-up when a method that trains its generator through the teachers' input gradients can get
    none: no client grants gradients and zeroth-order estimation is off."""
    if ensemble.gradient_members or (ensemble.logits_members and ensemble.zeroth_order.directions > 0):
        return
    grants = ", ".join(f"client {d.client}: {'+'.join(d.access_modes)}" for d in ensemble.descriptions)
    raise ConfigError(f"method={method} trains its generator through the teachers' input gradients and no client "
                      f"grants gradient access ({grants}); set zo-directions > 0 to estimate them from logits, or "
                      "have at least one client grant gradient (labels-only clients give no gradient at all)")


class QueryBudget:
    """Query samples a method may still spend (``query-budget``; 0 = no limit), counted by the teacher pool.

    The count is every sample of every Forward and Backward, summed over the
    teachers, from the moment the budget was opened (the driver's evaluation
    queries before distillation do not count against it).
    """

    def __init__(self, ensemble: Ensemble, limit: int) -> None:
        self.ensemble, self.limit = ensemble, limit
        self.start = self._total()
        self.last_cost = 0

    def _total(self) -> int:
        return sum(s.samples for s in self.ensemble.pool.stats())

    @property
    def spent(self) -> int:
        return self._total() - self.start

    def allows(self, estimate: int) -> bool:
        """Whether a round estimated to cost ``estimate`` samples (or what the last one cost) fits."""
        return self.fits(max(estimate, self.last_cost))

    def fits(self, cost: int) -> bool:
        """Whether ``cost`` more query samples fit in the budget."""
        return self.limit == 0 or self.spent + cost <= self.limit

    def charge(self, before: int) -> None:
        """Record what the round that began at ``spent == before`` cost."""
        self.last_cost = self.spent - before

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "last_cost": self.last_cost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.last_cost = int(state["start"]), int(state["last_cost"])
