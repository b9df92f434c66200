"""Who is in the session: one slot per teacher of the run (the identity its token or certificate grants, its
description, what the coordinator counted of its answers, its end-of-session report) and its current connection
(one live Session stream: an outbox the stream's handler drains, and a future per query in flight)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedkd.codec import Serialized, decode_privacy
from fedkd.contract import QueryError, QueryStats, TeacherDescription
from fedkd.v1 import fedkd_pb2 as pb


class ConnectionLost(RuntimeError):
    """The teacher's stream closed while a query was in flight."""


class Connection:
    """One live Session stream: an outbox the handler drains, and futures for the answers."""

    def __init__(self, slot: Slot, peer: str, limit: int) -> None:
        self.slot = slot
        self.peer = peer
        self.limit = limit  # the largest message the agent accepts
        self.outbox: queue.Queue[pb.HubMessage | bytes | None] = queue.Queue()
        self.pending: dict[int, cf.Future[pb.AgentMessage]] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.reason = ""
        self._ids = itertools.count(1)

    def send(self, serialized: Serialized | None = None, **kind: Any) -> tuple[int, cf.Future[pb.AgentMessage], int]:
        """Queue a message (``kind`` fields, or a body serialised once for many teachers); returns its id, the
        future of its answer and its size on the wire."""
        future: cf.Future[pb.AgentMessage] = cf.Future()
        with self.lock:
            if self.closed.is_set():
                raise ConnectionLost(self.reason)
            mid = next(self._ids)
            self.pending[mid] = future
        if serialized is not None:
            raw = serialized.message(mid)
            self.outbox.put(raw)
            return mid, future, len(raw)
        msg = pb.HubMessage(id=mid, **kind)
        self.outbox.put(msg)
        return mid, future, msg.ByteSize()

    def forget(self, mid: int) -> None:
        with self.lock:
            self.pending.pop(mid, None)

    def deliver(self, msg: pb.AgentMessage) -> bool:
        with self.lock:
            future = self.pending.pop(msg.id, None)
        if future is None:
            return False
        future.set_result(msg)
        return True

    def close(self, reason: str) -> bool:
        """Close once; True when this call closed it."""
        with self.lock:
            if self.closed.is_set():
                return False
            self.closed.set()
            self.reason = reason
            pending, self.pending = self.pending, {}
        self.outbox.put(None)
        for future in pending.values():
            future.set_exception(ConnectionLost(reason))
        return True


@dataclass
class Slot:
    """A teacher of the run: the identity its token (or certificate) grants, and its current connection."""

    name: str
    index: int
    token: str | None
    description: TeacherDescription | None = None
    connection: Connection | None = None
    stats: QueryStats = field(default_factory=QueryStats)
    joins: int = 0
    report: dict[str, Any] | None = None
    refused: str | None = None  # why its last Hello was refused (its description), until it joins
    exhausted: str | None = None  # why its privacy budget refused a query: it is asked no more this run

    @property
    def live(self) -> bool:
        return self.connection is not None and not self.connection.closed.is_set()


def differences(joined: TeacherDescription, now: TeacherDescription) -> list[str]:
    """The fields in which a rejoining agent differs from the teacher that left (privacy spend may move on)."""
    return [f"{f.name} {getattr(now, f.name)!r} (joined as {getattr(joined, f.name)!r})"
            for f in dataclasses.fields(TeacherDescription)
            if f.name != "privacy" and getattr(joined, f.name) != getattr(now, f.name)]




def spent_report(slot: Slot, spent: pb.Spent) -> dict[str, Any]:
    report: dict[str, Any] = {"client": slot.index, "name": slot.name, "forward_calls": spent.forward_calls,
                              "backward_calls": spent.backward_calls, "samples": spent.samples,
                              "bytes": spent.bytes, "refused": spent.refused, "draw_calls": spent.draw_calls,
                              "drawn_samples": spent.drawn_samples}
    try:
        privacy = decode_privacy(spent.privacy) if spent.HasField("privacy") else None
    except QueryError as exc:
        report["privacy_error"] = exc.message  # a report is evidence, kept, but not believed
        privacy = None
    if privacy is not None:
        report["privacy"] = privacy
    return report


class Members(Protocol):
    """The hub as its pool sees it: the run's slots, who is live, and the limits of a query."""

    slots: list[Slot]
    quorum: int
    query_timeout: float
    rejoin_timeout: float
    max_message_bytes: int
    straggler_factor: float

    def live(self) -> list[Slot]: ...

    def await_live(self, count: int, timeout: float) -> list[Slot] | None: ...

    def missing(self) -> list[str]: ...
