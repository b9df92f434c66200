"""The student judged against its ensemble (Agreement@1, probability loyalty, the ensemble's test answers) and
by the institutions on their own held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.contract import QueryContext, StudentToEvaluate
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.losses import js_distance
from fedkd.coordinator.pool import TeacherPool
from fedkd.models import is_code_spec


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
    competence: Tensor | None = None  # (K, N): 1 - p(unknown), when some teacher has an unknown output

    def recombined(self, ensemble: Ensemble) -> EnsembleAnswers:
        """The same members' answers combined with the ensemble's weights as they are now (no query): the ensemble
        as the method sees it at this point of the run."""
        combined = ensemble.combine(torch.stack(self.members), range(len(self.members)), self.competence)
        return EnsembleAnswers(combined, self.members, self.competence)


@torch.no_grad()
def query_ensemble(ensemble: Ensemble, inputs: Tensor, *, batch_size: int,
                   state: QueryContext | None = None) -> EnsembleAnswers:
    """Every teacher's answers and the ensemble's on ``inputs`` (all must answer), asked to evaluate unless
    ``state`` says otherwise."""
    state = state or QueryContext(purpose="evaluate")
    outs = [ensemble(inputs[i:i + batch_size], state, require_all=True) for i in range(0, len(inputs), batch_size)]
    members = [torch.cat([o.member_logits[k] for o in outs]) for k in range(len(ensemble))]
    gates = [o.competence for o in outs]
    competence = torch.cat([g for g in gates if g is not None], 1) if all(g is not None for g in gates) else None
    return EnsembleAnswers(torch.cat([o.logits for o in outs]), members, competence)


def evaluate_at_institutions(pool: TeacherPool, student: nn.Module, *, model: str, args: dict[str, Any],
                             method: str) -> dict[str, Any] | None:
    """The student evaluated by each institution that offers it (``fedkd teacher --eval-data``) on held-out data of
    its own, the counts released through its ledger: the summary's ``federated_evaluation`` (accuracy weighted by
    the examples each reports, and one row per institution, a refusal included), or None when none offers.

    The student travels as ``model`` (a fedkd model name or ``torchvision:NAME``) and its state dict; a student of
    the coordinator's own code is not sent (no institution imports code the coordinator names)."""
    offering = [k for k, d in enumerate(pool.descriptions) if d.evaluates_student]
    if not offering:
        return None
    if is_code_spec(model):
        why = (f"not asked: the student {model!r} is built by the coordinator's own code, which no institution "
               "imports")
        return {"student_accuracy": None, "num_examples": 0, "noised": False,
                "clients": [{"client": k, "evaluated": False, "why": why} for k in offering]}
    weights = {name: t.detach().cpu() for name, t in student.state_dict().items()}
    answers = pool.evaluate_student(StudentToEvaluate(model, dict(args), weights),
                                    QueryContext(purpose="evaluate", method=method))
    rows: list[dict[str, Any]] = []
    for k in offering:
        answer = answers.get(k, "did not answer")
        if isinstance(answer, str):
            rows.append({"client": k, "evaluated": False, "why": answer})
        else:
            rows.append({"client": k, "evaluated": True, "accuracy": answer.accuracy,
                         "num-examples": answer.examples, "epsilon": answer.epsilon})
    counted = [(r["accuracy"], r["num-examples"]) for r in rows if r["evaluated"] and r["num-examples"] > 0]
    total = sum(n for _, n in counted)
    return {"student_accuracy": sum(a * n for a, n in counted) / total if total else None, "num_examples": total,
            "noised": any(r.get("epsilon") for r in rows), "clients": rows}
