"""A new user's first hour: fast help, a hint for a key given as a flag, resuming from the run directory alone,
progress lines in a log, and what the run directory says about its student."""

import json
import subprocess
import sys

import pytest
from fedkd.server.cli import ConsoleObserver, main

SMALL = ["--set", "dataset=digits", "--set", "num-clients=2", "--set", "partition=iid", "--set", "epochs=2",
         "--set", "steps-per-epoch=2", "--set", "student-steps=1", "--set", "teacher-epochs=1",
         "--set", "batch-size=16", "--set", "generator-width=4", "--set", "latent-dim=8"]


def test_help_version_and_argument_errors_never_import_torch():
    code = """
import sys
from fedkd.cli import main
for argv in (['--help'], ['run', '--help'], ['distill', '--help'], ['teacher', '--help'], ['train-teacher', '--help'],
             ['--version'], ['run', '--out'], ['run', '--set', 'seed=-1'], ['run', '--set', 'epochs=two'],
             ['distill', '--listen', '127.0.0.1:0', '--teachers', '2', '--set', 'alpha=0']):
    try:
        main(argv)
    except SystemExit:
        pass
print('LOADED', sorted(m for m in ('torch', 'numpy', 'opacus', 'flwr') if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "fedkd 0.1.0" in out.stdout  # --version
    assert "seed: -1 is out of range" in out.stderr and "epochs: 'two' is not an integer" in out.stderr
    assert "alpha: 0" in out.stderr
    assert "fedkd keys" in out.stdout  # run --help points to the key list
    assert "needs no data" in out.stdout and "task card" in out.stdout  # distill --help says what it needs


@pytest.mark.parametrize("argv,hint", [
    (["run", "--epochs", "2"], "--epochs is a config key, not an option: give it as --set epochs=2"),
    (["run", "--num_clients=3"], "give it as --set num-clients=3"),
    (["distill", "--listen", "127.0.0.1:0", "--teachers", "2", "--method", "dafl"], "--set method=dafl"),
    (["run", "--ouput", "x"], "unrecognized arguments: --ouput x; did you mean --out?"),
])
def test_a_config_key_given_as_a_flag_is_pointed_to_set(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert hint in capsys.readouterr().err


class Interrupt:
    """Ctrl-C after the first epoch (the observer is the CLI's own)."""

    def __init__(self, monkeypatch):
        original = ConsoleObserver.epoch_finished

        def interrupted(observer, record):
            original(observer, record)
            raise KeyboardInterrupt

        monkeypatch.setattr(ConsoleObserver, "epoch_finished", interrupted)
        self.undo = lambda: monkeypatch.setattr(ConsoleObserver, "epoch_finished", original)


def test_resume_reads_the_run_s_own_settings_and_ends_where_an_uninterrupted_run_ends(tmp_path, capsys,
                                                                                     monkeypatch):
    full = tmp_path / "full"
    assert main(["run", *SMALL, "--out", str(full)]) == 0
    capsys.readouterr()
    out = tmp_path / "interrupted"
    interrupt = Interrupt(monkeypatch)
    assert main(["run", *SMALL, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"continue with: fedkd run --out {out} --resume" in err
    interrupt.undo()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # a key that changes the result is refused, naming it and saying why
    assert main(["run", "--out", str(out), "--resume", "--set", "epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "epochs: 2 -> 3" in err and "a longer run is a new run" in err and "Traceback" not in err
    # no --set at all: the run's config.json; num-threads may change (it does not change the result)
    assert main(["run", "--out", str(out), "--resume", "--set", "num-threads=1"]) == 0
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert resumed["config"]["dataset"] == "digits" and resumed["config"]["epochs"] == 2
    assert resumed["student"]["test_accuracy"] == uninterrupted["student"]["test_accuracy"]
    assert resumed["queries"]["samples"] == uninterrupted["queries"]["samples"]
    # the in-process teachers started again with the resumed run: their own counts are smaller, as expected
    reconciliation = resumed["queries"]["reconciliation"]
    assert reconciliation["differences"] and reconciliation["agree"]
    assert all(d["expected"] and d["why"].startswith("expected: the run was resumed")
               for d in reconciliation["differences"])
    assert resumed["fedkd_version"] == "0.1.0" and "commit" in resumed
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_whose_output_is_not_a_terminal_prints_one_line_per_epoch(tmp_path):
    """A batch job, nohup or | tee: one line per epoch (accuracy, seconds, query samples so far), no escape
    codes, no progress bar."""
    exe = [sys.executable, "-c", "import sys; from fedkd.cli import main; sys.exit(main())"]
    out = subprocess.run([*exe, "run", *SMALL, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if " epoch " in line]
    assert len(lines) == 2, out.stdout
    assert "epoch 1/2: student accuracy 0." in lines[0] and "query samples so far" in lines[0]
    assert "epoch 2/2" in lines[1]
    assert "\x1b[" not in out.stdout and "━" not in out.stdout.split("fedkd cudfkd on")[0]


def test_the_teacher_agent_says_what_it_is_doing_and_counts_its_wire_bytes(tmp_path, caplog):
    import logging
    import threading
    import time

    import torch
    from fedkd.client.agent import AgentSettings, TeacherAgent
    from fedkd.client.cli import host_from_module
    from fedkd.server.credentials import issue_tokens
    from fedkd.server.hub import Hub
    from torch import nn

    from fedkd.contract import QueryContext
    from fedkd.task import Task

    caplog.set_level(logging.INFO, logger="fedkd.client.agent")
    tokens = issue_tokens(tmp_path / "tokens", ["teacher-000"])
    hub = Hub(tokens, session="s")
    port = hub.start()
    task = Task(classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.38,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    host = host_from_module(model, task, name="mine")
    token = (tmp_path / "tokens" / "teacher-000.token").read_text().strip()
    agent = TeacherAgent(host, AgentSettings(target=f"127.0.0.1:{port}", token=token, status_every=0.2))
    served: dict = {}
    thread = threading.Thread(target=lambda: served.update(agent.serve()))
    thread.start()
    try:
        hub.wait_for_teachers(timeout=30)
        hub.pool.forward(torch.randn(5, 1, 8, 8), QueryContext(purpose="evaluate"), min_answers=1)
        deadline = time.monotonic() + 10
        while "serving: answered 1 forward" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        hub.end_session()
        thread.join(30)
    finally:
        hub.stop()
    assert not thread.is_alive()
    text = caplog.text
    assert f"connecting to the hub at 127.0.0.1:{port} (plaintext)" in text
    assert "connected: session 's'" in text and "granting gradient, logits" in text
    assert "privacy: none" in text
    assert "serving: answered 1 forward and 0 backward queries (5 samples" in text
    assert "the hub ended the session" in text and "stopped: answered 1 forward" in text
    # the agent's own report counts the bytes it exchanged, as the hub does (the hub adds the closing report)
    hub_bytes = hub.pool.stats()[0].wire_bytes
    assert 0 < served["wire_bytes"] <= hub_bytes < 2 * served["wire_bytes"]


def test_the_simulation_log_shows_each_line_once_without_escape_codes_or_debug():
    from fedkd.server.simulate import LogFilter

    stream = [
        "\n", "Flower configuration not found. Created default configuration at /x/config.toml\n",
        "Successfully started run 42\n",
        "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `42`\n",
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
        "\x1b[92mINFO \x1b[0m:      [fedkd] run directory /runs/run-42\n",
        "11/23/2026 13:21:59:INFO:[fedkd] run directory /runs/run-42\n",
        "11/23/2026 13:22:00:DEBUG:Initialising: RayBackend\n",
        "\x1b[92mINFO \x1b[0m:      [fedkd] epoch 1/2: student accuracy 0.5000 (1.0 s)\n",
        "11/23/2026 13:22:24:INFO:[fedkd] epoch 1/2: student accuracy 0.5000 (1.0 s)\n",
        "\x1b[93mWARNING \x1b[0m:   node 3 is slow\n",
        "11/23/2026 13:22:33:ERROR:ServerApp crashed: boom\n",
        "\x1b[92mINFO \x1b[0m:      \n",
    ]
    keep = LogFilter()
    shown = [line for line in map(keep, stream) if line is not None]
    assert shown == ["Successfully started run 42", "run directory /runs/run-42",
                     "epoch 1/2: student accuracy 0.5000 (1.0 s)", "WARNING: node 3 is slow",
                     "ERROR: ServerApp crashed: boom"]
    assert keep.run_dir == "/runs/run-42"


def test_a_tls_failure_is_one_line_of_fedkd_not_grpc_s_own(tmp_path):
    import os

    from fedkd.server.credentials import ServerTLS, issue_tokens
    from fedkd.server.hub import Hub

    from fedkd.checkpoint import save_teacher
    from fedkd.models import build_model
    from fedkd.tls import make_dev_pki

    pki, other = make_dev_pki(tmp_path / "pki"), make_dev_pki(tmp_path / "other")
    tokens = issue_tokens(tmp_path / "tokens", ["teacher-000"])
    hub = Hub(tokens, session="s", tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    port = hub.start()
    save_teacher(tmp_path / "t.pt", build_model("lenet5", num_classes=10, channels=1, image_size=8),
                 model_name="lenet5", num_classes=10, input_shape=(1, 8, 8), num_samples=10, label_counts=[1] * 10,
                 mean=(0.3,), std=(0.3,))
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    try:
        out = subprocess.run([sys.executable, "-c", "import sys; from fedkd.cli import main; sys.exit(main())",
                              "teacher", "--checkpoint", str(tmp_path / "t.pt"), "--connect", f"localhost:{port}",
                              "--token-file", str(tmp_path / "tokens" / "teacher-000.token"), "--ca",
                              str(other.ca_cert), "--give-up-after", "20"], capture_output=True, text=True,
                             timeout=120, env=env)
    finally:
        hub.stop()
    assert out.returncode == 2
    assert "does not verify against the CA given with --ca" in out.stderr
    assert f"connecting to the hub at localhost:{port} (TLS)" in out.stderr
    assert "ssl_transport_security" not in out.stderr and "Handshake failed" not in out.stderr, out.stderr
