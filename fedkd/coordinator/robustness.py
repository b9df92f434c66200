"""What the coordinator does about a teacher that answers wrong on purpose (or is broken).

Threat: one institution's teacher answers confidently wrong (a fixed class with a large logit, random logits,
absurd scales) and claims a large balanced label histogram, so that class weighting trusts it most. Nothing
about a single answer says it is wrong; what does is that the teacher disagrees with the others systematically.

- :class:`Reliability`: for every Forward the ensemble makes, each answering teacher's top-1 answer is compared
  with the leave-one-out consensus (coordinate-wise median of the other teachers' probabilities); an exponential
  moving average of that agreement rate is kept per teacher. Where the aggregator weighs label counts, a teacher is
  held to what it claims: each input counts in its agreement in proportion to the teacher's share of the claimed
  records of the class the others name (a client that never saw a class is not faulted for not knowing it; one
  that claims a class is judged on it, and a liar claiming every class is judged everywhere). A teacher whose
  agreement above chance is at least ``tolerance`` times the median teacher's keeps full weight; below that its
  weight falls linearly to 0 at chance level, and a weight under 0.5 is cut to 0 (the teacher is left out). Only a
  teacher *sure and contradicting* loses weight: one whose answers are no more confident (mean top probability)
  than the median teacher's keeps full weight whatever its agreement, because weak and unsure is what an honest
  noisy teacher (DP-SGD) or the one expert of a class the others cannot judge looks like, and its unsure answers
  move a probability average little; its claimed records count for no more than the median client's total, for a
  class only as far as its own answers name that class, and are still checked class by class. The class-by-class
  check scales each teacher's claimed count for class c by two relative scores: recall (of the inputs the others'
  consensus calls c, how many it calls c: a teacher that swaps c for another class never does) and discrimination
  (that recall less how often it calls c the inputs the consensus calls anything else, on every input whatever
  it claims: a teacher that names c everywhere, or on a random share of the inputs, says nothing about c however
  few other classes it claims, while an honest expert of c whose "c" the others contradict on the classes c is
  confused with keeps its say); it needs at least four answering teachers (``CLASS_CHECK``). A teacher that
  declares a privacy mechanism (noisy by design) is held to both only on inputs where the others are sure (their
  median probability of the class they name reaches ``SURE``). The weight multiplies
  whatever weights the aggregator uses (label counts included: a claimed histogram of any size does not buy trust
  back); order-statistic aggregators leave a teacher with weight 0 out. On honest federations every teacher keeps
  weight 1 (measured: docs/robustness.md, docs/privacy.md); in a pathological split, where honest
  teachers legitimately disagree, the comparison is relative to the median teacher, not absolute. The rule assumes
  fewer than half the teachers lie (so that the medians, of answers and of confidence, are honest ones).
- :meth:`Reliability.veto`: a liar can spread its lies over inputs instead of classes (a wrong class, sure, on a
  random 30 % of the inputs, claiming every class): its agreement and every class statistic stay within what
  honest teachers show, and its claimed records own a third of each class. What sets it apart is how often it
  contradicts a sure consensus of the others on a class it claims to know (its dissent rate), counted with its
  most contradicted class set aside: an honest client that saw few records of a class confuses that one class
  with its majority class as surely (Fashion-MNIST Dirichlet(0.1)), and one class is the class check's to judge,
  where lies spread over the inputs set no class apart (stop 70: docs/robustness.md, "One class set aside"). A
  teacher whose rate is both above ``DISSENT_FLOOR`` and ``DISSENT_RATIO`` times the median teacher's has, on each
  input, its answer left out where it contradicts the others so; its other answers keep their say (measured on
  replays of finished runs' pools: docs/robustness.md, "The partial liar"). A flagged teacher's claimed records
  then count for no more than the median client's total, and for a class only as far as its answers name it
  (``class_weights``), and its gradient term is not estimated from its Forwards (``fedkd.coordinator.ensemble``;
  stop 65).
- :func:`capped_counts`: no client's claimed label counts weigh more than 4x the median client's total.
- :class:`AnswerBounds`: logits are clipped to +-``logit_bound`` (a softmax is saturated long before; this only
  stops an absurd scale from owning a logit average); per sample, a teacher's input gradient is clipped to
  ``gradient_bound`` times the median norm of the teachers' gradients for that sample (when at least three answered:
  no absolute scale is needed).

- :class:`GradientAgreement`: a teacher may answer honest logits and adversarial input gradients (a sign flip
  scaled up drops a student to chance, and keeps the teacher's full weight: its logits agree). One check decides
  whether a teacher's gradient term stays in the sum the generator follows (its logits keep their say either
  way), a second is reported beside it:

  *Consistency with its own answers* (:func:`fedkd.coordinator.ensemble.gradient_consistency`): the gradient a
  teacher returns claims how its own objective (logits weighted by the coordinator's grad_logits, plus the asked
  terms) changes along any direction; along the gradient's own direction the claim is its norm. The
  coordinator asks the teacher a Forward a small step along that direction and measures the change: an honest
  teacher's ratio of measured to claimed slope is close to 1, a sign flip's is negative, a scaled answer's is
  1/scale. Needs no honest majority and costs one Forward of the batch per teacher per check (counted like any
  query): the first three Backwards, then one in ``every`` drawn at random from the run's seed, which no
  teacher knows, so a teacher cannot poison only the Backwards that go unchecked. Not run for a teacher that
  declares output noise (its answers are noisy by design).

  *Agreement with the others*, reported only: per Backward, each
  teacher's per-sample gradient direction is compared with the coordinate-wise median direction of every
  teacher that answered (unit vectors, so no teacher's scale owns the median); a moving average of the cosine is
  kept per teacher (``gradient_cosine`` in the summary). It does not decide anything: on the main job an honest
  teacher's average dipped to -0.24 for whole stretches of a run (its gradient legitimately points elsewhere on
  some synthetic batches), where a -8x sign flip sat at -0.26, so a threshold would have cut honest teachers.

  A teacher whose check fails loses its gradient term; its logits keep their say, and the ensemble estimates
  its term from them by zeroth order where estimates are on. Gradients the coordinator estimates itself are
  not judged. Not caught: gradients that are merely noise whose slope happens to fall within the bounds; the
  norm bound limits those.

- :class:`DensityCheck`: a teacher with ``teacher-density=on`` answers each input's log-density under its own
  data, and the density gate gives it, per input, a share that grows with that claim; a teacher that claims every
  input as its own would take every answer. Nothing about one answer shows a lie, but a density must integrate to
  one, and that the coordinator can test without seeing inside it: it draws ``DENSITY_PROBES`` inputs from a
  distribution q of its own (a mixture of isotropic Gaussians about the task's mean in the normalised input
  space, at scales ``DENSITY_SCALES``, whose density it knows exactly), asks each density teacher once, and
  computes the mean of p(x) / q(x). For any density p that integrates to at most one, its expectation under q is
  at most one, so by Markov's inequality the mean exceeds 1 / ``DENSITY_ALPHA`` with probability at most
  ``DENSITY_ALPHA``: an honest teacher is refuted by mistake at most once in a million, whatever its density.
  A refuted teacher takes no share of the gate for the rest of the run (it is out of the gated ensemble); so does
  one that leaves the probes unanswered ``DENSITY_ATTEMPTS`` times (they are asked again with each gated batch). On the
  benchmark's teachers the mean sits 320-560 nats below the threshold (log scale, over 784 values), so a claim
  raised by 0.4-0.7 nats per value or more is refuted; a density raised by less, or one that puts its whole mass
  of one on the inputs the coordinator queries (it sees them), is not, and the reliability estimate is what is
  left against it. A teacher that declares output noise has no density the gate uses (``Ensemble.has_density``),
  so there is nothing to check.

Each counts what it did per teacher; the summary reports it (``ensemble.teachers``) and a down-weighted teacher
is logged as a warning.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import TeacherDescription
from fedkd.coordinator.aggregation import column_shares, median_of

logger = logging.getLogger(__name__)
CUT = 0.5  # a reliability below this leaves the teacher out of the ensemble
# Claims are checked class by class only on batches at least this many teachers answered: among three, the "others"
# are two, and one of them swings what they call a class (measured: 3 IID digits teachers, docs/robustness.md).
CLASS_CHECK = 4
SURE = 0.3  # the others judge a teacher's class claims only on inputs where their median probability reaches this
# A teacher's discrimination of class c (its recall of c less its rate of naming c where the consensus names another
# class) earns full trust at this share of the best teacher's, falling linearly to none at zero (against 0.5, it keeps
# honest federations' ensembles and catches more of a liar naming one class on a share of the inputs, replaying
# finished runs' pools: simulations/class_check.py, docs/robustness.md "Which check, again").
DISCRIMINATION_TOLERANCE = 0.75
# The per-input veto (Reliability.veto): a teacher contradicts the others on an input when the median of their
# probabilities names a class at least VETO_SURE that the teacher holds (its claim of the class at least half its own
# mean claim per class) and it names another, which the others hold too, surer than that median. Its dissent
# rate, of the inputs where the first two hold, with its most contradicted class set aside (stop 70), is kept per
# teacher; a teacher whose rate exceeds DISSENT_FLOOR and
# DISSENT_RATIO times the median teacher's has its contradicting answers left out, input by input (replays of
# finished runs' pools: simulations/class_check.py, docs/robustness.md "The partial liar"). At 0.2 and 2 (stop 64)
# a liar on 15 % of the inputs went unflagged on five of fourteen replays; since a flag costs an honest teacher
# only the answers that contradict a sure consensus and the claims its answers do not back (stop 65), 0.15 and 1.5
# catch it on thirteen, and full runs' students stay within a point and a half of the old bar's where honest teachers
# get flagged (stop 66: docs/robustness.md, "The lower bar, adopted").
VETO_SURE = 0.5
DISSENT_FLOOR = 0.15
DISSENT_RATIO = 1.5
# The density check (DensityCheck): how many probe inputs each density teacher answers once, at which scales of the
# normalised input space they are drawn (a mixture: the probes cover tasks whose images spread more or less about
# their mean), and the chance of refuting an honest density.
DENSITY_PROBES = 128
DENSITY_SCALES = (0.25, 0.5, 1.0)
DENSITY_ALPHA = 1e-6
DENSITY_ATTEMPTS = 3  # probes a density teacher may leave unanswered before it is refuted for evading the check
# A teacher left out is announced as trusted again only once its weight is back to this (logging only: a teacher at
# the edge, its weight hovering about the cut, wrote a pair of lines every few batches of the main job); likewise a
# flagged teacher is announced as no longer contradicting the others only once its dissent rate is down to this
# share of the bar (two colluding swappers, their rates about the bar, wrote 22 lines in one run of swap-2).
TRUSTED_AGAIN = 0.75


class Reliability:
    """Per-teacher agreement with the leave-one-out consensus, and the weight it earns."""

    def __init__(self, teachers: int, num_classes: int, *, decay: float = 0.9, tolerance: float = 0.5,
                 enabled: bool = True, claims: Tensor | None = None, noisy: Sequence[bool] | None = None) -> None:
        """``claims`` (K, C): the records each teacher claims per class (as the aggregator weighs them); a
        teacher's share of a class's claims weighs the inputs of that class it is judged on. None: every input
        counts the same (an aggregator that ignores label counts gives every teacher the same say everywhere).
        ``noisy`` (K,): the teachers that declare a privacy mechanism (their answers noisy by design); their class
        claims are judged only where the others are sure (``SURE``), the others' on every input."""
        self.teachers, self.num_classes = teachers, num_classes
        self.decay, self.tolerance, self.enabled = decay, tolerance, enabled
        if claims is not None and tuple(claims.shape) != (teachers, num_classes):
            raise ValueError(f"claims must be ({teachers}, {num_classes}), got {tuple(claims.shape)}")
        self.claims = claims.detach().double().cpu() if claims is not None else None
        self.noisy = [bool(v) for v in noisy] if noisy is not None else [False] * teachers
        if len(self.noisy) != teachers:
            raise ValueError(f"noisy must name {teachers} teachers, got {len(self.noisy)}")
        if self.claims is not None:
            self.shares = column_shares(self.claims).float()
            # (K, C) the classes each teacher says it holds: at least half its own mean claim per class (a measure of
            # its own histogram, which no other teacher's claims can move)
            self.holds = self.claims >= 0.5 * self.claims.mean(1, keepdim=True)
        self.agreement = torch.zeros(teachers)
        self.confidence = torch.zeros(teachers)  # moving average of the teacher's mean top probability
        self.batches = torch.zeros(teachers, dtype=torch.long)
        # Per class c, two moving averages. Recall: of the inputs the others' consensus calls c, the share the
        # teacher calls c too. False rate: of the inputs the consensus calls another class, the share the teacher
        # calls c (every input counts, whatever the teacher claims).
        self.class_recall = torch.zeros(teachers, num_classes)
        self.class_seen = torch.zeros(teachers, num_classes, dtype=torch.bool)
        self.class_false = torch.zeros(teachers, num_classes)
        self.false_seen = torch.zeros(teachers, num_classes, dtype=torch.bool)
        self.vote_rate = torch.zeros(teachers, num_classes)  # moving average of how often it names each class
        # How often it contradicts a sure consensus on a class it holds (``_contradicts``), per class the consensus
        # names: decayed counts of the inputs it was judged on and of those it contradicted. Its dissent rate
        # (``_spread``) sets its most contradicted class aside; on how many batches it was judged so.
        self.class_judged = torch.zeros(teachers, num_classes)
        self.class_against = torch.zeros(teachers, num_classes)
        self.dissent = torch.zeros(teachers)
        self.dissent_batches = torch.zeros(teachers, dtype=torch.long)
        self._warned: set[int] = set()
        self.vetoed = torch.zeros(teachers, dtype=torch.long)  # answers left out by the veto, per teacher
        self._flag_warned: set[int] = set()

    @torch.no_grad()
    def update(self, members: list[int], logits: Tensor) -> None:
        """Account one answered batch: ``logits`` (K', B, C) of ``members``."""
        if not self.enabled or len(members) < 3:  # two teachers cannot outvote each other
            return
        p = F.softmax(logits.detach().float().cpu(), -1)
        votes = p.argmax(-1)  # (K', B)
        top = p.max(-1).values  # (K', B): how sure each answer is
        for i, k in enumerate(members):
            others = torch.cat([p[:i], p[i + 1:]])
            median = median_of(others)  # (B, C)
            consensus = median.argmax(-1)  # (B,)
            agrees = (votes[i] == consensus).float()
            # Each input weighs as much as the teacher's claim to the class the others name.
            say = self.shares[k, consensus] if self.claims is not None else torch.ones_like(agrees)
            if float(say.sum()) > 0:  # (a batch only of classes it never claimed says nothing about it)
                first = self.batches[k] == 0
                self.agreement[k] = self._ema(self.agreement[k], (say * agrees).sum() / say.sum(), first)
                self.confidence[k] = self._ema(self.confidence[k], top[i].mean(), first)
                rate = torch.bincount(votes[i], minlength=self.num_classes).float() / len(agrees)
                self.vote_rate[k] = self._ema(self.vote_rate[k], rate, first)
                self.batches[k] += 1
            if len(members) < CLASS_CHECK:  # two others are no consensus on a class
                continue
            judged_sure, against = self._contradicts(k, p[i], median)
            if bool(judged_sure.any()):
                named = consensus[judged_sure]
                self.class_judged[k] = self.decay * self.class_judged[k] + torch.bincount(
                    named, minlength=self.num_classes).float()
                self.class_against[k] = self.decay * self.class_against[k] + torch.bincount(
                    consensus[against], minlength=self.num_classes).float()
                self.dissent[k] = self._spread(k)
                self.dissent_batches[k] += 1
            # Per class, the recall of "the others say c" by "the teacher says c": a teacher is held to recognising
            # what the others call c, on the classes it claims. Recall, not the overlap (intersection over union):
            # where two colluders swap two classes, the others' consensus on those classes is theirs as much as
            # the honest experts', and an overlap counts every input an honest expert rightly names against it
            # (measured: docs/robustness.md). A noisy teacher's claims are judged only where the others are sure
            # (their median probability of the class they name reaches SURE): among noisy teachers (DP-SGD), on the
            # inputs of a class they never saw the others are unsure, so the one client that knows it is not judged
            # there by teachers that cannot tell.
            sure = median.max(-1).values >= SURE if self.noisy[k] else torch.ones_like(agrees, dtype=torch.bool)
            judged = consensus[sure]
            count = torch.bincount(judged, minlength=self.num_classes).float()
            hits = torch.bincount(judged, weights=agrees[sure], minlength=self.num_classes)
            present = count > 0
            updated = self._ema(self.class_recall[k], hits / count.clamp_min(1), ~self.class_seen[k])
            self.class_recall[k] = torch.where(present, updated, self.class_recall[k])
            self.class_seen[k] |= present
            # Recall alone is won by naming c everywhere. Against that, how often the teacher names c where the
            # consensus names another class, on every input: a client that never saw that class is not excused, since
            # its "c" there says as little about c as a liar's. (Weighing each input by the teacher's claim to the
            # others' class, as an earlier precision score did, let a liar that claims c alone and names it
            # everywhere go unjudged and own the ensemble: docs/robustness.md.)
            elsewhere = len(judged) - count  # per class c, the judged inputs the consensus calls another class
            named = torch.bincount(votes[i][sure], weights=1 - agrees[sure], minlength=self.num_classes)
            rate = named / elsewhere.clamp_min(1)
            updated = self._ema(self.class_false[k], rate, ~self.false_seen[k])
            self.class_false[k] = torch.where(elsewhere > 0, updated, self.class_false[k])
            self.false_seen[k] |= elsewhere > 0
        self._log_changes()

    def _contradicts(self, k: int, p: Tensor, median: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) bool twice, for teacher ``k``'s probabilities ``p`` (B, C) against the median of the others' (B, C):
        the inputs it is judged on (the median names a class at least ``VETO_SURE`` that the teacher holds: at
        least half its own mean claim per class; every class where claims are not weighed) and, of those, the ones
        where it names another class, one the others hold too, surer than the median."""
        top, consensus = median.max(-1)
        judged = top >= VETO_SURE
        mine, vote = p.max(-1)
        against = judged & (vote != consensus) & (mine >= top)
        if self.claims is not None:
            judged &= self.holds[k, consensus]
            # The class it names must be one the others hold too (an equal share of its claimed records or more,
            # together): where it alone holds that class, they cannot recognise it, and a contradiction is an
            # expert's as much as a liar's.
            against &= judged & (1 - self.shares[k, vote] >= 1.0 / self.teachers)
        return judged, against

    def _spread(self, k: int) -> Tensor:
        """Teacher ``k``'s dissent rate with its most contradicted class set aside: the share of the inputs it was
        judged on (decayed counts, per class the consensus names) where it contradicted the others, leaving out the
        class of the highest rate among those holding at least 1/C of its judged inputs. One class it keeps
        confusing with another is what an honest client that saw few records of it does (Fashion-MNIST
        Dirichlet(0.1): a teacher holding 3.6 k sneakers and 1.2 k ankle boots called the others' sure boots
        sneakers on 37 % of them, and nothing else), and the class check answers for one class (its recall of it);
        the veto is for lies spread over the inputs, which set no class apart. 0 when the classes left hold less
        than 1/C of its judged inputs (nothing shows a contradiction beyond one class)."""
        judged, against = self.class_judged[k], self.class_against[k]
        total = judged.sum()
        if float(total) <= 0:
            return torch.tensor(0.0)
        evident = judged >= total / self.num_classes
        rate = torch.where(evident, against / judged.clamp_min(1e-12), torch.full_like(judged, -1.0))
        worst = int(rate.argmax())
        rest = total - judged[worst]
        if float(rest) < float(total) / self.num_classes:
            return torch.tensor(0.0)
        return (against.sum() - against[worst]) / rest

    def flagged(self) -> Tensor:
        """(K,) bool: the teachers whose dissent rate exceeds ``DISSENT_FLOOR`` and ``DISSENT_RATIO`` times the
        median judged teacher's; their contradicting answers are vetoed input by input (``veto``)."""
        seen = self.dissent_batches > 0
        if not self.enabled or int(seen.sum()) < CLASS_CHECK:
            return torch.zeros(self.teachers, dtype=torch.bool)
        return seen & (self.dissent > self._dissent_bar())

    def _dissent_bar(self) -> float:
        """The dissent rate above which a teacher is flagged: ``DISSENT_FLOOR`` or ``DISSENT_RATIO`` times the median
        judged teacher's, whichever is higher."""
        seen = self.dissent_batches > 0
        median = float(self.dissent[seen].median()) if bool(seen.any()) else 0.0
        return max(DISSENT_FLOOR, DISSENT_RATIO * median)

    @torch.no_grad()
    def veto(self, members: list[int], logits: Tensor, *, count: bool = False) -> Tensor | None:
        """(K', B) 0 where a flagged member (``flagged``) contradicts the others on the input (the conditions of
        ``_contradicts``, against the median of the other answering members), 1 elsewhere; None when nothing is
        vetoed. A liar that names a wrong class on a random share of the inputs, claiming every class, spreads its
        lies over inputs, where no class statistic sees them; an honest teacher is seldom flagged (its dissent is
        the median teacher's), and a flagged one keeps every answer the others do not contradict."""
        flagged = self.flagged()
        if len(members) < CLASS_CHECK or not bool(flagged[members].any()):
            return None
        p = F.softmax(logits.detach().float().cpu(), -1)
        keep = torch.ones(p.shape[:2])
        for i, k in enumerate(members):
            if bool(flagged[k]):
                median = median_of(torch.cat([p[:i], p[i + 1:]]))
                keep[i] = (~self._contradicts(k, p[i], median)[1]).float()
        if count:  # (answers to the method's queries; not the coordinator's evaluation of the ensemble)
            self.vetoed[members] += (keep == 0).sum(1).long()
        return keep.to(logits.device) if bool((keep == 0).any()) else None

    def _ema(self, current: Tensor, value: Tensor, first: Tensor) -> Tensor:
        """The moving average after ``value``; ``value`` itself where ``first``."""
        return torch.where(first, value, self.decay * current + (1 - self.decay) * value)

    def weights(self) -> Tensor:
        """(K,) weights in [0, 1]: 1 for every teacher until there is evidence."""
        return self._judged()[0]

    def _judged(self) -> tuple[Tensor, Tensor]:
        """(weights (K,), unsure (K,) bool: the teachers whose agreement would have left them out but whose answers
        are no surer than the median teacher's, so they keep their say)."""
        seen = self.batches > 0
        ones, none = torch.ones(self.teachers), torch.zeros(self.teachers, dtype=torch.bool)
        if not self.enabled or int(seen.sum()) < 3:
            return ones, none
        chance = 1.0 / self.num_classes
        typical = float(self.agreement[seen].median()) - chance
        if typical <= 0.05:  # the teachers hardly agree at all: no basis for singling one out
            return ones, none
        w = ((self.agreement - chance) / (self.tolerance * typical)).clamp(0.0, 1.0)
        # Below half weight a teacher is out altogether: a distrusted teacher's claimed label counts (any size)
        # must not buy back what its disagreement lost.
        w = torch.where(w < CUT, torch.zeros_like(w), w)
        w = torch.where(seen, w, ones)
        # Unsure is not contradicting: a teacher no surer than the median teacher keeps its say.
        unsure = seen & (self.confidence <= self.confidence[seen].median())
        return torch.where(unsure, ones, w), unsure & (w < CUT)

    def class_weights(self) -> Tensor:
        """(K, C) factors in [0, 1] for the label-count weights: a teacher's claim to speak for class c is honoured
        as far as it recognises the inputs the others' consensus calls c (recall, relative to the teacher best at
        c: full weight at ``tolerance`` of the best above chance; for a teacher that declares a privacy mechanism
        counted only on inputs where the others are sure, ``SURE``) and as far as its "c" tells c from the rest
        (discrimination: recall less the rate at which it names c where the consensus names another class, relative
        to the best teacher's, full at ``DISCRIMINATION_TOLERANCE`` of it). A claimed histogram is thus checked
        class by class against the answers; an honest teacher loses weight only on classes it barely saw, where its
        counts gave it little weight anyway."""
        if not self.enabled or int((self.batches > 0).sum()) < 3:
            return torch.ones(self.teachers, self.num_classes)
        factors = self._relative(self.class_recall, self.class_seen) * self._discrimination()
        # A teacher kept only because it is unsure keeps its voice, not a large claimed say. On a class only it and
        # one honest client claim (which the others cannot judge), an unverifiable histogram would otherwise drown
        # the honest expert, even with answers that never name the class. So its claimed records count for no more
        # than the median client's total, and for a class only as far as its own answers name it (in full once
        # they name it as often as a uniform guess would).
        # The same holds for a teacher flagged for contradicting a sure consensus (``flagged``): shown to lie on a
        # share of its inputs, its claimed histogram is no more credible than its answers, and on a class where the
        # pool holds little consensus to judge it by, its claim would otherwise own the column.
        restrained = self._judged()[1] | self.flagged()
        if self.claims is None or not bool(restrained.any()):
            return factors
        totals = self.claims.sum(1)
        cap = (totals.median() / totals.clamp_min(1e-12)).clamp(max=1.0).float().unsqueeze(1)
        named = (self.num_classes * self.vote_rate).clamp(max=1.0)
        return torch.where(restrained.unsqueeze(1), factors * cap * named, factors)

    def discrimination(self) -> Tensor:
        """(K, C) recall of c less the rate of naming c where the consensus names another class (0 for a teacher
        that names c as often whatever the input); NaN where either is without evidence."""
        known = self.class_seen & self.false_seen
        return torch.where(known, self.class_recall - self.class_false, torch.full_like(self.class_recall, math.nan))

    def _discrimination(self) -> Tensor:
        """(K, C) factors: per class, the teacher's discrimination relative to the best teacher's (full at
        ``DISCRIMINATION_TOLERANCE`` of it, none at zero or below); 1 where there is no evidence, or where even the
        best is within 0.05 of zero."""
        score = self.discrimination()
        known = ~torch.isnan(score)
        return self._relative(torch.nan_to_num(score, nan=0.0), known, chance=0.0, tolerance=DISCRIMINATION_TOLERANCE)

    def _relative(self, score: Tensor, seen: Tensor, *, chance: float | None = None,
                  tolerance: float | None = None) -> Tensor:
        """(K, C) factors: per class, ``score`` above ``chance`` (default 1 / C) relative to the best teacher's
        (full at ``tolerance`` of it, default the estimate's); 1 where there is no evidence, or where even the best
        is within 0.05 of chance."""
        chance = 1.0 / self.num_classes if chance is None else chance
        tolerance = self.tolerance if tolerance is None else tolerance
        best = (score * seen).max(0).values - chance  # (C,)
        r = ((score - chance) / (tolerance * best.clamp_min(1e-6))).clamp(0.0, 1.0)
        return torch.where((best > 0.05).unsqueeze(0) & seen, r, torch.ones_like(r))

    def _log_changes(self) -> None:
        w = self.weights()
        for k in range(self.teachers):
            if w[k] < CUT and k not in self._warned:
                self._warned.add(k)
                logger.warning("teacher %d is left out of the ensemble (weight %.2f): answering surer than the median "
                               "teacher, it agrees with the others on %.0f%% of the inputs of the classes it claims "
                               "(the median teacher: %.0f%%)", k, float(w[k]),
                               100 * float(self.agreement[k]),
                               100 * float(self.agreement[self.batches > 0].median()))
            elif w[k] >= TRUSTED_AGAIN and k in self._warned:
                self._warned.discard(k)
                logger.warning("teacher %d is trusted again (weight %.2f)", k, float(w[k]))
        flagged, cleared = self.flagged(), TRUSTED_AGAIN * self._dissent_bar()
        for k in range(self.teachers):
            if bool(flagged[k]) and k not in self._flag_warned:
                self._flag_warned.add(k)
                seen = self.dissent_batches > 0
                logger.warning("teacher %d contradicts the others' sure answer on %.0f%% of the inputs of classes it "
                               "claims, its most contradicted class set aside (the median teacher: %.0f%%): its "
                               "contradicting answers are left out, input by input", k, 100 * float(self.dissent[k]),
                               100 * float(self.dissent[seen].median()))
            elif not bool(flagged[k]) and k in self._flag_warned and float(self.dissent[k]) <= cleared:
                self._flag_warned.discard(k)
                logger.warning("teacher %d no longer contradicts the others more than the median teacher does", k)

    def state_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement.clone(), "confidence": self.confidence.clone(),
                "batches": self.batches.clone(), "warned": sorted(self._warned),
                "class_recall": self.class_recall.clone(), "class_seen": self.class_seen.clone(),
                "class_false": self.class_false.clone(), "false_seen": self.false_seen.clone(),
                "vote_rate": self.vote_rate.clone(), "dissent": self.dissent.clone(),
                "dissent_batches": self.dissent_batches.clone(), "vetoed": self.vetoed.clone(),
                "class_judged": self.class_judged.clone(), "class_against": self.class_against.clone(),
                "flag_warned": sorted(self._flag_warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agreement = state["agreement"].clone().float()
        self.confidence = state.get("confidence", torch.zeros_like(self.agreement)).clone().float()
        self.batches = state["batches"].clone().long()
        self._warned = {int(k) for k in state["warned"]}
        # (a checkpoint from before recall was kept: its per-class overlap stands in for the recall; one from
        # before the false rates were kept, precision in their place or nothing: they start without evidence)
        recall = state["class_recall"] if "class_recall" in state else state["class_agreement"]
        self.class_recall = recall.clone().float()
        self.class_seen = state["class_seen"].clone().bool()
        self.class_false = state.get("class_false", torch.zeros_like(self.class_recall)).clone().float()
        self.false_seen = state.get("false_seen", torch.zeros_like(self.class_seen)).clone().bool()
        # (a checkpoint from before the vote rates were kept: every class counts as named until answers come)
        self.vote_rate = state.get("vote_rate", torch.ones(self.teachers, self.num_classes)).clone().float()
        # (a checkpoint from before the veto: no teacher has dissented yet)
        self.dissent = state.get("dissent", torch.zeros(self.teachers)).clone().float()
        # (a checkpoint from before the per-class counts: the rate stands until the next judged batch recounts it)
        blank = torch.zeros(self.teachers, self.num_classes)
        self.class_judged = state.get("class_judged", blank).clone().float()
        self.class_against = state.get("class_against", blank).clone().float()
        self.dissent_batches = state.get("dissent_batches", torch.zeros(self.teachers)).clone().long()
        self.vetoed = state.get("vetoed", torch.zeros(self.teachers)).clone().long()
        self._flag_warned = {int(k) for k in state.get("flag_warned", [])}


class GradientAgreement:
    """Per teacher, whether its input gradients agree with its own answers (which decides whether its gradient
    term stays in the sum the generator follows) and how they point relative to the other teachers' (reported)."""

    # a measured slope within [1/RATIO, RATIO] x the claimed one is consistent (first order, ReLU kinks allowed)
    RATIO = 2.0

    def __init__(self, teachers: int, *, decay: float = 0.8, enabled: bool = True, first: int = 3,
                 every: int = 10, seed: int = 0) -> None:
        self.teachers, self.decay, self.enabled = teachers, decay, enabled
        self.first, self.every, self.seed = first, every, seed
        self.cosine = torch.zeros(teachers)
        self.batches = torch.zeros(teachers, dtype=torch.long)
        self.consistency = torch.ones(teachers)  # moving average of "the measured slope backs the claimed one"
        self.checks = torch.zeros(teachers, dtype=torch.long)
        self.ratio = torch.zeros(teachers)  # the last measured / claimed slope, for the report
        self.backwards = 0
        self._warned: set[int] = set()

    def due(self) -> bool:
        """Whether this Backward's answers are checked against the teachers' own Forwards (counts Backwards)."""
        self.backwards += 1
        drawn = random.Random(f"{self.seed}:{self.backwards}").random() < 1.0 / self.every
        return self.enabled and (self.backwards <= self.first or drawn)

    def record_consistency(self, ratios: dict[int, float]) -> None:
        """Account one consistency check: measured / claimed slope per teacher checked."""
        for k, ratio in ratios.items():
            ok = float(1.0 / self.RATIO <= ratio <= self.RATIO)
            self.checks[k] += 1
            # a bias-corrected moving average (Adam's correction of an average started at 0): the first check is
            # the whole average, the n-th weighs (1 - decay) / (1 - decay^n), so no single early verdict decides
            # for long (one borderline check of an honest gradient, 0.499 x its claim, had kept it out for 50
            # Backwards); a teacher that fails every check stays at 0 from the first
            step = (1 - self.decay) / (1 - self.decay ** int(self.checks[k]))
            self.consistency[k] = float(self.consistency[k]) + step * (ok - float(self.consistency[k]))
            self.ratio[k] = ratio
        self._log_changes()

    @torch.no_grad()
    def update(self, grads: dict[int, Tensor]) -> None:
        """Account one Backward: ``grads`` maps each teacher that answered to its (B, ...) input gradient."""
        if not self.enabled or len(grads) < 3:
            return
        keys = sorted(grads)
        g = torch.stack([grads[k].detach().float().flatten(1) for k in keys])  # (K', B, D)
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        median = g.median(0).values  # (B, D): each coordinate's median over the teachers' directions
        cosine = F.cosine_similarity(g, median.unsqueeze(0), dim=-1, eps=1e-30)  # (K', B)
        for i, k in enumerate(keys):
            first = self.batches[k] == 0
            value = cosine[i].mean()
            self.cosine[k] = value if first else self.decay * self.cosine[k] + (1 - self.decay) * value
            self.batches[k] += 1

    def weights(self) -> Tensor:
        """(K,) weights of each teacher's gradient term: 0 while its consistency average is below one half, else
        1 (and 1 until it has been checked)."""
        if not self.enabled:
            return torch.ones(self.teachers)
        return torch.where(self.consistency < CUT, torch.zeros(self.teachers), torch.ones(self.teachers))

    def _log_changes(self) -> None:
        w = self.weights()
        for k in range(self.teachers):
            if w[k] < CUT and k not in self._warned:
                self._warned.add(k)
                logger.warning("teacher %d's input gradients are left out: they contradict its own answers (a step "
                               "along its gradient changed its objective by %.2f x what the gradient claims); its "
                               "logits keep their say", k, float(self.ratio[k]))
            elif w[k] >= CUT and k in self._warned:
                self._warned.discard(k)
                logger.warning("teacher %d's input gradients are trusted again (its last check: %.2f x the claim)", k,
                               float(self.ratio[k]))

    def state_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine.clone(), "batches": self.batches.clone(), "warned": sorted(self._warned),
                "consistency": self.consistency.clone(), "checks": self.checks.clone(), "ratio": self.ratio.clone(),
                "backwards": self.backwards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cosine = state["cosine"].clone().float()
        self.batches = state["batches"].clone().long()
        self._warned = {int(k) for k in state["warned"]}
        self.consistency = state["consistency"].clone().float()
        self.checks = state["checks"].clone().long()
        self.ratio = state["ratio"].clone().float()
        self.backwards = int(state["backwards"])


# No client's claimed label counts weigh more than this many times the median client's total (robust default).
MAX_COUNT_RATIO = 4.0


class DensityCheck:
    """Whether each density teacher's claimed log-densities integrate to at most one (module docstring)."""

    def __init__(self, teachers: Sequence[int], input_shape: Sequence[int], *, seed: int = 0,
                 probes: int = DENSITY_PROBES, scales: Sequence[float] = DENSITY_SCALES,
                 alpha: float = DENSITY_ALPHA) -> None:
        """``teachers``: the members to check (their answers carry a log-density per input value)."""
        self.pending = sorted(set(teachers))
        self.input_shape = tuple(input_shape)
        self.seed, self.probes, self.scales, self.alpha = seed, probes, tuple(scales), alpha
        self.log_mass: dict[int, float] = {}  # log of the mean of p(x) / q(x) over the probes
        self.refuted: set[int] = set()
        self.missed: dict[int, int] = {}  # probes each pending teacher left unanswered

    @property
    def due(self) -> bool:
        return bool(self.pending)

    def draw(self) -> tuple[Tensor, Tensor]:
        """The probe inputs (N, *input_shape), normalised, and log q of each (N,): x = s * N(0, I), s drawn
        uniformly from the scales (the same probes on every call: the draw depends on the run's seed alone)."""
        g = torch.Generator().manual_seed(self.seed)
        d = math.prod(self.input_shape)
        scales = torch.tensor(self.scales, dtype=torch.float64)
        pick = torch.randint(len(scales), (self.probes,), generator=g)
        x = torch.randn(self.probes, d, generator=g, dtype=torch.float64) * scales[pick].unsqueeze(1)
        sq = x.pow(2).sum(1, keepdim=True)  # (N, 1)
        per_scale = -0.5 * sq / scales.pow(2) - 0.5 * d * torch.log(2 * math.pi * scales.pow(2))  # (N, S)
        log_q = torch.logsumexp(per_scale, 1) - math.log(len(scales))
        return x.float().view(self.probes, *self.input_shape), log_q

    def judge(self, answers: dict[int, Tensor], log_q: Tensor) -> None:
        """``answers``: per member, its log-densities per input value on the probes (N,). A pending member that did
        not answer is asked again with the next batch that needs the gate; one that leaves ``DENSITY_ATTEMPTS``
        probes unanswered is refuted (a teacher that answers every query but never the check is evading it)."""
        d = math.prod(self.input_shape)
        for k in [k for k in self.pending if k not in answers]:
            self.missed[k] = self.missed.get(k, 0) + 1
            if self.missed[k] >= DENSITY_ATTEMPTS:
                self.pending.remove(k)
                self.refuted.add(k)
                logger.warning("teacher %d takes no share of the density gate: it left the density check's probes "
                               "unanswered %d times", k, self.missed[k])
        for k, per_value in answers.items():
            if k not in self.pending:
                continue
            self.pending.remove(k)
            ratio = d * per_value.detach().double().cpu() - log_q
            ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
            mass = float(torch.logsumexp(ratio, 0) - math.log(len(ratio)))
            self.log_mass[k] = mass
            if mass > math.log(1 / self.alpha):
                self.refuted.add(k)
                logger.warning("teacher %d takes no share of the density gate: its log-densities claim %s times "
                               "the mass a density has on probes the coordinator drew (log %.0f; an honest density "
                               "passes this with probability >= %g)", k,
                               "infinitely many" if math.isinf(mass) else f"e^{mass:.0f}", mass, 1 - self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"pending": list(self.pending), "log_mass": dict(self.log_mass), "refuted": sorted(self.refuted),
                "missed": dict(self.missed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = sorted(int(k) for k in state["pending"])
        self.log_mass = {int(k): float(v) for k, v in state["log_mass"].items()}
        self.refuted = {int(k) for k in state["refuted"]}
        self.missed = {int(k): int(v) for k, v in state.get("missed", {}).items()}


def capped_counts(descriptions: Sequence[TeacherDescription], *, enabled: bool = True) -> tuple[list[Any], list[float]]:
    """The clients' label counts, each scaled down so that its total is at most MAX_COUNT_RATIO x the median
    total of the clients that share counts (when at least three do): a claimed histogram is unverifiable, and
    an inflated one would otherwise buy a teacher the whole say on every class. Returns (counts, scale each)."""
    return cap_counts([d.label_counts for d in descriptions], enabled=enabled)


def cap_counts(counts: Sequence[Sequence[float] | None], *, enabled: bool = True) -> tuple[list[Any], list[float]]:
    """:func:`capped_counts` on the claimed histograms themselves (None: a client that shares none)."""
    counts = list(counts)
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
