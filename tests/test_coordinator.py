"""The one coordinator flow: `fedkd run`, `fedkd distill` and the Flower ServerApp give the same student, and a
ServerApp that dies resumes from its run directory and ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import fedkd.server.app
import pytest
import torch
from fedkd.client.agent import AgentSettings, TeacherAgent
from fedkd.client.app import app as client_app
from fedkd.client.cli import host_from_checkpoint
from fedkd.server.app import app as server_app
from fedkd.server.credentials import issue_tokens
from fedkd.server.distill import run_distillation, teacher_names
from flower_grid import InProcessGrid, app_run_config
from flwr.app import Context, RecordDict

from fedkd.checkpoint import CheckpointError
from fedkd.config import RunConfig, config_from_mapping
from fedkd.coordinator.experiment import run_experiment
from fedkd.coordinator.flow import LogObserver
from fedkd.coordinator.rundir import RunDirectoryError
from fedkd.institution.loading import load_teacher
from fedkd.options import ConfigError

# nodes-timeout above an agent's own welcome timeout (30 s), as the default (120 s) is: a first connection the hub
# is slow to welcome is dropped and made again within it (stop 63's CI saw one run's Hellos arrive 30 s late).
TINY = {"dataset": "digits", "num-clients": 3, "teacher-epochs": 2, "epochs": 2, "steps-per-epoch": 3,
        "student-steps": 2, "batch-size": 32, "num-threads": 1, "sample-stages": 1, "nodes-timeout": 60.0}


pytestmark = pytest.mark.usefixtures("node_cache")


def flower_config(tmp_path: Path, **changes: object) -> dict[str, object]:
    return app_run_config(tmp_path / "flower", TINY, **changes)


def flower_run(cfg: dict[str, object], run_id: int, hidden: tuple[int, ...] = ()) -> Path:
    """The real ServerApp over three simulated nodes running the real ClientApp; returns its run directory.
    The node ids run opposite to the partitions (as Flower's random ids may), so the lowest id holds partition 2."""
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in reversed(range(3))], cfg,
                         run_id=run_id, hidden=hidden)
    try:
        server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    finally:
        grid.close()
    return Path(str(cfg["resume-from"] or Path(str(cfg["run-dir"])) / f"run-{run_id}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distill_run(config: RunConfig, teachers: list[Path], out: Path) -> dict:
    """`fedkd distill` with the given teachers dialing in over gRPC on loopback, each with its token."""
    port = free_port()
    names = teacher_names(len(teachers))
    tokens = issue_tokens(out / "tokens", names)
    agents = [TeacherAgent(host_from_checkpoint(path, client=k, max_batch=config.teachers.max_query_batch),
                           AgentSettings(target=f"127.0.0.1:{port}", token=tokens[name], name=name,
                                         initial_backoff=0.05, max_backoff=0.2, give_up_after=60))
              for k, (path, name) in enumerate(zip(teachers, names))]
    threads = [threading.Thread(target=a.serve, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        return run_distillation(config, out, listen=f"127.0.0.1:{port}", teachers=len(teachers), tls=None,
                                token_dir=out / "tokens", wait=60, resume=False, observer=LogObserver())
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(10)


def assert_same_student(a: Path, b: Path) -> None:
    mine, theirs = load_teacher(a)[0].state_dict(), load_teacher(b)[0].state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)


def test_fedkd_run_fedkd_distill_and_the_server_app_give_the_same_student(tmp_path: Path) -> None:
    config = config_from_mapping(TINY)
    run = run_experiment(config, tmp_path / "run")
    teachers = [tmp_path / "run" / "clients" / f"client_{k:02d}" / "teacher.pt" for k in range(3)]
    distilled = distill_run(config, teachers, tmp_path / "distill")
    flower_dir = flower_run(flower_config(tmp_path), run_id=3)
    flower = json.loads((flower_dir / "summary.json").read_text())

    assert (run["transport"], distilled["transport"], flower["transport"]) == ("inprocess", "grpc", "flower")
    # The same teachers in the same order (a simulated node is its partition's client) ...
    for summary in (distilled, flower):
        assert [t["test_accuracy"] for t in summary["teachers"]] == [t["test_accuracy"] for t in run["teachers"]]
        assert [t["num_samples"] for t in summary["teachers"]] == [t["num_samples"] for t in run["teachers"]]
        assert summary["queries"]["samples"] == run["queries"]["samples"]
        assert summary["queries"]["reconciliation"]["agree"]
    # ... and the same student.
    for other in (tmp_path / "distill", flower_dir):
        assert_same_student(other / "student.pt", tmp_path / "run" / "student.pt")
    accuracies = {s["student"]["test_accuracy"] for s in (run, distilled, flower)}
    assert max(accuracies) - min(accuracies) <= 1 / 359 + 1e-9
    # The student that went to federated evaluation in memory is the one written to student.pt: on the whole
    # test set (the nodes' IID shares of it) the federated accuracy is the coordinator's.
    assert flower["federated_evaluation"]["student_accuracy"] == pytest.approx(flower["student"]["test_accuracy"])
    assert [n["client"] for n in flower["flower"]["nodes"]] == [0, 1, 2]


class Dies(RuntimeError):
    pass


@pytest.mark.slow
def test_a_server_app_that_died_resumes_from_its_run_directory_and_ends_where_an_uninterrupted_one_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = flower_config(tmp_path, epochs=3)
    whole = flower_run(cfg, run_id=1)

    steps = {"n": 0}

    def dies_in_epoch_two(self: object) -> None:
        steps["n"] += 1
        if steps["n"] == TINY["steps-per-epoch"] + 2:  # epoch 2 is in progress; epoch 1 is checkpointed
            raise Dies("the ServerApp's process died")

    with monkeypatch.context() as patch:
        patch.setattr(fedkd.server.app._Log, "step", dies_in_epoch_two)
        with pytest.raises(Dies):
            flower_run(cfg, run_id=2)
    died = Path(str(cfg["run-dir"])) / "run-2"
    assert not (died / "summary.json").exists()
    assert len((died / "metrics.jsonl").read_text().splitlines()) == 1  # only epoch 1 was kept

    resumed = flower_run({**cfg, "resume-from": str(died)}, run_id=3)
    assert resumed == died and not (Path(str(cfg["run-dir"])) / "run-3").exists()
    summary = json.loads((died / "summary.json").read_text())
    reference = json.loads((whole / "summary.json").read_text())
    assert summary["flower"]["resumed"] and not reference["flower"]["resumed"]
    records = [json.loads(line) for line in (died / "metrics.jsonl").read_text().splitlines()]
    # the three epochs once each, then the student refitted on the final pool (student-refit, the default)
    assert [(h["epoch"], h.get("stage")) for h in records] == [(0, None), (1, None), (2, None), (3, "refit")]
    assert_same_student(died / "student.pt", whole / "student.pt")
    assert summary["student"]["test_accuracy"] == reference["student"]["test_accuracy"]
    # The coordinator's query count is the uninterrupted run's plus the repeated part of epoch 2.
    assert summary["queries"]["samples"] > reference["queries"]["samples"]


def test_resume_from_a_run_directory_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    cfg = flower_config(tmp_path, epochs=1, train_timeout=15.0)
    done = flower_run(cfg, run_id=1)
    with pytest.raises(RunDirectoryError, match="is finished"):
        flower_run({**cfg, "resume-from": str(done)}, run_id=2)
    (done / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"different config \(batch-size: 32 -> 16\)"):
        flower_run({**cfg, "resume-from": str(done), "batch-size": 16}, run_id=3)
    # A node that does not answer: the quorum would go on with 2 teachers, but the run was checkpointed with 3.
    with pytest.raises(CheckpointError, match="written with the teachers of clients 0, 1, 2, and the teachers of "
                                              "clients 0, 1 answer now"):
        flower_run({**cfg, "resume-from": str(done)}, run_id=5, hidden=(101,))
    with pytest.raises(RunDirectoryError, match="nothing to resume"):
        flower_run({**cfg, "resume-from": str(tmp_path / "nowhere")}, run_id=4)
