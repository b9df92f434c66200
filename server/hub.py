"""The coordinator's gRPC hub: teacher agents dial in, and the coordinator queries them through its pool.

Each institution's agent opens one long-lived ``fedkd.v1.Hub/Session`` stream (institutions make outbound
connections only). The hub authenticates it (TLS plus a per-teacher bearer token, or a client certificate under
mutual TLS) before anything else, reads its Hello, and from then on sends it queries and matches the answers by id.
The rooms beside it: ``credentials`` (TLS and tokens), ``membership`` (a teacher's slot and its live connection),
``hub_pool`` (the fan-out, the quorum and the accounting). gRPC health checking and server reflection are served
beside the Hub service.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedkd.codec import (
    MAX_TEXT,
    MiB,
    channel_options,
    decode_description,
)
from fedkd.config import RunConfig
from fedkd.contract import (
    QueryError,
    unusable,
)
from fedkd.coordinator.pool import QuorumError
from fedkd.data import DatasetSpec
from fedkd.v1 import fedkd_pb2 as pb
from fedkd.v1 import fedkd_pb2_grpc as pb_grpc

from .credentials import ServerTLS
from .hub_pool import HubPool
from .membership import Connection, ConnectionLost, Slot, differences, spent_report

logger = logging.getLogger(__name__)

REFUSALS_LOGGED = 5  # refusals logged one by one before the log goes to one line a minute
SERVICE = pb.DESCRIPTOR.services_by_name["Hub"].full_name  # "fedkd.v1.Hub"


def _serialize(msg: pb.HubMessage | bytes) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class ListenError(OSError):
    """The hub cannot listen on the address it was given; the message names it."""


class Hub:
    """A gRPC server that teacher agents connect to, and the pool the coordinator queries them through.

    ``slots`` maps each teacher's name to its token (None under mutual TLS, where
    the client certificate's common name is the teacher's name).

    One teacher, one stream: a Hello on a new stream replaces the teacher's live one (an agent that reconnects
    after a network cut), and a stream that has authenticated but not yet said Hello is cancelled by a newer one
    of the same teacher, or after ``hello_timeout`` seconds. The server's concurrent-call limit leaves room for a
    live and a pending stream of every teacher, plus health checks.
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
        hello_timeout: float = 5.0,
        spec: DatasetSpec | None = None,
        straggler_factor: float = 0.0,
    ) -> None:
        if not slots:
            raise ValueError("a hub needs at least one teacher slot")
        if tls is None or tls.client_ca is None:
            missing = [name for name, token in slots.items() if not token]
            if missing:
                raise ValueError(f"teachers {missing} have no token; tokens are required unless mutual TLS is on")
        self.slots = [Slot(name, i, token) for i, (name, token) in enumerate(slots.items())]
        self._by_name = {s.name: s for s in self.slots}
        self.session = session
        self.address = address
        self.tls = tls
        self.max_message_bytes = int(max_message_bytes)
        self.query_timeout = query_timeout
        self.rejoin_timeout = rejoin_timeout
        self.straggler_factor = straggler_factor  # 0: wait for every teacher up to query_timeout
        self.quorum = quorum if quorum is not None else len(self.slots) // 2 + 1
        if not 1 <= self.quorum <= len(self.slots):
            raise ValueError(f"quorum {self.quorum} must be between 1 and the {len(self.slots)} teachers")
        self.hello_timeout = hello_timeout
        # The stream of each slot that has authenticated and not yet said Hello: one per slot, so a token holder
        # cannot fill the hub's concurrent calls with silent streams (a newer one cancels the older).
        self._pending: dict[int, grpc.ServicerContext] = {}
        self.spec = spec  # the run's data: a teacher that cannot take it is refused at Hello
        self.protocol_errors = 0
        self.refused_peers = 0
        self._refusal_logged = 0.0
        self.replaced_streams = 0  # streams cancelled before their Hello by a newer stream of the same teacher
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.port: int | None = None
        self.pool = HubPool(self)

    @classmethod
    def for_run(cls, slots: Mapping[str, str | None], config: RunConfig, *, session: str, address: str,
                tls: ServerTLS | None) -> Hub:
        """A hub with the run's limits: message size, deadline, straggler policy, rejoin wait and quorum from
        ``config``."""
        return cls(slots, session=session, address=address, tls=tls,
                   max_message_bytes=int(config.queries.max_message_mb * MiB), query_timeout=config.queries.timeout,
                   rejoin_timeout=config.queries.rejoin_timeout, quorum=config.queries.quorum_size(len(slots)),
                   spec=config.run_task().spec, straggler_factor=config.queries.straggler_factor)

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

    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.live]

    def await_live(self, count: int, timeout: float) -> list[Slot] | None:
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
                answer = future.result(timeout=timeout)
            except (cf.TimeoutError, ConnectionLost):
                logger.warning("%s did not report its spend before the session closed", slot.name)
            else:  # the one report a session takes: the answer to its goodbye, nothing sent before or after
                if answer.WhichOneof("kind") == "spent":
                    slot.report = spent_report(slot, answer.spent)
                else:
                    logger.warning("%s answered the goodbye with %s, not its report", slot.name,
                                   answer.WhichOneof("kind") or "an empty message")
            if slot.connection is not None:
                slot.connection.close("session ended")
        return self.pool.client_reports()

    # Called by the servicer ---------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> Slot:
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
        """Refuse the stream. Logged at WARNING for the first few and then once a minute with the count (a flood
        of bad tokens once wrote 20,790 lines in 25 s); every refusal is counted (``refused_peers``)."""
        self.refused_peers += 1
        now = time.monotonic()
        if self.refused_peers <= REFUSALS_LOGGED or now - self._refusal_logged >= 60.0:
            self._refusal_logged = now
            logger.warning("refused %s: %s (%d refusals so far%s)", context.peer(), message, self.refused_peers,
                           "; the next are logged once a minute" if self.refused_peers == REFUSALS_LOGGED else "")
        else:
            logger.debug("refused %s: %s", context.peer(), message)
        context.abort(code, message)

    def _mark_refused(self, slot: Slot, why: str) -> None:
        """Record why a slot's Hello was refused, and wake anyone waiting for teachers."""
        with self._changed:
            slot.refused = why
            self._changed.notify_all()

    def _join(self, slot: Slot, hello: pb.Hello, context: grpc.ServicerContext) -> Connection:
        if len(hello.session) > MAX_TEXT or len(hello.agent_version) > MAX_TEXT:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{slot.name}: Hello: session and agent_version take at most {MAX_TEXT} characters")
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
        if slot.description is not None and (changed := differences(slot.description, description)):
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"{slot.name} rejoined as a different teacher: {'; '.join(changed)}")
        limit = self.max_message_bytes
        if 0 < hello.max_message_bytes < limit:
            limit = int(hello.max_message_bytes)
        connection = Connection(slot, context.peer(), limit)
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

    def _leave(self, connection: Connection, reason: str) -> None:
        if connection.close(reason):
            logger.info("%s left (%s)", connection.slot.name, reason)
        with self._changed:
            self._changed.notify_all()

    def _read(self, connection: Connection, requests: Iterator[pb.AgentMessage]) -> None:
        """Reader thread of one stream: match answers to queries until the stream ends."""
        reason = "teacher closed the stream"
        try:
            for msg in requests:
                connection.slot.stats.wire_bytes += msg.ByteSize()
                kind = msg.WhichOneof("kind")
                if kind in (None, "hello") or not connection.deliver(msg):
                    # A duplicate Hello, an empty message, or an answer to nothing we asked (or asked and gave up
                    # on; a spend report nobody asked for is one): count it and go on.
                    self.protocol_errors += 1
                    logger.debug("%s: unexpected %s message with id %d", connection.slot.name, kind, msg.id)
        except Exception as exc:  # grpc raises when the peer goes away or the call is cancelled
            reason = f"stream broke ({type(exc).__name__})"
        finally:
            self._leave(connection, reason)


class _HubServicer(pb_grpc.HubServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def Session(self, request_iterator: Iterator[pb.AgentMessage],  # type: ignore[override]
                context: grpc.ServicerContext) -> Iterator[pb.HubMessage | bytes]:  # bytes: serialised once
        hub = self.hub
        slot = hub._authenticate(context)
        # A peer that authenticates but never says Hello is cut off after hello_timeout; a slot has one such
        # stream at a time (a newer one cancels the older): with a live stream, at most two calls per teacher.
        with hub._changed:
            older = hub._pending.get(slot.index)
            hub._pending[slot.index] = context
        if older is not None:
            hub.replaced_streams += 1
            older.cancel()
        timer = threading.Timer(hub.hello_timeout, context.cancel)
        timer.start()
        try:
            first = next(request_iterator, None)
        except Exception:
            return
        finally:
            timer.cancel()
            with hub._changed:
                if hub._pending.get(slot.index) is context:
                    del hub._pending[slot.index]
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
