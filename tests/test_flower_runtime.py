"""Real Flower processes: `flwr run` in the simulation engine (Ray) and a deployment on loopback."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from deployment import Deployment
from fedkd.server.simulate import simulate, superlink_pids

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"dataset": "digits", "teacher-epochs": 2, "epochs": 1, "steps-per-epoch": 2, "student-steps": 1,
         "batch-size": 32, "sample-stages": 1}


@pytest.fixture(autouse=True)
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))


def test_flwr_run_simulation_with_three_clients(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    log = io.StringIO()
    code, status = simulate({**SMALL, "num-clients": 3, "run-dir": str(tmp_path / "runs")}, flwr_home=home,
                            stream=log, timeout=400)
    assert (code, status["status"]) == (0, "finished:completed"), log.getvalue()[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("run-*/summary.json")).read_text())
    assert summary["flower"]["failed"] == [] and len(summary["flower"]["nodes"]) == 3
    # one line per event: no escape codes, no DEBUG, no copies, no notices that do not apply
    text = log.getvalue()
    assert "\x1b[" not in text and "DEBUG" not in text and "SuperNodes changed" not in text
    assert text.count("summary written to") == 1 and text.count("epoch 1/1: student accuracy") == 1
    assert Path(status["run-dir"]) == next((tmp_path / "runs").glob("run-*"))
    assert summary["federated_evaluation"]["num_examples"] == 359
    assert superlink_pids(home) == []  # the SuperLink it started is gone


@pytest.mark.slow
def test_ten_simulated_clients_on_two_workers(tmp_path: Path) -> None:
    # Ten teachers serve at once from threads of (at most) two simulation workers.
    log = io.StringIO()
    code, status = simulate({**SMALL, "num-clients": 10, "run-dir": str(tmp_path / "runs")},
                            flwr_home=tmp_path / "home", stream=log, timeout=600)
    assert (code, status["status"]) == (0, "finished:completed"), log.getvalue()[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("run-*/summary.json")).read_text())
    nodes = summary["flower"]["nodes"]
    assert len(nodes) == 10 and summary["flower"]["failed"] == []
    assert sorted(n["client"] for n in nodes) == list(range(10))
    assert all(n["served"]["forward_calls"] > 0 for n in nodes)
    assert len(summary["queries"]["per_client"]) == 10


@pytest.mark.slow
def test_bare_flwr_run_follows_the_default_federation(tmp_path: Path) -> None:
    # `flwr run . --stream` on a fresh FLWR_HOME: no --federation-config, the app's num-clients 0 takes the
    # federation's default 2 SuperNodes (2 CPUs each: one ClientApp at a time, which serving from a background
    # thread makes enough). A small schedule only, to keep the suite short.
    home = tmp_path / "fresh-flwr-home"
    log = io.StringIO()
    code, status = simulate({**SMALL, "run-dir": str(tmp_path / "runs")}, flwr_home=home, stream=log, timeout=400,
                            bare=True)
    assert (code, status["status"]) == (0, "finished:completed"), log.getvalue()[-3000:]
    assert "--federation-config" not in log.getvalue()
    summary = json.loads(next((tmp_path / "runs").glob("run-*/summary.json")).read_text())
    assert summary["config"]["num-clients"] == 2 and len(summary["flower"]["nodes"]) == 2
    assert summary["flower"]["failed"] == []
    assert all(n["served"]["forward_calls"] > 0 for n in summary["flower"]["nodes"])  # from the hub's reports


@pytest.mark.slow
def test_a_failed_simulation_run_fails_the_command(tmp_path: Path) -> None:
    # No MNIST files under data-root: every node fails its train round, the ServerApp stops the run.
    code, status = simulate({**SMALL, "dataset": "mnist", "data-root": str(tmp_path / "none"), "num-clients": 2,
                             "run-dir": str(tmp_path / "runs")}, flwr_home=tmp_path / "home", stream=io.StringIO(),
                            timeout=400)
    assert code == 1 and status["status"] == "finished:failed"


@pytest.mark.slow
def test_deployment_with_tls_and_supernode_auth(tmp_path: Path) -> None:
    subprocess.run([str(Path(__import__("sys").executable).parent / "fedkd"), "partition", "--out",
                    str(tmp_path / "data"), "--set", "dataset=digits", "--set", "num-clients=2"],
                   check=True, capture_output=True)
    nodes = [f'data-path="{tmp_path}/data/client-00{i}.npz" teacher-ckpt="{tmp_path}/node-{i}/teacher.pt"'
             for i in range(2)]
    deployment = Deployment(tmp_path, nodes, tls=True, auth=True)
    try:
        deployment.start()
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in {
            **SMALL, "num-clients": 2, "evaluation": "federated", "run-dir": str(tmp_path / "runs")}.items())
        run_id, status, text = deployment.run(config)
        assert status.get("status") == "finished:completed", text[-3000:]
    finally:
        deployment.stop()
    assert all(p.poll() is not None for _, p in deployment.procs)
    summary = json.loads((tmp_path / "runs" / f"run-{run_id}" / "summary.json").read_text())
    # The coordinator held no data: accuracies come from the institutions' held-out data only.
    assert summary["student"]["test_accuracy"] is None and summary["test_samples"] == 0
    assert summary["federated_evaluation"]["num_examples"] == 359
    # Each institution's teacher checkpoint is where its node config put it.
    assert all((tmp_path / f"node-{i}" / "teacher.pt").is_file() for i in range(2))
    assert {n["train"]["data"] for n in summary["flower"]["nodes"]} == {
        f"file:{tmp_path}/data/client-00{i}.npz" for i in range(2)}


@pytest.mark.slow
def test_a_deployment_whose_supernodes_serve_their_own_models_from_node_config(tmp_path: Path) -> None:
    """Two SuperNode processes name an exported program and a task card in --node-config (one also its labelled
    images); the run config names the card; the coordinator holds no data."""
    import torch
    from PIL import Image
    from torch import nn

    card = tmp_path / "task.toml"
    card.write_text('name = "digits-like"\nclasses = 10\ninput-shape = [1, 8, 8]\nmean = [0.3]\nstd = [0.38]\n')
    for i in range(2):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(256, 10)).eval()
        program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),),
                                      dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}})
        torch.export.save(program, tmp_path / f"hospital-{i}.pt2")
    for c in range(10):
        (tmp_path / "val" / str(c)).mkdir(parents=True)
        Image.new("L", (8, 8), color=25 * c).save(tmp_path / "val" / str(c) / "0.png")
    nodes = [f'model="{tmp_path}/hospital-0.pt2" task="{card}" eval-data="{tmp_path}/val"',
             f'model="{tmp_path}/hospital-1.pt2" task="{card}" label-counts="9,9,9,9,9,9,9,9,9,9"']
    deployment = Deployment(tmp_path, nodes, tls=True, auth=True)
    try:
        deployment.start()
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in {
            **SMALL, "task": str(card), "num-clients": 2, "synthetic-check": 64,
            "run-dir": str(tmp_path / "runs")}.items())
        run_id, status, text = deployment.run(config)
        assert status.get("status") == "finished:completed", text[-3000:]
    finally:
        deployment.stop()
    summary = json.loads((tmp_path / "runs" / f"run-{run_id}" / "summary.json").read_text())
    assert summary["dataset"] is None and summary["task"]["name"] == "digits-like" and summary["test_samples"] == 0
    assert sorted(t["model"] for t in summary["teachers"]) == ["hospital-0.pt2", "hospital-1.pt2"]
    assert summary["flower"]["failed"] == [] and [n["train"]["trained"] for n in summary["flower"]["nodes"]] == [0, 0]
    assert summary["federated_evaluation"]["num_examples"] == 10
    assert summary["student"]["synthetic_check"]["samples"] == 64
