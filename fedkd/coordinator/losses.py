"""Distillation and generator losses, each with the equation it implements.

Notation as in docs/methods.md: p^tau = softmax(logits / tau), B the batch, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_balance_entropy(teacher_logits: Tensor) -> Tensor:
    """H(mean_i p_T(x_i)): entropy of the batch-mean teacher distribution (CuDFKD L_G, first term).

    The generator *maximises* it (weight -w_ent), so the batch covers all classes.
    """
    mean_prob = F.softmax(teacher_logits, dim=1).mean(0)  # (C,)
    return -(mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum()


def onehot_loss(teacher_logits: Tensor) -> Tensor:
    """CE(T(x), argmax T(x)): rewards samples the teacher classifies confidently."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1))


def known_loss(competence: Tensor) -> Tensor:
    """-mean_i log max_k g_k(x_i), ``competence`` (K', B) each teacher's 1 - p(unknown | x_i): rewards samples
    that some teacher calls its own (open-set teachers; 0 where a closed teacher answers, whose g is 1)."""
    return -torch.log(competence.max(0).values.clamp_min(1e-6)).mean()


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """tau^2 * KL(p_T^tau || p_S^tau) for each sample, shape (B,)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)


def l1_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """||S(x) - T(x)||_1 / C for each sample, shape (B,) (the R34->R18 student loss)."""
    return (student_logits - teacher_logits).abs().mean(1)


def distillation_per_sample(student_logits: Tensor, teacher_logits: Tensor, kind: str,
                            temperature: float = 1.0) -> Tensor:
    """Per-sample student loss l_i used by the self-paced weights: ``l1`` or ``kl``."""
    if kind == "l1":
        return l1_per_sample(student_logits, teacher_logits)
    if kind == "kl":
        return kl_per_sample(student_logits, teacher_logits, temperature)
    raise KeyError(f"unknown student loss {kind!r}; valid: l1, kl")


def adversarial_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """L_adv = -tau_a^2 * mean_i KL(p_T^tau_a || p_S^tau_a): the generator seeks disagreement."""
    return -kl_per_sample(student_logits, teacher_logits, temperature).mean()


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (natural log) between rows of two probability matrices, (B,).

    Matches ``scipy.spatial.distance.jensenshannon``: sqrt of the JS divergence.
    """
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))),
                           torch.zeros_like(a)).sum(1)

    return torch.sqrt((0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0.0))


def js_divergence_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """JS(p_S^tau || p_T^tau) per sample (natural log, in [0, log 2]), shape (B,): TA-DFKD's and ADI's
    disagreement between student and teacher."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl_pm = (p * (p.clamp_min(1e-12).log() - m.log())).sum(1)
    kl_qm = (q * (q.clamp_min(1e-12).log() - m.log())).sum(1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def total_variation(images: Tensor, p: int = 2) -> Tensor:
    """DeepInversion's image prior: the ``p``-norm of the differences between neighbouring pixels (the four
    directions of ``get_image_prior_losses``), summed, over the batch."""
    diffs = [images[:, :, :, :-1] - images[:, :, :, 1:], images[:, :, :-1, :] - images[:, :, 1:, :],
             images[:, :, 1:, :-1] - images[:, :, :-1, 1:], images[:, :, :-1, :-1] - images[:, :, 1:, 1:]]
    if p == 1:
        return sum((d.abs().mean() for d in diffs), torch.zeros((), device=images.device))
    return sum((torch.norm(d) for d in diffs), torch.zeros((), device=images.device))


def mean_prediction_negentropy(teacher_logits: Tensor) -> Tensor:
    """sum_c pbar_c log pbar_c, pbar = mean_i softmax T(x_i) (DAFL's L_ie, RDSKD's L_ie): minimised, the batch
    covers the classes evenly. (= -class_balance_entropy.)"""
    return -class_balance_entropy(teacher_logits)
