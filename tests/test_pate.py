"""PATE on a client: shard teachers, Confident-GNMax labels with abstentions, accounting and budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from test_privacy_policy import rdp as rdp_epsilon  # the RDP accountant, independently of the ledger

from fedkd.checkpoint import save_teacher
from fedkd.contract import QueryContext, QueryError, vote_logits
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.institution.privacy import BudgetExhausted, PrivacySettings, ReleasePolicy, recompute_epsilon
from fedkd.institution.privacy.pate import (
    ABSTAIN,
    ORDERS,
    ShardVotes,
    confident_gnmax,
    data_dependent_rdp,
    pate_record,
    rdp_to_epsilon,
    shards,
)
from fedkd.models import build_model

STATE = QueryContext()
SHAPE = (1, 8, 8)


def votes(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def shard_votes(teachers: int = 4, seed: int = 0) -> ShardVotes:
    torch.manual_seed(seed)
    return ShardVotes([build_model("lenet5-half", num_classes=10, channels=1, image_size=8)
                       for _ in range(teachers)], 10).eval()


def pate_host(tmp_path, *, budget: float = 0.0, teachers: int = 4, **settings) -> TeacherHost:
    model = shard_votes(teachers)
    ckpt = save_teacher(tmp_path / "teacher.pt", model, model_name="lenet5-half", num_classes=10, input_shape=SHAPE,
                        num_samples=40 * teachers, label_counts=[4 * teachers] * 10, mean=(0.5,), std=(0.25,),
                        privacy=pate_record(teachers, [40] * teachers))
    model, ckpt = load_teacher(tmp_path / "teacher.pt")
    policy = ReleasePolicy(PrivacySettings(mode="pate", budget=budget, delta=1e-5, **settings),
                           num_records=40 * teachers, training=ckpt["privacy"],
                           generator=torch.Generator().manual_seed(0))
    return TeacherHost(model, describe_checkpoint(ckpt, model, client=0, policy=policy), policy=policy)


def test_shards_are_disjoint_cover_everything_and_need_enough_records():
    parts = shards(103, 10, seed=1)
    assert len(parts) == 10 and sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}
    with pytest.raises(ValueError, match="pate-teachers: 10 shard teachers need at least 20 records"):
        shards(15, 10, seed=0)
    with pytest.raises(ValueError, match="at least 2 shard teachers"):
        shards(100, 1, seed=0)


def test_confident_gnmax_answers_the_plurality_and_abstains_below_the_threshold():
    g = torch.Generator().manual_seed(0)
    unanimous = votes([[0, 0, 10, 0]] * 500)
    labels = confident_gnmax(unanimous, threshold=5, sigma1=1.0, sigma2=1.0, generator=g)
    assert (labels == 2).all()
    split = votes([[3, 3, 4, 0]] * 500)
    assert (confident_gnmax(split, threshold=8, sigma1=0.5, sigma2=1.0, generator=g) == ABSTAIN).all()
    # The answer rate is Pr[max + N(0, sigma1^2) >= T]: 4 votes, T 5, sigma1 2 -> Phi(-0.5) = 0.309.
    rows = 20_000
    answered = (confident_gnmax(votes([[3, 3, 4, 0]] * rows), threshold=5, sigma1=2.0, sigma2=1.0,
                                generator=g) != ABSTAIN).float().mean().item()
    assert answered == pytest.approx(norm.sf(0.5), abs=4 * math.sqrt(0.25 / rows))  # 4 standard errors


def test_the_ledger_charges_the_threshold_for_every_row_and_gnmax_for_every_answer(tmp_path):
    host = pate_host(tmp_path, pate_threshold=2.0, pate_sigma1=3.0, pate_sigma2=2.0, share_label_counts=False)
    reply = host.forward(torch.rand(50, *SHAPE), STATE, labels=True)
    answered = int((reply.labels != ABSTAIN).sum())
    assert 0 < answered < 50  # some of each with these settings and an untrained ensemble
    record = host.policy.record()
    steps = {e["kind"]: (e["noise_multiplier"], e["steps"]) for e in record["entries"]}
    assert steps["pate threshold"] == (3.0, 50) and steps["pate answers"] == (pytest.approx(2.0 / math.sqrt(2)),
                                                                              answered)
    # Independently: RDP lambda / (2 sigma1^2) per row and lambda / sigma2^2 per answer (Papernot et al. 2018).
    expected = rdp_epsilon([(3.0, 1.0, 50), (2.0 / math.sqrt(2), 1.0, answered)], 1e-5)
    assert record["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    assert recompute_epsilon(json.loads(json.dumps(record))) == pytest.approx(expected, rel=1e-9)
    assert record["pate"]["answered"] == answered and record["pate"]["abstained"] == 50 - answered
    assert record["unit"] == "record" and record["pate"]["teachers"] == 4
    # The labels as the coordinator's aggregators see them: an abstention is the uniform vote.
    uniform = reply.logits[reply.labels == ABSTAIN]
    assert torch.allclose(uniform, torch.full_like(uniform, math.log(0.1)))


def test_the_data_dependent_bound_is_never_above_the_data_independent_one():
    sigma1, sigma2, threshold = 150.0, 40.0, 200.0  # the paper's MNIST setting, 250 teachers
    unanimous = votes([[250] + [0] * 9] * 100)
    answered = torch.ones(100, dtype=torch.bool)
    dependent = data_dependent_rdp(unanimous, answered, threshold=threshold, sigma1=sigma1, sigma2=sigma2)
    independent = 100 * (ORDERS / (2 * sigma1 ** 2) + ORDERS / sigma2 ** 2)
    assert (dependent <= independent + 1e-12).all()
    # A wide margin makes the answers nearly certain: far cheaper than the worst case.
    assert rdp_to_epsilon(dependent, 1e-5) < 0.5 * rdp_to_epsilon(independent, 1e-5)
    # A close vote gets no discount.
    close = votes([[126, 124] + [0] * 8] * 100)
    close_rdp = data_dependent_rdp(close, answered, threshold=threshold, sigma1=sigma1, sigma2=sigma2)
    assert rdp_to_epsilon(close_rdp, 1e-5) > 0.8 * rdp_to_epsilon(independent, 1e-5)
    assert (close_rdp <= independent + 1e-12).all() and (close_rdp >= dependent - 1e-12).all()


def test_the_budget_checks_the_worst_case_and_refuses_without_releasing(tmp_path):
    # Room for exactly 10 rows if all were answered.
    budget = rdp_epsilon([(2.0, 1.0, 10), (1.0 / math.sqrt(2), 1.0, 10)], 1e-5) * 1.0000001
    host = pate_host(tmp_path, budget=budget, pate_threshold=0.0, pate_sigma1=2.0, pate_sigma2=1.0,
                     share_label_counts=False)
    host.forward(torch.rand(10, *SHAPE), STATE, labels=True)  # its worst case is the whole budget: allowed
    spent = host.policy.ledger.spent
    assert spent <= budget
    # Whatever the first batch's abstentions saved, 10 more rows could cost more than is left: refused.
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted: 10 PATE label"):
        host.forward(torch.rand(10, *SHAPE), STATE, labels=True)
    assert host.policy.ledger.spent == spent and host.stats.refused == 1


def test_a_pate_client_answers_labels_only(tmp_path):
    host = pate_host(tmp_path)
    assert host.describe().access_modes == ("labels",) and host.describe().terms == ()
    assert host.describe().privacy["mechanism"] == "pate"
    with pytest.raises(QueryError, match="grants hard labels only"):
        host.forward(torch.rand(2, *SHAPE), STATE)
    with pytest.raises(QueryError, match="does not grant gradient access"):
        host.backward(torch.rand(2, *SHAPE), torch.zeros(2, 10), STATE)


def test_the_shard_teachers_survive_a_checkpoint_and_a_single_teacher_is_not_pate(tmp_path):
    model = shard_votes(3, seed=4)
    x = torch.rand(16, *SHAPE)
    save_teacher(tmp_path / "t.pt", model, model_name="lenet5-half", num_classes=10, input_shape=SHAPE,
                 num_samples=60, label_counts=[6] * 10, mean=(0.5,), std=(0.25,), privacy=pate_record(3, [20] * 3))
    loaded, ckpt = load_teacher(tmp_path / "t.pt")
    assert isinstance(loaded, ShardVotes) and torch.equal(loaded(x), model(x))
    assert loaded(x).sum(1).eq(3).all()  # one vote per shard teacher
    with pytest.raises(ValueError, match="privacy-mode: pate needs shard teachers trained for PATE"):
        ReleasePolicy(PrivacySettings(mode="pate"), num_records=10, training=None)
    with pytest.raises(ValueError, match="cannot serve PATE shard teachers"):
        ReleasePolicy(PrivacySettings(mode="output-noise"), num_records=10, training=ckpt["privacy"])


def test_vote_logits_of_an_abstention_is_uniform_and_the_hub_accepts_it():
    logits = vote_logits(torch.tensor([3, ABSTAIN]), 10)
    assert logits[0].argmax() == 3 and torch.allclose(logits[1], torch.full((10,), math.log(0.1)))


@pytest.mark.slow
def test_a_federation_with_a_pate_client_runs_over_grpc_and_reports_both_bounds(tmp_path):
    from fedkd.server.loopback import grpc_transport

    from fedkd.config import config_from_mapping
    from fedkd.coordinator.experiment import run_experiment

    cfg = config_from_mapping({"dataset": "digits", "num-clients": 2, "partition": "iid", "teacher-model": "lenet5",
                               "teacher-epochs": 3, "epochs": 1, "steps-per-epoch": 3, "student-steps": 2,
                               "batch-size": 16, "latent-dim": 16, "num-threads": 2, "sample-stages": 1,
                               "privacy-mode": "none,pate", "pate-teachers": 3, "pate-threshold": 2.0,
                               "transport": "grpc"})
    summary = run_experiment(cfg, tmp_path / "run", transport=grpc_transport)
    plain, pate = summary["privacy"]["clients"]
    assert plain["mode"] == "none" and pate["mode"] == "pate"
    sizes = pate["training"]["shard_sizes"]
    assert pate["training"]["teachers"] == 3 and len(sizes) == 3 and max(sizes) - min(sizes) <= 1
    assert pate["pate"]["answered"] > 0 and pate["pate"]["abstained"] >= 0
    assert pate["epsilon_spent"] == pytest.approx(recompute_epsilon(pate), rel=1e-9)
    assert pate["pate"]["data_dependent_epsilon"] > 0
    per_client = summary["queries"]["per_client"]
    assert per_client[1]["samples"] == pate["pate"]["answered"] + pate["pate"]["abstained"]
    assert summary["student"]["test_accuracy"] is not None
