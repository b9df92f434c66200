"""Combining many teachers' answers into one ensemble signal, as one autograd function.

- ``mean``: the average of the answering teachers' logits.
- ``class-weighted``: teacher k's logit for class c is weighted by its share of
  the class-c training samples, w[k, c] = h[k, c] / sum_k h[k, c], where h[k] is
  teacher k's normalised label histogram. Clients may decline to share counts:
  a decliner counts as a uniform histogram.

The whole ensemble is one node in the autograd graph: its forward is one
fan-out of Forward queries through a :class:`~fedkd.pool.TeacherPool`, and
``loss.backward()`` sends one fan-out of Backward queries (each teacher gets the
gradient of the loss w.r.t. its own logits and BN loss) and sums the gradients
w.r.t. the inputs. When a teacher does not answer, the ensemble is formed from
those that did (weights renormalised over them); a teacher that answered the
Forward but misses the Backward only loses its term of the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedkd.pool import TeacherPool
from fedkd.teacher import CurriculumState

AGGREGATIONS = ("mean", "class-weighted")


def class_weights(histograms: Sequence[Sequence[int] | None], num_classes: int) -> Tensor:
    """(K, C) weights whose columns sum to 1, from per-teacher label counts (None = declined)."""
    rows = []
    for counts in histograms:
        if counts is None or sum(counts) == 0:
            rows.append(torch.full((num_classes,), 1.0 / num_classes))
        else:
            if len(counts) != num_classes:
                raise ValueError(f"label histogram has {len(counts)} classes, expected {num_classes}")
            c = torch.tensor(list(counts), dtype=torch.float32)
            rows.append(c / c.sum())
    h = torch.stack(rows)
    return h / h.sum(0, keepdim=True).clamp_min(1e-12)


@dataclass
class EnsembleOutput:
    logits: Tensor  # (B, C)
    bn_loss: Tensor | None  # mean over answering teachers that have feature statistics
    members: list[int]  # which teachers answered, in pool order
    member_logits: list[Tensor]  # their logits, aligned with ``members``


def _query(pool: TeacherPool, inputs: Tensor, state: CurriculumState, bn_loss: bool,
           min_answers: int | None) -> tuple[Tensor, list[int], list[bool], Tensor, Tensor]:
    """One Forward fan-out: (the inputs as sent, members that answered, which of them returned a BN loss,
    logits (K', B, C), BN losses (K',), zero where none) on the inputs' device."""
    x = inputs.detach().cpu().float().contiguous()
    replies = pool.forward(x, state, bn_loss=bn_loss, min_answers=min_answers)
    members = sorted(replies)
    has_bn = [replies[k].bn_loss is not None for k in members]
    logits = torch.stack([replies[k].logits for k in members]).to(inputs.device)
    losses = torch.zeros(len(members))
    for i, k in enumerate(members):
        loss = replies[k].bn_loss
        if loss is not None:
            losses[i] = loss
    return x, members, has_bn, logits, losses.to(inputs.device)


class _FanOut(torch.autograd.Function):
    """inputs (B, ...) -> logits (K', B, C), bn losses (K',) of the K' members that answered."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, pool: TeacherPool, state: CurriculumState, bn_loss: bool,
                min_answers: int | None, answered: list[int]) -> tuple[Tensor, Tensor]:
        x, members, has_bn, logits, losses = _query(pool, inputs, state, bn_loss, min_answers)
        answered.extend(members)
        ctx.pool, ctx.state, ctx.members, ctx.has_bn, ctx.x, ctx.device = (
            pool, state, members, has_bn, x, inputs.device)
        return logits, losses

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        g = grad_logits.detach().cpu().float().contiguous()
        gl = grad_losses.detach().cpu().float()
        grads = {k: (g[i].contiguous(), float(gl[i]) if ctx.has_bn[i] else None) for i, k in enumerate(ctx.members)}
        answers = ctx.pool.backward(ctx.x, grads, ctx.state)
        total = torch.zeros_like(ctx.x)
        for grad in answers.values():
            total += grad
        return total.to(ctx.device), None, None, None, None, None


class Ensemble:
    """Queries every teacher of a pool with the same inputs and combines their logits."""

    def __init__(self, pool: TeacherPool, aggregation: str = "mean") -> None:
        if aggregation not in AGGREGATIONS:
            raise KeyError(f"unknown ensemble aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        self.pool = pool
        descriptions = pool.descriptions
        if not descriptions:
            raise ValueError("an ensemble needs at least one teacher")
        classes = {d.num_classes for d in descriptions}
        shapes = {d.input_shape for d in descriptions}
        if len(classes) != 1 or len(shapes) != 1:
            raise ValueError(f"teachers disagree on classes {classes} or input shape {shapes}")
        self.descriptions = descriptions
        self.num_classes = classes.pop()
        self.aggregation = aggregation

    def __len__(self) -> int:
        return len(self.descriptions)

    @property
    def has_feature_statistics(self) -> bool:
        return any(d.has_feature_statistics for d in self.descriptions)

    def weights(self, members: Sequence[int]) -> Tensor | None:
        """(K', C) class weights over the answering members, or None for the plain mean."""
        if self.aggregation == "mean":
            return None
        return class_weights([self.descriptions[k].label_counts for k in members], self.num_classes)

    def __call__(self, inputs: Tensor, state: CurriculumState, *, bn_loss: bool = False,
                 require_all: bool = False) -> EnsembleOutput:
        """Query the teachers; gradients flow back through Backward queries when ``inputs`` requires grad."""
        min_answers = len(self) if require_all else None
        if inputs.requires_grad and torch.is_grad_enabled():
            answered: list[int] = []
            logits, losses = _FanOut.apply(inputs, self.pool, state, bn_loss, min_answers, answered)
        else:
            _, answered, _, logits, losses = _query(self.pool, inputs, state, bn_loss, min_answers)
        weights = self.weights(answered)
        if weights is None:
            combined = logits.mean(0)
        else:
            combined = (logits * weights.to(logits.device).unsqueeze(1)).sum(0)
        with_bn = [i for i, k in enumerate(answered) if self.descriptions[k].has_feature_statistics]
        loss = losses[with_bn].mean() if bn_loss and with_bn else None
        return EnsembleOutput(combined, loss, answered, list(logits.unbind(0)))

