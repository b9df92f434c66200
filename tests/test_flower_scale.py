"""simulations/flower_scale.py's time split: where a run's seconds went, read from its metrics.jsonl."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "simulations"))

import flower_scale  # noqa: E402


def _metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_epochs_and_refit_are_summed_apart(tmp_path):
    run = _metrics(tmp_path / "run", [{"epoch": 0, "epoch_seconds": 4.5}, {"epoch": 1, "epoch_seconds": 5.25},
                                      {"epoch": 2, "stage": "refit", "refit_steps": 8000, "epoch_seconds": 116.0}])
    assert flower_scale.time_split(run) == {"epoch_seconds": pytest.approx(9.75), "refit_seconds": 116.0}


def test_a_run_without_refit_has_none(tmp_path):
    run = _metrics(tmp_path / "run", [{"epoch": 0, "epoch_seconds": 3.0}, {"epoch": 1, "epoch_seconds": 2.0}])
    assert flower_scale.time_split(run) == {"epoch_seconds": 5.0, "refit_seconds": 0.0}


def test_a_row_is_completed_from_the_run_directory(tmp_path):
    run = _metrics(tmp_path / "run", [{"epoch": 0, "epoch_seconds": 3.0},
                                      {"epoch": 1, "stage": "refit", "epoch_seconds": 7.0}])
    (run / "summary.json").write_text(json.dumps({
        "config": {"num-clients": 2}, "teachers": [{"test_accuracy": 0.8}, {"test_accuracy": 0.9}],
        "ensemble": {"test_accuracy": 0.95}, "student": {"test_accuracy": 0.96}, "wall_seconds": 12.5}))
    row = flower_scale._row_from(run, {"status": "completed"})
    assert row == {"status": "completed", "clients": 2, "best_teacher": 0.9, "ensemble": 0.95, "student": 0.96,
                   "run_seconds": 12.5, "epoch_seconds": 3.0, "refit_seconds": 7.0}


def test_the_reference_run_takes_every_set_and_names_its_failure(tmp_path):
    from fedkd.config import parse_assignments

    row = flower_scale.reference_run(tmp_path / "reference", 120.0, parse_assignments(["epochs=0"]))
    assert row["status"].startswith("failed") and "student" not in row
    assert "epochs" in row["log_tail"]


def test_set_refuses_what_the_benchmark_sets_and_unknown_keys_before_anything_runs(tmp_path, capsys):
    for bad, named in (("num-clients=3", "num-clients"), ("run-dir=x", "run-dir"), ("no-such-key=1", "no-such-key")):
        with pytest.raises(SystemExit) as stopped:
            flower_scale.main(["--set", bad, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")])
        assert stopped.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()
