"""Institutions that evaluate the final student on held-out data of their own (``fedkd teacher --eval-data``): the
host rebuilds the student without importing code or allocating what the weights do not fill, releases only the
counts through its policy and ledger, and the coordinator trusts none of what comes back."""

from __future__ import annotations

import math

import pytest
import torch
from fedkd.client.cli import host_from_module

from fedkd.codec import decode_evaluate_request, decode_evaluation, encode_evaluation, evaluate_request
from fedkd.contract import QueryContext, QueryError, StudentEvaluation, StudentToEvaluate
from fedkd.coordinator.evaluation import evaluate_at_institutions
from fedkd.coordinator.pool import LocalPool
from fedkd.data import ImageData
from fedkd.institution.privacy.policy import PrivacySettings
from fedkd.models import build_classifier
from fedkd.task import Task

TASK = Task(tuple(str(c) for c in range(10)), (1, 8, 8), (0.3,), (0.38,), "digits-like")
STATE = QueryContext(purpose="evaluate", method="cudfkd")


def _teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("lenet5-half", num_classes=10, channels=1, image_size=8)


def _held_out(n: int = 40) -> ImageData:
    g = torch.Generator().manual_seed(1)
    return ImageData(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _student(seed: int = 3) -> tuple[torch.nn.Module, StudentToEvaluate]:
    model = _teacher(seed).eval()
    return model, StudentToEvaluate("lenet5-half", {}, {k: v.clone() for k, v in model.state_dict().items()})


def test_the_counts_are_the_student_s_own_on_the_institution_s_data():
    data = _held_out()
    host = host_from_module(_teacher(), TASK, name="clinic", eval_data=data)
    assert host.describe().evaluates_student
    model, student = _student()
    answer = host.evaluate_student(student, STATE)
    expected = int((model((data.images - 0.3) / 0.38).argmax(1) == data.labels).sum())
    assert (answer.correct, answer.examples, answer.epsilon) == (expected, 40, 0.0)
    assert host.last_state == STATE
    assert not host_from_module(_teacher(), TASK, name="plain").describe().evaluates_student


def test_a_noised_release_is_charged_to_the_ledger_and_refused_past_the_budget(tmp_path):
    data = _held_out(200)
    privacy = PrivacySettings(mode="output-noise", budget=2.5, delta=1e-5, eval_epsilon=1.0)
    host = host_from_module(_teacher(), TASK, name="clinic", privacy=privacy, ledger=tmp_path / "ledger.json",
                            eval_data=data)
    _, student = _student()
    released = []
    with pytest.raises(QueryError, match="privacy budget exhausted") as refused:
        for _ in range(10):
            released.append(host.evaluate_student(student, STATE))
    assert refused.value.code == "RESOURCE_EXHAUSTED" and host.stats.refused == 1
    assert 1 <= len(released) < 10
    first = released[0]
    assert 0 < first.epsilon <= 2.5 and first.privacy["epsilon_spent"] == pytest.approx(first.epsilon)
    assert first.examples != 200.0 and 0 <= first.correct <= first.examples  # noised: not the exact count
    assert host.policy.ledger.spent <= 2.5 + 1e-9


def test_code_a_foreign_architecture_or_partial_weights_are_refused_without_building_them():
    host = host_from_module(_teacher(), TASK, name="clinic", eval_data=_held_out())
    _, student = _student()
    with pytest.raises(QueryError, match="built by code") as code:
        host.evaluate_student(StudentToEvaluate("os:system", {}, student.weights), STATE)
    assert code.value.code == "FAILED_PRECONDITION"
    # 632 million parameters named by the coordinator: refused from the meta device, nothing allocated
    with pytest.raises(QueryError, match="cannot be rebuilt from the weights sent"):
        host.evaluate_student(StudentToEvaluate("torchvision:vit_h_14", {}, student.weights), STATE)
    partial = dict(list(student.weights.items())[:-1])
    with pytest.raises(QueryError, match="cannot be rebuilt.*Missing key"):
        host.evaluate_student(StudentToEvaluate("lenet5-half", {}, partial), STATE)
    with pytest.raises(QueryError, match="evaluates no student"):
        host_from_module(_teacher(), TASK, name="plain").evaluate_student(student, STATE)
    assert host.stats.refused == 3


def test_the_request_round_trips_and_a_hostile_one_is_named():
    _, student = _student()
    back, state = decode_evaluate_request(evaluate_request(student, STATE))
    assert back.model == "lenet5-half" and state == STATE
    assert all(torch.equal(back.weights[k], v) for k, v in student.weights.items())
    msg = evaluate_request(student, STATE)
    msg.args_json = "[1, 2]"
    with pytest.raises(QueryError, match="args_json must be a JSON object"):
        decode_evaluate_request(msg)
    msg = evaluate_request(student, STATE)
    msg.weights[0].name = msg.weights[1].name
    with pytest.raises(QueryError, match="unique"):
        decode_evaluate_request(msg)
    with pytest.raises(QueryError, match="limit"):
        decode_evaluate_request(evaluate_request(student, STATE), max_bytes=16)


@pytest.mark.parametrize("correct,examples,epsilon,message", [
    (30.0, 20.0, 0.0, "correct <= examples"),
    (math.nan, 20.0, 0.0, "correct <= examples"),
    (-1.0, 20.0, 0.0, "correct <= examples"),
    (5.0, 1e13, 0.0, "examples <= 1e"),
    (5.0, 20.0, -0.5, "epsilon"),
    (5.0, 20.0, math.inf, "epsilon"),
])
def test_what_an_institution_reports_is_checked(correct, examples, epsilon, message):
    forged = encode_evaluation(StudentEvaluation(correct, examples, epsilon))
    with pytest.raises(QueryError, match=message):
        decode_evaluation(forged)
    assert decode_evaluation(encode_evaluation(StudentEvaluation(5.0, 20.0, 0.25))).accuracy == 0.25


def test_the_coordinator_weighs_the_institutions_and_names_each_refusal(tmp_path):
    data = _held_out()
    hosts = [host_from_module(_teacher(0), TASK, name="a", eval_data=data, client=0),
             host_from_module(_teacher(1), TASK, name="b", client=1),
             host_from_module(_teacher(2), TASK, name="c", eval_data=_held_out(10), client=2,
                              privacy=PrivacySettings(mode="output-noise", budget=0.1, delta=1e-5),
                              ledger=tmp_path / "c.json")]
    model, _ = _student()
    result = evaluate_at_institutions(LocalPool(hosts), model, model="lenet5-half", args={}, method="cudfkd")
    assert result is not None
    rows = result["clients"]
    assert [r["client"] for r in rows] == [0, 2] and rows[0]["evaluated"] and not rows[1]["evaluated"]
    assert "privacy budget exhausted" in rows[1]["why"]
    assert result["student_accuracy"] == rows[0]["accuracy"] and result["num_examples"] == 40
    code = evaluate_at_institutions(LocalPool(hosts), model, model="mine:Net", args={}, method="cudfkd")
    assert code is not None and code["student_accuracy"] is None and "not asked" in code["clients"][0]["why"]
    assert evaluate_at_institutions(LocalPool(hosts[1:2]), model, model="lenet5-half", args={},
                                    method="cudfkd") is None
