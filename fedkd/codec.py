"""Converting between torch values and ``fedkd.v1`` messages: every message of the query path is built and read
here (the hub's Forward/Backward requests and the answers it reads, the agent's side of the same), and only here
are the original contract's compatibility fields (``bn_loss``, ``grad_bn_loss``) written or read: the Python API
speaks of teacher-side terms only.

Tensors travel as raw little-endian bytes with dtype and shape (never pickle).
Decoding validates everything a peer controls: a dtype this codec does not
know, a negative dimension, a byte count that does not match the shape, or a
tensor larger than the receiver's limit raises :class:`~fedkd.contract.QueryError`
with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message naming the field.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedkd.contract import (
    FEATURE_STATISTICS,
    PURPOSES,
    TERM_NAMES,
    ForwardReply,
    QueryContext,
    QueryError,
    StudentEvaluation,
    StudentToEvaluate,
    TeacherDescription,
    vote_logits,
)
from fedkd.v1 import fedkd_pb2 as pb

DTYPES: dict[torch.dtype, Any] = {  # values: fedkd.v1.DType
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int16: pb.INT16,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
}
_TORCH = {v: k for k, v in DTYPES.items()}
LITTLE_ENDIAN = sys.byteorder == "little"
MAX_DIMS = 8
MiB = 1 << 20


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options both sides of a session use: explicit message size limits, and keepalives
    so that a peer that vanishes without closing its connection is noticed within ~30 s."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _swap_bytes(t: Tensor) -> Tensor:
    """Reverse the byte order of every element (for big-endian hosts); ``t`` contiguous."""
    size = t.element_size()
    if size == 1:
        return t
    raw = t.reshape(-1).view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return raw.view(t.dtype).reshape(t.shape)


def encode_tensor(t: Tensor, *, little_endian: bool = LITTLE_ENDIAN) -> pb.Tensor:
    if t.dtype not in DTYPES:
        raise TypeError(f"dtype {t.dtype} cannot be sent; supported: {', '.join(map(str, DTYPES))}")
    t = t.detach().to("cpu").contiguous()
    if not little_endian:
        t = _swap_bytes(t)
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=DTYPES[t.dtype], shape=list(t.shape), data=data)


def decode_tensor(msg: pb.Tensor, *, field: str = "tensor", max_bytes: int | None = None,
                  little_endian: bool = LITTLE_ENDIAN) -> Tensor:
    """The tensor in ``msg`` (a fresh, writable copy); ``field`` names it in errors."""
    dtype = _TORCH.get(msg.dtype)
    if dtype is None:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise QueryError("INVALID_ARGUMENT", f"{field}: unsupported dtype {name}")
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS:
        raise QueryError("INVALID_ARGUMENT", f"{field}: {len(shape)} dimensions, at most {MAX_DIMS} supported")
    if any(d < 0 for d in shape):
        raise QueryError("INVALID_ARGUMENT", f"{field}: negative dimension in shape {tuple(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if max_bytes is not None and expected > max_bytes:
        raise QueryError("RESOURCE_EXHAUSTED", f"{field}: shape {tuple(shape)} needs {expected:,} bytes, more "
                         f"than the limit of {max_bytes:,}")
    if len(msg.data) != expected:
        raise QueryError("INVALID_ARGUMENT", f"{field}: {len(msg.data):,} bytes of data for shape {tuple(shape)} of "
                         f"{pb.DType.Name(msg.dtype)} (expected {expected:,})")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)
    return t if little_endian else _swap_bytes(t)


MAX_SCHEDULE = 32  # named numbers in a query context
MAX_NAME = 64


def encode_state(state: QueryContext) -> pb.CurriculumState:
    """The query context on the wire; CuDFKD's two numbers also in the first contract's fields (old agents)."""
    msg = pb.CurriculumState(epoch=state.epoch, step=state.step, lam=state.lam, adv_weight=state.adv_weight,
                             purpose=state.purpose, method=state.method, log_density=state.log_density)
    for name, value in state.schedule:
        msg.schedule[name] = value
    if state.density_class is not None:
        msg.density_class = state.density_class
    return msg


def decode_state(msg: pb.CurriculumState) -> QueryContext:
    """A query context from a peer, checked: finite numbers, a known purpose, bounded names."""
    for name in ("lam", "adv_weight"):
        if not math.isfinite(getattr(msg, name)):
            raise QueryError("INVALID_ARGUMENT", f"state.{name} is not finite")
    if msg.purpose and msg.purpose not in PURPOSES:
        raise QueryError("INVALID_ARGUMENT", f"state.purpose {msg.purpose[:MAX_NAME]!r} is not one of "
                                             f"{', '.join(PURPOSES)}")
    if len(msg.method) > MAX_NAME or len(msg.schedule) > MAX_SCHEDULE:
        raise QueryError("INVALID_ARGUMENT", f"state: a method name of at most {MAX_NAME} characters and at most "
                                             f"{MAX_SCHEDULE} schedule entries")
    schedule = dict(msg.schedule)
    for name, value in schedule.items():
        if len(name) > MAX_NAME or not math.isfinite(value):
            raise QueryError("INVALID_ARGUMENT", f"state.schedule[{name[:MAX_NAME]!r}] is not a finite number with "
                                                 "a short name")
    if not schedule:  # a coordinator that predates the schedule: CuDFKD's numbers in their own fields
        schedule = {k: float(v) for k, v in (("lambda", msg.lam), ("adv_weight", msg.adv_weight)) if v}
    density_class = int(msg.density_class) if msg.HasField("density_class") else None
    if density_class is not None and not 0 <= density_class < MAX_CLASSES:
        raise QueryError("INVALID_ARGUMENT", f"state.density_class {density_class} is not a class index")
    return QueryContext(int(msg.epoch), int(msg.step), msg.purpose, msg.method, tuple(sorted(schedule.items())),
                        msg.log_density, density_class)


def encode_privacy(privacy: Mapping[str, float | str] | None) -> pb.PrivacyStatus:
    """A client's privacy mechanism, budget and spend (None = no mechanism)."""
    p = privacy or {}
    return pb.PrivacyStatus(mechanism=str(p.get("mechanism", "none")),
                            epsilon_budget=float(p.get("epsilon_budget", 0.0)),
                            epsilon_spent=float(p.get("epsilon_spent", 0.0)), delta=float(p.get("delta", 0.0)),
                            unit=str(p.get("unit", "")))


def decode_privacy(msg: pb.PrivacyStatus) -> dict[str, float | str] | None:
    """A client's privacy status; INVALID_ARGUMENT naming the field when a number is not finite or negative."""
    for name in ("epsilon_budget", "epsilon_spent", "delta"):
        value = getattr(msg, name)
        if not math.isfinite(value) or value < 0:
            raise QueryError("INVALID_ARGUMENT", f"privacy.{name} must be a finite number >= 0, got {value!r}")
    if msg.delta >= 1:
        raise QueryError("INVALID_ARGUMENT", f"privacy.delta must be below 1, got {msg.delta!r}")
    for name in ("mechanism", "unit"):
        text = getattr(msg, name)
        if len(text) > MAX_TEXT or not text.isprintable():
            raise QueryError("INVALID_ARGUMENT", f"privacy.{name} must be printable text of at most {MAX_TEXT} "
                                                 f"characters, got {len(text):,} characters")
    if msg.mechanism in ("", "none"):
        return None
    return {"mechanism": msg.mechanism, "epsilon_budget": msg.epsilon_budget, "epsilon_spent": msg.epsilon_spent,
            "delta": msg.delta, "unit": msg.unit}


def encode_description(d: TeacherDescription, *, name: str = "", max_batch: int = 0) -> pb.TeacherDescription:
    return pb.TeacherDescription(
        name=name, client=d.client, model=d.model, num_classes=d.num_classes, input_shape=list(d.input_shape),
        mean=list(d.mean), std=list(d.std), access_modes=list(d.access_modes),
        has_feature_statistics=d.has_feature_statistics, num_samples=d.num_samples or 0,
        label_counts=list(d.label_counts or ()), max_batch=max_batch,
        privacy=encode_privacy(d.privacy), terms=list(d.available_terms), evaluates_student=d.evaluates_student,
        unknown_output=d.unknown_output, log_density_output=d.log_density_output, draws_density=d.draws_density,
    )


# What a description may announce: more would be an error or an attack, not a teacher.
MAX_CLASSES = 100_000
MAX_TEXT = 200  # characters of a name, a model, a mechanism: a 3 MB model name once reached summary.json
MAX_TERMS = 64
MAX_SIDE = 4096
MAX_NORMALISATION = 1e3


def decode_description(msg: pb.TeacherDescription) -> TeacherDescription:
    """Validate what an agent announces; raises INVALID_ARGUMENT naming the field."""
    def bad(text: str) -> QueryError:
        return QueryError("INVALID_ARGUMENT", f"description: {text}")

    for name in ("name", "model"):  # shown in logs, summary.json and the results table
        text = getattr(msg, name)
        if len(text) > MAX_TEXT or not text.isprintable():
            raise bad(f"{name} must be printable text of at most {MAX_TEXT} characters, got {len(text):,} "
                      "characters" + ("" if text.isprintable() else " with control characters"))
    if len(msg.terms) > MAX_TERMS or len(msg.access_modes) > 3:
        raise bad(f"at most {MAX_TERMS} terms and 3 access modes, got {len(msg.terms):,} and "
                  f"{len(msg.access_modes):,}")
    if not 2 <= msg.num_classes <= MAX_CLASSES:
        raise bad(f"num_classes must be from 2 to {MAX_CLASSES}, got {msg.num_classes}")
    if len(msg.input_shape) != 3 or any(not 1 <= d <= MAX_SIDE for d in msg.input_shape):
        raise bad(f"input_shape must be (channels, height, width) with sizes from 1 to {MAX_SIDE}, got "
                  f"{tuple(msg.input_shape)}")
    channels = msg.input_shape[0]
    if len(msg.mean) != channels or len(msg.std) != channels:
        raise bad(f"mean and std need one value per channel ({channels}), got {len(msg.mean)} and {len(msg.std)}")
    if not all(math.isfinite(v) and abs(v) <= MAX_NORMALISATION for v in msg.mean):
        raise bad(f"mean must be finite numbers within +-{MAX_NORMALISATION:g}, got {list(msg.mean)}")
    if not all(math.isfinite(v) and 0 < v <= MAX_NORMALISATION for v in msg.std):
        raise bad(f"std must be finite numbers in (0, {MAX_NORMALISATION:g}], got {list(msg.std)}")
    if msg.num_samples < 0 or msg.max_batch < 0:
        raise bad(f"num_samples and max_batch must be >= 0, got {msg.num_samples} and {msg.max_batch}")
    unknown = set(msg.access_modes) - {"gradient", "logits", "labels"}
    if unknown or not msg.access_modes:
        raise bad(f"access_modes must be a non-empty subset of gradient, logits, labels; got "
                  f"{list(msg.access_modes)}")
    if msg.label_counts and (len(msg.label_counts) != msg.num_classes or min(msg.label_counts) < 0):
        raise bad(f"label_counts must have {msg.num_classes} non-negative entries")
    if msg.unknown_output and msg.log_density_output:
        raise bad("unknown_output and log_density_output both announce the one extra output; a teacher has one "
                  "or the other")
    if msg.draws_density and not msg.log_density_output:
        raise bad("draws_density without log_density_output: a teacher draws from the density it answers")
    return TeacherDescription(
        client=int(msg.client), model=msg.model, num_classes=int(msg.num_classes),
        input_shape=(int(msg.input_shape[0]), int(msg.input_shape[1]), int(msg.input_shape[2])),
        mean=tuple(float(v) for v in msg.mean), std=tuple(float(v) for v in msg.std),
        access_modes=tuple(msg.access_modes), has_feature_statistics=bool(msg.has_feature_statistics),
        num_samples=int(msg.num_samples) or None,
        label_counts=tuple(int(c) for c in msg.label_counts) if msg.label_counts else None,
        privacy=_decode_description_privacy(msg),
        # terms this coordinator knows (an agent newer than the hub may announce more; they are never asked for)
        terms=tuple(t for t in dict.fromkeys(msg.terms) if t in TERM_NAMES),
        evaluates_student=bool(msg.evaluates_student),
        unknown_output=bool(msg.unknown_output), log_density_output=bool(msg.log_density_output),
        draws_density=bool(msg.draws_density),
    )


def _decode_description_privacy(msg: pb.TeacherDescription) -> dict[str, float | str] | None:
    if not msg.HasField("privacy"):
        return None
    try:
        return decode_privacy(msg.privacy)
    except QueryError as exc:
        raise QueryError("INVALID_ARGUMENT", f"description: {exc.message}") from None


# Framing: a query body serialised once for every teacher it goes to ----------------------------------------------

def varint(n: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    """One protobuf field of wire type 2 (bytes, string, message): tag, length, data."""
    return varint(field_number << 3 | 2) + varint(len(data)) + data


FORWARD_FIELD, BACKWARD_FIELD = 3, 4  # HubMessage.forward, HubMessage.backward


@dataclass(frozen=True)
class Serialized:
    """A query body serialised once for every teacher it goes to: ``body`` is the bytes of the HubMessage field
    ``field`` (3: forward, 4: backward); the fan-out adds each teacher's own message id around it."""

    field: int
    body: bytes

    def message(self, mid: int) -> bytes:
        return varint(1 << 3) + varint(mid) + length_delimited(self.field, self.body)


# Queries, as the coordinator's hub writes them and reads the answers ---------------------------------------------
# The original contract's ``bn_loss`` / ``grad_bn_loss`` fields are written and read here only, beside ``terms``:
# a peer that predates ``terms`` still computes (and differentiates) its feature statistics.

def forward_inputs(inputs: Tensor) -> bytes:
    """The inputs of a Forward as field 1 of a ForwardRequest, serialised once for every teacher."""
    return length_delimited(1, encode_tensor(inputs).SerializeToString())


def forward_request(inputs: bytes, state: QueryContext, *, terms: Sequence[str] = (), labels: bool = False,
                    keep: bool = False) -> Serialized:
    """One teacher's Forward: the shared ``inputs`` (:func:`forward_inputs`) and its own part of the query."""
    flags = pb.ForwardRequest(state=encode_state(state), labels=labels, keep=keep, terms=list(terms),
                              bn_loss=FEATURE_STATISTICS in terms)
    return Serialized(FORWARD_FIELD, inputs + flags.SerializeToString())


def backward_request(grad_logits: Tensor, grad_terms: Mapping[str, float], state: QueryContext, *,
                     inputs: pb.Tensor | None = None, forward_id: int = 0) -> pb.BackwardRequest:
    """A Backward naming the Forward it follows (``forward_id``) or carrying the ``inputs`` again."""
    request = pb.BackwardRequest(grad_logits=encode_tensor(grad_logits), state=encode_state(state),
                                 forward_id=forward_id)
    if inputs is not None:
        request.inputs.CopyFrom(inputs)
    for name, value in grad_terms.items():
        request.grad_terms[name] = value
    if FEATURE_STATISTICS in grad_terms:
        request.grad_bn_loss = grad_terms[FEATURE_STATISTICS]
    return request


def decode_forward_reply(msg: pb.AgentMessage, batch: int, classes: int, *, labels: bool = False,
                         terms: Sequence[str] = (),
                         outputs: int | None = None) -> ForwardReply:
    """A teacher's answer to a Forward, checked against what was asked (INVALID_ARGUMENT naming the field).
    ``outputs``: the width of its logits (``classes``, or one more from a teacher with an unknown output)."""
    width = outputs or classes
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
    logits = decode_tensor(msg.forward.logits, field="logits", max_bytes=batch * width * 4)
    if logits.dtype != torch.float32 or tuple(logits.shape) != (batch, width):
        raise QueryError("INVALID_ARGUMENT", f"logits {logits.dtype} {tuple(logits.shape)}, expected float32 "
                                             f"{(batch, width)}")
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


def decode_backward_reply(msg: pb.AgentMessage, inputs: Tensor, *, max_bytes: int | None = None) -> Tensor:
    """A teacher's input gradient: the inputs' dtype and shape, finite (INVALID_ARGUMENT otherwise)."""
    if msg.WhichOneof("kind") != "backward":
        raise QueryError("INVALID_ARGUMENT", f"answered a Backward with {msg.WhichOneof('kind')}")
    grad = decode_tensor(msg.backward.grad_inputs, field="grad_inputs", max_bytes=max_bytes)
    if grad.dtype != inputs.dtype or grad.shape != inputs.shape:
        raise QueryError("INVALID_ARGUMENT", f"grad_inputs {grad.dtype} {tuple(grad.shape)} does not "
                                             f"match the inputs {tuple(inputs.shape)}")
    if not torch.isfinite(grad).all():
        raise QueryError("INVALID_ARGUMENT", "grad_inputs contain NaN or infinite values")
    return grad


# Queries, as an institution's agent reads them and writes its answers -------------------------------------------

@dataclass(frozen=True)
class ForwardQuery:
    """A Forward as the host takes it."""

    inputs: Tensor
    state: QueryContext
    terms: tuple[str, ...]
    labels: bool
    keep: bool


@dataclass(frozen=True)
class BackwardQuery:
    """A Backward as the host takes it: ``inputs`` None when it names the Forward it follows (``forward_id``)."""

    inputs: Tensor | None
    grad_logits: Tensor
    state: QueryContext
    grad_terms: dict[str, float]
    forward_id: int


def decode_forward_request(request: pb.ForwardRequest, *, max_bytes: int | None = None) -> ForwardQuery:
    terms = list(dict.fromkeys(request.terms))
    if request.bn_loss and FEATURE_STATISTICS not in terms:  # the original flag (a hub that predates ``terms``)
        terms.append(FEATURE_STATISTICS)
    return ForwardQuery(decode_tensor(request.inputs, field="inputs", max_bytes=max_bytes),
                        decode_state(request.state), tuple(terms), bool(request.labels), bool(request.keep))


def decode_backward_request(request: pb.BackwardRequest, *, max_bytes: int | None = None) -> BackwardQuery:
    named = request.forward_id != 0
    inputs = (decode_tensor(request.inputs, field="inputs", max_bytes=max_bytes)
              if not named or request.HasField("inputs") else None)
    grad_logits = decode_tensor(request.grad_logits, field="grad_logits", max_bytes=max_bytes)
    grad_terms = dict(request.grad_terms)
    if request.HasField("grad_bn_loss"):  # the original field (a hub that predates ``grad_terms``)
        grad_terms[FEATURE_STATISTICS] = request.grad_bn_loss
    return BackwardQuery(inputs, grad_logits, decode_state(request.state), grad_terms, int(request.forward_id))


def encode_forward_reply(reply: ForwardReply) -> pb.AgentMessage:
    if reply.labels is not None:
        return pb.AgentMessage(forward=pb.ForwardReply(labels=encode_tensor(reply.labels)))
    out = pb.ForwardReply(logits=encode_tensor(reply.logits))
    for name, value in reply.terms.items():
        out.terms[name] = float(value)
    if FEATURE_STATISTICS in reply.terms:  # the original field too, for a hub that predates ``terms``
        out.bn_loss = float(reply.terms[FEATURE_STATISTICS])
    return pb.AgentMessage(forward=out)


def encode_backward_reply(grad_inputs: Tensor) -> pb.AgentMessage:
    return pb.AgentMessage(backward=pb.BackwardReply(grad_inputs=encode_tensor(grad_inputs)))


# Draws from a teacher's density (TeacherDescription.draws_density) ----------------------------------------------

@dataclass(frozen=True)
class DrawQuery:
    """A Draw as the host takes it."""

    count: int
    label: int
    state: QueryContext
    seed: int


def draw_request(count: int, label: int, state: QueryContext, seed: int) -> pb.DrawRequest:
    return pb.DrawRequest(state=encode_state(state), count=count, density_class=label, seed=seed % 2**64)


def decode_draw_request(request: pb.DrawRequest) -> DrawQuery:
    """The host checks the count and the class against its own limits and classes."""
    return DrawQuery(int(request.count), int(request.density_class), decode_state(request.state), int(request.seed))


def encode_draw_reply(images: Tensor) -> pb.AgentMessage:
    return pb.AgentMessage(draw=pb.DrawReply(inputs=encode_tensor(images)))


def decode_draw_reply(msg: pb.AgentMessage, count: int, input_shape: Sequence[int], *,
                      max_bytes: int | None = None) -> Tensor:
    """A teacher's drawn inputs: float32 of shape (count, *input_shape), finite (INVALID_ARGUMENT otherwise)."""
    if msg.WhichOneof("kind") != "draw":
        raise QueryError("INVALID_ARGUMENT", f"answered a Draw with {msg.WhichOneof('kind')}")
    images = decode_tensor(msg.draw.inputs, field="inputs", max_bytes=max_bytes)
    expected = (count, *input_shape)
    if images.dtype != torch.float32 or tuple(images.shape) != expected:
        raise QueryError("INVALID_ARGUMENT", f"drawn inputs {images.dtype} {tuple(images.shape)}, asked for float32 "
                                             f"{expected}")
    if not torch.isfinite(images).all():
        raise QueryError("INVALID_ARGUMENT", "drawn inputs contain NaN or infinite values")
    return images


# The final student, for the institutions that evaluate it -------------------------------------------------------

MAX_WEIGHTS = 100_000  # named tensors in a student's state dict
MAX_ARGS = 10_000  # characters of the constructor's arguments (JSON)
MAX_EXAMPLES = 1e12  # examples an evaluation may report


def evaluate_request(student: StudentToEvaluate, state: QueryContext) -> pb.EvaluateRequest:
    msg = pb.EvaluateRequest(model=student.model, args_json=json.dumps(student.args), state=encode_state(state))
    for name, tensor in student.weights.items():
        msg.weights.add(name=name, tensor=encode_tensor(tensor))
    return msg


def decode_evaluate_request(msg: pb.EvaluateRequest, *,
                            max_bytes: int | None = None) -> tuple[StudentToEvaluate, QueryContext]:
    """What the hub asks an institution to evaluate, checked (the institution decides separately whether it builds
    the model it names)."""
    def bad(text: str) -> QueryError:
        return QueryError("INVALID_ARGUMENT", f"evaluate: {text}")

    if not msg.model or len(msg.model) > MAX_TEXT or not msg.model.isprintable():
        raise bad(f"model must be printable text of 1 to {MAX_TEXT} characters")
    if len(msg.args_json) > MAX_ARGS:
        raise bad(f"args_json has {len(msg.args_json):,} characters, at most {MAX_ARGS:,}")
    try:
        args = json.loads(msg.args_json or "{}")
    except json.JSONDecodeError as exc:
        raise bad(f"args_json is not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise bad(f"args_json must be a JSON object, got {type(args).__name__}")
    if not 0 < len(msg.weights) <= MAX_WEIGHTS:
        raise bad(f"weights must hold 1 to {MAX_WEIGHTS:,} named tensors, got {len(msg.weights):,}")
    weights: dict[str, Tensor] = {}
    for entry in msg.weights:
        if not entry.name or len(entry.name) > MAX_TEXT or not entry.name.isprintable() or entry.name in weights:
            raise bad(f"weights: a tensor name must be printable, unique and 1 to {MAX_TEXT} characters, got "
                      f"{entry.name[:MAX_NAME]!r}")
        weights[entry.name] = decode_tensor(entry.tensor, field=f"weights[{entry.name!r}]", max_bytes=max_bytes)
    return StudentToEvaluate(msg.model, args, weights), decode_state(msg.state)


def encode_evaluation(evaluation: StudentEvaluation) -> pb.AgentMessage:
    return pb.AgentMessage(evaluation=pb.Evaluation(correct=evaluation.correct, examples=evaluation.examples,
                                                    epsilon=evaluation.epsilon,
                                                    privacy=encode_privacy(evaluation.privacy)))


def decode_evaluation(msg: pb.AgentMessage) -> StudentEvaluation:
    """An institution's evaluation of the student, as untrusted as any answer: finite counts, 0 <= correct <=
    examples <= 1e12, an epsilon >= 0; INVALID_ARGUMENT naming the field otherwise."""
    if msg.WhichOneof("kind") != "evaluation":
        raise QueryError("INVALID_ARGUMENT", f"answered an EvaluateRequest with {msg.WhichOneof('kind') or 'nothing'}")
    e = msg.evaluation
    if not (math.isfinite(e.correct) and math.isfinite(e.examples) and 0 <= e.correct <= e.examples <= MAX_EXAMPLES):
        raise QueryError("INVALID_ARGUMENT", f"evaluation: needs 0 <= correct <= examples <= {MAX_EXAMPLES:g}, got "
                                             f"correct={e.correct!r}, examples={e.examples!r}")
    if not math.isfinite(e.epsilon) or e.epsilon < 0:
        raise QueryError("INVALID_ARGUMENT", f"evaluation: epsilon must be a finite number >= 0, got {e.epsilon!r}")
    privacy = decode_privacy(e.privacy) if e.HasField("privacy") else None
    return StudentEvaluation(float(e.correct), float(e.examples), float(e.epsilon), privacy)
