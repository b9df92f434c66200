"""End to end on the built-in digits with tiny models: the whole pipeline, resume, run-directory rules."""

import json

import pytest
import torch

from fedkd.checkpoint import CheckpointError
from fedkd.config import config_from_mapping
from fedkd.coordinator.experiment import run_experiment
from fedkd.coordinator.rundir import RunDirectoryError
from fedkd.options import ConfigError

TINY = {
    "dataset": "digits", "num-clients": 3, "partition": "iid", "teacher-model": "lenet5",
    "student-model": "lenet5-half", "teacher-epochs": 30, "teacher-lr": 3e-3, "epochs": 4, "steps-per-epoch": 15,
    "student-steps": 5, "batch-size": 64, "latent-dim": 32, "generator-width": 16, "generator-lr": 1e-2,
    "cudfkd.weight-bn": 10.0, "student-loss": "kl", "temperature": 4.0, "sample-stages": 2, "num-threads": 2,
    # a refit as long as the run's student steps: the default 8 times was 24.6 of a run's 57 s at one thread (stop 68)
    "student-refit": 1.0,
}


def epochs(out):
    """The run's epoch records (metrics.jsonl without the refit's record after them)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "stage" not in r]


class Interrupt(Exception):
    pass


class StopAfter:
    """An observer that interrupts the run after a given number of epochs, like a Ctrl-C would."""

    def __init__(self, epochs):
        self.epochs = epochs

    def stage(self, message):
        pass

    def epoch_started(self, epoch, total_steps):
        pass

    def step(self):
        pass

    def epoch_finished(self, record):
        if record["epoch"] + 1 == self.epochs:
            raise Interrupt


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = config_from_mapping(TINY)
    return config, out, run_experiment(config, out)


def test_student_beats_chance_by_a_wide_margin(finished_run):
    _, _, summary = finished_run
    assert summary["ensemble"]["test_accuracy"] > 0.8
    # chance is 0.1; this run measured 0.52 on a 2-core CPU (0.56 with the default refit of 8, before stop 68)
    assert summary["student"]["test_accuracy"] > 0.35


def test_summary_and_run_directory(finished_run):
    config, out, summary = finished_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["method"] == "cudfkd" and on_disk["dataset"] == "digits" and on_disk["num_clients"] == 3
    assert [t["client"] for t in on_disk["teachers"]] == [0, 1, 2]
    assert sum(t["num_samples"] for t in on_disk["teachers"]) == 1438  # the training pool, split three ways
    for t in on_disk["teachers"]:
        assert 0.0 <= t["test_accuracy"] <= 1.0
    student = on_disk["student"]
    for key in ("test_accuracy", "agreement", "loyalty", "accuracy_mean"):
        assert 0.0 <= student[key] <= 1.0
    assert student["accuracy_var"] >= 0.0
    assert on_disk["queries"]["samples"] > 0 and on_disk["queries"]["bytes"] > 0
    assert on_disk["privacy"] is None and on_disk["wall_seconds"] > 0
    assert on_disk["config"] == config.to_dict()
    assert on_disk["references"]["fedavg"]["test_accuracy"] >= 0.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # the four epochs, then the student refitted on the final pool (student-refit)
    assert [(json.loads(line)["epoch"], json.loads(line).get("stage")) for line in lines] == [
        (0, None), (1, None), (2, None), (3, None), (4, "refit")]
    for name in ("accuracy.png", "curriculum.png", "samples.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    for k in range(3):
        assert (out / "clients" / f"client_{k:02d}" / "teacher.pt").exists()


def test_curriculum_admits_a_rising_share_and_the_pool_grows(finished_run):
    _, out, summary = finished_run
    history = epochs(out)
    admitted = [h["admitted"] for h in history]
    assert admitted[0] < 0.8 and admitted[-1] > 0.9 and admitted[-1] > admitted[0] + 0.2
    assert [h["pool_size"] for h in history] == [15 * 64 * (e + 1) for e in range(4)]
    assert summary["pool"]["samples"] == 4 * 15 * 64
    # every sample in the pool was answered once: one Forward and one Backward per synthesis round and teacher,
    # and one Forward of the batch per gradient check (the first three rounds, then about one in ten)
    checks = [t["gradient_checks"] for t in summary["ensemble"]["teachers"]]
    assert all(c >= 3 for c in checks) and sum(checks) < 3 * (3 + 60 // 4)
    assert summary["queries"]["distillation_samples"] == 4 * 15 * 64 * 2 * 3 + sum(checks) * 64
    assert summary["ensemble"]["aggregation"] == "class-weighted" and summary["ensemble"]["requested"] == "auto"
    assert summary["ensemble"]["label_counts_from"] == [0, 1, 2]
    assert (out / "plots" / "queries.png").stat().st_size > 1000


def test_query_budget_stops_synthesis_and_the_student_keeps_training(tmp_path):
    # three rounds of 64 samples to 3 teachers, each a Forward, a Backward and a gradient check (the first three
    # rounds are always checked; the checks count against the budget like any query)
    config = config_from_mapping({**TINY, "epochs": 2, "steps-per-epoch": 4, "student-steps": 2,
                                  "query-budget": 3 * 64 * 3 * 3})
    summary = run_experiment(config, tmp_path / "budget")
    history = epochs(tmp_path / "budget")
    assert [h["synthesis_rounds"] for h in history] == [3, 0]
    assert summary["queries"]["distillation_samples"] == 3 * 64 * 3 * 3 <= config.pool.query_budget
    assert summary["pool"]["samples"] == 3 * 64
    checkpoint = torch.load(tmp_path / "budget" / "checkpoint.pt", weights_only=True)
    assert checkpoint["method"]["trainer"]["steps"] == 2 * 4 * 2  # the student trained in every round


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(finished_run, tmp_path):
    config, full_out, full = finished_run
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_experiment(config, out, observer=StopAfter(2))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = run_experiment(config, out, resume=True)
    a = torch.load(full_out / "checkpoint.pt", weights_only=True)["method"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["method"]
    for key in a["trainer"]["student"]:
        torch.testing.assert_close(a["trainer"]["student"][key], b["trainer"]["student"][key], rtol=0, atol=0)
    # the synthetic pool came back from the checkpoint and grew exactly as in the uninterrupted run
    assert a["pool"]["added"] == b["pool"]["added"] == 4 * 15 * 64
    assert torch.equal(a["pool"]["images"], b["pool"]["images"])
    assert torch.equal(a["pool"]["answers"], b["pool"]["answers"])
    assert resumed["student"]["test_accuracy"] == full["student"]["test_accuracy"]
    assert resumed["queries"]["samples"] == full["queries"]["samples"]
    assert len(epochs(out)) == 4 and len((out / "metrics.jsonl").read_text().splitlines()) == 5  # + the refit


def test_run_directory_rules(finished_run, tmp_path):
    config, out, _ = finished_run
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        run_experiment(config, out)
    with pytest.raises(RunDirectoryError, match="nothing to resume"):
        run_experiment(config, tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="cannot resume .* with a different config .*batch-size: 64 -> 32"):
        run_experiment(config.replace(batch_size=32), out, resume=True)


def test_corrupt_run_checkpoint_is_reported(finished_run, tmp_path):
    config, out, _ = finished_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((out / "config.json").read_text())
    (copy / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.pt' is corrupt"):
        run_experiment(config, copy, resume=True)


def test_unknown_model_fails_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="student-model: unknown model 'lenet7'"):
        run_experiment(config_from_mapping({**TINY, "student-model": "lenet7"}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mixed_architectures_class_weights_and_centralised_reference(tmp_path):
    config = config_from_mapping({
        **TINY, "num-clients": 2, "partition": "dirichlet", "alpha": 0.3, "teacher-model": "lenet5,cnn",
        "teacher-epochs": 5, "epochs": 1, "steps-per-epoch": 2, "student-steps": 1, "ensemble": "auto",
        "share-label-counts": False, "centralised": True,
    })
    summary = run_experiment(config, tmp_path / "mixed")
    assert [t["model"] for t in summary["teachers"]] == ["lenet5", "cnn"]
    assert summary["references"]["fedavg"] is None  # different architectures cannot be averaged
    assert 0.0 <= summary["references"]["centralised"]["test_accuracy"] <= 1.0
    # nobody shares label counts: auto falls back to the mean of probabilities, and says so
    assert summary["ensemble"]["aggregation"] == "prob-mean" and summary["ensemble"]["label_counts_from"] is None


def test_an_aggregator_that_needs_counts_names_the_clients_when_none_shares_them(tmp_path):
    config = config_from_mapping({**TINY, "num-clients": 2, "teacher-epochs": 1, "epochs": 1, "steps-per-epoch": 1,
                                  "student-steps": 1, "ensemble": "class-weighted", "share-label-counts": False})
    with pytest.raises(ConfigError, match=r"ensemble: ensemble=class-weighted needs the label counts.*clients 0, 1"):
        run_experiment(config, tmp_path / "nocounts")



@pytest.mark.slow
def test_student_refit_trains_a_fresh_student_on_the_final_pool_without_a_query(tmp_path):
    full = run_experiment(config_from_mapping({**TINY, "student-refit": 0.0}), tmp_path / "along-the-way")
    refit = config_from_mapping({**TINY, "student-refit": 1.0})
    out = tmp_path / "refit"
    with pytest.raises(Interrupt):  # stopped once the last epoch is checkpointed: the resume refits from there
        run_experiment(refit, out, observer=StopAfter(4))
    summary = run_experiment(refit, out, resume=True)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h.get("stage") for h in history] == [None] * 4 + ["refit"]
    record = history[-1]
    assert record["refit_steps"] == 4 * 15 * 5 and record["refit_samples"] == 4 * 15 * 64 == summary["pool"]["samples"]
    # the epochs are the run without the refit, bit for bit; the refit asks the teachers nothing
    assert history[3]["student_accuracy"] == full["student"]["test_accuracy"]
    assert summary["queries"]["samples"] == full["queries"]["samples"] == record["query_samples"]
    # the summary and the saved student are the refitted one, not the student trained along the way
    assert summary["student"]["test_accuracy"] == record["student_accuracy"] > 0.35
    assert summary["student"]["refit"] == {"steps": record["refit_steps"], "samples": record["refit_samples"],
                                           "blends": 0, "climbs": 0,
                                           "along_the_way": {"accuracy": history[3]["student_accuracy"],
                                                             "agreement": history[3]["agreement"],
                                                             "loyalty": history[3]["loyalty"]}}
    assert full["student"]["refit"] is None
    # "over the epochs" stays over the epochs
    assert summary["student"]["accuracy_mean"] == pytest.approx(sum(h["student_accuracy"] for h in history[:4]) / 4)
    online = torch.load(out / "checkpoint.pt", weights_only=True)["method"]["trainer"]["student"]
    saved = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(online[k], saved[k]) for k in online)


class StageLog(StopAfter):
    """Keeps every stage message of the run."""

    def __init__(self):
        super().__init__(None)
        self.messages = []

    def stage(self, message):
        self.messages.append(message)


class StopAtStage(StopAfter):
    """Interrupts the run at the first stage message that starts with ``prefix``."""

    def __init__(self, prefix):
        super().__init__(None)
        self.prefix = prefix

    def stage(self, message):
        if message.startswith(self.prefix):
            raise Interrupt


@pytest.mark.slow
def test_student_refit_mixup_asks_for_the_blends_once_counts_them_and_keeps_to_the_budget(tmp_path):
    mixup = {**TINY, "student-refit": 1.0, "student-refit-mixup": 0.5}
    pool = 4 * 15 * 64  # the epochs' samples
    out = tmp_path / "mixup"
    with pytest.raises(Interrupt):  # stopped once the blends are answered and checkpointed, before the refit
        run_experiment(config_from_mapping(mixup), out, observer=StopAtStage("student-refit-mixup"))
    # blends that do not fit the run (a checkpoint edited, or another task's) stop the resume, naming them
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    kept = saved["method"]["blends"]["answers"]
    saved["method"]["blends"]["answers"] = kept[:, :5]
    torch.save(saved, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"saved blends are images \(1920, 1, 8, 8\) with answers \(1920, 5\)"):
        run_experiment(config_from_mapping(mixup), out, resume=True)
    saved["method"]["blends"]["answers"] = kept
    torch.save(saved, out / "checkpoint.pt")
    log = StageLog()
    summary = run_experiment(config_from_mapping(mixup), out, resume=True, observer=log)
    *runs, record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["stage"] == "refit" and record["refit_blends"] == pool // 2 == summary["student"]["refit"]["blends"]
    assert record["refit_samples"] == pool + pool // 2 == summary["student"]["refit"]["samples"]
    # the refit's steps grow with the blends: each sample drawn as often as in a refit on the pool alone
    assert record["refit_steps"] == 4 * 15 * 5 * 3 // 2 == summary["student"]["refit"]["steps"]
    # one Forward of each blend to each of the 3 teachers, counted once: the resume asked nothing again
    assert summary["queries"]["samples"] == record["query_samples"] == runs[-1]["query_samples"] + 3 * (pool // 2)
    assert record["budget_spent"] == runs[-1]["budget_spent"] + 3 * (pool // 2)
    assert any("blends of pool samples answered" in m and "kept from before the restart" in m for m in log.messages)
    assert summary["student"]["test_accuracy"] > 0.35

    # a query budget that leaves room for a share of them: the asking stops there, the refit uses what came back
    batch = config_from_mapping(mixup).teachers.max_query_batch
    budget = {**mixup, "query-budget": runs[-1]["budget_spent"] + 3 * batch + 1}
    log = StageLog()
    short = run_experiment(config_from_mapping(budget), tmp_path / "budget", observer=log)
    assert any(f"query-budget reached after {batch:,} of {pool // 2:,} blends" in m for m in log.messages)
    *runs, report = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert short["student"]["refit"]["blends"] == batch and report["refit_samples"] == pool + batch
    assert report["refit_steps"] == round(4 * 15 * 5 * (pool + batch) / pool)  # grown with what came back
    assert short["queries"]["samples"] == runs[-1]["query_samples"] + 3 * batch and report["budget_spent"] <= budget[
        "query-budget"]


@pytest.mark.slow
def test_student_refit_warp_warps_the_blends_and_asks_for_as_many(tmp_path):
    mixup = {**TINY, "student-refit": 1.0, "student-refit-mixup": 0.5, "student-refit-warp": 0.0}
    for name, warp in (("plain", 0.0), ("warped", 30.0)):
        with pytest.raises(Interrupt):  # stopped once the blends are answered and checkpointed
            run_experiment(config_from_mapping({**mixup, "student-refit-warp": warp}), tmp_path / name,
                           observer=StopAtStage("student-refit-mixup"))
    plain, warped = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False)["method"]
                     for n in ("plain", "warped"))
    assert torch.equal(plain["pool"]["images"], warped["pool"]["images"])  # the same epochs before the blends
    assert plain["blends"]["images"].shape == warped["blends"]["images"].shape == (4 * 15 * 64 // 2, 1, 8, 8)
    moved = (plain["blends"]["images"] != warped["blends"]["images"]).flatten(1).any(1)
    assert float(moved.float().mean()) > 0.95  # nearly every blend is another image
    assert not torch.equal(plain["blends"]["answers"], warped["blends"]["answers"])  # and the teachers answered it
    asked = [sum(t["samples"] for t in json.loads((tmp_path / n / "queries.json").read_text()))
             for n in ("plain", "warped")]
    assert asked[0] == asked[1]  # as many queries either way


def test_student_refit_leaves_the_student_of_a_method_without_a_pool(tmp_path):
    plain = {k: v for k, v in TINY.items() if not k.startswith("cudfkd.")}
    config = config_from_mapping({**plain, "method": "dfad", "epochs": 1, "steps-per-epoch": 4, "student-steps": 2,
                                  "student-refit": 1.0, "student-refit-mixup": 1.0})
    log = StageLog()
    summary = run_experiment(config, tmp_path / "dfad", observer=log)
    assert any("0 blends" in m and "method dfad keeps no pool beyond its last batch" in m for m in log.messages)
    history = [json.loads(line) for line in (tmp_path / "dfad" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "stage" not in history[0]
    assert summary["student"]["test_accuracy"] == history[0]["student_accuracy"]
