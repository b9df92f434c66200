"""How the answers of many teachers become one ensemble signal: aggregators behind a registry.

Every aggregator maps the logits of the K' teachers that answered a query,
(K', B, C), to one (B, C) tensor of ensemble logits, with plain torch
operations, so the gradient of any loss on the ensemble reaches each teacher's
logits (and, through the Backward queries, the inputs). Aggregators that work
in probability space return log-probabilities, which are valid logits:
``softmax(log p) = p``.

- ``logit-mean``: mean of the logits (the classic ensemble; scale-sensitive).
- ``prob-mean``: log of the mean of the teachers' probabilities.
- ``class-weighted``: FedFTG's target (docs/robustness.md, "The ensemble"),
  p(c | x) proportional to sum_k w[k, c] p_k(c | x) with w[k, c] = n_k(c) / sum_j n_j(c):
  each class is answered by the teachers that saw it, in proportion to how
  much of it they saw. Needs the label counts clients choose to share; a client
  that declines counts as having seen every class equally often
  (n_k(c) = n_k / C, or 1 when it shares no sample count either).
- ``class-weighted-logits``: the same weights applied to logits.
- ``confidence``: per-sample weights softmax_k(-H(p_k(x))): a teacher counts
  more on the inputs it is sure about (needs no counts).
- ``median``: the coordinate-wise median of the teachers' probabilities
  (renormalised): one teacher, however wrong or confident, cannot move it past
  the others.
- ``trimmed-mean``: per coordinate, the mean of the probabilities left after
  dropping the highest and lowest fifth of the teachers (at least one each
  way; the median when fewer than three would remain).

Per-teacher weights (label counts, and the reliability estimate of
``fedkd.coordinator.robustness``) reach the aggregators as a (K', C) matrix whose columns
sum to 1; the order statistics (median, trimmed mean) take no weights: an
unreliable teacher is left out of them instead. Teachers with an "unknown"
output (``teacher-recipe=open-set``) add a per-input factor, each teacher's
1 - p(unknown | x) (:func:`competence`): the weights become (K', B, C), and
the aggregators that work in probability space (prob-mean, class-weighted,
confidence) sum each teacher's probabilities scaled by it, FedOV's soft vote
(``utils.py`` ``compute_accuracy_vote_soft``) weighted like any other vote.
- ``auto`` (a config value, not an aggregator): ``class-weighted`` when at
  least one client shares its label counts, else ``prob-mean``.

Measured on MNIST-5k, 5 LeNet-5 teachers, 1,000 held-out images (docs/robustness.md, "The
ensemble"): Dirichlet(0.5) logit-mean 0.936, prob-mean 0.965, class-weighted
0.975; Dirichlet(0.1) 0.632 / 0.637 / 0.959; IID all 0.977-0.978.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LabelCounts = Sequence[int] | None


@dataclass(frozen=True)
class Aggregator:
    """A named way of combining teachers' logits; ``needs_counts`` when it uses label histograms."""

    name: str
    combine: Callable[[Tensor, Tensor | None], Tensor]  # (logits (K', B, C), weights (K', C) | None) -> (B, C)
    needs_counts: bool = False
    description: str = ""
    takes_weights: bool = True  # False: an order statistic; unreliable members are left out instead
    takes_competence: bool = False  # sums probabilities, so a per-input weight (1 - p(unknown)) scales each vote


def class_weights(counts: Sequence[LabelCounts], num_classes: int, num_samples: Sequence[int | None] | None = None
                  ) -> Tensor:
    """(K, C) weights w[k, c] = n_k(c) / sum_j n_j(c): each column sums to 1 over the teachers.

    A teacher whose counts are None (declined) is treated as uniform over the
    classes, with its sample count when it shares one (else one sample per class).
    """
    return column_shares(claimed_counts(counts, num_classes, num_samples))


def column_shares(n: Tensor) -> Tensor:
    """(K, C) each teacher's share of each class's claimed records ``n`` (K, C): columns sum to 1."""
    column = n.sum(0, keepdim=True)
    # A class no teacher saw: every teacher speaks for it equally.
    return torch.where(column > 0, n / column.clamp_min(1e-12), torch.full_like(n, 1.0 / len(n)))


def unseen_share(n: Tensor) -> float:
    """How much of the federation never saw each class, from the records each teacher claims per class ``n``
    (K, C): the share of (teacher, class) pairs, over the classes anyone holds, where the teacher holds none. A
    teacher that never saw a class answers its inputs confidently with a class of its own, which no weighing of
    the answers undoes and the density gate does. A pathological split of ``classes-per-client`` of C classes
    gives 1 - classes-per-client / C (0.8 for 2 of 10), Dirichlet(0.1) over 5-20 clients 0.18-0.57, Dirichlet(0.5)
    at most 0.12, IID 0 (MNIST-5k and Fashion-MNIST, seeds 0-4; docs/robustness.md)."""
    held = n.sum(0) > 0
    if not bool(held.any()):
        return 0.0
    return float((n[:, held] <= 0).double().mean())


def claimed_counts(counts: Sequence[LabelCounts], num_classes: int,
                   num_samples: Sequence[int | None] | None = None) -> Tensor:
    """(K, C) the records each teacher claims per class, as :func:`class_weights` weighs them (a teacher that
    declined counted uniform over its samples)."""
    rows = []
    for k, row in enumerate(counts):
        if row is None or sum(row) == 0:
            total = (num_samples[k] if num_samples is not None else None) or num_classes
            rows.append(torch.full((num_classes,), float(total) / num_classes))
        else:
            if len(row) != num_classes:
                raise ValueError(f"teacher {k}: label histogram has {len(row)} classes, expected {num_classes}")
            if any(c < 0 for c in row):
                raise ValueError(f"teacher {k}: label histogram has negative counts")
            rows.append(torch.tensor([float(c) for c in row]))
    return torch.stack(rows)


def competence(logits: Tensor, num_classes: int, has_unknown: Tensor, has_density: Tensor | None = None, *,
               sharpness: float = 4.0, kept: Tensor | None = None) -> Tensor:
    """(K', B) per-input weights from (K', B, C + 1) logits: 1 - p(unknown | x) for the teachers with an unknown
    output (``has_unknown`` (K',) bool), the density gate (:func:`density_gate`) for the teachers whose last
    column is a log-density (``has_density``), 1 for the others (their last column is ignored)."""
    known = torch.logsumexp(logits[..., :num_classes], -1)
    gate = torch.sigmoid(known - logits[..., num_classes])  # = 1 - softmax(logits)[..., C]
    gate = torch.where(has_unknown.view(-1, 1), gate, torch.ones_like(gate))
    if has_density is not None and bool(has_density.any()):
        rows = has_density.nonzero().flatten()
        part = density_gate(logits[rows, :, num_classes], sharpness=sharpness,
                            kept=None if kept is None else kept[rows])
        gate = gate.index_copy(0, rows, part.to(gate.dtype))
    return gate


def density_gate(log_density: Tensor, *, sharpness: float = 4.0, kept: Tensor | None = None) -> Tensor:
    """(M, B) weights of M teachers from their inputs' log-densities per input value (M, B) under their own data
    (``teacher-density=on``): M x the posterior p(teacher | x) = softmax over the teachers of ``sharpness`` x the
    log-density. Teachers not ``kept`` ((M,) bool: the reliability estimate left them out) take no share of the
    posterior, so that a distrusted teacher cannot empty everyone else's by claiming every input. The weights
    average 1 over the teachers, as ungated answers' would.

    ``sharpness`` tempers Bayes' rule: at the number of input values it is the exact posterior of the clients'
    mixture, which pixel densities make overconfident (their values are not independent); measured on MNIST-5k and
    Fashion-MNIST (docs/robustness.md), 4 keeps pathological splits' routing and costs the least on Dirichlet
    ones."""
    scores = sharpness * log_density.double()
    if kept is not None:
        scores = torch.where(kept.view(-1, 1), scores, torch.full_like(scores, -math.inf))
    left = torch.isinf(scores).all(0, keepdim=True)  # every teacher left out: no share to give
    scores = torch.where(left, torch.zeros_like(scores), scores)
    return (len(log_density) * torch.softmax(scores, 0)).to(log_density.dtype)


def _per_input(weights: Tensor) -> Tensor:
    """Weights (K', C) or per input (K', B, C), broadcastable against (K', B, C) probabilities."""
    return weights.unsqueeze(1) if weights.dim() == 2 else weights


def _log_normalise(p: Tensor) -> Tensor:
    """log of p normalised over the last dimension, safe at p = 0."""
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.log(p.clamp_min(1e-30))


def _logit_mean(logits: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return logits.mean(0)
    return (logits * _per_input(weights)).sum(0)


def _prob_mean(logits: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return _log_normalise(F.softmax(logits, -1).mean(0))
    return _log_normalise((F.softmax(logits, -1) * _per_input(weights)).sum(0))


def _class_weighted(logits: Tensor, weights: Tensor | None) -> Tensor:
    assert weights is not None
    return _log_normalise((F.softmax(logits, -1) * _per_input(weights)).sum(0))  # (B, C)


def _class_weighted_logits(logits: Tensor, weights: Tensor | None) -> Tensor:
    assert weights is not None
    return (logits * _per_input(weights)).sum(0)


def _confidence(logits: Tensor, weights: Tensor | None) -> Tensor:
    p = F.softmax(logits, -1)  # (K', B, C)
    entropy = -(p * F.log_softmax(logits, -1)).sum(-1)  # (K', B)
    w = F.softmax(-entropy, 0).unsqueeze(-1)  # (K', B, 1)
    if weights is not None:  # per-teacher weights (the class-mean of each row) scale the per-sample ones
        mean = weights.mean(-1)  # (K',) or, with competence, (K', B)
        w = w * (mean.view(-1, 1, 1) if mean.dim() == 1 else mean.unsqueeze(-1))
        if weights.dim() == 2:
            w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    return _log_normalise((w * p).sum(0))


def median_of(values: Tensor) -> Tensor:
    """The median over the first dimension (the mean of the two middle values when it is even)."""
    k = values.shape[0]
    ordered = values.sort(0).values
    return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def _median(logits: Tensor, weights: Tensor | None) -> Tensor:
    return _log_normalise(median_of(F.softmax(logits, -1)))


def _trimmed_mean(logits: Tensor, weights: Tensor | None) -> Tensor:
    k = logits.shape[0]
    trim = max(1, k // 5)
    if k - 2 * trim < 1 or k < 3:
        return _median(logits, weights)
    ordered = F.softmax(logits, -1).sort(0).values
    return _log_normalise(ordered[trim:k - trim].mean(0))


AGGREGATORS: dict[str, Aggregator] = {a.name: a for a in (
    Aggregator("logit-mean", _logit_mean, description="mean of the teachers' logits"),
    Aggregator("prob-mean", _prob_mean, takes_competence=True, description="mean of the teachers' probabilities"),
    Aggregator("class-weighted", _class_weighted, needs_counts=True, takes_competence=True,
               description="probabilities weighted per class by the teachers' label counts (FedFTG)"),
    Aggregator("class-weighted-logits", _class_weighted_logits, needs_counts=True,
               description="logits weighted per class by the teachers' label counts"),
    Aggregator("confidence", _confidence, takes_competence=True,
               description="probabilities weighted per sample by low entropy"),
    Aggregator("median", _median, takes_weights=False,
               description="coordinate-wise median of the teachers' probabilities"),
    Aggregator("trimmed-mean", _trimmed_mean, takes_weights=False,
               description="coordinate-wise mean of the probabilities without the highest and lowest fifth"),
)}

ENSEMBLE_CHOICES = ("auto", *AGGREGATORS)


def get_aggregator(name: str) -> Aggregator:
    """The aggregator called ``name``; a wrong name fails with the list of valid ones."""
    if name not in AGGREGATORS:
        raise KeyError(f"unknown ensemble aggregator {name!r}; valid: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]


def resolve_aggregator(name: str, counts: Sequence[LabelCounts],
                       clients: Sequence[int] | None = None) -> Aggregator:
    """Resolve ``auto`` and check that a counts-based aggregator has counts to work with.

    Raises ValueError naming the clients when none of them shares its label counts.
    """
    if name == "auto":
        return AGGREGATORS["class-weighted" if any(c is not None for c in counts) else "prob-mean"]
    aggregator = get_aggregator(name)
    if aggregator.needs_counts and all(c is None for c in counts):
        names = ", ".join(str(k) for k in (clients or range(len(counts))))
        raise ValueError(f"ensemble={name} needs the label counts of the clients, and none of them shares them "
                         f"(clients {names} declined or use DP); use ensemble=prob-mean or ensemble=auto")
    return aggregator
