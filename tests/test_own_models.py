"""An institution's own classifier as a teacher: torchvision models, its own code, exported programs; every way it
can fail is named before anything is served."""

from __future__ import annotations

import sys

import pytest
import torch
from fedkd.client.cli import host_from_model
from torch import nn

from fedkd.contract import FEATURE_STATISTICS, QueryContext
from fedkd.institution.classifier import ModelError, load_classifier
from fedkd.institution.privacy.policy import PrivacySettings
from fedkd.task import Task

DIGITS = Task(tuple(str(c) for c in range(10)), (1, 8, 8), (0.3,), (0.38,), "digits")
RGB = Task(tuple("abcdefg"), (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "rgb7")

MODULE = '''
import torch
from torch import nn


class Clinic(nn.Module):
    """An institution's own network, written without fedkd."""

    def __init__(self, classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.head(self.features(x))


def not_a_model(**kwargs):
    return "a string"
'''


@pytest.fixture
def clinic(tmp_path, monkeypatch):
    """The institution's own package on its PYTHONPATH, and weights for it saved by plain torch."""
    (tmp_path / "clinic_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("clinic_models", None)
    import clinic_models

    torch.manual_seed(0)
    model = clinic_models.Clinic()
    weights = tmp_path / "clinic.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


def test_the_institution_s_own_module_serves_with_its_weights(clinic, tmp_path):
    reference, weights = clinic
    model = load_classifier("clinic_models:Clinic", DIGITS, weights=weights)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x), reference.eval()(x))
    host = host_from_model("clinic_models:Clinic", DIGITS, weights=weights, label_counts=[5] * 10)
    assert host.description.has_feature_statistics and FEATURE_STATISTICS in host.description.available_terms
    assert host.description.label_counts == tuple([5] * 10) and host.description.num_samples == 50
    reply = host.forward(x, QueryContext(), terms=(FEATURE_STATISTICS,))
    assert reply.logits.shape == (4, 10) and FEATURE_STATISTICS in reply.terms


def test_model_args_reach_the_callable_and_a_mismatch_in_the_weights_is_named(clinic, tmp_path):
    _, weights = clinic
    with pytest.raises(ModelError, match=r"do not fit the model: features\.0\.weight \(8, 1, 3, 3\) \(the model's "
                                         r"\(16, 1, 3, 3\)\)"):
        load_classifier("clinic_models:Clinic", DIGITS, weights=weights, model_args={"width": 16})
    with pytest.raises(ModelError, match="answers \\(2, 3\\) for a batch of 2; the task has 10 classes"):
        other = tmp_path / "three.pt"
        import clinic_models

        torch.save(clinic_models.Clinic(classes=3).state_dict(), other)
        load_classifier("clinic_models:Clinic", DIGITS, weights=other, model_args={"classes": 3})


@pytest.mark.parametrize("spec,message", [
    ("no_such_package.models:Net", "module 'no_such_package.models' does not import"),
    ("clinic_models:Missing", "has no callable 'Missing'"),
    ("clinic_models:not_a_model", "returned a str, not a torch.nn.Module"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not a classification model of torchvision.models"),
    ("nonsense", "give torchvision:NAME"),
])
def test_a_spec_that_does_not_give_a_classifier_is_named(clinic, spec, message):
    _, weights = clinic
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_classifier(spec, DIGITS, weights=weights)


def test_weights_are_never_unpickled_and_missing_keys_are_named(clinic, tmp_path):
    _, weights = clinic
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": nn.Linear(1, 1)}, hostile)
    with pytest.raises(ModelError, match="not a state dict torch can read safely"):
        load_classifier("clinic_models:Clinic", DIGITS, weights=hostile)
    partial = tmp_path / "partial.pt"
    state = torch.load(weights, weights_only=True)
    del state["head.bias"]
    torch.save(state, partial)
    with pytest.raises(ModelError, match="missing keys head.bias"):
        load_classifier("clinic_models:Clinic", DIGITS, weights=partial)
    with pytest.raises(ModelError, match="needs its trained weights"):
        load_classifier("clinic_models:Clinic", DIGITS)


def test_a_torchvision_classifier_with_its_own_head_serves_an_rgb_task(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=7)
    weights = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), weights)
    host = host_from_model("torchvision:resnet18", RGB, weights=weights, model_args={"num_classes": 7})
    assert host.description.has_feature_statistics and host.description.model == "torchvision:resnet18"
    assert host.description.label_counts is None and host.description.num_samples is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(host.forward(x, QueryContext()).logits, model.eval()(x))
    with pytest.raises(ModelError, match="answers \\(2, 1000\\)"):
        torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), tmp_path / "r1000.pt")
        load_classifier("torchvision:resnet18", RGB, weights=tmp_path / "r1000.pt")
    with pytest.raises(ModelError, match="would download"):
        load_classifier("torchvision:resnet18", RGB, weights=weights, model_args={"weights": "DEFAULT"})


def test_an_exported_program_serves_without_python_code_and_without_the_statistics_term(clinic, tmp_path):
    reference, _ = clinic
    program = torch.export.export(reference.eval(), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    path = tmp_path / "teacher.pt2"
    torch.export.save(program, path)
    host = host_from_model(str(path), DIGITS, privacy=PrivacySettings(mode="output-noise", delta=1e-5))
    assert host.description.model == "teacher.pt2" and not host.description.has_feature_statistics
    x = torch.randn(3, 1, 8, 8)
    assert host.forward(x, QueryContext()).logits.shape == (3, 10)
    # input gradients through the exported graph, as autograd gives them
    plain = host_from_model(str(path), DIGITS, ledger=tmp_path / "plain.json")
    g = torch.randn(3, 10)
    plain.forward(x, QueryContext())
    xr = x.clone().requires_grad_(True)
    (reference(xr) * g).sum().backward()
    torch.testing.assert_close(plain.backward(x, g, QueryContext()), xr.grad, rtol=1e-5, atol=1e-6)
    assert host.policy is not None and host.policy.ledger.spent > 0  # noise on what it released, accounted
    not_a_program = tmp_path / "fake.pt2"
    not_a_program.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="is not a torch.export program"):
        load_classifier(str(not_a_program), DIGITS)
    with pytest.raises(ModelError, match="carries its own weights"):
        load_classifier(str(path), DIGITS, weights=tmp_path / "clinic.pt")


def test_privacy_claims_and_counts_of_an_own_model_are_checked(clinic):
    _, weights = clinic
    with pytest.raises(ModelError, match="privacy-mode dp-sgd"):
        host_from_model("clinic_models:Clinic", DIGITS, weights=weights, privacy=PrivacySettings(mode="dp-sgd"))
    with pytest.raises(ModelError, match="--label-counts: 3 counts for 10 classes"):
        host_from_model("clinic_models:Clinic", DIGITS, weights=weights, label_counts=[1, 2, 3])
    with pytest.raises(ModelError, match="--delta"):
        host_from_model("clinic_models:Clinic", DIGITS, weights=weights, privacy=PrivacySettings(mode="output-noise"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_folder(root, classes=10, per_class=2):
    from PIL import Image

    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8, 8), color=23 * c + 9 * i).save(root / str(c) / f"{i}.png")
    return root


def test_institutions_own_models_distil_over_grpc_with_only_a_task_card_at_the_coordinator(clinic, tmp_path):
    """fedkd distill with task=CARD and no data; two institutions serve models fedkd never trained (their own
    module with its weights, an exported program) with fedkd teacher --model; the student leaves as an exported
    program and a model card, and the program answers as the saved state dict does. The first institution
    evaluates the student on held-out images of its own (--eval-data): the summary has its counts."""
    import json
    import os
    import subprocess
    import time

    reference, weights = clinic
    program = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(reference.eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes={
        "x": {0: torch.export.Dim("batch", min=1, max=4096)}}), program)
    card = tmp_path / "digits-task.toml"
    card.write_text('name = "digits-like"\nclasses = 10\ninput-shape = [1, 8, 8]\nmean = [0.3]\nstd = [0.38]\n')
    out, port = tmp_path / "run", _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    settings = {"task": str(card), "epochs": 1, "steps-per-epoch": 2, "student-steps": 2, "batch-size": 16,
                "student-model": "lenet5-half", "num-threads": 1}
    procs = [subprocess.Popen([sys.executable, "-m", "fedkd.server.cli", "distill", "--listen", f"127.0.0.1:{port}",
                               "--teachers", "2", "--out", str(out), "--wait", "60",
                               *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 60
        while not (out / "tokens" / "teacher-001.token").exists() or not (out / "tls" / "ca.pem").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stdout.read().decode()
            time.sleep(0.2)
        held_out = _image_folder(tmp_path / "held-out")
        own = [["--model", "clinic_models:Clinic", "--weights", str(weights), "--label-counts", ",".join(["9"] * 10),
                "--eval-data", str(held_out)],
               ["--model", str(program), "--access", "logits,gradient"]]
        for k, flags in enumerate(own):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedkd.client", *flags, "--task", str(card), "--connect", f"localhost:{port}",
                 "--token-file", str(out / "tokens" / f"teacher-{k:03d}.token"), "--ca", str(out / "tls" / "ca.pem"),
                 "--num-threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        assert procs[0].wait(timeout=300) == 0, procs[0].stdout.read().decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"]["name"] == "digits-like" and summary["dataset"] is None
    assert [t["model"] for t in summary["teachers"]] == ["clinic_models:Clinic", "teacher.pt2"]
    assert summary["student"]["test_accuracy"] is None and summary["test_samples"] == 0
    assert summary["queries"]["samples"] > 0
    check = summary["student"]["synthetic_check"]  # what needs no labels: fresh synthetic samples, asked over gRPC
    assert check["samples"] == 1000 and 0.0 <= check["agreement"] <= 1.0
    output = procs[0].stdout.read().decode()
    assert "loyalty (*) were measured on 1,000 fresh synthetic samples" in output, output[-2000:]
    student_card = json.loads((out / "student.json").read_text())
    assert student_card["task"] == summary["task"] and student_card["files"]["exported_program"] == "student.pt2"
    assert student_card["parameters"] > 0 and student_card["query_samples"] == summary["queries"]["samples"]
    exported = torch.export.load(out / "student.pt2").module()
    from fedkd.institution.loading import load_teacher

    student, _ = load_teacher(out / "student.pt")
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(exported(x), student(x), rtol=1e-5, atol=1e-5)
    # The institution's evaluation: exact counts (no privacy mechanism), the student it received = the one saved.
    images = Task.from_toml(card).load_images(held_out)
    correct = int((student((images.images - 0.3) / 0.38).argmax(1) == images.labels).sum())
    federated = summary["federated_evaluation"]
    assert federated["clients"] == [{"client": 0, "evaluated": True, "accuracy": correct / 20, "num-examples": 20.0,
                                     "epsilon": 0.0}]
    assert federated["student_accuracy"] == correct / 20 and federated["num_examples"] == 20
    assert student_card["accuracy"]["coordinator"] is None
    assert student_card["accuracy"]["federated"]["value"] == correct / 20
    assert "the institutions' evaluation: 1 of 1 evaluated the student" in output, output[-3000:]
    assert "the federated row: 1 of 1 institutions evaluated the student" in output


def test_fedkd_run_refuses_a_task_card_naming_what_to_run(tmp_path, capsys):
    from fedkd.server.cli import main

    card = tmp_path / "t.toml"
    card.write_text('classes = 10\ninput-shape = [1, 8, 8]\nmean = [0.3]\nstd = [0.38]\n')
    assert main(["run", "--set", f"task={card}", "--set", "dataset=digits", "--out", str(tmp_path / "r")]) == 2
    assert "fedkd distill" in capsys.readouterr().err


def test_a_flower_deployment_serves_each_institution_s_own_model_from_its_node_config(clinic, tmp_path):
    """The real ServerApp and ClientApp (an in-process grid, nodes with their own node config): two SuperNodes name
    their own model, weights and task card; the coordinator holds only the card; the node with its own labelled
    images evaluates the student, the other has none and says so."""
    import json

    from fedkd.client.app import app as client_app
    from fedkd.server.app import app as server_app
    from flower_grid import InProcessGrid, app_run_config
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from PIL import Image

    reference, weights = clinic
    program = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(reference.eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes={
        "x": {0: torch.export.Dim("batch", min=1, max=4096)}}), program)
    card = tmp_path / "task.toml"
    card.write_text(DIGITS.to_toml())
    for c in range(10):
        (tmp_path / "val" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=20 * c + i).save(tmp_path / "val" / str(c) / f"{i}.png")
    nodes = [{"model": "clinic_models:Clinic", "weights": str(weights), "task": str(card),
              "label-counts": ",".join(["9"] * 10), "eval-data": str(tmp_path / "val")},
             {"model": str(program), "task": str(card)}]
    cfg = app_run_config(tmp_path / "runs", {"task": str(card), "num-clients": 2, "epochs": 1, "steps-per-epoch": 2,
                                             "student-steps": 1, "batch-size": 16, "num-threads": 1,
                                             "sample-stages": 1, "nodes-timeout": 20.0, "synthetic-check": 100})
    grid = InProcessGrid(client_app, nodes, cfg)
    try:
        server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    finally:
        grid.close()
    summary = json.loads(next((tmp_path / "runs").glob("run-*/summary.json")).read_text())
    assert [t["model"] for t in summary["teachers"]] == ["clinic_models:Clinic", "teacher.pt2"]
    assert summary["dataset"] is None and summary["task"]["name"] == "digits" and summary["test_samples"] == 0
    assert [n["train"]["trained"] for n in summary["flower"]["nodes"]] == [0, 0] and not summary["flower"]["failed"]
    assert summary["teachers"][0]["num_samples"] == 90 and summary["teachers"][1]["num_samples"] is None
    federated = summary["federated_evaluation"]
    assert federated["num_examples"] == 20 and 0.0 <= federated["student_accuracy"] <= 1.0
    assert [r["num-examples"] for r in federated["nodes"]] == [20, 0]
    assert summary["student"]["synthetic_check"]["samples"] == 100

    # a node that names no model in a task-card run, and a node config key without model, are named
    grid = InProcessGrid(client_app, [{"data-path": str(tmp_path / "x.npz")}, {"weights": str(weights)}], cfg)
    try:
        replies = list(grid.send_and_receive([Message(RecordDict({"train": ConfigRecord({"client": k})}),
                                                      dst_node_id=101 + k, message_type="train") for k in (0, 1)],
                                             timeout=60))
    finally:
        grid.close()
    reasons = sorted(r.error.reason for r in replies if r.has_error())
    assert len(reasons) == 2
    assert "each institution serves its own model" in reasons[0]
    assert "node config: weights goes with model" in reasons[1]


def test_label_counts_from_the_training_data_s_image_folder(clinic, tmp_path):
    from PIL import Image

    from fedkd.data import count_image_folder

    _, weights = clinic
    root = tmp_path / "train"
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i in range(c + 1):
            Image.new("L", (8, 8)).save(root / str(c) / f"{i}.png")
    (root / "3" / "notes.txt").write_text("not an image")
    counts = count_image_folder(root, DIGITS.classes)
    assert counts == [c + 1 for c in range(10)]
    host = host_from_model("clinic_models:Clinic", DIGITS, weights=weights, label_counts=counts)
    assert host.description.num_samples == 55


def image_folder_task(root):
    """A task card of three classes of 8 x 8 grey images (``root``/task.toml, returned) and its training
    ImageFolder (``root``/train: 6, 7 and 8 images)."""
    from PIL import Image

    card = root / "task.toml"
    card.write_text('classes = ["a", "b", "c"]\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.25]\n')
    for k, name in enumerate("abc"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(6 + k):
            Image.new("L", (8, 8), color=80 * k + i).save(root / "train" / name / f"{i}.png")
    return card


def test_train_teacher_from_an_image_folder_then_serve_its_checkpoint(tmp_path, capsys):
    """An institution with data but no model: fedkd train-teacher on its ImageFolder (DP-SGD too), and the
    checkpoint serves with fedkd teacher --checkpoint, its DP guarantee carried into the host's ledger."""
    import json

    from fedkd.client.cli import host_from_checkpoint

    from fedkd.cli import main

    card = image_folder_task(tmp_path)
    out = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--task", str(card), "--data", str(tmp_path / "train"), "--model", "lenet5",
                 "--set", "teacher-epochs=2", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["records"] == 21 and report["label_counts"] == [6, 7, 8] and report["epsilon_spent"] is None
    host = host_from_checkpoint(out)
    assert host.description.num_classes == 3 and host.description.label_counts == (6, 7, 8)
    assert host.description.input_shape == (1, 8, 8) and host.description.mean == (0.5,)

    private = tmp_path / "dp.pt"
    assert main(["train-teacher", "--task", str(card), "--data", str(tmp_path / "train"), "--privacy-mode",
                 "dp-sgd", "--set", "teacher-epochs=2", "--set", "dp-epsilon=4", "--set", "dp-batch-size=8",
                 "--out", str(private)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < report["epsilon_spent"] <= 4.0 + 1e-6
    dp_host = host_from_checkpoint(private, privacy=PrivacySettings(mode="dp-sgd", share_label_counts=False),
                                   ledger=tmp_path / "dp.ledger.json")
    assert dp_host.description.privacy["mechanism"] == "dp-sgd" and dp_host.description.label_counts is None
    assert 0 < dp_host.description.privacy["epsilon_spent"] <= 4.0 + 1e-6  # the training, in its ledger

    assert main(["train-teacher", "--task", str(card), "--data", str(tmp_path / "train"), "--set", "epochs=3",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a teacher's training setting" in capsys.readouterr().err
    from fedkd.server.cli import main as listed  # the command `fedkd --help` lists goes the same way

    assert listed(["train-teacher", "--task", str(card), "--data", str(tmp_path / "none"), "--out", "x.pt"]) == 2
    assert "neither an ImageFolder directory nor a .npz" in capsys.readouterr().err


def test_fedkd_teacher_device_auto_takes_cuda_where_present_and_cuda_without_one_is_refused(clinic, tmp_path):
    from fedkd.client.cli import _host
    from fedkd.client.flags import teacher_parser

    from fedkd.options import ConfigError

    _, weights = clinic
    card = tmp_path / "task.toml"
    card.write_text(DIGITS.to_toml())
    flags = ["--model", "clinic_models:Clinic", "--weights", str(weights), "--task", str(card), "--connect",
             "127.0.0.1:1", "--insecure"]
    host = _host(teacher_parser().parse_args([*flags, "--device", "auto"]), PrivacySettings())
    assert host.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(host.model.parameters()).device.type == host.device.type
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            _host(teacher_parser().parse_args([*flags, "--device", "cuda"]), PrivacySettings())
    with pytest.raises(SystemExit):
        teacher_parser().parse_args([*flags, "--device", "tpu"])
