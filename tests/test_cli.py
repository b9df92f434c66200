"""The fedkd command as a user runs it (in-process through main(), and once as a real subprocess)."""

import json
import os
import subprocess
import sys

import pytest
from fedkd.server.cli import main

SMALL = ["--set", "dataset=digits", "--set", "num-clients=2", "--set", "partition=iid", "--set", "epochs=1",
         "--set", "steps-per-epoch=2", "--set", "student-steps=1", "--set", "teacher-epochs=1",
         "--set", "batch-size=16", "--set", "generator-width=4", "--set", "latent-dim=8"]


def test_run_prints_a_results_table_and_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher 0" in printed and "ensemble" in printed and "student" in printed
    assert str(out) in printed.replace("\n", "")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 2
    # student-refit (the default): the refitted student is the run's, the one the epochs left is shown beside it
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["student"]["refit"]["steps"] == epochs[-1]["refit_steps"] == 8 * (1 * 2 * 1)  # 8x its steps
    assert summary["student"]["refit"]["along_the_way"]["accuracy"] == epochs[0]["student_accuracy"]
    assert "refitted on the final pool" in printed and "along the way" in printed


def test_the_student_leaves_as_a_checkpoint_an_exported_program_and_a_model_card(tmp_path, capsys):
    """Keys given on the command line are plain values in every file (a --set string once reached student.pt as
    a foreign class, which weights_only loading refuses)."""
    import torch

    from fedkd.institution.loading import load_teacher

    out = tmp_path / "run"
    assert main(["run", *SMALL, "--set", "student-model=lenet5-half", "--set", "export-onnx=yes", "--out",
                 str(out)]) == 0
    student, ckpt = load_teacher(out / "student.pt")
    assert ckpt["model"] == "lenet5-half" and type(ckpt["model"]) is str
    program = torch.export.load(out / "student.pt2").module()
    x = torch.randn(7, 1, 8, 8)
    torch.testing.assert_close(program(x), student(x), rtol=1e-5, atol=1e-5)
    card = json.loads((out / "student.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert card["architecture"] == "lenet5-half" and card["task"]["input-shape"] == [1, 8, 8]
    assert card["accuracy"]["coordinator"]["value"] == summary["student"]["test_accuracy"]
    assert "held-out data" in card["accuracy"]["coordinator"]["measured_on"]
    # ONNX, as the onnx extra (installed with the test extra) writes it: the same answers, any batch size
    import onnx
    from onnx.reference import ReferenceEvaluator

    assert card["files"]["onnx"] == "student.onnx" and card["onnx_error"] is None
    graph = onnx.load(out / "student.onnx")
    onnx.checker.check_model(graph)
    for n in (1, 7):
        x = torch.randn(n, 1, 8, 8)
        (answer,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(answer), student(x), rtol=1e-4, atol=1e-4)


def test_without_export_onnx_no_onnx_is_written_and_the_card_says_why(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    card = json.loads((out / "student.json").read_text())
    assert not (out / "student.onnx").exists() and card["files"]["onnx"] is None
    assert card["onnx_error"] == "not asked for (export-onnx=yes writes it)"


def test_config_file_and_set_override(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('dataset = "digits"\nnum-clients = 3\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), *SMALL[4:], "--out", str(out)]) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["num-clients"] == 3 and config["epochs"] == 1


def test_bad_input_exits_2_with_a_message_naming_it(tmp_path, capsys):
    assert main(["run", "--set", "epoch=3", "--out", str(tmp_path / "a")]) == 2
    assert "unknown config key 'epoch'; did you mean 'epochs'?" in capsys.readouterr().err
    assert main(["run", "--set", "dataset=cifar10", "--set", f"data-root={tmp_path}", "--out",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "'cifar10' not found under data-root" in err and "cifar-10-batches-py" in err
    assert "download=True" not in err  # torchvision's advice: fedkd downloads nothing
    assert main(["run", "--out", str(tmp_path / "c"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # a partition the data cannot give: named, with the keys to change (was Flower Datasets' traceback)
    assert main(["run", "--set", "dataset=digits", "--set", "num-clients=100", "--set", "alpha=0.01", "--out",
                 str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "partition 'dirichlet' with alpha=0.01" in err and "num-clients=100" in err and "Traceback" not in err
    assert main(["run", *SMALL, "--set", "partition=pathological", "--set", "classes-per-client=11", "--out",
                 str(tmp_path / "e")]) == 2
    assert "classes-per-client=11 exceeds the 10 classes" in capsys.readouterr().err


def test_keys_lists_every_key(capsys):
    assert main(["keys"]) == 0
    printed = capsys.readouterr().out
    for key in ("dataset", "num-clients", "steps-per-epoch", "query-budget", "pool-size", "cudfkd.self-paced",
                "cudfkd.lambda-start"):
        assert key in printed


def test_console_script_is_installed(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "fedkd")
    result = subprocess.run([exe, "run", "--set", "num-clients=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "num-clients: 0 is out of range" in result.stderr


@pytest.mark.parametrize("assignment,named", [
    ("temperature=nan", "temperature: nan is not a finite number"),
    ("teacher-lr=inf", "teacher-lr: inf is not a finite number"),
    ("cudfkd.lambda-start=nan", "cudfkd.lambda-start: nan is not a finite number"),
    ("query-timeout=inf", "query-timeout: inf is not a finite number"),
    ("epochs=99999999999999999999", "epochs: 99999999999999999999 is out of range"),
    ("seed=-1", "seed: -1 is out of range"),
    ("teacher-model=wrn-17-2", "teacher-model: wide ResNet depth must be 6n+4"),
    ("student-model=wrn-16-0", "student-model: wide ResNet width must be between 1 and 64"),
    ("batch-size=1e9", "batch-size: '1e9' is not an integer"),
])
def test_a_bad_value_stops_at_start_up_naming_the_key_before_anything_is_written(tmp_path, capsys, assignment,
                                                                                  named):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--set", assignment, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_toml_strings_are_not_coerced_to_numbers(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('epochs = "3"\n')
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "epochs: '3' is a string, the key takes an integer; write it without quotes" in capsys.readouterr().err


def test_a_run_that_fails_before_it_starts_leaves_the_directory_reusable(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--set", "dataset=cifar10", "--set", f"data-root={tmp_path}", "--out", str(out)]
    assert main(args) == 2
    assert "'cifar10' not found under data-root" in capsys.readouterr().err
    assert main(args) == 2  # the same command again: the same named cause, not "already holds a run"
    assert "'cifar10' not found" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: fmt.replace("%Y%m%d-%H%M%S", "20261126-120000"))
    taken = tmp_path / "runs" / "20261126-120000-digits-cudfkd"
    taken.mkdir(parents=True)  # another run, started the same second, claimed the name first
    (taken / "config.json").write_text("{}")
    assert main(["run", *SMALL]) == 0
    assert (taken / "config.json").read_text() == "{}"  # the other run's directory untouched
    mine = taken.with_name(taken.name + "-2")
    assert json.loads((mine / "summary.json").read_text())["num_clients"] == 2
    assert "runs/20261126-120000-digits-cudfkd-2" in capsys.readouterr().out.replace("\n", "")


def test_the_institution_s_command_never_loads_the_coordinator_s_package(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from fedkd.cli import main; "
            f"rc = main(['-v', 'teacher', '--checkpoint', {str(tmp_path / 'none.pt')!r}, '--connect', "
            "'127.0.0.1:1', '--insecure', '--token-file', '/nonexistent']); "
            "print('RC', rc, sorted({'.'.join(m.split('.')[:2]) for m in sys.modules}"
            " & {'fedkd.server', 'fedkd.client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 2 ['fedkd.client']" in out.stdout, out.stdout + out.stderr
    assert "token file '/nonexistent' does not exist" in out.stderr


def test_the_client_side_never_imports_the_coordinator_s_driver():
    import subprocess
    import sys

    code = ("import sys, client.app, client.cli, client.node; "
            "print(sorted(m for m in sys.modules if m.startswith(('fedkd.server', 'fedkd.coordinator'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # the coordinator's settings sections only: declarations the run config holds (tests/test_layout.py)
    assert out.stdout.strip() == "['fedkd.coordinator', 'fedkd.coordinator.settings']", out.stdout + out.stderr


def test_an_agent_started_with_the_settings_flags_reads_back_the_same_settings():
    """transport=grpc starts each agent with privacy_flags(settings): fedkd teacher's parser must read back
    exactly those settings (one table, PRIVACY_FLAGS, for both directions)."""
    import argparse

    from fedkd.client.flags import PRIVACY_FLAGS, add_teacher_arguments, privacy_flags, privacy_from_args

    from fedkd.institution.privacy.policy import PrivacySettings

    settings = PrivacySettings(mode="output-noise", budget=7.5, delta=1e-6, output_noise=2.0, output_clip=3.0,
                               gradient_clip=0.5, share_label_counts=False, label_count_noise="laplace",
                               label_count_epsilon=0.25, pate_threshold=4.0, pate_sigma1=3.0, pate_sigma2=1.5)
    parser = argparse.ArgumentParser()
    add_teacher_arguments(parser)
    args = parser.parse_args(["--checkpoint", "t.pt", "--connect", "h:1", *privacy_flags(settings)])
    assert privacy_from_args(args) == settings
    defaults = parser.parse_args(["--checkpoint", "t.pt", "--connect", "h:1"])
    assert privacy_from_args(defaults) == PrivacySettings()
    every_field = {f for f in PrivacySettings.__dataclass_fields__ if f not in ("share_label_counts", "eval_epsilon")}
    assert set(PRIVACY_FLAGS) == every_field


def test_predict_evaluates_the_exported_student_per_class_and_writes_a_csv(tmp_path, capsys):
    import csv

    from PIL import Image

    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    data = tmp_path / "val"
    for c in range(10):
        (data / str(c)).mkdir(parents=True)
        Image.new("L", (8, 8), color=25 * c).save(data / str(c) / "a.png")
    capsys.readouterr()
    assert main(["predict", "--student", str(out), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out
    assert "all" in printed and "10" in printed
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 10 and {r["label"] for r in rows} == {str(c) for c in range(10)}
    assert all(r["prediction"] in {str(c) for c in range(10)} and 0 < float(r["confidence"]) <= 1 for r in rows)
    (data / "11").mkdir()
    assert main(["predict", "--student", str(out), "--data", str(data)]) == 2
    assert "'11' name no class of the task" in capsys.readouterr().err
