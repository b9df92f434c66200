"""What the coordinator does about a teacher that answers wrong on purpose (or is broken).

Threat: one institution's teacher answers confidently wrong (a fixed class with a large logit, random logits,
absurd scales) and claims a large balanced label histogram, so that class weighting trusts it most. Nothing
about a single answer says it is wrong; what does is that the teacher disagrees with the others systematically.

- :class:`Reliability`: for every Forward the ensemble makes, each answering teacher's top-1 answer is compared
  with the leave-one-out consensus (coordinate-wise median of the other teachers' probabilities); an exponential
  moving average of that agreement rate is kept per teacher. A teacher whose agreement above chance is at least
  ``tolerance`` times the median teacher's keeps full weight; below that its weight falls linearly to 0 at
  chance level, and a weight under 0.5 is cut to 0 (the teacher is left out). The weight multiplies whatever
  weights the aggregator uses (label counts included: a claimed histogram of any size does not buy trust back);
  order-statistic aggregators leave a teacher with weight 0 out. On honest
  federations every teacher keeps weight 1 (measured: docs/robustness.md); in a pathological split, where
  honest teachers legitimately disagree, the comparison is relative to the median teacher, not absolute.
- :func:`capped_counts`: no client's claimed label counts weigh more than 4x the median client's total.
- :class:`AnswerBounds`: logits are clipped to +-``logit_bound`` (a softmax is saturated long before; this only
  stops an absurd scale from owning a logit average); per sample, a teacher's input gradient is clipped to
  ``gradient_bound`` times the median norm of the teachers' gradients for that sample (when at least three answered:
  no absolute scale is needed).

Both count what they did per teacher; the summary reports it (``ensemble.teachers``) and a down-weighted teacher
is logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import TeacherDescription
from fedkd.coordinator.aggregation import median_of

logger = logging.getLogger(__name__)
CUT = 0.5  # a reliability below this leaves the teacher out of the ensemble


class Reliability:
    """Per-teacher agreement with the leave-one-out consensus, and the weight it earns."""

    def __init__(self, teachers: int, num_classes: int, *, decay: float = 0.9, tolerance: float = 0.5,
                 enabled: bool = True) -> None:
        self.teachers, self.num_classes = teachers, num_classes
        self.decay, self.tolerance, self.enabled = decay, tolerance, enabled
        self.agreement = torch.zeros(teachers)
        self.batches = torch.zeros(teachers, dtype=torch.long)
        # Per class c: overlap of the samples the teacher calls c with those the others' consensus calls c.
        self.class_agreement = torch.zeros(teachers, num_classes)
        self.class_seen = torch.zeros(teachers, num_classes, dtype=torch.bool)
        self._warned: set[int] = set()

    @torch.no_grad()
    def update(self, members: list[int], logits: Tensor) -> None:
        """Account one answered batch: ``logits`` (K', B, C) of ``members``."""
        if not self.enabled or len(members) < 3:  # two teachers cannot outvote each other
            return
        p = F.softmax(logits.detach().float().cpu(), -1)
        votes = p.argmax(-1)  # (K', B)
        for i, k in enumerate(members):
            others = torch.cat([p[:i], p[i + 1:]])
            consensus = median_of(others).argmax(-1)  # (B,)
            agrees = (votes[i] == consensus).float()
            self.agreement[k] = self._ema(self.agreement[k], agrees.mean(), self.batches[k] == 0)
            self.batches[k] += 1
            # Per class, the overlap (intersection over union) of "the teacher says c" and "the others say c":
            # a teacher that says c everywhere (recall 1, precision low) scores as low as one that never does.
            count = torch.bincount(consensus, minlength=self.num_classes).float()
            said = torch.bincount(votes[i], minlength=self.num_classes).float()
            hits = torch.bincount(consensus, weights=agrees, minlength=self.num_classes)
            present = count > 0
            per_class = hits / (count + said - hits).clamp_min(1)
            updated = self._ema(self.class_agreement[k], per_class, ~self.class_seen[k])
            self.class_agreement[k] = torch.where(present, updated, self.class_agreement[k])
            self.class_seen[k] |= present
        self._log_changes()

    def _ema(self, current: Tensor, value: Tensor, first: Tensor) -> Tensor:
        """The moving average after ``value``; ``value`` itself where ``first``."""
        return torch.where(first, value, self.decay * current + (1 - self.decay) * value)

    def weights(self) -> Tensor:
        """(K,) weights in [0, 1]: 1 for every teacher until there is evidence."""
        seen = self.batches > 0
        if not self.enabled or int(seen.sum()) < 3:
            return torch.ones(self.teachers)
        chance = 1.0 / self.num_classes
        typical = float(self.agreement[seen].median()) - chance
        if typical <= 0.05:  # the teachers hardly agree at all: no basis for singling one out
            return torch.ones(self.teachers)
        w = ((self.agreement - chance) / (self.tolerance * typical)).clamp(0.0, 1.0)
        # Below half weight a teacher is out altogether: a distrusted teacher's claimed label counts (any size)
        # must not buy back what its disagreement lost.
        w = torch.where(w < CUT, torch.zeros_like(w), w)
        return torch.where(seen, w, torch.ones_like(w))

    def class_weights(self) -> Tensor:
        """(K, C) factors in [0, 1] for the label-count weights: a teacher's claim to speak for class c is
        honoured in proportion to how well the inputs it calls c match those the others' consensus calls c
        (intersection over union), relative to the teacher best at c (full weight at ``tolerance`` of the best
        above chance). A claimed histogram is thus checked
        class by class against the answers; an honest teacher loses weight only on classes it barely saw, where
        its counts gave it little weight anyway."""
        if not self.enabled or int((self.batches > 0).sum()) < 3:
            return torch.ones(self.teachers, self.num_classes)
        chance = 1.0 / self.num_classes
        best = (self.class_agreement * self.class_seen).max(0).values - chance  # (C,)
        r = ((self.class_agreement - chance) / (self.tolerance * best.clamp_min(1e-6))).clamp(0.0, 1.0)
        informative = (best > 0.05).unsqueeze(0) & self.class_seen
        return torch.where(informative, r, torch.ones_like(r))

    def _log_changes(self) -> None:
        w = self.weights()
        for k in range(self.teachers):
            if w[k] < CUT and k not in self._warned:
                self._warned.add(k)
                logger.warning("teacher %d is left out of the ensemble (weight %.2f): it agrees with the others on "
                               "%.0f%% of the queries (the median teacher: %.0f%%)", k, float(w[k]),
                               100 * float(self.agreement[k]),
                               100 * float(self.agreement[self.batches > 0].median()))
            elif w[k] >= CUT and k in self._warned:
                self._warned.discard(k)
                logger.warning("teacher %d is trusted again (weight %.2f)", k, float(w[k]))

    def state_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement.clone(), "batches": self.batches.clone(), "warned": sorted(self._warned),
                "class_agreement": self.class_agreement.clone(), "class_seen": self.class_seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agreement = state["agreement"].clone().float()
        self.batches = state["batches"].clone().long()
        self._warned = {int(k) for k in state["warned"]}
        self.class_agreement = state["class_agreement"].clone().float()
        self.class_seen = state["class_seen"].clone().bool()


# No client's claimed label counts weigh more than this many times the median client's total (robust default).
MAX_COUNT_RATIO = 4.0


def capped_counts(descriptions: Sequence[TeacherDescription], *, enabled: bool = True) -> tuple[list[Any], list[float]]:
    """The clients' label counts, each scaled down so that its total is at most MAX_COUNT_RATIO x the median
    total of the clients that share counts (when at least three do): a claimed histogram is unverifiable, and
    an inflated one would otherwise buy a teacher the whole say on every class. Returns (counts, scale each)."""
    counts = [d.label_counts for d in descriptions]
    totals = [sum(c) for c in counts if c is not None and sum(c) > 0]
    scales = [1.0] * len(counts)
    if not enabled or len(totals) < 3:
        return counts, scales
    limit = MAX_COUNT_RATIO * float(torch.tensor(totals, dtype=torch.float64).median())
    out: list[Any] = []
    for k, c in enumerate(counts):
        if c is not None and sum(c) > limit:
            scales[k] = limit / sum(c)
            out.append([v * scales[k] for v in c])
        else:
            out.append(c)
    return out, scales


@dataclass
class AnswerBounds:
    """Clip the absurd: logit magnitude, and per-sample input-gradient norms relative to the other teachers."""

    logit_bound: float = 100.0
    gradient_bound: float = 10.0

    def __post_init__(self) -> None:
        self.clipped_logits: dict[int, int] = {}  # teacher -> answers (samples) with a logit clipped
        self.clipped_gradients: dict[int, int] = {}  # teacher -> samples with the gradient clipped

    def logits(self, members: list[int], logits: Tensor) -> Tensor:
        """(K', B, C) logits clipped to +-logit_bound; counts the samples touched per teacher."""
        over = (logits.abs() > self.logit_bound).any(-1)  # (K', B)
        if bool(over.any()):
            for i, k in enumerate(members):
                n = int(over[i].sum())
                if n:
                    self.clipped_logits[k] = self.clipped_logits.get(k, 0) + n
            return logits.clamp(-self.logit_bound, self.logit_bound)
        return logits

    def gradients(self, grads: dict[int, Tensor]) -> dict[int, Tensor]:
        """Each teacher's (B, ...) input gradient with per-sample norms at most gradient_bound x the median."""
        if len(grads) < 3:
            return grads
        keys = sorted(grads)
        norms = torch.stack([grads[k].flatten(1).norm(dim=1) for k in keys])  # (K', B)
        limit = self.gradient_bound * median_of(norms)  # (B,)
        out = {}
        for i, k in enumerate(keys):
            over = norms[i] > limit
            if bool(over.any()):
                scale = torch.where(over, limit / norms[i].clamp_min(1e-30), torch.ones_like(limit))
                out[k] = grads[k] * scale.view(-1, *([1] * (grads[k].dim() - 1)))
                self.clipped_gradients[k] = self.clipped_gradients.get(k, 0) + int(over.sum())
            else:
                out[k] = grads[k]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"clipped_logits": dict(self.clipped_logits), "clipped_gradients": dict(self.clipped_gradients)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped_logits = {int(k): int(v) for k, v in state["clipped_logits"].items()}
        self.clipped_gradients = {int(k): int(v) for k, v in state["clipped_gradients"].items()}
