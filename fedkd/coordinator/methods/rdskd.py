"""RDSKD: robustness and diversity seeking data-free distillation (Han et al., ICASSP 2021, arXiv
2011.03749); docs/methods.md.

Two stages, not adversarial. For the first ``rdskd.generator-share`` of the epochs the generator learns
against the frozen teachers alone; then it is frozen and the student learns from it. A batch is two
halves x1, x2 (from independent latents):

    L_oh = CE(T(x), argmax T(x))                            # authenticity
    L_ie = sum_c pbar_c log pbar_c                          # class diversity (pbar = mean softmax T(x))
    l_z  = ||x2 - x1|| / ||softmax T(x2) - softmax T(x1)||,  L_ds = 1 / (l_z + 1e-20)   # mode seeking
    L_G  = exp(L_oh - L_oh') + exp(L_ie - L_ie') + L_ds

where L_oh', L_ie' are detached snapshots refreshed once per epoch (at its first batch): the exponential
penalty on loss increments keeps either term from rising while the other falls. The student: tau^2 KL
at tau = ``rdskd.temperature`` (10). In fedkd the student stage draws ``rdskd.fresh-batches`` batches per
round from the frozen generator, answered by a Forward alone, into the synthetic pool, and trains
``student-steps`` steps per round from the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedkd.contract import QueryContext
from fedkd.coordinator.losses import mean_prediction_negentropy, onehot_loss
from fedkd.coordinator.methods.base import GeneratorMethod, MethodContext
from fedkd.coordinator.synthesis import SynthesisLoss
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, validate_fields


def rdskd_loss(images: Tensor, teacher_logits: Tensor, snapshot: dict[str, float] | None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """L_G and its terms for a batch (images (B, ...), teacher logits (B, C)); ``snapshot`` holds L_oh' and
    L_ie' (None: this batch's own values, so both penalties are exp(0) = 1)."""
    oh = onehot_loss(teacher_logits)
    ie = mean_prediction_negentropy(teacher_logits)
    half = len(images) // 2
    p = torch.softmax(teacher_logits, dim=1)
    l_z = (images[half:2 * half] - images[:half]).norm() / (p[half:2 * half] - p[:half]).norm().clamp_min(1e-20)
    ds = 1.0 / (l_z + 1e-20)
    prev_oh = float(oh.detach()) if snapshot is None else snapshot["onehot"]
    prev_ie = float(ie.detach()) if snapshot is None else snapshot["entropy"]
    loss = torch.exp(oh - prev_oh) + torch.exp(ie - prev_ie) + ds
    return loss, {"loss_generator": loss, "loss_onehot": oh, "loss_entropy": ie, "loss_diversity": ds}


@dataclass(frozen=True)
class RDSKDOptions:
    """RDSKD's own keys (``rdskd.KEY``)."""

    generator_share: float = field(default=0.5, metadata=bounded(
        0.01, 0.99, help="share of a query budget the generator stage may spend"))
    temperature: float = field(default=10.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="temperature of the student's KL loss"))
    fresh_batches: int = field(default=1, metadata=bounded(
        1, 100, help="fresh batches per round in the student stage (Forward only, into the pool)"))

    def __post_init__(self) -> None:
        validate_fields(self)


class RDSKD(GeneratorMethod[RDSKDOptions]):
    name = "rdskd"

    def __init__(self, context: MethodContext) -> None:
        cfg, opts = context.config, context.config.options
        self.generator_epochs = max(1, min(cfg.epochs - 1, round(opts.generator_share * cfg.epochs))) \
            if cfg.epochs > 1 else 1
        student_epochs = max(cfg.epochs - self.generator_epochs, 1)
        super().__init__(context, synthesis=replace(cfg.synthesis, conditional=False, diversity=0.0),
                         student=replace(cfg.student, loss="kl", temperature=opts.temperature),
                         student_total_steps=student_epochs * cfg.steps_per_epoch * cfg.student_steps)
        self.snapshot: dict[str, float] | None = None
        self.last_terms: dict[str, float] | None = None
        self.snapshot_epoch = -1

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            t = self.ensemble(x, state).logits
            loss, terms = rdskd_loss(x, t, self.snapshot)
            return loss, t, terms

        return loss_fn

    def start_epoch(self, epoch: int) -> None:
        if epoch < self.generator_epochs and self.snapshot_epoch != epoch:  # the once-per-epoch snapshot
            self.snapshot = None if self.last_terms is None else {
                "onehot": self.last_terms["loss_onehot"], "entropy": self.last_terms["loss_entropy"]}
            self.snapshot_epoch = epoch

    def round(self, epoch: int, metrics: MetricAverager) -> bool:
        """Stage 1 (the generator against the frozen teachers) or stage 2 (the student on the frozen generator)."""
        if epoch >= self.generator_epochs:
            for _ in range(self.options.fresh_batches):
                fresh = self.fresh_batch(epoch)
                if fresh is None:
                    break
                self.pool.add(fresh.images, fresh.answers, fresh.targets)
            self.student_round(metrics)
            return False
        # the generator stage spends at most its share of a query budget; the student stage has the rest
        share = self.options.generator_share * self.budget.limit
        if self.budget.limit and self.budget.spent + self.round_cost() > share:
            return False
        return self.synthesis_round(epoch, metrics)

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        batch = self.synthesise(self.generator_loss(self.curriculum_state(epoch)), epoch)
        if batch is None:
            return False
        metrics.add(batch.terms)
        if all(math.isfinite(v) for v in batch.terms.values()):
            self.last_terms = batch.terms
            if self.snapshot is None:
                self.snapshot = {"onehot": batch.terms["loss_onehot"], "entropy": batch.terms["loss_entropy"]}
        return True

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        return {"stage": 1.0 if epoch < self.generator_epochs else 2.0}

    def extra_state(self) -> dict[str, object]:
        return {"snapshot": self.snapshot, "last_terms": self.last_terms, "snapshot_epoch": self.snapshot_epoch}

    def load_extra_state(self, state: dict[str, object]) -> None:
        self.snapshot = state["snapshot"]  # type: ignore[assignment]
        self.last_terms = state["last_terms"]  # type: ignore[assignment]
        self.snapshot_epoch = int(state["snapshot_epoch"])  # type: ignore[call-overload]
