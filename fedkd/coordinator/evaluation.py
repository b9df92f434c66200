"""The student judged against its ensemble: Agreement@1, probability loyalty, the ensemble's test answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import QueryContext
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.losses import js_distance


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Agreement@1: share of inputs where argmax S == argmax T."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


def loyalty(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Probability loyalty L_p = mean_i (1 - sqrt(d_JS(p_S(x_i), p_T(x_i)))), d_JS the JS distance."""
    d = js_distance(F.softmax(student_logits.double(), 1), F.softmax(teacher_logits.double(), 1))
    return float((1.0 - torch.sqrt(d)).mean())


@dataclass(frozen=True)
class EnsembleAnswers:
    """The teachers' and the ensemble's logits on the test set, queried once through the hosts."""

    ensemble: Tensor  # (N, C)
    members: list[Tensor]  # K x (N, C)


@torch.no_grad()
def query_ensemble(ensemble: Ensemble, inputs: Tensor, *, batch_size: int,
                   state: QueryContext | None = None) -> EnsembleAnswers:
    """Every teacher's answers and the ensemble's on ``inputs`` (all must answer), asked to evaluate unless
    ``state`` says otherwise."""
    state = state or QueryContext(purpose="evaluate")
    outs = [ensemble(inputs[i:i + batch_size], state, require_all=True) for i in range(0, len(inputs), batch_size)]
    members = [torch.cat([o.member_logits[k] for o in outs]) for k in range(len(ensemble))]
    return EnsembleAnswers(torch.cat([o.logits for o in outs]), members)
