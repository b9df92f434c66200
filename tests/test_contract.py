"""The fedkd.v1 contract: generated code is current, tensors and descriptions round-trip, bad tensors are named."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedkd.codec import DTYPES, _swap_bytes, decode_description, decode_tensor, encode_description, encode_tensor
from fedkd.contract import QueryError, TeacherDescription
from fedkd.v1 import fedkd_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_committed_generated_code_is_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"fedkd_pb2.py", "fedkd_pb2.pyi", "fedkd_pb2_grpc.py"}
    for path in written:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run `python protos/generate.py` and commit the result")


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES, key=str)))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 100
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return values.clamp(info.min, info.max).to(dtype)
    return values.to(dtype)


@given(tensors(), st.booleans())
def test_every_dtype_and_shape_round_trips_through_the_wire(t, little_endian):
    msg = pb.Tensor.FromString(encode_tensor(t, little_endian=little_endian).SerializeToString())
    back = decode_tensor(msg, little_endian=little_endian)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bytes_are_little_endian_whatever_the_host():
    t = torch.tensor([1], dtype=torch.int32)
    assert encode_tensor(t).data == b"\x01\x00\x00\x00"
    # A big-endian host swaps before sending and after receiving: the wire bytes are the same.
    assert encode_tensor(_swap_bytes(t), little_endian=False).data == b"\x01\x00\x00\x00"
    assert decode_tensor(encode_tensor(t), little_endian=False).item() == 1 << 24


@pytest.mark.parametrize("msg, code, text", [
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "INVALID_ARGUMENT", "unsupported dtype"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "INVALID_ARGUMENT", "unsupported dtype 99"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -1], data=b""), "INVALID_ARGUMENT", "negative dimension"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[3], data=b"\0" * 8), "INVALID_ARGUMENT", "8 bytes of data for shape (3,)"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[1] * 9, data=b"\0" * 4), "INVALID_ARGUMENT", "9 dimensions"),
    (pb.Tensor(dtype=pb.FLOAT64, shape=[1 << 20, 1 << 20], data=b""), "RESOURCE_EXHAUSTED", "more than the limit"),
])
def test_malformed_tensors_are_refused_naming_the_field(msg, code, text):
    with pytest.raises(QueryError, match=re.escape(text)) as err:
        decode_tensor(msg, field="inputs", max_bytes=1 << 30)
    assert err.value.code == code and "inputs" in err.value.message


def test_description_round_trips_and_is_validated():
    d = TeacherDescription(client=3, model="lenet5", num_classes=10, input_shape=(1, 28, 28), mean=(0.13,),
                           std=(0.31,), access_modes=("logits",), has_feature_statistics=True, num_samples=900,
                           label_counts=tuple(range(10)),
                           privacy={"mechanism": "dp-sgd", "epsilon_budget": 8.0, "epsilon_spent": 2.5,
                                    "delta": 1e-5, "unit": "record"})
    back = decode_description(pb.TeacherDescription.FromString(encode_description(d).SerializeToString()))
    assert back.model == d.model and back.input_shape == d.input_shape and back.label_counts == d.label_counts
    assert back.access_modes == ("logits",) and back.privacy["epsilon_spent"] == 2.5
    assert back.mean == pytest.approx(d.mean) and back.std == pytest.approx(d.std)
    msg = encode_description(d)
    msg.access_modes.append("weights")
    with pytest.raises(QueryError, match="access_modes"):
        decode_description(msg)
    msg = encode_description(d)
    del msg.input_shape[:]
    with pytest.raises(QueryError, match="input_shape"):
        decode_description(msg)
    msg = encode_description(d)
    msg.label_counts.append(5)
    with pytest.raises(QueryError, match="label_counts must have 10"):
        decode_description(msg)


def test_a_query_serialised_once_is_the_message_the_contract_defines():
    from fedkd.codec import Serialized, encode_state, encode_tensor, length_delimited
    from fedkd.contract import QueryContext

    x = encode_tensor(torch.randn(3, 1, 4, 4))
    state = encode_state(QueryContext.of(epoch=2, step=5, lam=0.5, adv_weight=0.25))
    for flags in ({}, {"keep": True}, {"labels": True, "bn_loss": True}):
        body = length_delimited(1, x.SerializeToString()) + pb.ForwardRequest(state=state, **flags).SerializeToString()
        for mid in (1, 300, 2**40):
            parsed = pb.HubMessage.FromString(Serialized(3, body).message(mid))
            assert parsed == pb.HubMessage(id=mid, forward=pb.ForwardRequest(inputs=x, state=state, **flags))


def test_the_codec_s_query_messages_round_trip_and_speak_the_old_fields_for_old_peers():
    """Every Forward/Backward message is built and read by the codec: what the hub writes, the agent reads back as
    the same query, and the original ``bn_loss`` / ``grad_bn_loss`` fields ride along for peers that predate
    ``terms`` (and are read when a peer sends only them)."""
    from fedkd.codec import (
        backward_request,
        decode_backward_request,
        decode_forward_reply,
        decode_forward_request,
        encode_backward_reply,
        encode_forward_reply,
        forward_inputs,
        forward_request,
    )
    from fedkd.contract import FEATURE_STATISTICS, ForwardReply, QueryContext

    x, state = torch.randn(3, 1, 4, 4), QueryContext.of(epoch=1, step=7, lam=0.25, adv_weight=0.5)
    wire = pb.HubMessage.FromString(forward_request(forward_inputs(x), state, terms=(FEATURE_STATISTICS,),
                                                    keep=True).message(9))
    assert wire.forward.bn_loss and list(wire.forward.terms) == [FEATURE_STATISTICS]
    query = decode_forward_request(wire.forward)
    assert torch.equal(query.inputs, x) and query.state == state and query.keep and not query.labels
    assert query.terms == (FEATURE_STATISTICS,)
    old = decode_forward_request(pb.ForwardRequest(inputs=wire.forward.inputs, state=wire.forward.state, bn_loss=True))
    assert old.terms == (FEATURE_STATISTICS,)

    reply = ForwardReply(torch.randn(3, 10), {FEATURE_STATISTICS: torch.tensor(1.5)})
    answer = encode_forward_reply(reply)
    assert answer.forward.bn_loss == 1.5
    back = decode_forward_reply(answer, 3, 10, terms=(FEATURE_STATISTICS,))
    assert torch.equal(back.logits, reply.logits) and float(back.terms[FEATURE_STATISTICS]) == 1.5
    old_answer = pb.AgentMessage(forward=pb.ForwardReply(logits=answer.forward.logits, bn_loss=2.5))
    assert float(decode_forward_reply(old_answer, 3, 10, terms=(FEATURE_STATISTICS,)).terms[FEATURE_STATISTICS]) == 2.5
    with pytest.raises(QueryError, match="not asked for"):
        decode_forward_reply(answer, 3, 10, terms=())

    g = torch.randn(3, 10)
    request = backward_request(g, {FEATURE_STATISTICS: 0.5}, state, forward_id=9)
    assert request.grad_bn_loss == 0.5 and not request.HasField("inputs")
    query_back = decode_backward_request(request)
    assert query_back.inputs is None and query_back.forward_id == 9 and torch.equal(query_back.grad_logits, g)
    assert query_back.grad_terms == {FEATURE_STATISTICS: 0.5}
    old_back = decode_backward_request(pb.BackwardRequest(inputs=wire.forward.inputs, grad_logits=request.grad_logits,
                                                          state=request.state, grad_bn_loss=2.0))
    assert old_back.grad_terms == {FEATURE_STATISTICS: 2.0} and torch.equal(old_back.inputs, x)
    assert torch.equal(decode_tensor(encode_backward_reply(x).backward.grad_inputs), x)


def test_the_query_context_round_trips_and_an_old_coordinator_s_curriculum_is_read_as_a_schedule():
    from fedkd.codec import decode_state, encode_state
    from fedkd.contract import QueryContext

    context = QueryContext.of(epoch=3, step=40, purpose="synthesis", method="cudfkd", lam=0.7, adv_weight=1.5)
    wire = encode_state(context)
    assert (wire.lam, wire.adv_weight, dict(wire.schedule)) == (0.7, 1.5, {"lambda": 0.7, "adv_weight": 1.5})
    assert decode_state(pb.CurriculumState.FromString(wire.SerializeToString())) == context
    asking = dataclasses.replace(context, log_density=True)  # the density gate's ask travels with the context
    assert decode_state(pb.CurriculumState.FromString(encode_state(asking).SerializeToString())).log_density
    assert not context.log_density
    old = decode_state(pb.CurriculumState(epoch=1, lam=0.25, adv_weight=0.5))
    assert old.lam == 0.25 and old.adv_weight == 0.5 and old.purpose == ""
    assert decode_state(pb.CurriculumState(epoch=1)).schedule == ()
    with pytest.raises(QueryError, match="state.purpose 'spy' is not one of"):
        decode_state(pb.CurriculumState(purpose="spy"))
    bad = pb.CurriculumState()
    bad.schedule["lambda"] = float("nan")
    with pytest.raises(QueryError, match="is not a finite number"):
        decode_state(bad)
    many = pb.CurriculumState()
    for k in range(40):
        many.schedule[f"n{k}"] = 1.0
    with pytest.raises(QueryError, match="at most 32 schedule entries"):
        decode_state(many)
