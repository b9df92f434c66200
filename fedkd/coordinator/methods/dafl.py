"""DAFL: data-free learning of student networks (Chen et al., ICCV 2019); docs/methods.md.

Authors' code: huawei-noah/Efficient-Computing, ``Data-Efficient-Model-Compression/DAFL/DAFL_train.py``.
Per round, one generator step on x = G(z) against the teachers (here the ensemble; the activation term
is computed by each client where its teacher lives, ``fedkd.institution.terms``):

    L_G = w_oh * CE(T(x), argmax T(x))           # w_oh = 1: samples the teacher is sure of
          - w_a * mean|f_T(x)|                    # w_a = 0.1: strong penultimate activations
          + w_ie * sum_c pbar_c log10 pbar_c      # w_ie = 5: every class equally (log10 as the code)

and then the student learns that very batch (detached) from the teachers' answers to it: KL at
temperature ``dafl.temperature`` (1 in the code), ``dafl.student-steps`` steps (1 in the code). The
student sees each sample only as often as that: DAFL has no pool, and when the query budget is spent
it stops learning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from torch import Tensor

from fedkd.contract import ACTIVATION, QueryContext
from fedkd.coordinator.losses import mean_prediction_negentropy, onehot_loss
from fedkd.coordinator.methods.base import (
    GeneratorMethod,
    MethodContext,
    require_terms,
)
from fedkd.coordinator.synthesis import SynthesisLoss
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, validate_fields


@dataclass(frozen=True)
class DAFLOptions:
    """DAFL's own keys (``dafl.KEY``); defaults as the authors' MNIST script."""

    weight_onehot: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, help="weight of the one-hot term"))
    weight_activation: float = field(default=0.1, metadata=bounded(
        0.0, 1e6, help="weight of the (negated) activation term, computed by each client"))
    weight_entropy: float = field(default=5.0, metadata=bounded(
        0.0, 1e6, help="weight of the information-entropy term"))
    temperature: float = field(default=1.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="temperature of the student's KL loss"))
    student_steps: int = field(default=1, metadata=bounded(
        1, 1000, help="student steps on each batch just made"))

    def __post_init__(self) -> None:
        validate_fields(self)


class DAFL(GeneratorMethod[DAFLOptions]):
    name = "dafl"

    def __init__(self, context: MethodContext) -> None:
        cfg, opts = context.config, context.config.options
        super().__init__(context, synthesis=replace(cfg.synthesis, steps=1, diversity=0.0),
                         student=replace(cfg.student, loss="kl", temperature=opts.temperature),
                         student_total_steps=cfg.epochs * cfg.steps_per_epoch * opts.student_steps,
                         pool_size=cfg.batch_size)
        self.terms = require_terms(self.ensemble, self.name,
                                   {ACTIVATION: ("weight-activation", opts.weight_activation)})

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        opts = self.options

        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            out = self.ensemble(x, state, terms=self.terms)
            onehot = opts.weight_onehot * onehot_loss(out.logits)
            activation = -opts.weight_activation * out.terms[ACTIVATION] if self.terms else onehot * 0
            entropy = opts.weight_entropy * mean_prediction_negentropy(out.logits) / math.log(10)
            loss = onehot + activation + entropy
            return loss, out.logits, {"loss_generator": loss, "loss_onehot": onehot,
                                      "loss_activation": activation, "loss_entropy": entropy}

        return loss_fn

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        batch = self.synthesise(self.generator_loss(self.curriculum_state(epoch)), epoch)
        if batch is None:
            return False
        metrics.add(batch.terms)
        for _ in range(self.options.student_steps):  # the batch just made, as DAFL trains
            metrics.add(self.trainer.step(batch.images, batch.answers))
        self.pool.add(batch.images, batch.answers, batch.targets)  # the last batch, for the checkpoint
        return True

    def student_round(self, metrics: MetricAverager) -> None:
        """None: the student trained on the batch just made, inside the synthesis round."""
