"""The client's release policy and ledger: accounting, budgets, noise, and who may set them."""

import json
import random
import re
import warnings

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedkd.contract import QueryContext, QueryError, TeacherDescription
from fedkd.coordinator.pool import LocalPool, QuorumError
from fedkd.institution.host import TeacherHost
from fedkd.institution.privacy import (
    BudgetExhausted,
    Entry,
    PrivacyLedger,
    PrivacySettings,
    ReleasePolicy,
    recompute_epsilon,
)
from fedkd.models import build_model

STATE = QueryContext.of(epoch=0, step=0, lam=0.5, adv_weight=0.0)
SHAPE = (1, 8, 8)
TRAINING = {"mechanism": "dp-sgd", "epsilon_budget": 4.0, "epsilon_spent": 3.9, "delta": 1e-5, "unit": "record",
            "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 600, "max_grad_norm": 1.0, "accountant": "prv"}


def rdp(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta)


def host(policy, *, seed=0, access=("gradient", "logits")):
    torch.manual_seed(seed)
    model = build_model("lenet5-half", num_classes=10, channels=1, image_size=8)
    desc = TeacherDescription(client=seed, model="lenet5-half", num_classes=10, input_shape=SHAPE, mean=(0.5,),
                              std=(0.25,), access_modes=access, privacy=policy.status() if policy else None)
    return TeacherHost(model.eval(), desc, policy=policy)


def output_noise(budget=0.0, z=2.0, **kw):
    return ReleasePolicy(PrivacySettings(mode="output-noise", budget=budget, output_noise=z, delta=1e-5, **kw),
                         num_records=100)


def test_the_reported_epsilon_is_opacus_s_from_the_recorded_parameters():
    policy = ReleasePolicy(PrivacySettings(mode="dp-sgd", budget=20.0), num_records=1000, training=TRAINING)
    assert policy.label_counts(tuple(range(10))) is not None  # Gaussian histogram, accounted
    policy.evaluation_counts(40, 50)
    record = policy.record()
    assert [e["kind"] for e in record["entries"]] == ["dp-sgd training", "label counts", "evaluation counts"]
    acc = PRVAccountant()
    acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in record["entries"]]
    assert record["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert recompute_epsilon(json.loads(json.dumps(record))) == pytest.approx(record["epsilon_spent"], rel=1e-6)
    assert record["unit"] == "record" and record["guarantee"].startswith("record-level")
    assert record["training"]["noise_multiplier"] == 1.1 and record["settings"]["label_count_epsilon"] == 0.5

    noisy = output_noise()
    h = host(noisy)
    h.forward(torch.rand(7, *SHAPE), STATE)
    record = noisy.record()
    assert record["entries"] == [{"kind": "logits", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 7,
                                  "sensitivity": 20.0, "laplace_epsilon": 0.0}]
    assert record["epsilon_spent"] == pytest.approx(rdp([(2.0, 1.0, 7)], 1e-5), rel=1e-9)
    assert record["unit"] == "teacher"


@pytest.mark.parametrize("trial", range(12))
def test_the_budget_refuses_exactly_at_the_boundary(trial):
    rng = random.Random(trial)
    z, budget = rng.uniform(1.0, 8.0), rng.uniform(0.5, 12.0)
    ledger = PrivacyLedger(delta=1e-5, budget=budget, accountant="rdp")
    answered = 0
    while True:
        batch = rng.randint(1, 6)
        try:
            ledger.charge(Entry("logits", z, 1.0, batch))
        except BudgetExhausted as exc:
            assert exc.code == "RESOURCE_EXHAUSTED" and "nothing was released" in exc.message
            assert ledger.spent == pytest.approx(rdp([(z, 1.0, answered)], 1e-5) if answered else 0.0)
            if batch == 1:
                break
            continue  # a smaller batch may still fit: the loop ends once a single row is refused
        answered += batch
        assert ledger.spent <= budget  # never exceeded, not by one query
    assert rdp([(z, 1.0, answered)], 1e-5) <= budget < rdp([(z, 1.0, answered + 1)], 1e-5)


def test_output_noise_has_the_configured_scale_and_clips_each_row():
    torch.manual_seed(0)
    policy = output_noise(z=0.5, output_clip=1.0)
    released = policy.release("logits", torch.zeros(4000, 10))
    # std = z x 2 x clip = 1.0; with 40,000 draws the sample std is within 2 % (about 6 standard errors)
    assert float(released.std()) == pytest.approx(1.0, rel=0.02) and abs(float(released.mean())) < 0.02
    tiny = output_noise(z=1e-6, output_clip=3.0)
    rows = tiny.release("logits", torch.tensor([[300.0, 400.0], [0.3, 0.4]]))
    assert rows.norm(dim=1).tolist() == pytest.approx([3.0, 0.5], rel=1e-4)  # the long row clipped, not the short
    grads = tiny.release("input gradients", torch.full((2, *SHAPE), 10.0))
    assert grads.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-4)


def test_budget_refusals_name_the_cost_and_leave_the_ledger_unchanged():
    budget = rdp([(2.0, 1.0, 10)], 1e-5) * 1.0001
    policy = output_noise(budget=budget)
    h = host(policy)
    x = torch.rand(8, *SHAPE)
    h.forward(x, STATE, keep=1)
    spent = policy.ledger.spent
    with pytest.raises(QueryError, match=r"privacy budget exhausted: 8 input-gradient row\(s\).*past its budget") as e:
        h.backward(None, torch.ones(8, 10) / 8, STATE, forward_id=1)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert policy.ledger.spent == spent and h.stats.backward_calls == 0 and h.stats.refused == 1
    h.forward(x[:2], STATE)  # 10 rows in all: exactly what the budget holds
    with pytest.raises(QueryError, match="privacy budget exhausted"):
        h.forward(x[:1], STATE)
    assert h.describe().privacy["epsilon_spent"] <= budget and h.stats.forward_calls == 2


def test_an_exhausted_teacher_is_dropped_and_the_run_stops_when_none_answers():
    tight, loose = output_noise(budget=rdp([(2.0, 1.0, 4)], 1e-5) * 1.0001), output_noise()
    pool = LocalPool([host(tight, seed=0), host(loose, seed=1)])
    x = torch.rand(4, *SHAPE)
    assert set(pool.forward(x, STATE)) == {0, 1}
    assert set(pool.forward(x, STATE)) == {1}  # client 0's budget refused; the run goes on with client 1
    assert pool.stats()[0].missed == 1 and 0 in pool.exhausted
    with pytest.raises(QuorumError, match=r"1 of 2 teachers answered, 2 needed.*client 0: privacy budget exhausted"):
        pool.forward(x, STATE, min_answers=2)


def test_label_counts_under_a_mechanism_are_noisy_accounted_and_released_once(tmp_path):
    settings = PrivacySettings(mode="output-noise", label_count_noise="gaussian", label_count_epsilon=1.0)
    counts = (500,) * 10
    torch.manual_seed(0)
    policy = ReleasePolicy(settings, num_records=5000, ledger_path=tmp_path / "l.json")
    released = policy.label_counts(counts)
    assert released != counts and all(abs(a - b) < 60 for a, b in zip(released, counts))
    assert policy.ledger.entries[0].kind == "label counts" and policy.ledger.spent > 0
    again = ReleasePolicy(settings, num_records=5000, ledger_path=tmp_path / "l.json")
    assert again.label_counts(counts) == released and again.ledger.spent == policy.ledger.spent  # post-processing
    laplace = ReleasePolicy(PrivacySettings(mode="output-noise", label_count_noise="laplace",
                                            label_count_epsilon=0.3), num_records=10)
    laplace.label_counts(counts)
    assert laplace.ledger.spent == pytest.approx(0.3)
    assert ReleasePolicy(PrivacySettings(), num_records=10).label_counts(counts) == counts  # no mechanism: exact
    declined = ReleasePolicy(PrivacySettings(mode="output-noise", share_label_counts=False), num_records=10)
    assert declined.label_counts(counts) is None and declined.ledger.spent == 0
    with pytest.raises(ValueError, match="label-count-noise: none would release exact label counts"):
        ReleasePolicy(PrivacySettings(mode="output-noise", label_count_noise="none"), num_records=10).label_counts(
            counts)


@pytest.mark.parametrize("kwargs,message", [
    ({"output_noise": -1.0}, r"output-noise: -1.0 is out of range \(must be > 0"),
    ({"delta": 1.5}, r"dp-delta: 1.5 is out of range \(must be <= 0.1\)"),
    ({"budget": float("nan")}, r"privacy-budget: nan is not a finite number"),
    ({"mode": "gnmax"}, r"privacy-mode: 'gnmax' is not one of none, dp-sgd, output-noise, pate"),
    ({"label_count_noise": "poisson"}, r"label-count-noise: 'poisson' is not one of"),
])
def test_bad_privacy_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacySettings(**kwargs)


def test_a_run_s_settings_name_a_mode_per_client_and_a_policy_applies_one_only():
    """A run's privacy section may list one mode per client; each client gets its own, and a release policy
    handed the list refuses to start (it would otherwise match no mode and release unnoised)."""
    run = PrivacySettings(mode="none,output-noise,none", budget=4.0)
    assert run.modes == ["none", "output-noise", "none"]
    assert run.for_client(1) == PrivacySettings(mode="output-noise", budget=4.0)
    assert PrivacySettings(mode="pate").for_client(2).mode == "pate"
    with pytest.raises(ValueError, match="names one mode per client"):
        ReleasePolicy(run, num_records=100, training=None)
    with pytest.raises(ValueError, match="privacy-mode: 'none,gnmax' is not one of"):
        PrivacySettings(mode="none,gnmax")


def test_start_up_refuses_a_budget_below_training_and_dp_sgd_without_dp_training(tmp_path):
    with pytest.raises(ValueError, match=r"privacy-budget: 1 is below what training this teacher already spent"):
        ReleasePolicy(PrivacySettings(mode="dp-sgd", budget=1.0), num_records=1000, training=TRAINING)
    with pytest.raises(ValueError, match="dp-sgd needs a teacher trained with DP-SGD"):
        ReleasePolicy(PrivacySettings(mode="dp-sgd"), num_records=1000)


def test_the_ledger_survives_a_restart_and_a_corrupt_one_is_named(tmp_path):
    path = tmp_path / "teacher.ledger.json"
    policy = ReleasePolicy(PrivacySettings(mode="output-noise", output_noise=2.0, delta=1e-5), num_records=100,
                           ledger_path=path)
    host(policy).forward(torch.rand(5, *SHAPE), STATE)
    restarted = ReleasePolicy(PrivacySettings(mode="output-noise", output_noise=2.0, delta=1e-5, budget=50.0),
                              num_records=100, ledger_path=path)
    assert restarted.ledger.spent == pytest.approx(policy.ledger.spent) and restarted.ledger.entries[0].steps == 5
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"privacy ledger .*teacher.ledger.json' cannot be read.*never silently"):
        ReleasePolicy(PrivacySettings(mode="output-noise", delta=1e-5), num_records=100, ledger_path=path)


def test_output_noise_releases_no_teacher_side_terms():
    h = host(output_noise())
    with pytest.raises(QueryError, match="privacy-mode=output-noise releases logits and input gradients only"):
        h.forward(torch.rand(2, *SHAPE), STATE, terms=("activation",))


def test_a_node_s_privacy_comes_from_its_own_config_never_the_coordinator_s(tmp_path):
    from fedkd.client.node import NodeConfigError, node_privacy

    from fedkd.config import config_from_mapping

    coordinator = config_from_mapping({"dataset": "digits", "num-clients": 2, "privacy-mode": "none",
                                       "privacy-budget": 1000.0, "output-noise": 0.01})
    node = {"data-path": str(tmp_path / "d.npz"), "privacy-mode": "output-noise", "privacy-budget": 3.0}
    settings, own = node_privacy(coordinator, node, 1)
    assert (settings.mode, settings.budget, settings.output_noise) == ("output-noise", 3.0, 1.0)  # the defaults
    assert own.privacy_modes() == ["output-noise", "output-noise"] and own.num_clients == 2
    unset, _ = node_privacy(coordinator, {"data-path": "x.npz"}, 0)
    assert (unset.mode, unset.budget) == ("none", 0.0)  # the coordinator's 1000 never reaches the node
    simulated, _ = node_privacy(coordinator, {"partition-id": 0, "num-partitions": 2}, 0)
    assert simulated.budget == 1000.0  # a simulation: the experimenter is every party
    with pytest.raises(NodeConfigError, match="node config: output-noise: -2.0 is out of range"):
        node_privacy(coordinator, {"data-path": "x.npz", "output-noise": -2.0}, 0)


def test_over_grpc_a_budget_refusal_reaches_the_coordinator_named_and_the_report_carries_the_spend(pki_dir):
    from fedkd.client.agent import AgentSettings, ClientTLS, TeacherAgent
    from fedkd.server.credentials import ServerTLS
    from fedkd.server.hub import Hub

    budget = rdp([(2.0, 1.0, 6)], 1e-5) * 1.0001
    policy = output_noise(budget=budget)
    hub = Hub({"teacher-000": "tok"}, session="s", tls=ServerTLS(pki_dir.server_cert.read_bytes(),
                                                                  pki_dir.server_key.read_bytes()))
    port = hub.start()
    agent = TeacherAgent(host(policy), AgentSettings(target=f"localhost:{port}", token="tok", session="s",
                                                     tls=ClientTLS(pki_dir.ca_cert.read_bytes()),
                                                     initial_backoff=0.05, max_backoff=0.2))
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(spent=agent.serve()), daemon=True)
    thread.start()
    try:
        hub.wait_for_teachers(timeout=20)
        x = torch.rand(3, *SHAPE)
        assert set(hub.pool.forward(x, STATE, min_answers=1)) == {0}
        assert set(hub.pool.forward(x, STATE, min_answers=1)) == {0}
        with pytest.raises(QuorumError, match=r"teacher-000: refused: RESOURCE_EXHAUSTED: privacy budget exhausted"):
            hub.pool.forward(x, STATE, min_answers=1)
        with pytest.raises(QuorumError, match=r"teacher-000: privacy budget exhausted"):  # not asked again
            hub.pool.forward(x, STATE, min_answers=1)
        assert policy.ledger.spent <= budget and policy.ledger.refused == 1
    finally:
        hub.end_session()
        thread.join(15)
        hub.stop()
    report = hub.slots[0].report
    assert report["privacy"]["mechanism"] == "output-noise"
    assert report["privacy"]["epsilon_spent"] == pytest.approx(policy.ledger.spent)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    from fedkd.tls import make_dev_pki

    return make_dev_pki(tmp_path_factory.mktemp("pki"), clients=["teacher-000"])


def test_a_run_goes_on_without_a_client_whose_budget_ran_out_and_reports_every_ledger(tmp_path):
    from fedkd.config import config_from_mapping
    from fedkd.coordinator.experiment import run_experiment

    # The coordinator's start-up evaluation takes 359 rows (digits' test split), then 120 rows of distillation
    budget = rdp([(2.0, 1.0, 359 + 120)], 1e-5)
    cfg = config_from_mapping({"dataset": "digits", "num-clients": 2, "partition": "iid", "teacher-model": "lenet5",
                               "teacher-epochs": 3, "epochs": 2, "steps-per-epoch": 4, "student-steps": 2,
                               "batch-size": 16, "latent-dim": 16, "num-threads": 2, "sample-stages": 1,
                               "privacy-mode": "output-noise,none", "privacy-budget": budget, "output-noise": 2.0})
    summary = run_experiment(cfg, tmp_path / "run")
    noisy, plain = summary["privacy"]["clients"]
    assert noisy["mode"] == "output-noise" and plain["mode"] == "none" and plain["epsilon_spent"] == 0
    assert 0.8 * budget < noisy["epsilon_spent"] <= budget and noisy["refused"] >= 1
    assert recompute_epsilon(noisy) == pytest.approx(noisy["epsilon_spent"], rel=1e-9)
    assert noisy["guarantee"].startswith("teacher-level") and "a defence, not a meaningful guarantee" in \
        noisy["guarantee"]
    assert sum(e["steps"] for e in noisy["entries"] if e["kind"] in ("logits", "input gradients")) <= 359 + 120
    per_client = summary["queries"]["per_client"]
    assert per_client[0]["missed"] > 0 and per_client[1]["missed"] == 0  # client 1 answered throughout
    assert summary["student"]["test_accuracy"] is not None
    ledger = json.loads((tmp_path / "run" / "clients" / "client_00" / "teacher.ledger.json").read_text())
    assert ledger["epsilon_spent"] == pytest.approx(noisy["epsilon_spent"])


@pytest.mark.slow
def test_the_refits_blends_are_asked_like_any_query_and_a_spent_client_keeps_to_its_budget(tmp_path):
    from fedkd.config import config_from_mapping
    from fedkd.coordinator.experiment import run_experiment

    base = {"dataset": "digits", "num-clients": 2, "partition": "iid", "teacher-model": "lenet5",
            "teacher-epochs": 1, "epochs": 2, "steps-per-epoch": 4, "student-steps": 2, "batch-size": 16,
            "latent-dim": 16, "num-threads": 2, "sample-stages": 1, "privacy-mode": "output-noise,none",
            "privacy-budget": 1000.0, "output-noise": 2.0, "student-refit": 1.0}
    # with room in its budget, the noisy client releases its answers on the blends too, and accounts them
    roomy = run_experiment(config_from_mapping({**base, "student-refit-mixup": 0.5}), tmp_path / "roomy")
    plain = run_experiment(config_from_mapping(base), tmp_path / "plain")
    def logit_rows(summary):
        return sum(e["steps"] for e in summary["privacy"]["clients"][0]["entries"] if e["kind"] == "logits")

    assert roomy["student"]["refit"]["blends"] == 64 and logit_rows(roomy) == logit_rows(plain) + 64
    assert roomy["queries"]["samples"] == plain["queries"]["samples"] + 2 * 64
    # a budget the epochs spend whole: the client refuses the blends, the other teacher answers them alone
    budget = plain["privacy"]["clients"][0]["epsilon_spent"] * 1.0001
    spent = run_experiment(config_from_mapping({**base, "privacy-budget": budget, "student-refit-mixup": 0.5}),
                           tmp_path / "spent")
    noisy = spent["privacy"]["clients"][0]
    assert noisy["refused"] >= 1 and noisy["epsilon_spent"] <= budget
    assert spent["student"]["refit"]["blends"] == 64 and spent["queries"]["samples"] == plain["queries"]["samples"] + 64
    assert spent["queries"]["per_client"][0]["missed"] > 0 and spent["queries"]["per_client"][1]["missed"] == 0


@pytest.mark.slow
def test_where_prv_cannot_discretise_the_ledger_falls_back_to_rdp_and_recomputes_alike():
    # DP-SGD training beside a release with very little noise: Opacus's PRV discretisation raises.
    history = [(2.08, 0.256, 160), (0.0249, 1.0, 1)]
    with pytest.raises(RuntimeError):
        acc = PRVAccountant()
        acc.history = history
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.get_epsilon(1e-5)
    ledger = PrivacyLedger(delta=1e-5, accountant="prv")
    ledger.charge(Entry("dp-sgd training", 2.08, 0.256, 160), enforce=False)
    ledger.charge(Entry("feature statistics", 0.0249, 1.0, 1), enforce=False)
    assert ledger.spent == pytest.approx(rdp(history, 1e-5), rel=1e-9)
    assert recompute_epsilon(ledger.record()) == pytest.approx(ledger.spent, rel=1e-9)


@pytest.mark.parametrize("entry, named", [
    ({"steps": -1000000}, "entries[0].steps is -1000000, not a non-negative integer"),
    ({"steps": "many"}, "entries[0].steps is 'many', not a non-negative integer"),
    ({"noise_multiplier": 1e9}, "entries[0].noise_multiplier is 1000000000.0, not a Gaussian release's"),
    ({"noise_multiplier": float("nan")}, "entries[0].noise_multiplier is nan, not a finite number"),
    ({"sample_rate": 2.0}, "entries[0].sample_rate is 2.0, not in (0, 1]"),
    ({"laplace_epsilon": 0.5}, "entries[0].noise_multiplier is 2.0, but a Laplace release has none"),
    ({"free": True}, "entries[0] is not a ledger entry"),
])
def test_a_malformed_ledger_fails_closed_naming_the_file_and_the_field(tmp_path, entry, named):
    """A ledger entry with steps -1000000 once loaded: epsilon became -841,448 and nothing was refused after."""
    path = tmp_path / "teacher.ledger.json"
    good = {"kind": "logits", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 5, "sensitivity": 20.0,
            "laplace_epsilon": 0.0}
    path.write_text(json.dumps({"format": "fedkd.ledger.v1", "epsilon_spent": 0.0, "epsilon_budget": 5.0,
                                "delta": 1e-5, "accountant": "prv", "refused": 0, "entries": [{**good, **entry}]}))
    with pytest.raises(ValueError, match=re.escape(named)) as err:
        PrivacyLedger(delta=1e-5, budget=5.0, path=path)
    assert "teacher.ledger.json' cannot be read" in str(err.value)


CHARGER = """
import sys
from fedkd.institution.privacy.ledger import BudgetExhausted, Entry, PrivacyLedger
ledger = PrivacyLedger(delta=1e-5, budget=5.0, path=sys.argv[1])
released = 0
for _ in range(40):
    try:
        ledger.charge(Entry("label counts", 0.0, 1.0, 1, laplace_epsilon=0.1), what="a release")
        released += 1
    except BudgetExhausted:
        pass
print(released)
"""


@pytest.mark.slow
def test_two_processes_of_one_client_share_its_ledger_and_its_budget(tmp_path):
    """Two `fedkd teacher` processes on one checkpoint share the default ledger file: together they may release
    what the budget allows, no more (each once released up to the budget on its own, the last writer winning)."""
    import subprocess
    import sys

    path = tmp_path / "teacher.ledger.json"
    procs = [subprocess.Popen([sys.executable, "-c", CHARGER, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    released = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    assert sum(released) == 50  # 50 releases of epsilon 0.1 make the budget of 5
    saved = json.loads(path.read_text())
    assert saved["entries"][0]["steps"] == 50 and saved["epsilon_spent"] == pytest.approx(5.0)
    assert saved["sequence"] >= 50
