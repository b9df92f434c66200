"""The coordinator's gRPC hub: teacher agents dial in, queries fan out to them.

Each institution's agent opens one long-lived ``fedkd.v1.Hub/Session`` stream
(institutions make outbound connections only). The hub authenticates it (TLS
plus a per-teacher bearer token, or a client certificate under mutual TLS)
before anything else, reads its Hello, and from then on sends it queries and
matches the answers by id. :class:`HubPool` is the coordinator's
:class:`~fedkd.coordinator.pool.TeacherPool` over the hub: every Forward/Backward goes to
all live teachers at once, with a deadline; the run continues while a quorum
answers, waits (bounded) for dropped teachers to rejoin when it does not, and
records queries and bytes per teacher. gRPC health checking and server
reflection are served beside the Hub service.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hmac
import itertools
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from torch import Tensor

from fedkd.codec import (
    MiB,
    channel_options,
    decode_description,
    decode_privacy,
    decode_tensor,
    encode_state,
    encode_tensor,
)
from fedkd.config import RunConfig
from fedkd.contract import (
    FEATURE_STATISTICS,
    CurriculumState,
    ForwardReply,
    QueryError,
    QueryStats,
    TeacherDescription,
    unusable,
    vote_logits,
)
from fedkd.coordinator.pool import QuorumError, backward_bytes, forward_bytes, member_terms
from fedkd.data import SPECS, DatasetSpec
from fedkd.institution.privacy.ledger import BUDGET_REFUSAL
from fedkd.v1 import fedkd_pb2 as pb
from fedkd.v1 import fedkd_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Hub"].full_name  # "fedkd.v1.Hub"
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class ServerTLS:
    """PEM bytes: the hub's certificate chain and key; ``client_ca`` turns on mutual TLS."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    """One protobuf field of wire type 2 (bytes, string, message): tag, length, data."""
    return _varint(field_number << 3 | 2) + _varint(len(data)) + data


@dataclass(frozen=True)
class Serialized:
    """A query body serialised once for every teacher it goes to: ``body`` is the bytes of the HubMessage field
    ``field`` (3: forward, 4: backward); the fan-out adds each teacher's own message id around it."""

    field: int
    body: bytes

    def message(self, mid: int) -> bytes:
        return _varint(1 << 3) + _varint(mid) + length_delimited(self.field, self.body)


def _serialize(msg: pb.HubMessage | bytes) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class ListenError(OSError):
    """The hub cannot listen on the address it was given; the message names it."""


class ConnectionLost(RuntimeError):
    """The teacher's stream closed while a query was in flight."""


class _Connection:
    """One live Session stream: an outbox the handler drains, and futures for the answers."""

    def __init__(self, slot: _Slot, peer: str, limit: int) -> None:
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
class _Slot:
    """A teacher of the run: the identity its token (or certificate) grants, and its current connection."""

    name: str
    index: int
    token: str | None
    description: TeacherDescription | None = None
    connection: _Connection | None = None
    stats: QueryStats = field(default_factory=QueryStats)
    joins: int = 0
    report: dict[str, Any] | None = None
    refused: str | None = None  # why its last Hello was refused (its description), until it joins
    exhausted: str | None = None  # why its privacy budget refused a query: it is asked no more this run

    @property
    def live(self) -> bool:
        return self.connection is not None and not self.connection.closed.is_set()


def _differences(joined: TeacherDescription, now: TeacherDescription) -> list[str]:
    """The fields in which a rejoining agent differs from the teacher that left (privacy spend may move on)."""
    return [f"{f.name} {getattr(now, f.name)!r} (joined as {getattr(joined, f.name)!r})"
            for f in dataclasses.fields(TeacherDescription)
            if f.name != "privacy" and getattr(joined, f.name) != getattr(now, f.name)]




class Hub:
    """A gRPC server that teacher agents connect to, and the pool the coordinator queries them through.

    ``slots`` maps each teacher's name to its token (None under mutual TLS, where
    the client certificate's common name is the teacher's name).
    """

    def __init__(
        self,
        slots: Mapping[str, str | None],
        *,
        session: str,
        address: str = "127.0.0.1:0",
        tls: ServerTLS | None = None,
        max_message_bytes: int = 64 * MiB,
        query_timeout: float = 60.0,
        rejoin_timeout: float = 120.0,
        quorum: int | None = None,
        hello_timeout: float = 10.0,
        spec: DatasetSpec | None = None,
    ) -> None:
        if not slots:
            raise ValueError("a hub needs at least one teacher slot")
        if tls is None or tls.client_ca is None:
            missing = [name for name, token in slots.items() if not token]
            if missing:
                raise ValueError(f"teachers {missing} have no token; tokens are required unless mutual TLS is on")
        self.slots = [_Slot(name, i, token) for i, (name, token) in enumerate(slots.items())]
        self._by_name = {s.name: s for s in self.slots}
        self.session = session
        self.address = address
        self.tls = tls
        self.max_message_bytes = int(max_message_bytes)
        self.query_timeout = query_timeout
        self.rejoin_timeout = rejoin_timeout
        self.quorum = quorum if quorum is not None else len(self.slots) // 2 + 1
        if not 1 <= self.quorum <= len(self.slots):
            raise ValueError(f"quorum {self.quorum} must be between 1 and the {len(self.slots)} teachers")
        self.hello_timeout = hello_timeout
        self.spec = spec  # the run's data: a teacher that cannot take it is refused at Hello
        self.protocol_errors = 0
        self.refused_peers = 0
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.port: int | None = None
        self.pool = HubPool(self)

    @classmethod
    def for_run(cls, slots: Mapping[str, str | None], config: RunConfig, *, session: str, address: str,
                tls: ServerTLS | None) -> Hub:
        """A hub with the run's limits: message size, deadline, rejoin wait and quorum from ``config``."""
        return cls(slots, session=session, address=address, tls=tls,
                   max_message_bytes=int(config.max_message_mb * MiB), query_timeout=config.query_timeout,
                   rejoin_timeout=config.rejoin_timeout, quorum=config.quorum_size(len(slots)),
                   spec=SPECS[config.dataset])

    # Lifecycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Bind and serve; returns the port (useful with port 0)."""
        workers = 2 * len(self.slots) + 8
        server = grpc.server(cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedkd-hub"),
                             options=channel_options(self.max_message_bytes),
                             maximum_concurrent_rpcs=workers - 2)
        # The generated registration, with a serializer that also passes through messages serialised in advance
        # (a Forward's inputs are serialised once however many teachers it goes to).
        handlers = {"Session": grpc.stream_stream_rpc_method_handler(
            _HubServicer(self).Session, request_deserializer=pb.AgentMessage.FromString,
            response_serializer=_serialize)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        try:
            if self.tls is not None:
                port = server.add_secure_port(self.address, self.tls.credentials())
            else:
                port = server.add_insecure_port(self.address)
        except RuntimeError:  # grpcio raises when it cannot bind (older versions return 0)
            port = 0
        if port == 0:
            raise ListenError(f"cannot listen on {self.address!r}: the address is in use or not one of this "
                              "machine's (use 0.0.0.0:PORT for every interface)")
        server.start()
        self._server, self.port = server, port
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("hub listening on port %d (%s)", port, "TLS" if self.tls else "plaintext")
        return port

    def stop(self, grace: float = 1.0) -> None:
        self._health.enter_graceful_shutdown()
        for slot in self.slots:
            if slot.connection is not None:
                slot.connection.close("hub stopped")
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1.0)
            self._server = None

    def __enter__(self) -> Hub:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # On an error the agents are told why and exit; on an interrupt (the operator will --resume) they are
        # told nothing and keep retrying until the coordinator is back.
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.end_session(f"the coordinator stopped on an error: {type(exc).__name__}: {exc}", aborted=True,
                             timeout=5.0)
        self.stop()

    # Membership ---------------------------------------------------------------------------

    def live(self) -> list[_Slot]:
        return [s for s in self.slots if s.live]

    def await_live(self, count: int, timeout: float) -> list[_Slot] | None:
        """The live teachers once at least ``count`` are connected, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(live := self.live()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 1.0))
            return live

    def missing(self) -> list[str]:
        return [s.name for s in self.slots if not s.live]

    def never_connected(self) -> list[str]:
        with self._changed:
            return [s.name for s in self.slots if s.description is None]

    def drop_absent(self) -> list[str]:
        """Before the first query: forget the teachers that never connected; returns their names.

        The others are renumbered 0..n-1 in their original order. A dropped
        teacher's token no longer admits anyone. The quorum stays as set (the
        caller decides first whether enough teachers are left).
        """
        with self._changed:
            gone = self.never_connected()
            kept = [s for s in self.slots if s.description is not None]
            if not gone:
                return []
            if len(kept) < self.quorum:
                raise QuorumError(f"only {len(kept)} teachers ever connected, {self.quorum} must answer; "
                                  f"never connected: {', '.join(gone)}")
            for i, slot in enumerate(kept):
                assert slot.description is not None
                slot.index = i
                slot.description = dataclasses.replace(slot.description, client=i)
            self.slots = kept
            self._by_name = {s.name: s for s in kept}
        return gone

    def refusals(self) -> dict[str, str]:
        """Teachers whose Hello was refused for their description (and that have not joined since): why."""
        with self._changed:
            return {s.name: s.refused for s in self.slots if s.refused is not None and not s.live}

    def wait_for_teachers(self, count: int | None = None, timeout: float = 60.0) -> None:
        """Block until ``count`` (default: every) teacher is connected; TimeoutError names the missing ones.

        Teachers refused at Hello (a description the run cannot use) are not waited for: once every other
        teacher is connected the wait ends if a quorum is, and fails at once naming the refusals if not.
        """
        count = len(self.slots) if count is None else count
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                live = len(self.live())
                refused = self.refusals()
                if live >= count:
                    return
                if refused and live + len(refused) >= len(self.slots):
                    why = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
                    if live >= self.quorum:
                        logger.warning("going on with %d of %d teachers; refused at Hello: %s", live,
                                       len(self.slots), why)
                        return
                    raise QuorumError(f"{live} of {len(self.slots)} teachers connected and {self.quorum} must "
                                      f"answer; refused at Hello: {why}")
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
        detail = "; ".join(f"{n}: {r}" for n, r in self.refusals().items())
        raise TimeoutError(f"{len(self.live())} of {len(self.slots)} teachers connected after "
                           f"{timeout:.0f} s (need {count}); not connected: {', '.join(self.missing())}"
                           + (f" (refused at Hello: {detail})" if detail else ""))

    def end_session(self, reason: str = "distillation finished", timeout: float = 10.0, *,
                    aborted: bool = False) -> list[dict[str, Any]]:
        """Say goodbye to every live teacher and collect what each reports it released (``aborted``: the run
        stopped on an error, and the agents exit rather than wait for it)."""
        waits = []
        for slot in self.live():
            assert slot.connection is not None
            try:
                mid, future, _ = slot.connection.send(goodbye=pb.Goodbye(reason=reason, aborted=aborted))
                waits.append((slot, future))
            except ConnectionLost:
                continue
        for slot, future in waits:
            try:
                future.result(timeout=timeout)
            except (cf.TimeoutError, ConnectionLost):
                logger.warning("%s did not report its spend before the session closed", slot.name)
            if slot.connection is not None:
                slot.connection.close("session ended")
        return self.pool.client_reports()

    # Called by the servicer ---------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> _Slot:
        """The slot this peer may hold; aborts with UNAUTHENTICATED / PERMISSION_DENIED otherwise."""
        if self.tls is not None and self.tls.client_ca is not None:
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            slot = next((self._by_name[n] for n in names if n in self._by_name), None)
            if slot is None:
                self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                             f"client certificate {names or '(no common name)'} is not a teacher of this run")
            assert slot is not None
            if slot.token is None:
                return slot
        else:
            slot = None
        metadata = dict(context.invocation_metadata())
        header = metadata.get("authorization")
        if not isinstance(header, str) or not header:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         "no credentials: send the teacher's token as 'authorization: Bearer <token>' metadata")
        assert isinstance(header, str)
        if not header.startswith("Bearer "):
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
        token = header[len("Bearer "):].strip()
        match = next((s for s in self.slots if s.token and hmac.compare_digest(s.token, token)), None)
        if match is None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "token not recognised by this hub")
        assert match is not None
        if slot is not None and match is not slot:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"the token is {match.name}'s but the client certificate is {slot.name}'s")
        return match

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.refused_peers += 1
        logger.warning("refused %s: %s", context.peer(), message)
        context.abort(code, message)

    def _mark_refused(self, slot: _Slot, why: str) -> None:
        """Record why a slot's Hello was refused, and wake anyone waiting for teachers."""
        with self._changed:
            slot.refused = why
            self._changed.notify_all()

    def _join(self, slot: _Slot, hello: pb.Hello, context: grpc.ServicerContext) -> _Connection:
        if hello.session and hello.session != self.session:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"unknown session {hello.session!r}; this hub runs session {self.session!r}")
        try:
            description = dataclasses.replace(decode_description(hello.description), client=slot.index)
        except QueryError as exc:
            if slot.description is None:
                self._mark_refused(slot, exc.message)
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            raise  # unreachable: abort raises
        if self.spec is not None and (why := unusable(description, self.spec)) is not None:
            self._mark_refused(slot, f"description: {why}")
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{slot.name}: description: {why}")
        if slot.description is not None and (changed := _differences(slot.description, description)):
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"{slot.name} rejoined as a different teacher: {'; '.join(changed)}")
        limit = self.max_message_bytes
        if 0 < hello.max_message_bytes < limit:
            limit = int(hello.max_message_bytes)
        connection = _Connection(slot, context.peer(), limit)
        with self._changed:
            old = slot.connection
            slot.connection = connection
            slot.description = description
            slot.refused = None
            slot.joins += 1
            self._changed.notify_all()
        if old is not None:
            old.close(f"replaced by a new connection from {context.peer()}")
        logger.info("%s joined from %s (%s, join %d)", slot.name, context.peer(), description.model, slot.joins)
        return connection

    def _leave(self, connection: _Connection, reason: str) -> None:
        if connection.close(reason):
            logger.info("%s left (%s)", connection.slot.name, reason)
        with self._changed:
            self._changed.notify_all()

    def _read(self, connection: _Connection, requests: Iterator[pb.AgentMessage]) -> None:
        """Reader thread of one stream: match answers to queries until the stream ends."""
        reason = "teacher closed the stream"
        try:
            for msg in requests:
                connection.slot.stats.wire_bytes += msg.ByteSize()
                kind = msg.WhichOneof("kind")
                if kind == "spent":
                    connection.slot.report = _spent_dict(connection.slot, msg.spent)
                if kind in (None, "hello") or not connection.deliver(msg):
                    # A duplicate Hello, an empty message, or an answer to nothing we asked (or asked and gave up
                    # on): count it and go on.
                    self.protocol_errors += 1
                    logger.debug("%s: unexpected %s message with id %d", connection.slot.name, kind, msg.id)
        except Exception as exc:  # grpc raises when the peer goes away or the call is cancelled
            reason = f"stream broke ({type(exc).__name__})"
        finally:
            self._leave(connection, reason)


def _spent_dict(slot: _Slot, spent: pb.Spent) -> dict[str, Any]:
    report: dict[str, Any] = {"client": slot.index, "name": slot.name, "forward_calls": spent.forward_calls,
                              "backward_calls": spent.backward_calls, "samples": spent.samples,
                              "bytes": spent.bytes, "refused": spent.refused}
    try:
        privacy = decode_privacy(spent.privacy) if spent.HasField("privacy") else None
    except QueryError as exc:
        report["privacy_error"] = exc.message  # a report is evidence, kept, but not believed
        privacy = None
    if privacy is not None:
        report["privacy"] = privacy
    return report


class _HubServicer(pb_grpc.HubServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def Session(self, request_iterator: Iterator[pb.AgentMessage],  # type: ignore[override]
                context: grpc.ServicerContext) -> Iterator[pb.HubMessage | bytes]:  # bytes: serialised once
        hub = self.hub
        slot = hub._authenticate(context)
        # A peer that authenticates but never says Hello is cut off after hello_timeout.
        timer = threading.Timer(hub.hello_timeout, context.cancel)
        timer.start()
        try:
            first = next(request_iterator, None)
        except Exception:
            return
        finally:
            timer.cancel()
        if first is None or first.WhichOneof("kind") != "hello":
            hub._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                        "the first message of a session must be a Hello with the teacher's description")
        assert first is not None
        connection = hub._join(slot, first.hello, context)
        context.add_callback(lambda: hub._leave(connection, "stream ended"))
        threading.Thread(target=hub._read, args=(connection, request_iterator), daemon=True,
                         name=f"fedkd-hub-{slot.name}").start()
        yield pb.HubMessage(welcome=pb.Welcome(session=hub.session, teacher=slot.name,
                                               max_message_bytes=hub.max_message_bytes))
        while True:
            msg = connection.outbox.get()
            if msg is None:
                return
            yield msg


@dataclass
class _Outcome:
    answers: dict[int, pb.AgentMessage]
    failures: dict[str, str]  # teacher name -> why it did not answer
    lost: bool  # some teacher dropped out during the query (worth waiting for a rejoin)
    ids: dict[int, tuple[_Connection, int]] = field(default_factory=dict)  # teacher -> (connection, message id)


class HubPool:
    """The coordinator's pool over a hub: parallel fan-out, deadlines, quorum, rejoin, per-teacher accounting."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def descriptions(self) -> list[TeacherDescription]:
        missing = [s.name for s in self.hub.slots if s.description is None]
        if missing:
            raise QuorumError(f"teachers {', '.join(missing)} have never connected; wait for them first")
        return [s.description for s in self.hub.slots if s.description is not None]

    # Fan-out ----------------------------------------------------------------------------

    def _wait_for_quorum(self, need: int) -> list[_Slot]:
        hub = self.hub
        live = hub.await_live(need, hub.rejoin_timeout)
        if live is None:
            raise QuorumError(f"only {len(hub.live())} of {len(hub.slots)} teachers are connected and {need} must "
                              f"answer; waited {hub.rejoin_timeout:.0f} s for {', '.join(hub.missing())} to rejoin")
        return live

    def _fan_out(self, messages: Mapping[int, dict[str, Any]]) -> _Outcome:
        """Send ``messages[k]`` to teacher k (all at once) and gather the answers within the deadline."""
        hub = self.hub
        sent: dict[int, tuple[_Connection, int, cf.Future[pb.AgentMessage]]] = {}
        ids: dict[int, tuple[_Connection, int]] = {}
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
            sent[k] = (connection, mid, future)
            ids[k] = (connection, mid)
        done, _ = cf.wait([f for _, _, f in sent.values()], timeout=hub.query_timeout)
        answers = {}
        for k, (connection, mid, future) in sent.items():
            name = hub.slots[k].name
            if future not in done:
                connection.forget(mid)
                failures[name] = f"no answer within {hub.query_timeout:g} s"
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

    def _check_quorum(self, outcome: _Outcome, need: int, what: str) -> None:
        if len(outcome.answers) < need:
            reasons = {s.name: s.exhausted for s in self.hub.slots if s.exhausted is not None}
            reasons.update(outcome.failures)
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(reasons.items()))
            raise QuorumError(f"{what}: {len(outcome.answers)} of {len(self.hub.slots)} teachers answered, "
                              f"{need} needed ({why})")

    def forward(self, inputs: Tensor, state: CurriculumState, *, terms: Sequence[str] = (),
                min_answers: int | None = None, only: Sequence[int] | None = None,
                keep: bool = False) -> dict[int, ForwardReply]:
        need = self.hub.quorum if min_answers is None else min_answers
        asked = set(range(len(self.hub.slots)) if only is None else only)
        asked -= {s.index for s in self.hub.slots if s.exhausted is not None}  # their budgets refused already
        descriptions = self.descriptions
        # The inputs, serialised once as field 1 of a ForwardRequest; each teacher's flags are appended to them.
        x_field = length_delimited(1, encode_tensor(inputs).SerializeToString())
        st = encode_state(state)
        batch, classes = len(inputs), descriptions[0].num_classes
        for attempt in range(3):
            live = self._wait_for_quorum(need)
            labels_only = {k for k, d in enumerate(descriptions) if "logits" not in d.access_modes}
            asked_terms = {k: member_terms(d, terms) for k, d in enumerate(descriptions)}
            messages = {s.index: {"serialized": Serialized(3, x_field + pb.ForwardRequest(
                state=st, labels=s.index in labels_only,
                keep=keep and "gradient" in descriptions[s.index].access_modes,
                terms=asked_terms[s.index],
                # the original flag too, so an agent that predates ``terms`` still computes its BN statistics
                bn_loss=FEATURE_STATISTICS in asked_terms[s.index],
            ).SerializeToString())} for s in live if s.index in asked}
            outcome = self._fan_out(messages)
            replies = {}
            for k, msg in outcome.answers.items():
                slot = self.hub.slots[k]
                try:
                    reply = self._forward_reply(msg, batch, classes, labels=k in labels_only,
                                                terms=asked_terms[k])
                except QueryError as exc:
                    outcome.failures[slot.name] = f"bad answer: {exc.message}"
                    continue
                slot.stats.forward_calls += 1
                slot.stats.samples += batch
                slot.stats.bytes += forward_bytes(inputs, reply)
                if keep and "gradient" in descriptions[k].access_modes:
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
                 state: CurriculumState, refs: Mapping[int, Any] | None = None) -> dict[int, Tensor]:
        if not grads:
            return {}
        x: pb.Tensor | None = None
        st = encode_state(state)
        messages = {}
        by_ref: set[int] = set()
        for k, (grad_logits, grad_terms) in grads.items():
            ref = (refs or {}).get(k)
            slot = self.hub.slots[k]
            connection = slot.connection
            if ref is not None and connection is not None and ref[0] is connection and not connection.closed.is_set():
                # the same stream that answered the Forward: name it, the inputs do not travel again
                request = pb.BackwardRequest(forward_id=ref[1], grad_logits=encode_tensor(grad_logits), state=st)
                by_ref.add(k)
            else:  # no Forward to name (or the teacher reconnected since): carry the inputs
                x = encode_tensor(inputs) if x is None else x
                request = pb.BackwardRequest(inputs=x, grad_logits=encode_tensor(grad_logits), state=st)
            for name, value in grad_terms.items():
                request.grad_terms[name] = value
            if FEATURE_STATISTICS in grad_terms:  # the original field too, for an agent that predates grad_terms
                request.grad_bn_loss = grad_terms[FEATURE_STATISTICS]
            messages[k] = {"backward": request}
        outcome = self._fan_out(messages)
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
                grad = decode_tensor(msg.backward.grad_inputs, field="grad_inputs",
                                     max_bytes=self.hub.max_message_bytes)
                if grad.dtype != inputs.dtype or grad.shape != inputs.shape:
                    raise QueryError("INVALID_ARGUMENT", f"grad_inputs {grad.dtype} {tuple(grad.shape)} does not "
                                                         f"match the inputs {tuple(inputs.shape)}")
                if not torch.isfinite(grad).all():
                    raise QueryError("INVALID_ARGUMENT", "grad_inputs contain NaN or infinite values")
            except QueryError as exc:
                outcome.failures[slot.name] = f"bad answer: {exc.message}"
                continue
            slot.stats.backward_calls += 1
            slot.stats.samples += len(inputs)
            slot.stats.bytes += backward_bytes(inputs, grads[k][0], grad, by_ref=k in by_ref)
            out[k] = grad
        for k in grads:
            if k not in out:
                self.hub.slots[k].stats.missed += 1
        outcome.answers = {k: outcome.answers[k] for k in out}
        self._log_failures(outcome, "Backward")
        # The Forward already met the quorum; a Backward a teacher misses only loses its gradient term.
        self._check_quorum(outcome, 1, "Backward")
        return out

    @staticmethod
    def _forward_reply(msg: pb.AgentMessage, batch: int, classes: int, *, labels: bool = False,
                       terms: Sequence[str] = ()) -> ForwardReply:
        if msg.WhichOneof("kind") != "forward":
            raise QueryError("INVALID_ARGUMENT", f"answered a Forward with {msg.WhichOneof('kind')}")
        if labels:
            hard = decode_tensor(msg.forward.labels, field="labels", max_bytes=batch * 8)
            if hard.dtype != torch.int64 or tuple(hard.shape) != (batch,):
                raise QueryError("INVALID_ARGUMENT", f"labels {hard.dtype} {tuple(hard.shape)}, expected int64 "
                                                     f"({batch},)")
            if len(hard) and (int(hard.min()) < -1 or int(hard.max()) >= classes):
                raise QueryError("INVALID_ARGUMENT", f"labels outside 0..{classes - 1} (or -1: abstain)")
            return ForwardReply(vote_logits(hard, classes), labels=hard)
        logits = decode_tensor(msg.forward.logits, field="logits", max_bytes=batch * classes * 4)
        if logits.dtype != torch.float32 or tuple(logits.shape) != (batch, classes):
            raise QueryError("INVALID_ARGUMENT", f"logits {logits.dtype} {tuple(logits.shape)}, expected float32 "
                                                 f"{(batch, classes)}")
        if not torch.isfinite(logits).all():
            raise QueryError("INVALID_ARGUMENT", "logits contain NaN or infinite values")
        values = dict(msg.forward.terms)
        if msg.forward.HasField("bn_loss"):  # the original field (an agent that predates ``terms`` sends only it)
            values.setdefault(FEATURE_STATISTICS, msg.forward.bn_loss)
        out = {}
        for name, value in values.items():
            if name not in terms:
                raise QueryError("INVALID_ARGUMENT", f"answered term {name!r}, which was not asked for")
            if not math.isfinite(value):
                raise QueryError("INVALID_ARGUMENT", f"term {name!r} is not finite")
            out[name] = torch.tensor(value, dtype=torch.float32)
        return ForwardReply(logits, out)

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



def issue_tokens(directory: str | Path, names: Sequence[str]) -> dict[str, str]:
    """One bearer token per teacher in ``directory/<name>.token`` (mode 0600); existing ones are kept,
    so a resumed run admits the same agents. Returns name -> token, in the order given."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for name in names:
        path = d / f"{name}.token"
        if path.exists():
            token = path.read_text().strip()
            if not token:
                raise ValueError(f"token file {str(path)!r} is empty; delete it to issue a new token")
        else:
            token = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        tokens[name] = token
    return tokens
