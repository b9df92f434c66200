"""Combining many teachers' answers into one ensemble signal.

- ``mean``: the average of the teachers' logits.
- ``class-weighted``: teacher k's logit for class c is weighted by its share of
  the class-c training samples, w[k, c] = h[k, c] / sum_k h[k, c], where h[k] is
  teacher k's normalised label histogram. Clients may decline to share counts:
  a decliner counts as a uniform histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedkd.remote import RemoteTeacher
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
    bn_loss: Tensor | None  # mean over teachers that have feature statistics
    member_logits: list[Tensor]


class Ensemble:
    """Queries every teacher with the same inputs and combines their logits."""

    def __init__(self, teachers: Sequence[RemoteTeacher], aggregation: str = "mean") -> None:
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher")
        if aggregation not in AGGREGATIONS:
            raise KeyError(f"unknown ensemble aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        self.teachers = list(teachers)
        classes = {t.description.num_classes for t in self.teachers}
        shapes = {t.description.input_shape for t in self.teachers}
        if len(classes) != 1 or len(shapes) != 1:
            raise ValueError(f"teachers disagree on classes {classes} or input shape {shapes}")
        self.num_classes = classes.pop()
        self.aggregation = aggregation
        self.weights: Tensor | None = None
        if aggregation == "class-weighted":
            self.weights = class_weights([t.description.label_counts for t in self.teachers], self.num_classes)

    @property
    def has_feature_statistics(self) -> bool:
        return any(t.has_feature_statistics for t in self.teachers)

    def __call__(self, inputs: Tensor, state: CurriculumState, *, bn_loss: bool = False) -> EnsembleOutput:
        answers = [t(inputs, state, bn_loss=bn_loss) for t in self.teachers]
        logits = torch.stack([a[0] for a in answers])  # (K, B, C)
        if self.weights is None:
            combined = logits.mean(0)
        else:
            combined = (logits * self.weights.to(logits.device).unsqueeze(1)).sum(0)
        losses = [a[1] for a in answers if a[1] is not None]
        loss = torch.stack(losses).mean() if losses else None
        return EnsembleOutput(combined, loss, [a[0] for a in answers])
