"""The Flower app's handlers in-process: the real ServerApp and ClientApp over an in-process Grid (no Ray)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from fedkd.client.app import app as client_app
from fedkd.client.node import NodeConfigError, node_data
from fedkd.server.app import FlowerRunError, wait_for_nodes
from fedkd.server.app import app as server_app
from flower_grid import InProcessGrid, app_run_config
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import flatten_dict

from fedkd.config import RunConfig, config_from_mapping, config_from_run_config, option_keys
from fedkd.coordinator.experiment import prepare_clients
from fedkd.coordinator.methods import METHODS
from fedkd.data import SPECS, load_node_file
from fedkd.institution.loading import load_teacher
from fedkd.options import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = {"dataset": "digits", "num-clients": 3, "teacher-epochs": 2, "epochs": 1, "steps-per-epoch": 2,
        "student-steps": 1, "batch-size": 32, "num-threads": 1, "sample-stages": 1, "nodes-timeout": 20.0}


pytestmark = pytest.mark.usefixtures("node_cache")


def run_config(tmp_path: Path, **changes: object) -> dict[str, object]:
    return app_run_config(tmp_path / "runs", TINY, **changes)


def simulated(n: int) -> list[dict[str, object]]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def run_server(grid: InProcessGrid, cfg: dict[str, object]) -> dict:
    try:
        server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=cfg))
    finally:
        grid.close()
    return json.loads(next((Path(str(cfg["run-dir"])) / f"run-{grid.run_id}").glob("summary.json")).read_text())


def test_app_config_has_exactly_the_run_keys_with_their_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedkd.server.app:app", "clientapp": "fedkd.client.app:app"}
    table = flatten_dict(app["config"])  # as Flower reads it: [tool.flwr.app.config.cudfkd] -> cudfkd.KEY
    # every run-wide key, and every method's options (so `--run-config 'method="dafl" dafl.KEY=...'` works)
    every_option = {k for m in METHODS.values() for k in option_keys(m.options, m.name)}
    assert set(table) == set(RunConfig().to_dict()) | every_option
    # num-clients 0 follows the federation: the app's one default that differs from fedkd run's
    assert table["num-clients"] == 0
    with pytest.raises(ConfigError, match="num-clients: 0 follows the federation"):
        config_from_run_config(table)
    assert config_from_run_config(table, num_clients=5) == RunConfig()
    switched = config_from_run_config({**table, "method": "dafl", "dafl.student-steps": 3}, num_clients=5)
    assert switched.method == "dafl" and switched.options.student_steps == 3


def test_simulated_run_trains_distils_and_evaluates_federated(tmp_path: Path, node_cache: Path) -> None:
    cfg = run_config(tmp_path)
    summary = run_server(InProcessGrid(client_app, simulated(3), cfg, run_id=7), cfg)
    run_dir = tmp_path / "runs" / "run-7"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert summary["transport"] == "flower"
    assert summary["flower"]["failed"] == []
    nodes = summary["flower"]["nodes"]
    assert [n["client"] for n in nodes] == [0, 1, 2]
    assert all(n["served"]["forward_calls"] > 0 for n in nodes)
    assert sum(n["train"]["num-examples"] for n in nodes) == 1797 - 359  # the digits training pool, split three ways
    # Coordinator evaluation and federated evaluation: the weighted mean of the nodes' accuracies.
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
    fed = summary["federated_evaluation"]
    rows = fed["nodes"]
    assert fed["num_examples"] == sum(r["num-examples"] for r in rows) == summary["test_samples"] == 359
    expected = sum(r["accuracy"] * r["num-examples"] for r in rows) / fed["num_examples"]
    assert fed["student_accuracy"] == pytest.approx(expected)
    # On the full test set, the coordinator's accuracy equals the federated one (IID shares of the same set).
    assert fed["student_accuracy"] == pytest.approx(summary["student"]["test_accuracy"], abs=1e-6)
    # The checkpoints stayed on the nodes (the node cache), and they are the teachers `fedkd run` trains.
    cached = sorted(node_cache.glob("teachers/*.pt"))
    assert len(cached) == 3
    config = config_from_mapping(cfg)
    from fedkd.data import load_dataset

    torch.set_num_threads(1)  # as the simulated nodes train (summation order)
    clients = prepare_clients(config, load_dataset("digits", seed=0), tmp_path / "ref", torch.device("cpu"),
                              observer=type("O", (), {"stage": lambda self, m: None})())
    ours = {n["client"]: n for n in nodes}
    for c in clients:
        match = [p for p in cached if load_teacher(p)[1]["num_samples"] == ours[c.client]["train"]["num-examples"]]
        model, _ = load_teacher(match[0])
        for key, value in c.model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value)


def test_nodes_with_densities_answer_them_through_flower_and_each_passes_the_density_check(tmp_path: Path) -> None:
    """teacher-density=on in a Flower run: each node fits its density with its teacher, its answers carry the
    log-density through Flower's messages (the gate's ask with every query: a node releases it only then), and
    the coordinator's check finds each a proper density."""
    cfg = run_config(tmp_path, **{"teacher-density": True, "density-gate": "on"})
    summary = run_server(InProcessGrid(client_app, simulated(3), cfg, run_id=8), cfg)
    assert summary["flower"]["failed"] == []
    assert summary["ensemble"]["density_gate"]["used"]
    teachers = summary["ensemble"]["teachers"]
    assert [t["density_refuted"] for t in teachers] == [False] * 3
    # (a log mass at all: each node answered the probes with the extra column; under 13.8: a proper density)
    assert all(t["density_log_mass"] is not None and t["density_log_mass"] < 13.8 for t in teachers)


def test_a_failing_node_is_reported_by_id_and_the_quorum_goes_on(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, evaluation="coordinator")
    nodes = simulated(3)
    nodes[1] = {"data-path": str(tmp_path / "missing.npz")}
    grid = InProcessGrid(client_app, nodes, cfg, run_id=8)
    summary = run_server(grid, cfg)
    bad = list(grid.contexts)[1]
    assert summary["flower"]["failed"] == [bad]
    record = next(n for n in summary["flower"]["nodes"] if n["node_id"] == bad)
    assert record["failed_at"] == "train" and "missing.npz" in record["error"] and str(bad) in record["error"]
    assert len(summary["teachers"]) == 2


def test_a_silent_node_times_out_and_too_few_nodes_stop_the_run(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, train_timeout=3.0)
    nodes = simulated(3)
    nodes[0] = {"data-path": str(tmp_path / "missing.npz")}
    grid = InProcessGrid(client_app, nodes, cfg, run_id=9, hidden=[102])
    with pytest.raises(FlowerRunError) as err:
        server_app(grid, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    grid.close()
    text = str(err.value)
    assert "1 of 3 nodes are left" in text and "needs 2" in text
    assert "node 101" in text and "missing.npz" in text and "node 102: no reply within 3 s" in text


def test_wait_for_nodes_names_what_is_missing(tmp_path: Path) -> None:
    grid = InProcessGrid(client_app, simulated(2), run_config(tmp_path))
    with pytest.raises(FlowerRunError, match=r"2 of the 5 nodes .* 'num-supernodes=5'"):
        wait_for_nodes(grid, 5, timeout=0.5)
    assert wait_for_nodes(grid, 2, timeout=0.5) == [101, 102]
    grid.close()


def ask(grid: InProcessGrid, content: RecordDict, message_type: str, node: int = 101) -> Message:
    replies = list(grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)],
                                         timeout=120))
    assert len(replies) == 1
    return replies[0]


def test_client_handlers_name_their_errors(tmp_path: Path) -> None:
    cfg = run_config(tmp_path)
    grid = InProcessGrid(client_app, [{}, *simulated(3)[1:]], cfg)
    reply = ask(grid, RecordDict({"train": ConfigRecord({"client": 0})}), "train")
    assert reply.has_error() and "neither data-path" in (reply.error.reason or "")
    hub = ConfigRecord({"address": "127.0.0.1:1", "token": "t", "session": "s", "name": "n", "client": 1})
    reply = ask(grid, RecordDict({"hub": hub}), "query.serve", node=102)
    assert reply.has_error() and "train round has not run" in (reply.error.reason or "")
    wrong = ArrayRecord({"w": torch.zeros(3)})
    reply = ask(grid, RecordDict({"student": wrong}), "evaluate", node=102)
    assert reply.has_error() and "do not fit a 'lenet5'" in (reply.error.reason or "")
    grid.close()
    # a student of the coordinator's own code: a node imports no code the run config names
    grid = InProcessGrid(client_app, simulated(3), run_config(tmp_path, student_model="os:getcwd"))
    reply = ask(grid, RecordDict({"student": wrong}), "evaluate", node=102)
    assert reply.has_error() and "'os:getcwd' names code" in (reply.error.reason or "")
    grid.close()
    with pytest.raises(ConfigError, match="student-model: 'os:getcwd' is built by your own code"):
        run_server(InProcessGrid(client_app, simulated(2), cfg := run_config(tmp_path, student_model="os:getcwd")),
                   cfg)


def test_dp_sgd_nodes_release_only_accounted_values(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, privacy_mode="dp-sgd", dp_epsilon=4.0, dp_eval_epsilon=0.5, num_clients=2)
    grid = InProcessGrid(client_app, simulated(2), cfg)
    reply = ask(grid, RecordDict({"train": ConfigRecord({"client": 0})}), "train")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert 0 < metrics["epsilon-spent"] <= 4.0 * 1.01
    assert "train-accuracy" not in metrics and "num-examples" not in metrics  # not covered by the guarantee
    from fedkd.models import build_model

    student = build_model("lenet5", num_classes=10, channels=1, image_size=8)  # the run's student-model
    spent = []
    for _ in range(2):
        reply = ask(grid, RecordDict({"student": ArrayRecord(student.state_dict())}), "evaluate")
        m = dict(reply.content["metrics"])
        assert 0 < m["epsilon"] < 0.5  # composed with the training in the node's ledger (PRV), not added
        spent.append(m["epsilon-total"])
    assert metrics["epsilon-spent"] < spent[0] < spent[1]  # the node's ledger keeps count across messages
    grid.close()


@pytest.mark.parametrize("arrays, named", [
    ({"x_train": np.full((12, 8, 8), np.nan, np.float32)}, "x_train holds 768 NaN or infinite values"),
    ({"x_test": np.full((3, 8, 8), np.inf), "y_test": np.arange(3)}, "x_test holds 192 NaN or infinite values"),
    ({"x_train": np.zeros((0, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)},
     "x_train holds 0 records; a teacher needs at least 10"),
    ({"y_train": np.arange(12, dtype=np.float64) % 10}, "y_train holds float64 values; labels are integers 0..9"),
    ({"y_train": np.array([str(i % 10) for i in range(12)])}, "y_train holds <U1 values"),
    ({"x_train": np.zeros((12, 8, 8), np.int64)}, "x_train holds int64 values; store uint8 pixels in [0, 255]"),
    ({"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, np.int64)}, "x_test and y_test are empty"),
])
def test_every_node_file_field_is_checked_and_named(tmp_path: Path, arrays: dict, named: str) -> None:
    good = {"x_train": np.zeros((12, 8, 8), np.uint8), "y_train": np.arange(12) % 10}
    path = tmp_path / "node.npz"
    np.savez(path, **{**good, **arrays})
    with pytest.raises(ValueError, match=re.escape(named)):
        load_node_file(path, SPECS["digits"])


def test_node_files_are_checked(tmp_path: Path) -> None:
    spec = SPECS["digits"]
    path = tmp_path / "n.npz"
    np.savez(path, x_train=np.zeros((12, 8, 8), np.uint8), y_train=np.arange(12) % 10)
    train, held = load_node_file(path, spec)
    assert train.images.shape == (12, 1, 8, 8) and held is None
    np.savez(path, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.arange(4))
    with pytest.raises(ValueError, match=r"x_train has shape \(4, 28, 28\).*'digits'"):
        load_node_file(path, spec)
    np.savez(path, images=np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="needs x_train and y_train"):
        load_node_file(path, spec)
    np.savez(path, x_train=np.zeros((12, 8, 8), np.uint8), y_train=np.array([0, 1, 2, 10] * 3))
    with pytest.raises(ValueError, match="labels outside 0..9"):
        load_node_file(path, spec)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_node_file(tmp_path / "bad.npz", spec)
    with pytest.raises(NodeConfigError, match="num-clients=5"):
        node_data(RunConfig(dataset="digits"), {"partition-id": 0, "num-partitions": 3})


def test_namespaced_keys_reach_the_server_app_through_flowers_own_run_config_parsing() -> None:
    from fedkd.server.simulate import run_config_arg
    from flwr.common.config import fuse_dicts, parse_config_args

    from fedkd.config import parse_assignments

    # as `fedkd simulate --set epochs=3 --set cudfkd.weight-bn=5` (command-line text) plus a TOML table
    changes = {**parse_assignments(["epochs=3", "cudfkd.weight-bn=5"]), "cudfkd": {"adv-mask": "none"},
               "ensemble": "prob-mean"}
    config = config_from_mapping(changes)
    overrides = parse_config_args([run_config_arg(changes, config)], flatten=False)  # as `flwr run --run-config`
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fused = flatten_dict(fuse_dicts(defaults, overrides))  # what the ServerApp's context.run_config holds
    assert fused["cudfkd.weight-bn"] == 5.0 and fused["cudfkd.adv-mask"] == "none"
    assert config_from_run_config(fused, num_clients=config.num_clients) == config  # fedkd simulate: 5 nodes
    assert (config.options.weight_bn, config.options.adv_mask, config.epochs) == (5.0, "none", 3)
