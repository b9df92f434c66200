"""The fedkd command as a user runs it (in-process through main(), and once as a real subprocess)."""

import json
import os
import subprocess
import sys

from server.cli import main

SMALL = ["--set", "dataset=digits", "--set", "num-clients=2", "--set", "partition=iid", "--set", "epochs=1",
         "--set", "steps-per-epoch=2", "--set", "student-steps=1", "--set", "teacher-epochs=1",
         "--set", "batch-size=16", "--set", "generator-width=4", "--set", "latent-dim=8"]


def test_run_prints_a_results_table_and_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher 0" in printed and "ensemble" in printed and "student" in printed
    assert str(out) in printed.replace("\n", "")
    assert json.loads((out / "summary.json").read_text())["num_clients"] == 2


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
    assert "'cifar10' not found under data-root" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "c"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


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
