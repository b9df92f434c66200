"""The institution's teacher agent: dials out to the coordinator's hub and answers its queries.

The agent holds the teacher (in a :class:`~fedkd.institution.host.TeacherHost`, which
enforces the client's own limits: maximum batch, the access modes it grants,
Backward only for inputs it has answered) and never sends anything but
answers: no data, no weights (and, when the institution evaluates the final student on held-out data of its
own, that evaluation's counts). It opens one ``fedkd.v1.Hub/Session`` stream,
announces itself, answers Forward/Backward queries one after another, and
when the hub says goodbye reports what it released and returns. A dropped
connection is retried with jittered exponential backoff; a refusal of its
credentials is final (retrying would not change the answer).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedkd.codec import (
    MiB,
    channel_options,
    decode_backward_request,
    decode_draw_request,
    decode_evaluate_request,
    decode_forward_request,
    encode_backward_reply,
    encode_description,
    encode_draw_reply,
    encode_evaluation,
    encode_forward_reply,
    encode_privacy,
)
from fedkd.contract import CLASS_FEATURE_STATISTICS, QueryError, TeacherDescription
from fedkd.institution.host import TeacherHost
from fedkd.v1 import fedkd_pb2 as pb
from fedkd.v1 import fedkd_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

AGENT_VERSION = "fedkd-agent/1"
# Refusals that a retry cannot fix: stop and tell the operator.
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)


class AgentError(RuntimeError):
    """The agent cannot serve: the hub refused it, or it could not reach the hub in time."""


class SessionAborted(AgentError):
    """The coordinator stopped the run on an error and said so; ``released`` is what this teacher released."""

    def __init__(self, reason: str, released: dict[str, int]) -> None:
        super().__init__(f"the coordinator ended the session early: {reason}")
        self.reason = reason
        self.released = released


# A connection the hub has not welcomed this many seconds after it was opened is reported (a hub welcomes at once:
# this is a hub wedged in set-up, or a peer that is not a hub), and dropped after the settings' welcome_timeout.
WELCOME_SLOW = 10.0
# A hub that closes the connection during set-up this many times in a row refuses how this agent connects
# (plaintext against TLS, or a client certificate it does not accept): a retry would not change that.
SETUP_CLOSES = 3


def _why_closed(settings: AgentSettings) -> str:
    if settings.tls is None:
        return "it expects TLS and this agent runs plaintext (--insecure): drop --insecure and give --ca"
    if settings.tls.certificate_chain is None:
        return "it expects a client certificate (mutual TLS): give --cert and --key signed by its --client-ca"
    return "it does not accept this agent's client certificate (--cert): use one signed by the hub's --client-ca"


def certificate_failure(details: str, settings: AgentSettings) -> str | None:
    """What a connection error says about the certificates, when it is one a retry cannot fix (else None)."""
    where = f"the hub at {settings.target}"
    if "WRONG_VERSION_NUMBER" in details:
        return f"{where} does not speak TLS (its answer is not a TLS handshake); is it a plaintext hub (--insecure)?"
    if "Hostname Verification" in details or "Peer name" in details:
        name = settings.server_name or settings.target.rsplit(":", 1)[0]
        return (f"{where} presented a certificate that is not valid for the name {name!r}; connect by a name its "
                "certificate lists (fedkd distill --hosts adds names), or pass --server-name")
    if "handshake failed" not in details.lower():
        return None
    why = details.split("OPENSSL_internal:", 1)[-1].split(": OK")[0].strip() if "OPENSSL_internal:" in details \
        else "TLS handshake failed"
    if "ALERT" in why:  # the hub's side of the handshake refused ours: our client certificate
        return (f"{where} refused this agent's client certificate during the TLS handshake ({why}); give --cert and "
                "--key signed by the CA the hub trusts (its --client-ca)")
    ca = "the CA given with --ca" if settings.tls and settings.tls.root_certificates else "the system's CAs (no --ca)"
    return (f"{where} presented a certificate that does not verify against {ca} ({why}); give --ca with the CA "
            "that signed the hub's certificate (fedkd distill prints it)")


@dataclass(frozen=True)
class ClientTLS:
    """PEM bytes: the CA that signed the hub's certificate; a certificate and key for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class AgentSettings:
    target: str  # host:port of the hub
    token: str | None = None
    tls: ClientTLS | None = None  # None = plaintext (loopback experiments only)
    session: str = ""  # the run the agent was invited to ("" = whatever the hub runs)
    name: str = ""
    max_message_bytes: int = 64 * MiB
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    give_up_after: float = 600.0  # seconds without a working session
    welcome_timeout: float = 30.0  # seconds a connection may wait for the hub's Welcome before it is dropped
    server_name: str | None = None  # TLS name to expect, when it differs from the target's host
    status_every: float = 60.0  # seconds between status lines while connected (0: none)


def privacy_line(privacy: dict[str, float | str] | None) -> str:
    """What this teacher has spent of its privacy budget, for the operator's log."""
    if not privacy:
        return "privacy: none (answers released as computed, no guarantee)"
    spent = float(privacy.get("epsilon_spent", 0.0))
    budget = float(privacy.get("epsilon_budget", 0.0) or 0.0)
    left = f" of {budget:g} ({max(budget - spent, 0.0):.3g} left)" if budget else " (no budget: unlimited)"
    return f"privacy: {privacy.get('mechanism', '?')}, epsilon {spent:.3g} spent{left}"


def density_notice(description: TeacherDescription) -> str | None:
    """The operator's warning when this teacher answers a log-density of its own data (``teacher-density``,
    ``--density-data``): the density's answers let a coordinator climb to the mean image of a class it holds, to
    3 % (measured: ``simulations/density_leak.py``). None otherwise."""
    if not description.log_density_output:
        return None
    grants = "input gradients" if "gradient" in description.access_modes else "its answers alone (more queries)"
    return ("this teacher answers each input's log-density under this institution's own images: a coordinator "
            f"that climbs it through {grants} reaches the mean image of a class it holds "
            "(simulations/density_leak.py); it is released only to queries that ask for it (the coordinator's "
            "density-gate), and any coordinator can ask: serve a density only where releasing those is acceptable"
            + ("; it also draws images from it on request (a class's mean image with the class's own spread "
               "around it: what the density's gradients give, in one query)" if description.draws_density else ""))


def class_statistics_notice(description: TeacherDescription) -> str | None:
    """The operator's warning when this teacher releases the class-feature-statistics term (``--class-statistics``,
    ``--class-statistics-data``, ``teacher-class-statistics``). None otherwise."""
    if CLASS_FEATURE_STATISTICS not in description.available_terms:
        return None
    return ("this teacher releases the class-feature-statistics term: how far a batch is from the BatchNorm "
            "statistics of this institution's own images of each class; a coordinator inverting it (as "
            "DeepInversion inverts the running statistics) is steered toward each class's images, not only toward "
            "the data as a whole; serve it only where that is acceptable (how much closer it gets is not measured)")


class _NoWelcome(Exception):
    """The hub did not welcome this agent in time (a session attempt that failed, not a fatal error)."""


@dataclass(frozen=True)
class _Refused:
    """A refusal by the host."""

    error: QueryError


class TeacherAgent:
    """Serves one teacher to a hub until the hub ends the session."""

    def __init__(self, host: TeacherHost, settings: AgentSettings) -> None:
        self.host = host
        self.settings = settings
        self.sessions = 0  # sessions the hub welcomed (1 + reconnections)
        self.welcome: pb.Welcome | None = None
        self.goodbye: pb.Goodbye | None = None  # the hub's last word, once it has said it
        self._stop = threading.Event()
        self._stopped_serving = threading.Event()
        self._connected = threading.Event()
        self._call: Any = None
        shape = host.description.input_shape
        # Upper bound on a query tensor before it is decoded (float64 is the largest dtype accepted by the codec).
        self._max_tensor_bytes = host.max_batch * shape[0] * shape[1] * shape[2] * 8

    # Public -------------------------------------------------------------------------------

    def serve(self) -> dict[str, int]:
        """Connect, answer queries, reconnect when dropped; returns what was released when the hub says goodbye.

        It says what it is doing at INFO (``fedkd teacher`` shows it): connecting, connected (the session, what it
        grants, its privacy budget), a status line every ``status_every`` seconds while connected (queries
        answered, epsilon spent), a lost connection and the retry, and the end."""
        s = self.settings
        logger.info("connecting to the hub at %s (%s)%s", s.target, "plaintext" if s.tls is None else "TLS",
                    f" as {s.name!r}" if s.name else "")
        for notice in (density_notice(self.host.description), class_statistics_notice(self.host.description)):
            if notice:
                logger.warning("%s", notice)
        status = threading.Thread(target=self._status_lines, name="fedkd-agent-status", daemon=True)
        status.start()
        try:
            return self._serve()
        finally:
            self._stopped_serving.set()
            logger.info("stopped: %s; %s", self._answered(), privacy_line(self.host.describe().privacy))

    def _serve(self) -> dict[str, int]:
        s = self.settings
        backoff = s.initial_backoff
        last_ok = time.monotonic()
        closed_in_setup = 0
        while not self._stop.is_set():
            # A peer that accepts the connection and never welcomes us (not a hub; a hub wedged in set-up; a
            # loopback socket that connected to itself) must not hold the agent past its give-up time.
            wait = min(s.welcome_timeout, max(s.give_up_after - (time.monotonic() - last_ok), 2.0))
            try:
                if self._session(wait):
                    if self.goodbye is not None and self.goodbye.aborted:
                        raise SessionAborted(self.goodbye.reason, self.host.stats.as_dict())
                    return self.host.stats.as_dict()
                reason = "the hub closed the stream"
            except _NoWelcome:
                reason = f"no Welcome within {wait:.0f} s of connecting: is {s.target} a fedkd hub?"
            except grpc.RpcError as exc:
                code, details = exc.code(), str(exc.details())
                if code in FATAL:
                    raise AgentError(f"the hub at {s.target} refused this teacher: {code.name}: {details}") from None
                failure = certificate_failure(details, s)
                if failure is not None:  # a certificate does not change between attempts: fail fast
                    raise AgentError(failure) from None
                reason = f"{code.name}: {details}"
                closed_in_setup = closed_in_setup + 1 if "Socket closed" in details else 0
                if closed_in_setup >= SETUP_CLOSES:
                    raise AgentError(f"the hub at {s.target} closed the connection during set-up {closed_in_setup} "
                                     f"times in a row: {_why_closed(s)}") from None
            if self.welcome is not None:  # the last attempt got a session: start the backoff afresh
                backoff, last_ok, self.welcome = s.initial_backoff, time.monotonic(), None
            if self._stop.is_set():
                break
            if time.monotonic() - last_ok > s.give_up_after:
                raise AgentError(f"no session with the hub at {s.target} for {s.give_up_after:.0f} s "
                                 f"(last error: {reason})")
            delay = backoff * random.uniform(0.5, 1.0)
            logger.warning("connection to %s lost (%s); retrying in %.1f s", s.target, reason, delay)
            self._stop.wait(delay)
            backoff = min(backoff * 2, s.max_backoff)
        return self.host.stats.as_dict()

    def _answered(self) -> str:
        st = self.host.stats
        density = (f", its log-density with {st.density_samples:,} samples (asked for by the coordinator's "
                   "density gate)" if self.host.description.log_density_output else "")
        if self.host.description.draws_density:
            density += f", {st.drawn_samples:,} inputs drawn from it"
        return (f"answered {st.forward_calls:,} forward and {st.backward_calls:,} backward queries ({st.samples:,} "
                f"samples, {st.wire_bytes / 1e6:,.1f} MB on the wire){density}, refused {st.refused:,}")

    def _status_lines(self) -> None:
        """Every ``status_every`` seconds while connected: what has been answered and spent so far."""
        every = self.settings.status_every
        while every > 0 and not self._stopped_serving.wait(every):
            if self._connected.is_set():
                logger.info("serving: %s; %s", self._answered(), privacy_line(self.host.describe().privacy))

    def stop(self) -> None:
        """Leave the session (from another thread or a signal handler)."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    # One session ---------------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        s = self.settings
        options: list[tuple[str, Any]] = list(channel_options(s.max_message_bytes))
        if s.server_name:
            options.append(("grpc.ssl_target_name_override", s.server_name))
        if s.tls is None:
            return grpc.insecure_channel(s.target, options=options)
        return grpc.secure_channel(s.target, s.tls.credentials(), options=options)

    def _hello(self) -> pb.AgentMessage:
        s = self.settings
        description = encode_description(self.host.describe(), name=s.name, max_batch=self.host.max_batch)
        return pb.AgentMessage(hello=pb.Hello(session=s.session, description=description,
                                              agent_version=AGENT_VERSION, max_message_bytes=s.max_message_bytes))

    def _session(self, welcome_within: float) -> bool:
        """One stream; True when it ended with the hub's goodbye. Raises _NoWelcome when the hub has not
        welcomed this agent ``welcome_within`` seconds after the call started."""
        outbox: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        outbox.put(self._hello())

        def requests() -> Iterator[pb.AgentMessage]:
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                yield msg

        metadata = [("authorization", f"Bearer {self.settings.token}")] if self.settings.token else None
        with self._channel() as channel:
            call = pb_grpc.HubStub(channel).Session(requests(), metadata=metadata)
            self._call = call
            if self._stop.is_set():
                call.cancel()
            goodbye = welcomed = False
            no_welcome = threading.Event()

            def give_up_waiting() -> None:
                if not welcomed:
                    no_welcome.set()
                    call.cancel()

            def still_waiting() -> None:
                if not welcomed and not self._stop.is_set():
                    logger.warning("no Welcome from the hub at %s %.3g s after connecting; waiting up to %.3g s more "
                                   "before connecting again", self.settings.target, WELCOME_SLOW,
                                   welcome_within - WELCOME_SLOW)

            timer = threading.Timer(welcome_within, give_up_waiting)
            slow = threading.Timer(WELCOME_SLOW, still_waiting)
            for t in (timer, slow) if welcome_within > 2 * WELCOME_SLOW else (timer,):
                t.daemon = True
                t.start()
            try:
                for msg in call:
                    kind = msg.WhichOneof("kind")
                    if kind == "welcome" and not welcomed:
                        welcomed = True
                        self.welcome = msg.welcome
                        self.sessions += 1
                        self.host.forget_kept()  # graphs kept for the last session's Backwards
                        self._connected.set()
                        logger.info("connected: session %r at %s as %s; granting %s; %s", msg.welcome.session,
                                    self.settings.target, msg.welcome.teacher,
                                    ", ".join(self.host.description.access_modes),
                                    privacy_line(self.host.describe().privacy))
                    elif kind == "goodbye":
                        # Report, half-close, and read on until the hub closes its side (so the report is
                        # delivered before the channel goes).
                        outbox.put(pb.AgentMessage(id=msg.id, spent=self._spent()))
                        outbox.put(None)
                        goodbye = True
                        self.goodbye = msg.goodbye
                        log = logger.warning if msg.goodbye.aborted else logger.info
                        log("the hub ended the session: %s", msg.goodbye.reason)
                    elif goodbye:
                        continue
                    else:
                        answer = self._answer(msg)
                        self.host.stats.wire_bytes += msg.ByteSize() + answer.ByteSize()  # as the hub counts them
                        outbox.put(answer)
            except grpc.RpcError as exc:
                if goodbye or (exc.code() == grpc.StatusCode.CANCELLED and self._stop.is_set()):
                    return goodbye
                if no_welcome.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                    raise _NoWelcome from None
                raise
            finally:
                timer.cancel()
                slow.cancel()
                self._connected.clear()
                outbox.put(None)
                self._call = None
            return goodbye

    # Answers ------------------------------------------------------------------------------

    def _answer(self, msg: pb.HubMessage) -> pb.AgentMessage:
        """The answer to one query. A refusal the host made is counted by the host; one made here (a message
        that does not decode, an unexpected kind, an answer too large for the hub) is counted here."""
        kind = msg.WhichOneof("kind")
        try:
            if kind == "forward":
                query = decode_forward_request(msg.forward, max_bytes=self._max_tensor_bytes)
                keep = (self.sessions, msg.id) if query.keep else None  # ids are per session
                reply = self._ask(lambda: encode_forward_reply(self.host.forward(
                    query.inputs, query.state, terms=query.terms, labels=query.labels, keep=keep)))
            elif kind == "backward":
                request = decode_backward_request(msg.backward, max_bytes=self._max_tensor_bytes)
                named = (self.sessions, request.forward_id) if request.forward_id else None
                reply = self._ask(lambda: encode_backward_reply(self.host.backward(
                    request.inputs, request.grad_logits, request.state, grad_terms=request.grad_terms,
                    forward_id=named)))
            elif kind == "draw":
                draw = decode_draw_request(msg.draw)
                reply = self._ask(lambda: encode_draw_reply(self.host.draw(draw.count, draw.label, draw.state,
                                                                           seed=draw.seed)))
            elif kind == "evaluate":
                student, state = decode_evaluate_request(msg.evaluate, max_bytes=self.settings.max_message_bytes)
                logger.info("evaluating the student (%s) on this institution's held-out data", student.model)
                reply = self._ask(lambda: encode_evaluation(self.host.evaluate_student(student, state)))
                if not isinstance(reply, _Refused):
                    e = reply.evaluation
                    logger.info("released the student's accuracy %.4f on %.0f examples%s", e.correct / e.examples,
                                e.examples, f" (noised; epsilon {e.epsilon:.3g})" if e.epsilon else "")
            else:
                raise QueryError("INVALID_ARGUMENT", f"unexpected {kind or 'empty'} message from the hub")
            if isinstance(reply, _Refused):
                refusal: QueryError = reply.error
                return self._error(msg.id, refusal.code, refusal.message)
            limit = self.welcome.max_message_bytes if self.welcome and self.welcome.max_message_bytes else None
            if limit is not None and reply.ByteSize() > limit:
                raise QueryError("RESOURCE_EXHAUSTED", f"the answer ({reply.ByteSize():,} bytes) exceeds the hub's "
                                                       f"message limit of {limit:,} bytes")
            reply.id = msg.id
            return reply
        except QueryError as exc:  # refused here, before the host (or after it, for the hub's size limit)
            self.host.stats.refused += 1
            logger.debug("refused query %d: %s", msg.id, exc)
            return self._error(msg.id, exc.code, exc.message)
        except Exception as exc:  # a bug here must not take the teacher offline for everyone
            logger.exception("query %d failed", msg.id)
            return self._error(msg.id, "INTERNAL", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _ask(call: Callable[[], pb.AgentMessage]) -> pb.AgentMessage | _Refused:
        """The host's answer, or its refusal (which the host has counted)."""
        try:
            return call()
        except QueryError as exc:
            logger.debug("the host refused: %s", exc)
            return _Refused(exc)

    def _error(self, mid: int, code: str, message: str) -> pb.AgentMessage:
        number = grpc.StatusCode[code].value[0] if code in grpc.StatusCode.__members__ else 2  # UNKNOWN
        return pb.AgentMessage(id=mid, error=pb.Status(code=number, message=message))

    def _spent(self) -> pb.Spent:
        st = self.host.stats
        return pb.Spent(forward_calls=st.forward_calls, backward_calls=st.backward_calls, samples=st.samples,
                        bytes=st.bytes, refused=st.refused, privacy=encode_privacy(self.host.describe().privacy),
                        draw_calls=st.draw_calls, drawn_samples=st.drawn_samples)
