"""DFAD: data-free adversarial distillation (Fang et al., arXiv 1912.11006); docs/methods.md.

Authors' code: VainF/Data-Free-Adversarial-Distillation (``DFAD_mnist.py``, ``DFAD_cifar.py``). No priors:
the teachers and the student together are the discriminator. Per round:

- ``dfad.student-steps`` (5) student steps, each on a fresh batch x = G(z) answered by a Forward alone:
  L_S = mean_i ||S(x_i) - T(x_i)||_1 / C;
- one generator step that maximises the same discrepancy: L_G = -mean_i ||S(x_i) - T(x_i)||_1 / C.

The student sees every sample once, as in the paper (no pool); when the query budget is spent, it
stops learning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor

from fedkd.contract import QueryContext
from fedkd.coordinator.losses import l1_per_sample
from fedkd.coordinator.methods.base import GeneratorMethod, MethodContext
from fedkd.coordinator.student import judging
from fedkd.coordinator.synthesis import SynthesisLoss
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, validate_fields


@dataclass(frozen=True)
class DFADOptions:
    """DFAD's own keys (``dfad.KEY``); defaults as the authors' scripts."""

    student_steps: int = field(default=5, metadata=bounded(
        1, 1000, help="fresh batches (student steps) per generator step"))

    def __post_init__(self) -> None:
        validate_fields(self)


class DFAD(GeneratorMethod[DFADOptions]):
    name = "dfad"

    def __init__(self, context: MethodContext) -> None:
        cfg, opts = context.config, context.config.options
        super().__init__(context, synthesis=replace(cfg.synthesis, steps=1, diversity=0.0),
                         student=replace(cfg.student, loss="l1"),
                         student_total_steps=cfg.epochs * cfg.steps_per_epoch * opts.student_steps,
                         pool_size=cfg.batch_size)

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            t = self.ensemble(x, state).logits
            with judging(self.student) as student:
                loss = -l1_per_sample(student(x), t).mean()
            return loss, t, {"loss_generator": loss}

        return loss_fn

    def round(self, epoch: int, metrics: MetricAverager) -> bool:
        """The student first (on fresh batches), then the generator, as DFAD alternates them."""
        for _ in range(self.options.student_steps):
            fresh = self.fresh_batch(epoch)
            if fresh is None:
                break
            metrics.add(self.trainer.step(fresh.images, fresh.answers))
            self.pool.add(fresh.images, fresh.answers, fresh.targets)
        return self.synthesis_round(epoch, metrics)

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        batch = self.synthesise(self.generator_loss(self.curriculum_state(epoch)), epoch)
        if batch is not None:
            metrics.add(batch.terms)
        return batch is not None
