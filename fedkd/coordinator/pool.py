"""The coordinator's view of all its teachers: one fan-out per query.

A :class:`TeacherPool` sends the same query to every teacher at once and
returns the answers of those that replied. The :class:`~fedkd.coordinator.ensemble.Ensemble`
turns a pool into one autograd function, so method code is the same for
in-process teachers (:class:`LocalPool`, here) and teachers behind the gRPC hub
(``fedkd.server.hub_pool.HubPool``), which answers in parallel, with deadlines and a quorum.

Members are indexed 0..K-1 in a fixed order. Answers are dicts keyed by member:
a member missing from a reply did not answer (dropped out, missed the
deadline, or refused); each pool counts that as ``missed`` in its stats.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from fedkd.contract import (
    ForwardReply,
    QueryContext,
    QueryError,
    QueryStats,
    StudentEvaluation,
    StudentToEvaluate,
    TeacherDescription,
    releases_density,
)
from fedkd.institution.host import TeacherHost
from fedkd.institution.privacy.ledger import BudgetExhausted

logger = logging.getLogger(__name__)


class QuorumError(RuntimeError):
    """Fewer teachers answered a query than the run's quorum; the message says who and why."""


class TeacherPool(Protocol):
    """Every teacher of a run, queried together."""

    @property
    def descriptions(self) -> list[TeacherDescription]: ...

    def forward(self, inputs: Tensor, state: QueryContext, *, terms: Sequence[str] = (),
                min_answers: int | None = None, only: Sequence[int] | None = None,
                keep: bool = False) -> dict[int, ForwardReply]:
        """Logits (and each of ``terms`` from the members that compute it) per answering member; ``only``
        asks just those members (the others are not queried and not counted as missed). A member that grants
        labels only is asked for labels; its reply carries them and their vote logits. ``keep``: a Backward
        will follow; each reply's ``ref`` is what it names.

        Raises :class:`QuorumError` when fewer than ``min_answers`` (default: the pool's quorum) answer.
        """
        ...

    def backward(self, inputs: Tensor, grads: Mapping[int, tuple[Tensor, Mapping[str, float]]],
                 state: QueryContext, refs: Mapping[int, Any] | None = None) -> dict[int, Tensor]:
        """Gradient w.r.t. ``inputs`` from each member in ``grads`` (its grad_logits, grad_terms) that answered;
        a member with a ref in ``refs`` is sent that (its Forward's id) instead of the inputs."""
        ...

    def draw(self, k: int, count: int, label: int, state: QueryContext, *, seed: int) -> Tensor | None:
        """``count`` inputs drawn from member ``k``'s density's component of class ``label`` (its description says
        it draws), in the normalised input space, checked; None where it did not answer (refused, out of budget,
        gone, or an answer that is not what was asked: logged and counted as missed)."""
        ...

    def stats(self) -> list[QueryStats]:
        """The coordinator's count of what each member answered (same order as ``descriptions``)."""
        ...

    def restore_stats(self, stats: Sequence[Mapping[str, int]]) -> None: ...

    def client_reports(self) -> list[dict[str, Any]]:
        """What each client itself says it released (its own accounting)."""
        ...

    def evaluate_student(self, student: StudentToEvaluate,
                         state: QueryContext) -> dict[int, StudentEvaluation | str]:
        """Each member that evaluates students (its description says so) evaluates ``student`` on its own held-out
        data: the counts it released, or why there are none. Never raises for a member's refusal."""
        ...


@dataclass(frozen=True)
class MemberQuery:
    """One teacher's part of a query."""

    labels: bool  # hard labels only: a labels-only client
    terms: tuple[str, ...]  # the asked-for teacher-side terms it computes (none for a labels-only client)
    keep: bool  # keep the graph for the Backward that follows (only a client that grants gradients)


def plan(description: TeacherDescription, terms: Sequence[str], keep: bool = False) -> MemberQuery:
    """What a member is asked, given what it grants and computes: the one rule for every pool."""
    labels = "logits" not in description.access_modes
    asked = () if labels else tuple(t for t in terms if t in description.available_terms)
    return MemberQuery(labels, asked, keep and "gradient" in description.access_modes)


class LocalPool:
    """Teachers in this process (their hosts called one after another). Nothing fails over here."""

    def __init__(self, hosts: Sequence[TeacherHost]) -> None:
        if not hosts:
            raise ValueError("a teacher pool needs at least one teacher")
        self.hosts = list(hosts)
        self._stats = [QueryStats() for _ in self.hosts]
        self._refs = itertools.count(1)
        self.exhausted: dict[int, str] = {}  # member -> why its privacy budget refused (it is asked no more)

    @property
    def descriptions(self) -> list[TeacherDescription]:
        return [h.describe() for h in self.hosts]

    def _exhausted(self, k: int, exc: QueryError) -> None:
        """A member whose budget refused: counted as missed, and asked no more this run."""
        self.exhausted[k] = exc.message
        self._stats[k].missed += 1
        logger.warning("client %d stops answering: %s", self.hosts[k].description.client, exc.message)

    def _check_quorum(self, answered: int, need: int, what: str) -> None:
        if answered < need:
            why = "; ".join(f"client {self.hosts[k].description.client}: {m}" for k, m in self.exhausted.items())
            raise QuorumError(f"{what}: {answered} of {len(self.hosts)} teachers answered, {need} needed ({why})")

    def forward(self, inputs: Tensor, state: QueryContext, *, terms: Sequence[str] = (),
                min_answers: int | None = None, only: Sequence[int] | None = None,
                keep: bool = False) -> dict[int, ForwardReply]:
        replies = {}
        for k, host in enumerate(self.hosts):
            if (only is not None and k not in only) or k in self.exhausted:
                continue
            part = plan(host.description, terms, keep)
            ref = next(self._refs) if part.keep else None
            started = time.perf_counter()
            try:
                reply = host.forward(inputs, state, terms=part.terms, labels=part.labels, keep=ref)
            except BudgetExhausted as exc:
                self._exhausted(k, exc)
                continue
            self._stats[k].answer_ms += round(1000 * (time.perf_counter() - started))
            if ref is not None:
                reply = dataclasses.replace(reply, ref=ref)
            self._stats[k].count_forward(inputs, reply, density=releases_density(host.description, state, part.labels))
            replies[k] = reply
        self._check_quorum(len(replies), 1 if min_answers is None else min_answers, "Forward")
        return replies

    def backward(self, inputs: Tensor, grads: Mapping[int, tuple[Tensor, Mapping[str, float]]],
                 state: QueryContext, refs: Mapping[int, Any] | None = None) -> dict[int, Tensor]:
        out = {}
        for k, (grad_logits, grad_terms) in grads.items():
            ref = (refs or {}).get(k)
            started = time.perf_counter()
            try:
                grad = self.hosts[k].backward(None if ref is not None else inputs, grad_logits, state,
                                              grad_terms=grad_terms, forward_id=ref)
            except BudgetExhausted as exc:
                self._exhausted(k, exc)
                continue
            self._stats[k].answer_ms += round(1000 * (time.perf_counter() - started))
            self._stats[k].count_backward(inputs, grad_logits, grad, by_ref=ref is not None)
            out[k] = grad
        return out

    def draw(self, k: int, count: int, label: int, state: QueryContext, *, seed: int) -> Tensor | None:
        if k in self.exhausted:
            return None
        started = time.perf_counter()
        try:
            images = self.hosts[k].draw(count, label, state, seed=seed)
        except BudgetExhausted as exc:
            self._exhausted(k, exc)
            return None
        except QueryError as exc:  # (a class it holds too few images of to model: the coordinator climbs it)
            self._stats[k].missed += 1
            logger.info("client %d refused a Draw of class %d: %s", self.hosts[k].description.client, label,
                        exc.message)
            return None
        self._stats[k].answer_ms += round(1000 * (time.perf_counter() - started))
        self._stats[k].count_draw(images)
        return images

    def stats(self) -> list[QueryStats]:
        return list(self._stats)

    def restore_stats(self, stats: Sequence[Mapping[str, int]]) -> None:
        self._stats = [QueryStats(**dict(s)) for s in stats]

    def client_reports(self) -> list[dict[str, Any]]:
        return [{"client": h.description.client, **h.stats.as_dict()} for h in self.hosts]

    def evaluate_student(self, student: StudentToEvaluate,
                         state: QueryContext) -> dict[int, StudentEvaluation | str]:
        out: dict[int, StudentEvaluation | str] = {}
        for k, host in enumerate(self.hosts):
            if host.describe().evaluates_student:
                try:
                    out[k] = host.evaluate_student(student, state)
                except QueryError as exc:
                    out[k] = f"refused: {exc.code}: {exc.message}"
        return out
