"""End to end on the built-in digits with tiny models: the whole pipeline, resume, run-directory rules."""

import json

import pytest
import torch

from fedkd.checkpoint import CheckpointError
from fedkd.config import ConfigError, config_from_mapping
from fedkd.experiment import RunDirectoryError, run_experiment

TINY = {
    "dataset": "digits", "num-clients": 3, "partition": "iid", "teacher-model": "lenet5",
    "student-model": "lenet5-half", "teacher-epochs": 30, "teacher-lr": 3e-3, "epochs": 4, "steps-per-epoch": 15,
    "student-steps": 5, "batch-size": 64, "latent-dim": 32, "generator-width": 16, "generator-lr": 1e-2,
    "cudfkd.weight-bn": 10.0, "student-loss": "kl", "temperature": 4.0, "sample-stages": 2, "num-threads": 2,
}


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
    # chance is 0.1; this run measured 0.56 on a 2-core CPU
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
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]
    for name in ("accuracy.png", "curriculum.png", "samples.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    for k in range(3):
        assert (out / "clients" / f"client_{k:02d}" / "teacher.pt").exists()


def test_every_query_carries_the_curriculum(finished_run):
    _, _, summary = finished_run
    history_lambda = [json.loads(line)["lambda"] for line in
                      (finished_run[1] / "metrics.jsonl").read_text().splitlines()]
    assert history_lambda[1] <= history_lambda[2]  # the threshold grows after the first epoch


def test_resume_ends_where_an_uninterrupted_run_ends(finished_run, tmp_path):
    config, full_out, full = finished_run
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_experiment(config, out, observer=StopAfter(2))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = run_experiment(config, out, resume=True)
    a = torch.load(full_out / "checkpoint.pt", weights_only=True)["method"]["student"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["method"]["student"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed["student"]["test_accuracy"] == full["student"]["test_accuracy"]
    assert resumed["queries"]["samples"] == full["queries"]["samples"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


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
        "teacher-epochs": 5, "epochs": 1, "steps-per-epoch": 2, "student-steps": 1, "ensemble": "class-weighted",
        "share-label-counts": False, "centralised": True,
    })
    summary = run_experiment(config, tmp_path / "mixed")
    assert [t["model"] for t in summary["teachers"]] == ["lenet5", "cnn"]
    assert summary["references"]["fedavg"] is None  # different architectures cannot be averaged
    assert 0.0 <= summary["references"]["centralised"]["test_accuracy"] <= 1.0
    assert summary["ensemble"]["aggregation"] == "class-weighted"
