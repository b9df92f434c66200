"""Membership-inference attacks, to measure what a model's answers reveal about the records it was trained on.

An audit, not a proof: the attacks here give a lower bound on leakage, the
epsilon a client's ledger reports an upper bound. :func:`dp_tpr_bound` is the
highest true-positive rate any attack can reach at a given false-positive rate
against an (epsilon, delta)-DP mechanism (Kairouz et al. 2015), so an attack
that beats it means the guarantee or its accounting is wrong.

- :func:`loss_scores`: the loss-threshold attack (Yeom et al. 2018): the lower
  a record's loss, the likelier it was trained on.
- :func:`lira_offline_scores`: LiRA's offline variant (Carlini et al. 2022):
  shadow models trained without the candidates give, per candidate, the
  distribution of its logit-scaled confidence when it is not a member; the
  score is how far above that distribution the target puts it (one-sided
  Gaussian test, per-example mean, variance per example or global).
- :func:`attack_metrics`: ROC AUC and the true-positive rate at fixed
  false-positive rates (0.1 % and 1 %), read off the ROC curve.

Every function takes model answers (logits), not models, so the same attack
runs against a teacher through its host (the coordinator sending the records
as queries, under the client's release policy) and against the student
(``fedkd.metrics.predict``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor

FPRS = (0.001, 0.01)  # the false-positive rates an audit reports the true-positive rate at


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"logits (N, C) and labels (N,) must describe the same N records; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")


def loss_scores(logits: Tensor, labels: Tensor) -> np.ndarray:
    """The loss-threshold attack's score per record: minus the cross-entropy (higher: likelier a member)."""
    _check(logits, labels)
    return (-F.cross_entropy(logits.double(), labels.long(), reduction="none")).numpy()


def scaled_confidence(logits: Tensor, labels: Tensor) -> np.ndarray:
    """LiRA's statistic: log(p_y / (1 - p_y)), computed stably as z_y - logsumexp_{c != y} z_c."""
    _check(logits, labels)
    z = logits.double()
    own = z.gather(1, labels.long()[:, None]).squeeze(1)
    others = z.scatter(1, labels.long()[:, None], float("-inf")).logsumexp(1)
    return (own - others).numpy()


def lira_offline_scores(target: np.ndarray, shadows: Sequence[np.ndarray], *,
                        global_variance: bool = True) -> np.ndarray:
    """LiRA, offline: ``target`` is each candidate's scaled confidence under the attacked model, ``shadows`` the
    same under each OUT shadow model (trained without any candidate). Returns log Pr[phi_out < target], the
    one-sided test's statistic (higher: likelier a member). With few shadows the variance is pooled over the
    candidates (``global_variance``), as the paper advises."""
    if len(shadows) < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {len(shadows)}")
    from scipy.stats import norm

    out = np.stack([np.asarray(s, dtype=np.float64) for s in shadows])
    if out.shape[1:] != np.shape(target):
        raise ValueError(f"shadow statistics {out.shape[1:]} and target statistics {np.shape(target)} differ")
    mean = out.mean(0)
    std = np.full_like(mean, out.std(0, ddof=1).mean()) if global_variance else out.std(0, ddof=1)
    return norm.logcdf((np.asarray(target, dtype=np.float64) - mean) / np.maximum(std, 1e-6))


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                   fprs: Sequence[float] = FPRS) -> dict[str, float]:
    """AUC and, per false-positive rate, the highest true-positive rate at or below it (members are positive)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members, nonmembers = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("an audit needs members and non-members")
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    s = np.r_[members, nonmembers]
    fpr, tpr, _ = roc_curve(y, s)
    out = {"auc": float(roc_auc_score(y, s)), "members": float(len(members)), "nonmembers": float(len(nonmembers))}
    for rate in fprs:
        out[f"tpr_at_{rate:g}"] = float(tpr[fpr <= rate].max()) if (fpr <= rate).any() else 0.0
    return out


def dp_tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    """The highest true-positive rate any membership test can reach at false-positive rate ``fpr`` against an
    (epsilon, delta)-DP mechanism: min(e^eps fpr + delta, 1 - e^-eps (1 - delta - fpr)), at most 1."""
    if epsilon is None or not math.isfinite(epsilon):
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)))

