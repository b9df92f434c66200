"""Combining many teachers' answers into one ensemble signal, as one autograd function.

How the answers are combined is an :class:`~fedkd.coordinator.aggregation.Aggregator`
(``ensemble=NAME``: logit-mean, prob-mean, class-weighted, ...), applied to the
members' logits with plain torch operations, so it sits on both paths: the
answers, and the gradients that flow back to each teacher.

The whole ensemble is one node in the autograd graph: its forward is one
fan-out of Forward queries through a :class:`~fedkd.coordinator.pool.TeacherPool`, and
``loss.backward()`` sends one fan-out of Backward queries (each teacher gets the
gradient of the loss w.r.t. its own logits and BN loss) and sums the gradients
w.r.t. the inputs. When a teacher does not answer, the ensemble is formed from
those that did (weights renormalised over them); a teacher that answered the
Forward but misses the Backward only loses its term of the gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import FEATURE_STATISTICS, QueryContext, TeacherDescription
from fedkd.coordinator.aggregation import (
    Aggregator,
    claimed_counts,
    column_shares,
    competence,
    resolve_aggregator,
    unseen_share,
)
from fedkd.coordinator.pool import TeacherPool, plan
from fedkd.coordinator.robustness import AnswerBounds, DensityCheck, GradientAgreement, Reliability, capped_counts


@dataclass
class EnsembleOutput:
    logits: Tensor  # (B, C)
    terms: dict[str, Tensor]  # per asked-for teacher-side term: its mean over the answering teachers computing it
    members: list[int]  # which teachers answered, in pool order
    member_logits: list[Tensor]  # their logits over the classes, aligned with ``members``
    competence: Tensor | None = None  # (K', B) per member and input: 1 - p(unknown), or the density gate
    # per asked-for term: each member's value (K',) (zero where it computed none) and whether it computed it (K',)
    member_terms: dict[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)


def _query(pool: TeacherPool, inputs: Tensor, state: QueryContext, terms: Sequence[str],
           min_answers: int | None, refs: dict[int, Any] | None = None
           ) -> tuple[Tensor, list[int], Tensor, Tensor, Tensor]:
    """One Forward fan-out: (the inputs as sent, members that answered, logits (K', B, C), term values
    (K', T) in the order of ``terms`` (zero where a member did not compute one), which it computed (K', T)
    bool) on the inputs' device. With ``refs``, a Backward will follow: the teachers keep their graphs and
    ``refs`` receives what the Backward names, per member."""
    x = inputs.detach().cpu().float().contiguous()
    replies = pool.forward(x, state, terms=terms, min_answers=min_answers, keep=refs is not None)
    if refs is not None:
        refs.update({k: r.ref for k, r in replies.items() if r.ref is not None})
    members = sorted(replies)
    # Teachers with an "unknown" output answer one column more; the others are padded (the column is ignored).
    width = max((replies[k].logits.shape[-1] for k in members), default=0)
    logits = torch.stack([F.pad(replies[k].logits, (0, width - replies[k].logits.shape[-1]))
                          for k in members]).to(inputs.device)
    values = torch.zeros(len(members), len(terms))
    computed = torch.zeros(len(members), len(terms), dtype=torch.bool)
    for i, k in enumerate(members):
        for j, name in enumerate(terms):
            if (value := replies[k].terms.get(name)) is not None:
                values[i, j], computed[i, j] = value, True
    return x, members, logits, values.to(inputs.device), computed


@dataclass(frozen=True)
class ZerothOrder:
    """How the input gradient of a teacher that grants logits but not gradients is estimated (DFME, FedZGE):
    ``directions`` random unit directions per sample (0 = that teacher's gradient term is left out), forward
    differences of step ``radius`` in the teacher's input space. Each direction costs one extra Forward of the
    batch to every such teacher (counted as query samples like any other)."""

    directions: int = 0
    radius: float = 1e-2
    max_batch: int = 1024


def zeroth_order_gradient(pool: TeacherPool, x: Tensor, teachers: list[int], grad_logits: dict[int, Tensor],
                          base_logits: dict[int, Tensor], state: QueryContext, zo: ZerothOrder,
                          generator: torch.Generator | None = None) -> dict[int, Tensor]:
    """Per teacher k, an estimate of d/dx sum_b <grad_logits[k][b], logits_k(x_b)> from Forward queries alone:
    (d / m) sum_j (f_b(x_b + r u_j) - f_b(x_b)) / r * u_j, u_j uniform on the unit sphere of the input's d
    dimensions, f_b(x_b) from the Forward already answered (``base_logits``)."""
    b, d, m = len(x), x[0].numel(), zo.directions
    u = torch.randn(m, *x.shape, generator=generator)
    u = u / u.flatten(2).norm(dim=2).clamp_min(1e-12).view(m, b, *([1] * (x.dim() - 1)))
    probes = (x.unsqueeze(0) + zo.radius * u).reshape(m * b, *x.shape[1:])
    answers: dict[int, list[Tensor]] = {k: [] for k in teachers}
    step = max(1, zo.max_batch // b) * b  # whole probe sets per query, within the teachers' batch limit
    for start in range(0, len(probes), step):
        replies = pool.forward(probes[start:start + step].contiguous(), state, min_answers=0, only=teachers)
        for k in teachers:
            if k in replies and k in answers:
                answers[k].append(replies[k].logits)
            else:
                answers.pop(k, None)  # a teacher that missed part of the probes loses its term
    out = {}
    for k, parts in answers.items():
        probed = torch.cat(parts).view(m, b, -1)  # (m, B, C)
        f_probe = (probed * grad_logits[k].unsqueeze(0)).sum(-1)  # (m, B)
        f_base = (base_logits[k] * grad_logits[k]).sum(-1)  # (B,)
        slope = (f_probe - f_base.unsqueeze(0)) / zo.radius  # (m, B)
        out[k] = (d / m) * (slope.view(m, b, *([1] * (x.dim() - 1))) * u).sum(0)
    return out


# How far a consistency check steps along a teacher's gradient: the batch moves by this L2 distance per sample on
# average (normalised inputs), small enough for first order, large enough for float32 logits.
CONSISTENCY_STEP = 0.05


def gradient_consistency(pool: TeacherPool, x: Tensor, grads: dict[int, Tensor],
                         asked: dict[int, tuple[Tensor, dict[str, float]]], base_logits: dict[int, Tensor],
                         base_terms: dict[int, dict[str, float]], state: QueryContext) -> dict[int, float]:
    """Per teacher k, the slope of its own objective (sum_b <grad_logits_b, logits_b> + sum_t w_t term_t) along
    the direction of the gradient it returned, measured with one Forward a step along it, over the slope that
    gradient claims (its norm): about 1 for an honest answer. Teachers that do not answer are left out."""
    ratios = {}
    for k, grad in grads.items():
        claimed = float(grad.norm())
        if not math.isfinite(claimed) or claimed < 1e-12:
            continue
        step = CONSISTENCY_STEP * math.sqrt(len(x))
        g_logits, g_terms = asked[k]
        replies = pool.forward((x + step * grad / claimed).contiguous(), state, terms=tuple(g_terms), min_answers=0,
                               only=[k])
        if k not in replies:
            continue
        reply = replies[k]
        change = float((g_logits * (reply.logits.float() - base_logits[k])).sum())
        for name, weight in g_terms.items():
            if name in reply.terms and name in base_terms[k]:
                change += weight * (float(reply.terms[name]) - base_terms[k][name])
        ratios[k] = change / step / claimed
    return ratios


class _FanOut(torch.autograd.Function):
    """inputs (B, ...) -> logits (K', B, C), term values (K', T) of the K' members that answered."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, pool: TeacherPool, state: QueryContext, terms: tuple[str, ...],
                min_answers: int | None, answered: dict[str, Any], ensemble: Ensemble) -> tuple[Tensor, Tensor]:
        refs: dict[int, Any] = {}
        x, members, logits, values, computed = _query(pool, inputs, state, terms, min_answers, refs)
        answered.update(members=members, computed=computed)
        ctx.pool, ctx.state, ctx.members, ctx.terms, ctx.computed = pool, state, members, terms, computed
        ctx.x, ctx.device, ctx.ensemble, ctx.refs = x, inputs.device, ensemble, refs
        ctx.logits = logits.detach().cpu()
        ctx.values = values.detach().cpu()
        return logits, values

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        ensemble: Ensemble = ctx.ensemble
        # each member's part at its own width (a teacher without an unknown output was padded by one column)
        widths = [ensemble.descriptions[k].outputs for k in ctx.members]
        g = [row[:, :w].contiguous() for row, w in zip(grad_logits.detach().cpu().float(), widths)]
        base = [row[:, :w] for row, w in zip(ctx.logits, widths)]
        gv = grad_values.detach().cpu().float()
        grads = {k: (g[i], {name: float(gv[i, j]) for j, name in enumerate(ctx.terms)
                            if ctx.computed[i, j]})
                 for i, k in enumerate(ctx.members) if k in ensemble.gradient_members}
        answers = ctx.pool.backward(ctx.x, grads, ctx.state, refs=ctx.refs)
        index = {k: i for i, k in enumerate(ctx.members)}
        check = ensemble.gradient_agreement
        if ensemble.gradient_check_due():
            checked = {k: v for k, v in answers.items() if ensemble.consistency_checked(k)}
            check.record_consistency(gradient_consistency(
                ctx.pool, ctx.x, checked, grads, {k: base[index[k]] for k in checked},
                {k: {name: float(ctx.values[index[k], j]) for j, name in enumerate(ctx.terms)
                     if ctx.computed[index[k], j]} for k in checked}, ctx.state))
        check.update(answers)  # the peer cosine, reported (directions only: the bounds below do not matter)
        # A teacher whose gradients are not trusted is treated like one that grants logits only: its term is
        # estimated from its logits (zeroth order) where estimates are on, and left out otherwise.
        trust = check.weights()
        distrusted = [k for k in answers if trust[k] == 0]
        for k in distrusted:
            del answers[k]
        # Labels-only teachers answer a step function: no gradient term, estimated or otherwise. Nor does a teacher
        # flagged for contradicting the others on a share of its inputs (Reliability.flagged): its Forwards are
        # what the estimate differences, and a lie on a probe or on the base input is a jump of its logits over the
        # radius, which the bound only clips to gradient-bound x the honest teachers' median (a partial liar's
        # estimate, clipped on nearly every sample, had owned the sum the generator follows).
        flagged = ensemble.reliability.flagged()
        estimated = [k for k in ctx.members if (k not in ensemble.gradient_members or k in distrusted)
                     and k in ensemble.logits_members and not bool(flagged[k])]
        if estimated and ensemble.zeroth_order.directions > 0:
            answers.update(zeroth_order_gradient(
                ctx.pool, ctx.x, estimated, {k: g[index[k]] for k in estimated},
                {k: base[index[k]] for k in estimated}, ctx.state, ensemble.zeroth_order))
        answers = ensemble.bounds.gradients(answers)
        total = torch.zeros_like(ctx.x)
        for grad in answers.values():  # (trusted gradients and estimates: a distrusted answer was replaced above)
            total += grad
        return total.to(ctx.device), None, None, None, None, None, None


# density-gate=auto weighs by the teachers' densities only where, on average, at least this share of the teachers
# never saw a class (unseen_share). Measured on MNIST-5k (docs/robustness.md): the gate lifts the student 35 points
# on the pathological split of 2 classes of 10 per client over 5 clients and 24 over 10 (0.8), and costs it 2 points
# with 3 classes per client (0.7; the ensemble gains 16), 3-4 at Dirichlet(0.5) and (0.1) over 5 clients (at most
# 0.08 and 0.18-0.34) and 3.3 at Dirichlet(0.1) over 10 (0.27-0.51; over 20, 0.33-0.57).
DENSITY_GATE_UNSEEN = 0.75


@dataclass(frozen=True)
class DensityGate:
    """Whether a run weighs answers by the teachers' log-densities, and why (summary.json's ``density_gate``)."""

    mode: str  # the density-gate setting: auto, on or off
    used: bool
    reason: str
    unseen_share: float | None = None  # from the label counts (auto), see unseen_share

    @classmethod
    def decide(cls, mode: str, has_density: Tensor, descriptions: Sequence[TeacherDescription],
               unseen: float) -> DensityGate:
        """``unseen``: the federation's :func:`unseen_share`, from the label counts."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"density-gate {mode!r} is not one of auto, on, off")
        if not bool(has_density.any()):
            return cls(mode, False, "no teacher answers a log-density the gate can use")
        if mode != "auto":
            return cls(mode, mode == "on", f"density-gate={mode}")
        silent = [d.client for k, d in enumerate(descriptions)
                  if bool(has_density[k]) and (d.label_counts is None or sum(d.label_counts) == 0)]
        if silent:
            return cls(mode, True, f"client(s) {', '.join(map(str, silent))} answer a density and share no label "
                                   "counts to judge by")
        used = unseen >= DENSITY_GATE_UNSEEN
        return cls(mode, used, f"by the label counts {unseen:.0%} of the teachers never saw a class, on average; "
                               f"the gate weighs from {DENSITY_GATE_UNSEEN:.0%}", round(unseen, 4))

    def report(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Ensemble:
    """Queries every teacher of a pool with the same inputs and combines their logits."""

    def __init__(self, pool: TeacherPool, aggregation: str = "auto", *, reliability: bool = True,
                 logit_bound: float = 100.0, gradient_bound: float = 10.0,
                 zeroth_order: ZerothOrder | None = None, check_seed: int = 0, density_sharpness: float = 4.0,
                 density_gate: str = "auto") -> None:
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
        # Teachers whose answers carry an "unknown" output (teacher-recipe=open-set): each answer is weighted per
        # input by 1 - p(unknown) in the aggregators that sum probabilities (fedkd.coordinator.aggregation).
        # (A labels-only teacher answers votes, abstaining where "unknown" is its top: no column to weigh by.)
        self.has_unknown = torch.tensor([d.unknown_output and "logits" in d.access_modes for d in descriptions])
        # Teachers whose last column is the input's log-density under their own data (teacher-density=on): per
        # input, the posterior over them of who knows it, tempered by ``density_sharpness``.
        # A teacher that declares output noise releases its log-density noised like any logit (a standard deviation
        # of 2 x output-noise x output-clip per value, 20 at the defaults), which would route inputs at random; its
        # column is ignored and it answers ungated, like a closed teacher (so declaring noise also buys a liar
        # nothing: its density cannot be checked, and it is not used).
        self.has_density = torch.tensor([d.log_density_output and "logits" in d.access_modes and
                                         not d.unknown_output and d.mechanism != "output-noise"
                                         for d in descriptions])
        self.density_sharpness = density_sharpness
        self.aggregator: Aggregator = resolve_aggregator(
            aggregation, [d.label_counts for d in descriptions], [d.client for d in descriptions])
        counts, self.count_scale = capped_counts(descriptions, enabled=reliability)
        claimed = claimed_counts(counts, self.num_classes, [d.num_samples for d in descriptions])  # (K, C)
        # how much of the federation never saw each class, by the label counts (a teacher sharing none counts as
        # having seen every class): what the run knows of its label skew
        self.unseen_share = unseen_share(claimed)
        # Whether this run weighs by the densities at all (density-gate); when it does not, its queries do not ask
        # for them and no teacher releases one.
        self.density_gate = DensityGate.decide(density_gate, self.has_density, descriptions, self.unseen_share)
        # Those that answer one whether or not the gate weighs by it: the refit's climb goes up their densities
        # either way (``student-refit-climb``).
        self.answers_density = self.has_density.clone()
        if not self.density_gate.used:
            self.has_density = torch.zeros_like(self.has_density)
        # Each density is checked once, before the gate first weighs by it, to integrate to at most one (a teacher
        # claiming every input cannot); not with reliability=off (the hostile-teacher defences off).
        self.density_check = DensityCheck(
            [k for k in range(len(descriptions)) if reliability and bool(self.has_density[k])],
            descriptions[0].input_shape, seed=check_seed)
        self._class_weights = column_shares(claimed)  # (K, C)
        # Backward goes only to the teachers that grant gradients; the others' gradient terms are estimated
        # from Forward queries (``zeroth_order``) or left out.
        self.gradient_members = {k for k, d in enumerate(descriptions) if "gradient" in d.access_modes}
        self.logits_members = {k for k, d in enumerate(descriptions) if "logits" in d.access_modes}
        self.zeroth_order = zeroth_order or ZerothOrder()
        self.reliability = Reliability(len(descriptions), self.num_classes, enabled=reliability,
                                       claims=claimed if self.aggregator.needs_counts else None,
                                       noisy=[bool(d.mechanism) for d in descriptions])
        self.gradient_agreement = GradientAgreement(len(descriptions), enabled=reliability, seed=check_seed)
        self.bounds = AnswerBounds(logit_bound, gradient_bound)

    def gradient_check_due(self) -> bool:
        """Whether this Backward's gradients are checked against the teachers' own Forwards."""
        return self.gradient_agreement.due() and bool(self.gradient_members)

    def consistency_checked(self, k: int) -> bool:
        """Teacher ``k``'s gradients are checked against its own answers unless it declares output noise (its
        answers are noisy by design; only the norm bound applies to its gradients)."""
        return self.descriptions[k].mechanism != "output-noise"

    @property
    def aggregation(self) -> str:
        """The aggregator's name (``auto`` resolved)."""
        return self.aggregator.name

    @property
    def label_counts_from(self) -> list[int] | None:
        """The clients whose label counts the ensemble uses; None when its aggregator uses none."""
        if not self.aggregator.needs_counts:
            return None
        return [d.client for d in self.descriptions if d.label_counts is not None]

    def __len__(self) -> int:
        return len(self.descriptions)

    @property
    def has_feature_statistics(self) -> bool:
        return self.computes(FEATURE_STATISTICS)

    def computes(self, term: str) -> bool:
        """Whether any teacher that answers with logits computes the teacher-side term ``term``."""
        return any(plan(d, (term,)).terms for d in self.descriptions)

    def lacking(self, term: str) -> list[int]:
        """The clients that do not compute ``term`` (labels-only clients compute none)."""
        return [d.client for d in self.descriptions if not plan(d, (term,)).terms]

    def weights(self, members: Sequence[int]) -> Tensor | None:
        """(K', C) weights over the answering members: class weights (when the aggregator uses label counts)
        times each teacher's reliability, columns renormalised; None when every weight would be equal."""
        members = list(members)
        r = self.reliability.weights()[members]  # (K',)
        if not self.aggregator.needs_counts and bool((r == 1).all()):
            return None
        if float(r.sum()) <= 0:  # nobody is trusted more than anybody: equal footing
            r = torch.ones_like(r)
        if self.aggregator.needs_counts:  # claimed counts, honoured as far as the answers back them, per class
            base = self._class_weights[members] * self.reliability.class_weights()[members]
        else:
            base = torch.ones(len(members), self.num_classes)
        w = base * r.unsqueeze(1)
        # A class only distrusted teachers speak for: their count weights as they were, before the class check (or,
        # when none of the answering teachers claims the class, all of them alike). A column of zeros would give
        # the class probability 0 on every input: a logit of -69 that a student trained on logits chases.
        fallback = self._class_weights[members] if self.aggregator.needs_counts else base
        fallback = torch.where(fallback.sum(0, keepdim=True) > 0, fallback, torch.ones_like(fallback))
        column = w.sum(0, keepdim=True)
        return torch.where(column > 0, w / column.clamp_min(1e-12),
                           fallback / fallback.sum(0, keepdim=True).clamp_min(1e-12))

    def combine(self, logits: Tensor, members: Sequence[int], competence: Tensor | None = None, *,
                count: bool = False) -> Tensor:
        """The ensemble's (B, C) logits from the members' (K', B, C) logits; ``competence`` (K', B): per input, each
        member's 1 - p(unknown) (1 for members without that output), used by the aggregators that sum
        probabilities. Those aggregators also leave out, input by input, the answers of a teacher flagged for
        contradicting the others (:meth:`Reliability.veto`; ``count``: count them in the report), each class's
        weights renormalised over the answers left."""
        vetoes = self.reliability.veto(list(members), logits, count=count) if self.aggregator.takes_competence else None
        if (competence is not None or vetoes is not None) and self.aggregator.takes_competence:
            base = self.weights(members)
            if base is None:  # equal footing: the probability mean's own weights
                base = torch.full((len(members), self.num_classes), 1.0 / len(members))
            per_input = base.to(logits.device).unsqueeze(1)  # (K', 1, C)
            if vetoes is not None:
                kept = per_input * vetoes.unsqueeze(-1)  # (K', B, C)
                column = kept.sum(0, keepdim=True)
                # (a class whose every weighted answer was vetoed on an input keeps its weights as they were)
                per_input = torch.where(column > 0, kept / column.clamp_min(1e-12), per_input.expand_as(kept))
            if competence is not None:
                per_input = per_input * competence.unsqueeze(-1)
            return self.aggregator.combine(logits, per_input)
        if not self.aggregator.takes_weights:  # an order statistic: leave the distrusted teachers out
            r = self.reliability.weights()[list(members)]
            keep = [i for i in range(len(r)) if r[i] > 0]
            if keep and len(keep) < len(r):
                logits = logits[keep]
            return self.aggregator.combine(logits, None)
        weights = self.weights(members)
        return self.aggregator.combine(logits, None if weights is None else weights.to(logits.device))

    def report(self) -> list[dict[str, Any]]:
        """Per teacher: its reliability weight, its agreement with the others, and what was clipped."""
        w, gw = self.reliability.weights(), self.gradient_agreement.weights()
        rel = self.reliability
        trust = rel.class_weights()
        judged = self.gradient_agreement.batches
        return [{"client": d.client, "weight": round(float(w[k]), 4), "count_scale": round(self.count_scale[k], 4),
                 "agreement": round(float(self.reliability.agreement[k]), 4) if self.reliability.batches[k] else None,
                 # how sure its own answers are (mean top probability): weak and unsure is not the same as sure
                 # and contradicting
                 "confidence": (round(float(self.reliability.confidence[k]), 4) if self.reliability.batches[k]
                                else None),
                 # per class: how many of the inputs the others call c it calls c (recall), how many of those they
                 # call another class it calls c (false rate), and the factor that scales its claimed count for c
                 # (a teacher honest but on one class shows there)
                 "class_recall": [round(float(v), 3) if bool(s) else None
                                  for v, s in zip(rel.class_recall[k], rel.class_seen[k])],
                 "class_false_rate": [round(float(v), 3) if bool(s) else None
                                      for v, s in zip(rel.class_false[k], rel.false_seen[k])],
                 "class_trust": [round(float(v), 3) for v in trust[k]],
                 # how often it contradicts a sure consensus of the others on a class it claims (its most
                 # contradicted class set aside; per class the consensus names, every class), and how many of its
                 # answers the per-input veto left out (a teacher is vetoed only once it dissents far more than the
                 # median teacher)
                 "dissent": round(float(rel.dissent[k]), 4) if rel.dissent_batches[k] else None,
                 "class_dissent": [round(float(a / j), 3) if float(j) > 0 else None
                                   for a, j in zip(rel.class_against[k], rel.class_judged[k])],
                 "vetoed_answers": int(rel.vetoed[k]),
                 "gradient_weight": round(float(gw[k]), 4),
                 "gradient_cosine": round(float(self.gradient_agreement.cosine[k]), 4) if judged[k] else None,
                 "gradient_consistency": (round(float(self.gradient_agreement.ratio[k]), 4)
                                          if self.gradient_agreement.checks[k] else None),
                 "gradient_checks": int(self.gradient_agreement.checks[k]),
                 # teacher-density=on: log of the mean of p(x) / q(x) on the density check's probes (at most
                 # log 1e6 for a density that integrates to one, but once in a million), and the verdict
                 "density_log_mass": (round(self.density_check.log_mass[k], 1) if k in self.density_check.log_mass
                                      else None),
                 "density_refuted": k in self.density_check.refuted,
                 "clipped_logits": self.bounds.clipped_logits.get(k, 0),
                 "clipped_gradients": self.bounds.clipped_gradients.get(k, 0)}
                for k, d in enumerate(self.descriptions)]

    def _check_densities(self, state: QueryContext) -> None:
        """Ask the density teachers not yet checked for their log-densities on the check's probes (one Forward,
        counted like any query) and judge them (:class:`fedkd.coordinator.robustness.DensityCheck`). ``state``:
        the query's, which asks for the densities (only a run whose gate weighs by them checks any)."""
        x, log_q = self.density_check.draw()
        replies = self.pool.forward(x, state, min_answers=0, only=self.density_check.pending)
        self.density_check.judge({k: r.logits[:, self.num_classes].float() for k, r in replies.items()
                                  if r.logits.shape == (len(x), self.num_classes + 1)}, log_q)

    def state_dict(self) -> dict[str, Any]:
        return {"reliability": self.reliability.state_dict(), "bounds": self.bounds.state_dict(),
                "gradient_agreement": self.gradient_agreement.state_dict(),
                "density_check": self.density_check.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reliability.load_state_dict(state["reliability"])
        self.bounds.load_state_dict(state["bounds"])
        if "gradient_agreement" in state:  # (a run checkpointed before gradients were judged starts afresh)
            self.gradient_agreement.load_state_dict(state["gradient_agreement"])
        if "density_check" in state:  # (a run checkpointed before densities were checked checks them on resume)
            self.density_check.load_state_dict(state["density_check"])

    def __call__(self, inputs: Tensor, state: QueryContext, *, terms: Sequence[str] = (),
                 require_all: bool = False) -> EnsembleOutput:
        """Query the teachers; gradients flow back through Backward queries when ``inputs`` requires grad.

        ``terms``: teacher-side terms (``fedkd.institution.terms``) to compute, each averaged over the answering
        teachers that compute it (absent from the output when none does)."""
        names = tuple(dict.fromkeys(terms))
        min_answers = len(self) if require_all else None
        if self.density_gate.used:  # the teachers with a density release it in this query
            state = dataclasses.replace(state, log_density=True)
        if inputs.requires_grad and torch.is_grad_enabled():
            info: dict[str, Any] = {}
            logits, values = _FanOut.apply(inputs, self.pool, state, names, min_answers, info, self)
            answered, computed = info["members"], info["computed"]
        else:
            _, answered, logits, values, computed = _query(self.pool, inputs, state, names, min_answers)
        logits = self.bounds.logits(answered, logits)
        gate = None
        if logits.shape[-1] > self.num_classes:  # some member has an unknown output or a log-density
            has_unknown = self.has_unknown[answered].to(logits.device)
            has_density = self.has_density[answered].to(logits.device)
            if bool(has_unknown.any()) or bool(has_density.any()):
                kept = None
                if bool(has_density.any()):  # who may take a share of the density posterior
                    if self.density_check.due:
                        self._check_densities(state)
                    refuted = torch.tensor([k in self.density_check.refuted for k in answered])
                    kept = ((self.reliability.weights()[list(answered)] > 0) & ~refuted).to(logits.device)
                gate = competence(logits, self.num_classes, has_unknown, has_density,
                                  sharpness=self.density_sharpness, kept=kept)
            logits = logits[..., :self.num_classes]
        # The estimate learns only from what the method asks; measuring on the coordinator's own (test) images
        # must not teach it: a data-free coordinator has none, and an ensemble judged on the images it is scored
        # on would be scored in-sample.
        if state.purpose != "evaluate":
            self.reliability.update(answered, logits)
        combined = self.combine(logits, answered, gate, count=state.purpose != "evaluate")
        out_terms = {}
        for j, name in enumerate(names):
            rows = computed[:, j].nonzero().flatten().tolist()
            if rows:
                out_terms[name] = values[rows, j].mean()
        member_terms = {name: (values[:, j], computed[:, j].to(values.device)) for j, name in enumerate(names)}
        return EnsembleOutput(combined, out_terms, answered, list(logits.unbind(0)), gate, member_terms)

