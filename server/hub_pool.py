"""The coordinator's teacher pool over the hub (a :class:`~fedkd.coordinator.pool.TeacherPool`): every Forward
and Backward goes to all live teachers at once, with a deadline; the run continues while a quorum answers, waits
(bounded) for dropped teachers to rejoin when it does not, and records what each teacher answered. Each teacher's
part of a query is planned by :func:`fedkd.coordinator.pool.plan`, as for in-process teachers; the messages are the
codec's."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from torch import Tensor

from fedkd.codec import (
    backward_request,
    decode_backward_reply,
    decode_draw_reply,
    decode_evaluation,
    decode_forward_reply,
    draw_request,
    encode_tensor,
    evaluate_request,
    forward_inputs,
    forward_request,
)
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
from fedkd.coordinator.pool import QuorumError, plan
from fedkd.institution.privacy.ledger import BUDGET_REFUSAL
from fedkd.v1 import fedkd_pb2 as pb

from .membership import Connection, ConnectionLost, Members, Slot

logger = logging.getLogger(__name__)

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
STRAGGLER_FLOOR = 1.0  # seconds: the straggler rule never cuts a teacher sooner (jitter is not slowness)
EVALUATION_TIMEOUT = 300.0  # seconds an institution may take to evaluate the student on its held-out data


@dataclass
class _Outcome:
    answers: dict[int, pb.AgentMessage]
    failures: dict[str, str]  # teacher name -> why it did not answer
    lost: bool  # some teacher dropped out during the query (worth waiting for a rejoin)
    ids: dict[int, tuple[Connection, int]] = field(default_factory=dict)  # teacher -> (connection, message id)


def _stamp(times: dict[int, float], k: int, _: cf.Future[pb.AgentMessage]) -> None:
    """When teacher k's answer arrived (a future's done-callback)."""
    times[k] = time.monotonic()


class HubPool:
    """The coordinator's pool over a hub: parallel fan-out, deadlines, quorum, rejoin, per-teacher accounting."""

    def __init__(self, hub: Members) -> None:
        self.hub = hub

    @property
    def descriptions(self) -> list[TeacherDescription]:
        missing = [s.name for s in self.hub.slots if s.description is None]
        if missing:
            raise QuorumError(f"teachers {', '.join(missing)} have never connected; wait for them first")
        return [s.description for s in self.hub.slots if s.description is not None]

    # Fan-out ----------------------------------------------------------------------------

    def _wait_for_quorum(self, need: int) -> list[Slot]:
        hub = self.hub
        live = hub.await_live(need, hub.rejoin_timeout)
        if live is None:
            raise QuorumError(f"only {len(hub.live())} of {len(hub.slots)} teachers are connected and {need} must "
                              f"answer; waited {hub.rejoin_timeout:.0f} s for {', '.join(hub.missing())} to rejoin")
        return live

    def _fan_out(self, messages: Mapping[int, dict[str, Any]], timeout: float | None = None,
                 enough: int = 0) -> _Outcome:
        """Send ``messages[k]`` to teacher k (all at once) and gather the answers within the deadline (the hub's
        query timeout unless ``timeout`` says otherwise). With the hub's ``straggler_factor`` F > 0, once ``enough``
        teachers have answered the others get F times the median answer time so far (at least
        STRAGGLER_FLOOR seconds) and the query goes on without them: late, counted and named."""
        hub = self.hub
        timeout = hub.query_timeout if timeout is None else timeout
        sent: dict[int, tuple[Connection, int, cf.Future[pb.AgentMessage]]] = {}
        sent_at: dict[int, float] = {}
        answered_at: dict[int, float] = {}
        ids: dict[int, tuple[Connection, int]] = {}
        failures: dict[str, str] = {}
        lost = False
        for k, kind in messages.items():
            slot = hub.slots[k]
            connection = slot.connection
            if connection is None or connection.closed.is_set():
                failures[slot.name] = "not connected"
                lost = True
                continue
            size = (len(kind["serialized"].body) if "serialized" in kind
                    else sum(m.ByteSize() for m in kind.values())) + 16  # + the envelope's id and tags
            if size > connection.limit:
                raise QueryError("RESOURCE_EXHAUSTED", f"a query of {size:,} bytes exceeds {slot.name}'s message "
                                 f"limit of {connection.limit:,} bytes; lower batch-size or raise max-message-mb")
            try:
                mid, future, wire = connection.send(**kind)
            except ConnectionLost as exc:
                failures[slot.name] = f"disconnected ({exc})"
                lost = True
                continue
            slot.stats.wire_bytes += wire
            sent_at[k] = time.monotonic()
            future.add_done_callback(functools.partial(_stamp, answered_at, k))
            sent[k] = (connection, mid, future)
            ids[k] = (connection, mid)
        done, late = self._gather(sent, sent_at, answered_at, timeout, enough)
        answers = {}
        for k, (connection, mid, future) in sent.items():
            name = hub.slots[k].name
            # how long the coordinator waited for this teacher (the whole deadline for one that never answered). A
            # future's done-callbacks run after its waiters wake: an answer not stamped yet arrived just now.
            waited = answered_at.get(k, time.monotonic()) - sent_at[k] if future in done else (late or timeout)
            hub.slots[k].stats.answer_ms += round(1000 * waited)
            if future not in done:
                connection.forget(mid)
                if late is not None:
                    hub.slots[k].stats.late += 1
                    failures[name] = (f"late: no answer within {late:.2g} s, {hub.straggler_factor:g} x the median "
                                      "answer time of the teachers that answered (straggler-factor)")
                else:
                    failures[name] = f"no answer within {timeout:g} s"
                continue
            try:
                msg = future.result()
            except ConnectionLost as exc:
                failures[name] = f"disconnected ({exc})"
                lost = True
                continue
            if msg.WhichOneof("kind") == "error":
                code = STATUS_CODES.get(msg.error.code, grpc.StatusCode.UNKNOWN)
                failures[name] = f"refused: {code.name}: {msg.error.message}"
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and msg.error.message.startswith(BUDGET_REFUSAL):
                    hub.slots[k].exhausted = msg.error.message
                    logger.warning("%s stops answering: %s", name, msg.error.message)
                continue
            answers[k] = msg
        return _Outcome(answers, failures, lost, ids)

    def _gather(self, sent: Mapping[int, tuple[Connection, int, cf.Future[pb.AgentMessage]]],
                sent_at: Mapping[int, float], answered_at: Mapping[int, float], timeout: float,
                enough: int) -> tuple[set[cf.Future[pb.AgentMessage]], float | None]:
        """The futures answered before the query's deadline: ``timeout`` after it was sent, or, under the straggler
        policy, F x the median answer time once ``enough`` have answered (never below STRAGGLER_FLOOR); and the
        seconds after which the straggler rule cut the others (None when it cut nobody)."""
        futures = {k: f for k, (_, _, f) in sent.items()}
        start = min(sent_at.values(), default=time.monotonic())
        deadline, cut = start + timeout, None
        factor = self.hub.straggler_factor
        pending = set(futures.values())
        while pending:
            now = time.monotonic()
            limit = deadline
            answered = [k for k, f in futures.items() if f not in pending]
            if factor > 0 and answered and len(answered) >= max(enough, 1):
                times = sorted(answered_at.get(k, now) - sent_at[k] for k in answered)
                limit = min(deadline, start + max(STRAGGLER_FLOOR, factor * times[len(times) // 2]))
            if now >= limit:
                cut = limit - start if limit < deadline else None
                break
            _, pending = cf.wait(pending, timeout=limit - now, return_when=cf.FIRST_COMPLETED)
        return {f for f in futures.values() if f not in pending}, cut

    def _check_quorum(self, outcome: _Outcome, need: int, what: str) -> None:
        if len(outcome.answers) < need:
            reasons = {s.name: s.exhausted for s in self.hub.slots if s.exhausted is not None}
            reasons.update(outcome.failures)
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(reasons.items()))
            raise QuorumError(f"{what}: {len(outcome.answers)} of {len(self.hub.slots)} teachers answered, "
                              f"{need} needed ({why})")

    def forward(self, inputs: Tensor, state: QueryContext, *, terms: Sequence[str] = (),
                min_answers: int | None = None, only: Sequence[int] | None = None,
                keep: bool = False) -> dict[int, ForwardReply]:
        need = self.hub.quorum if min_answers is None else min_answers
        asked = set(range(len(self.hub.slots)) if only is None else only)
        asked -= {s.index for s in self.hub.slots if s.exhausted is not None}  # their budgets refused already
        descriptions = self.descriptions
        x_field = forward_inputs(inputs)  # serialised once; each teacher's part of the query is appended to it
        batch, classes = len(inputs), descriptions[0].num_classes
        parts = [plan(d, terms, keep) for d in descriptions]
        for attempt in range(3):
            live = self._wait_for_quorum(need)
            messages = {s.index: {"serialized": forward_request(
                x_field, state, terms=parts[s.index].terms, labels=parts[s.index].labels, keep=parts[s.index].keep,
            )} for s in live if s.index in asked}
            outcome = self._fan_out(messages, enough=need)
            replies = {}
            for k, msg in outcome.answers.items():
                slot = self.hub.slots[k]
                try:
                    reply = decode_forward_reply(msg, batch, classes, labels=parts[k].labels, terms=parts[k].terms,
                                                 outputs=descriptions[k].outputs)
                except QueryError as exc:
                    outcome.failures[slot.name] = f"bad answer: {exc.message}"
                    continue
                slot.stats.count_forward(inputs, reply,
                                         density=releases_density(descriptions[k], state, parts[k].labels))
                if parts[k].keep:
                    reply = dataclasses.replace(reply, ref=outcome.ids[k])  # the Backward names this query
                replies[k] = reply
            outcome.answers = {k: outcome.answers[k] for k in replies}
            for slot in self.hub.slots:
                if slot.index in asked and slot.index not in replies:
                    slot.stats.missed += 1
            self._log_failures(outcome, "Forward")
            if len(replies) >= need or not outcome.lost or attempt == 2:
                self._check_quorum(outcome, need, "Forward")
                return replies
            logger.warning("Forward below quorum after a teacher dropped out; waiting for it to rejoin")
        raise AssertionError("unreachable")

    def backward(self, inputs: Tensor, grads: Mapping[int, tuple[Tensor, Mapping[str, float]]],
                 state: QueryContext, refs: Mapping[int, Any] | None = None) -> dict[int, Tensor]:
        if not grads:
            return {}
        x: pb.Tensor | None = None
        messages = {}
        by_ref: set[int] = set()
        for k, (grad_logits, grad_terms) in grads.items():
            ref = (refs or {}).get(k)
            slot = self.hub.slots[k]
            connection = slot.connection
            if ref is not None and connection is not None and ref[0] is connection and not connection.closed.is_set():
                # the same stream that answered the Forward: name it, the inputs do not travel again
                request = backward_request(grad_logits, grad_terms, state, forward_id=ref[1])
                by_ref.add(k)
            else:  # no Forward to name (or the teacher reconnected since): carry the inputs
                x = encode_tensor(inputs) if x is None else x
                request = backward_request(grad_logits, grad_terms, state, inputs=x)
            messages[k] = {"backward": request}
        outcome = self._fan_out(messages, enough=1)
        # A teacher that no longer keeps the named Forward's graph (evicted, or restarted) gets the inputs.
        stale = [k for k in by_ref if "does not keep" in outcome.failures.get(self.hub.slots[k].name, "")]
        if stale:
            x = encode_tensor(inputs) if x is None else x
            for k in stale:
                messages[k]["backward"].inputs.CopyFrom(x)
                messages[k]["backward"].forward_id = 0
                del outcome.failures[self.hub.slots[k].name]
                by_ref.discard(k)
            retry = self._fan_out({k: messages[k] for k in stale})
            outcome.answers.update(retry.answers)
            outcome.failures.update(retry.failures)
        out = {}
        for k, msg in outcome.answers.items():
            slot = self.hub.slots[k]
            if msg.WhichOneof("kind") != "backward":
                outcome.failures[slot.name] = f"answered a Backward with {msg.WhichOneof('kind')}"
                continue
            try:
                grad = decode_backward_reply(msg, inputs, max_bytes=self.hub.max_message_bytes)
            except QueryError as exc:
                outcome.failures[slot.name] = f"bad answer: {exc.message}"
                continue
            slot.stats.count_backward(inputs, grads[k][0], grad, by_ref=k in by_ref)
            out[k] = grad
        for k in grads:
            if k not in out:
                self.hub.slots[k].stats.missed += 1
        outcome.answers = {k: outcome.answers[k] for k in out}
        self._log_failures(outcome, "Backward")
        # The Forward already met the quorum; a Backward a teacher misses only loses its gradient term.
        self._check_quorum(outcome, 1, "Backward")
        return out

    def draw(self, k: int, count: int, label: int, state: QueryContext, *, seed: int) -> Tensor | None:
        """Teacher ``k``'s Draw (see ``TeacherPool.draw``): one teacher asked, within the query deadline; what it
        sends is checked (:func:`decode_draw_reply`) and counted. None where it did not answer."""
        slot = self.hub.slots[k]
        if slot.exhausted is not None or slot.description is None:
            return None
        outcome = self._fan_out({k: {"draw": draw_request(count, label, state, seed)}}, enough=1)
        images = None
        if k in outcome.answers:
            try:
                images = decode_draw_reply(outcome.answers[k], count, slot.description.input_shape,
                                           max_bytes=self.hub.max_message_bytes)
            except QueryError as exc:
                outcome.failures[slot.name] = f"bad answer: {exc.message}"
        if images is None:
            slot.stats.missed += 1
            self._log_failures(outcome, "Draw")
            return None
        slot.stats.count_draw(images)
        return images

    def evaluate_student(self, student: StudentToEvaluate,
                         state: QueryContext) -> dict[int, StudentEvaluation | str]:
        """Ask each connected teacher that evaluates students to evaluate ``student`` on its own held-out data:
        its released counts, or why there are none (keyed by teacher). Nothing here fails the run."""
        request = evaluate_request(student, state)
        size = request.ByteSize() + 16
        out: dict[int, StudentEvaluation | str] = {}
        messages = {}
        for slot in self.hub.live():
            if slot.description is None or not slot.description.evaluates_student:
                continue
            if slot.connection is not None and size > slot.connection.limit:
                out[slot.index] = (f"the student ({size:,} bytes) exceeds {slot.name}'s message limit of "
                                   f"{slot.connection.limit:,} bytes (its --max-message-mb)")
                continue
            messages[slot.index] = {"evaluate": request}
        outcome = self._fan_out(messages, timeout=max(self.hub.query_timeout, EVALUATION_TIMEOUT),
                                enough=len(messages))  # an evaluation is never cut as a straggler
        for k, msg in outcome.answers.items():
            try:
                out[k] = decode_evaluation(msg)
            except QueryError as exc:
                outcome.failures[self.hub.slots[k].name] = f"bad answer: {exc.message}"
        for slot in self.hub.slots:
            if slot.name in outcome.failures:
                out[slot.index] = outcome.failures[slot.name]
        self._log_failures(outcome, "Evaluate")
        return out

    def _log_failures(self, outcome: _Outcome, what: str) -> None:
        for name, reason in outcome.failures.items():
            logger.warning("%s %s: %s", what, name, reason)

    # Accounting --------------------------------------------------------------------------

    def stats(self) -> list[QueryStats]:
        return [s.stats for s in self.hub.slots]

    def restore_stats(self, stats: Sequence[Mapping[str, int]]) -> None:
        for slot, saved in zip(self.hub.slots, stats):
            slot.stats = QueryStats(**dict(saved))

    def client_reports(self) -> list[dict[str, Any]]:
        return [s.report or {"client": s.index, "name": s.name, "reported": False} for s in self.hub.slots]
