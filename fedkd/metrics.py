"""Evaluation: accuracy, fidelity to the ensemble, robustness over training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.ensemble import Ensemble
from fedkd.losses import js_distance
from fedkd.teacher import CurriculumState


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Agreement@1: share of inputs where argmax S == argmax T."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


def loyalty(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Probability loyalty L_p = mean_i (1 - sqrt(d_JS(p_S(x_i), p_T(x_i)))), d_JS the JS distance."""
    d = js_distance(F.softmax(student_logits.double(), 1), F.softmax(teacher_logits.double(), 1))
    return float((1.0 - torch.sqrt(d)).mean())


def mean_and_variance(values: list[float]) -> tuple[float, float]:
    """Mean and (population) variance, in the units given (the paper reports % and %^2)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.var(unbiased=False)) if len(values) > 1 else 0.0


@torch.no_grad()
@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, *, batch_size: int = 512,
            device: torch.device | str = "cpu") -> Tensor:
    """Logits of a local model over normalised inputs, in batches, in eval mode, without autograd."""
    was_training = model.training
    model.eval()
    out = [model(inputs[i:i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class EnsembleAnswers:
    """The teachers' and the ensemble's logits on the test set, queried once through the hosts."""

    ensemble: Tensor  # (N, C)
    members: list[Tensor]  # K x (N, C)


@torch.no_grad()
def query_ensemble(ensemble: Ensemble, inputs: Tensor, *, batch_size: int) -> EnsembleAnswers:
    state = CurriculumState()
    outs = [ensemble(inputs[i:i + batch_size], state, require_all=True) for i in range(0, len(inputs), batch_size)]
    members = [torch.cat([o.member_logits[k] for o in outs]) for k in range(len(ensemble))]
    return EnsembleAnswers(torch.cat([o.logits for o in outs]), members)


class MetricAverager:
    """Running means of named scalars over an epoch (each key averaged over the records that have it)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, record: dict[str, float]) -> None:
        for key, value in record.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.totals[k] / self.counts[k] for k in self.totals}
