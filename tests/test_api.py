"""The Python API, called as a researcher would: nn.Modules in a notebook, a task, keyword config keys."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fedkd
from fedkd.options import ConfigError


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10)).eval()


def test_distil_nn_modules_in_process_with_keyword_config_keys(tmp_path):
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,), name="tiny")
    images, labels = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
    result = fedkd.distill(teachers=[_teacher(0), _teacher(1)], task=task, out=tmp_path / "run",
                           label_counts=[[4] * 10, None], eval_data=(images, labels), epochs=1, steps_per_epoch=2,
                           student_steps=1, batch_size=16, cudfkd_weight_bn=5.0)
    assert isinstance(result.student, nn.Module) and not result.student.training
    assert result.summary["config"]["cudfkd.weight-bn"] == 5.0 and result.summary["config"]["epochs"] == 1
    assert result.summary["test_samples"] == 40 and result.summary["student"]["test_accuracy"] is not None
    assert result.summary["ensemble"]["label_counts_from"] == [0]  # only the first teacher shared its counts
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["task"]["name"] == "tiny"
    exported = torch.export.load(result.export(tmp_path / "student.pt2")).module()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(exported(x), result.student(x), rtol=1e-5, atol=1e-5)


def test_the_api_checks_what_it_is_given_with_the_config_s_named_errors(tmp_path):
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        fedkd.distill(teachers=[_teacher(0)], task=task, out=tmp_path / "a", epoch=3)
    with pytest.raises(ConfigError, match="label_counts: 1 entries for 2 teachers"):
        fedkd.distill(teachers=[_teacher(0), _teacher(1)], task=task, out=tmp_path / "b", label_counts=[None])
    with pytest.raises(ConfigError, match="answers \\(2, 3\\)"):
        fedkd.distill(teachers=[nn.Sequential(nn.Flatten(), nn.Linear(64, 3))], task=task, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="eval_data: images of shape"):
        fedkd.distill(teachers=[_teacher(0)], task=task, out=tmp_path / "d",
                      eval_data=(torch.rand(4, 3, 8, 8), torch.zeros(4)))
    with pytest.raises(fedkd.TaskError, match="input-shape"):
        fedkd.Task(classes=3, input_shape=(1, 10, 10), mean=(0.5,), std=(0.5,))


def test_import_fedkd_alone_loads_neither_side():
    import subprocess
    import sys

    code = "import sys, fedkd; print(sorted(m for m in sys.modules if m.startswith(('fedkd.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_torchvision_student_is_built_saved_reloaded_and_exported(tmp_path):
    from fedkd.institution.loading import load_teacher

    task = fedkd.Task(classes=4, input_shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    teachers = [nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 4)).eval() for _ in range(2)]
    result = fedkd.distill(teachers=teachers, task=task, out=tmp_path / "run", student="torchvision:resnet18",
                           student_args='{"zero_init_residual": true}', epochs=1, steps_per_epoch=1,
                           student_steps=1, batch_size=8)
    assert result.summary["student"]["model"] == "torchvision:resnet18"
    reloaded, ckpt = load_teacher(tmp_path / "run" / "student.pt")
    assert ckpt["model_args"] == {"zero_init_residual": True}
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), result.student(x))
    program = torch.export.load(tmp_path / "run" / "student.pt2").module()
    torch.testing.assert_close(program(x), result.student(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="student-model: torchvision:fasterrcnn"):
        fedkd.distill(teachers=teachers, task=task, out=tmp_path / "bad", student="torchvision:fasterrcnn_resnet50_fpn")


def test_eval_data_from_an_image_folder(tmp_path):
    from PIL import Image

    task = fedkd.Task(classes=["a", "b"], input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,))
    for name in ("a", "b"):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=60 * i).save(tmp_path / "val" / name / f"{i}.png")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    result = fedkd.distill(teachers=[teacher], task=task, out=tmp_path / "run", eval_data=tmp_path / "val",
                           epochs=1, steps_per_epoch=1, student_steps=1, batch_size=8, cudfkd_weight_bn=0.0)
    assert result.summary["test_samples"] == 6 and 0.0 <= result.summary["student"]["test_accuracy"] <= 1.0


def test_serve_connects_a_module_to_a_hub_and_returns_what_it_released(tmp_path):
    import threading

    from fedkd.server.credentials import ServerTLS, issue_tokens
    from fedkd.server.hub import Hub

    from fedkd.contract import QueryContext
    from fedkd.tls import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki")
    tokens = issue_tokens(tmp_path / "tokens", ["teacher-000"])
    hub = Hub(tokens, session="s", tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    port = hub.start()
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    served: dict = {}
    thread = threading.Thread(target=lambda: served.update(fedkd.serve(
        _teacher(0), task, connect=f"localhost:{port}", token_file=tmp_path / "tokens" / "teacher-000.token",
        ca=pki.ca_cert, label_counts=[3] * 10)))
    thread.start()
    try:
        hub.wait_for_teachers(timeout=30)
        (description,) = hub.pool.descriptions
        assert description.label_counts == tuple([3] * 10) and description.model == "Sequential"
        replies = hub.pool.forward(torch.randn(2, 1, 8, 8), QueryContext(purpose="evaluate"), min_answers=1)
        assert replies[0].logits.shape == (2, 10)
        hub.end_session()
        thread.join(30)
    finally:
        hub.stop()
    assert not thread.is_alive() and served["forward_calls"] == 1


STUDENT_CODE = '''
from torch import nn


def tiny(classes=10, width=4):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 64, classes))


def not_a_model():
    return "tiny"
'''


def test_a_student_of_the_users_own_code_is_built_exported_and_reloaded_only_on_trust(tmp_path, monkeypatch):
    from fedkd.checkpoint import CheckpointError

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_students.py").write_text(STUDENT_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    result = fedkd.distill(teachers=[_teacher(0), _teacher(1)], task=task, out=tmp_path / "run",
                           student="my_students:tiny", student_args='{"width": 6}', epochs=1, steps_per_epoch=1,
                           student_steps=1, batch_size=8)
    assert result.summary["student"]["model"] == "my_students:tiny"
    assert result.student[0].out_channels == 6  # student-args reached the callable
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.load(tmp_path / "run" / "student.pt2").module()
    torch.testing.assert_close(program(x), result.student(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="imports no code a file names; .*trust_code=True"):
        fedkd.load_student(tmp_path / "run")
    torch.testing.assert_close(fedkd.load_student(tmp_path / "run", trust_code=True)(x), result.student(x))
    for spec, args, named in [("my_students:missing", "", "has no callable 'missing'"),
                              ("my_students:not_a_model", "", "returned a str, not a torch.nn.Module"),
                              ("my_students:tiny", '{"depth": 3}', "unexpected keyword argument 'depth'"),
                              ("my_students:tiny", '{"classes": 3}', "answers \\(2, 3\\)"),
                              ("no_such_module.nets:Net", "", "module 'no_such_module.nets' does not import")]:
        with pytest.raises(ConfigError, match=f"student-model: .*{named}"):
            fedkd.distill(teachers=[_teacher(0)], task=task, out=tmp_path / "bad", student=spec, student_args=args)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_without_labelled_data_the_student_is_judged_on_fresh_synthetic_samples(tmp_path):
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    common = dict(epochs=1, steps_per_epoch=2, student_steps=1, batch_size=16)
    checked = fedkd.distill(teachers=[_teacher(0), _teacher(1)], task=task, out=tmp_path / "a", synthetic_check=150,
                            **common)
    plain = fedkd.distill(teachers=[_teacher(0), _teacher(1)], task=task, out=tmp_path / "b", synthetic_check=0,
                          **common)
    check = checked.summary["student"]["synthetic_check"]
    assert check["samples"] == 150 and 0.0 <= check["agreement"] <= 1.0 and 0.0 < check["loyalty"] <= 1.0
    assert 0.1 <= check["ensemble_confidence"] <= 1.0
    assert plain.summary["student"]["synthetic_check"] is None
    # the check's queries are counted, and it leaves the run as it was: the same student either way
    assert checked.summary["queries"]["samples"] == plain.summary["queries"]["samples"] + 150 * 2
    for a, b in zip(checked.student.state_dict().values(), plain.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    card = json.loads((tmp_path / "a" / "student.json").read_text())
    assert card["agreement_with_ensemble"]["value"] == check["agreement"]
    assert "150 fresh synthetic samples" in card["agreement_with_ensemble"]["measured_on"]
    inverted = fedkd.distill(teachers=[_teacher(0)], task=task, out=tmp_path / "c", method="deepinversion",
                             deepinversion_iterations=2, **common)
    assert inverted.summary["student"]["synthetic_check"]["agreement"] is None
    assert "no generator" in inverted.summary["student"]["synthetic_check"]["note"]


def test_an_exported_program_or_its_module_is_a_teacher_and_anything_else_is_named(tmp_path):
    """torch refuses to switch an exported module's train/eval mode; the API serves it as it was exported."""
    task = fedkd.Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    program = torch.export.export(_teacher(0), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}})
    result = fedkd.distill(teachers=[program, program.module(), _teacher(1)], task=task, out=tmp_path / "run",
                           epochs=1, steps_per_epoch=1, student_steps=1, batch_size=8, synthetic_check=20)
    assert [t["model"] for t in result.summary["teachers"]] == ["ExportedProgram", "GraphModule", "Sequential"]
    assert result.summary["queries"]["per_client"][0]["samples"] > 0
    with pytest.raises(ConfigError, match="a teacher must be a torch.nn.Module or a torch.export program, got a str"):
        fedkd.distill(teachers=["model.pt"], task=task, out=tmp_path / "bad")


def test_a_task_of_non_square_images_is_distilled_end_to_end(tmp_path):
    """A 3x8x16 task: the generator makes 8x16 images, fedkd's own LeNet-5 student and a torchvision one take them,
    the exported student answers them."""
    task = fedkd.Task(classes=4, input_shape=(3, 8, 16), mean=(0.5,) * 3, std=(0.25,) * 3, name="wide")
    teachers = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 8 * 16, 4)).eval() for _ in range(2)]
    for student in ("lenet5-half", "torchvision:resnet18"):
        result = fedkd.distill(teachers=teachers, task=task, out=tmp_path / student.replace(":", "-"),
                               student=student, epochs=1, steps_per_epoch=2, student_steps=1, batch_size=8,
                               synthetic_check=16)
        assert result.summary["task"]["input-shape"] == [3, 8, 16]
        assert result.summary["student"]["synthetic_check"]["samples"] == 16
        x = torch.rand(3, 3, 8, 16)
        program = torch.export.load(result.run_dir / "student.pt2").module()
        assert program(x).shape == (3, 4)
        torch.testing.assert_close(program(x), result.student(x), rtol=1e-4, atol=1e-4)
