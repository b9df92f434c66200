"""The shared student trainer: SGD with a cosine schedule over pool batches (after a linear warm-up of
``student-warmup`` of its steps, where set), per-sample weights.

A step takes images in [0, 1] and the ensemble's cached logits, optionally
shifts the images by a pixel or two (``student-shift``; the cached answer is
kept, a small label noise that regularises), computes the per-sample
distillation loss l_i (tau^2 KL at ``temperature``, or L1 on logits / C), asks
the method for per-sample weights v_i (CuDFKD's self-paced curriculum; 1 when
it has none) and minimises mean_i v_i l_i (the gradient clipped to ``student-clip`` in L2 norm, where set).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.augment import random_shift
from fedkd.coordinator.losses import distillation_per_sample
from fedkd.coordinator.settings import StudentSettings
from fedkd.data import DatasetSpec
from fedkd.options import check_finite

# per-sample losses (B,) -> weights (B,) in [0, 1], no gradient
SampleWeights = Callable[[Tensor], Tensor]


@contextmanager
def judging(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, then back in the mode it was in: a student judged, not trained (a
    generator's adversarial term), keeps its BatchNorm statistics as they are."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class StudentTrainer:
    """Trains the student with SGD over a schedule of ``total_steps`` steps, as the ``student-*`` keys say."""

    def __init__(self, student: nn.Module, spec: DatasetSpec, settings: StudentSettings, device: torch.device, *,
                 total_steps: int) -> None:
        self.student, self.spec, self.settings, self.device = student.to(device), spec, settings, device
        self.total_steps = total_steps
        self.optimizer = torch.optim.SGD(student.parameters(), lr=settings.lr, momentum=settings.momentum,
                                         weight_decay=settings.weight_decay)
        total = max(total_steps, 1)
        warm = round(settings.warmup * total_steps)
        self.schedule: torch.optim.lr_scheduler.LRScheduler
        if warm > 0:  # lr x min(1, (t + 1) / warm) x the cosine factor
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda t: min(1.0, (t + 1) / warm) * 0.5
                                                              * (1 + math.cos(math.pi * min(t, total) / total)))
        else:
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        self.steps = 0

    def step(self, images: Tensor, answers: Tensor, weigh: SampleWeights | None = None) -> dict[str, float]:
        """One update on a batch of images in [0, 1] (B, C, H, W) and the ensemble's logits (B, C)."""
        self.student.train()
        x = self.spec.normalize(random_shift(images.to(self.device), self.settings.shift))
        losses = distillation_per_sample(self.student(x), answers.to(self.device), self.settings.loss,
                                         self.settings.temperature)  # (B,)
        weights = weigh(losses.detach()) if weigh is not None else torch.ones_like(losses)
        self.update((weights * losses).mean())
        return {"loss_student": float(losses.detach().mean()), "admitted": float((weights >= 0.5).float().mean()),
                "weight_mean": float(weights.mean())}

    def update(self, loss: Tensor) -> None:
        """One optimiser step on ``loss`` (stopped, naming ``student-lr``, if it is not finite) and one step of the
        schedule: :meth:`step`'s update, for a caller with a loss of its own."""
        check_finite(loss, "student-lr", self.settings.lr, "the student")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.settings.clip)
        self.optimizer.step()
        if self.steps < self.total_steps:
            self.schedule.step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps = int(state["steps"])

