"""Whole runs over gRPC with teacher agents as real processes on 127.0.0.1."""

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fedkd.server.credentials import ServerTLS, issue_tokens
from fedkd.server.hub import Hub
from fedkd.server.loopback import agent_command, grpc_transport

from fedkd.checkpoint import load_safe
from fedkd.config import config_from_mapping
from fedkd.coordinator.experiment import run_experiment
from fedkd.tls import make_dev_pki

TINY = {
    "dataset": "digits", "num-clients": 3, "partition": "iid", "teacher-model": "lenet5",
    "student-model": "lenet5-half", "teacher-epochs": 30, "teacher-lr": 3e-3, "epochs": 2, "steps-per-epoch": 10,
    "student-steps": 10, "batch-size": 64, "latent-dim": 32, "generator-width": 16, "sample-stages": 1,
    "num-threads": 2, "student-refit": 1,  # (the refit at its default 8 took half of each run)
}


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess") / "run"
    summary = run_experiment(config_from_mapping(TINY), out)
    return out, summary


def test_a_run_over_grpc_gives_the_same_student_as_in_process(in_process_run, tmp_path):
    ref_dir, ref = in_process_run
    out = tmp_path / "grpc"
    # The same teachers: copy the client checkpoints so only the transport differs.
    for src in ref_dir.glob("clients/*/teacher.pt"):
        dst = out / src.relative_to(ref_dir)
        dst.parent.mkdir(parents=True)
        dst.write_bytes(src.read_bytes())
    summary = run_experiment(config_from_mapping({**TINY, "transport": "grpc"}), out, transport=grpc_transport)
    assert summary["transport"] == "grpc"
    assert summary["ensemble"]["test_accuracy"] == ref["ensemble"]["test_accuracy"]
    assert [t["test_accuracy"] for t in summary["teachers"]] == [t["test_accuracy"] for t in ref["teachers"]]
    assert summary["student"]["test_accuracy"] == pytest.approx(ref["student"]["test_accuracy"], abs=0.01)
    a = load_safe(out / "checkpoint.pt", "fedkd.run.v1")["method"]["trainer"]["student"]
    b = load_safe(ref_dir / "checkpoint.pt", "fedkd.run.v1")["method"]["trainer"]["student"]
    for key in b:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    # The same queries were asked, and each agent's own account matches the coordinator's.
    q, rq = summary["queries"], ref["queries"]
    assert [c["samples"] for c in q["per_client"]] == [c["samples"] for c in rq["per_client"]]
    assert [c["bytes"] for c in q["per_client"]] == [c["bytes"] for c in rq["per_client"]]
    for mine, theirs in zip(q["per_client"], q["reported_by_clients"]):
        assert (theirs["forward_calls"], theirs["backward_calls"], theirs["samples"], theirs["bytes"]) == (
            mine["forward_calls"], mine["backward_calls"], mine["samples"], mine["bytes"])
        assert mine["missed"] == 0 and mine["wire_bytes"] > mine["bytes"]
    assert (out / "tls" / "ca.pem").exists() and len(list((out / "tokens").glob("*.token"))) == 3


class KillAndRestart:
    """Observer: kill teacher 2's process at one step, restart it at a later one, and wait until it rejoined."""

    def __init__(self, kill_at, restart_at):
        self.kill_at, self.restart_at = kill_at, restart_at
        self.steps = 0
        self.procs, self.commands, self.hub = {}, {}, None
        self.joined_again_at = None

    def stage(self, message):
        pass

    def epoch_started(self, epoch, total_steps):
        pass

    def epoch_finished(self, record):
        pass

    def step(self):
        self.steps += 1
        if self.steps == self.kill_at:
            self.procs[2].kill()
            self.procs[2].wait(10)
        if self.steps == self.restart_at:
            self.procs[2] = subprocess.Popen(self.commands[2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while self.hub.slots[2].joins < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            self.joined_again_at = self.steps


@pytest.mark.slow
def test_a_teacher_killed_mid_run_the_run_completes_and_it_rejoins(in_process_run, tmp_path):
    ref_dir, _ = in_process_run
    # (reliability off: the counts below are the rounds' queries, without the gradient checks' Forwards)
    config = config_from_mapping({**TINY, "epochs": 3, "rejoin-timeout": 60, "reliability": False})
    observer = KillAndRestart(kill_at=5, restart_at=15)
    pki = make_dev_pki(tmp_path / "tls")
    names = ["client-000", "client-001", "client-002"]
    tokens = issue_tokens(tmp_path / "tokens", names)

    @contextlib.contextmanager
    def transport(clients, config, run_dir, device):
        hub = Hub(tokens, session="kill-test", tls=ServerTLS(pki.server_cert.read_bytes(),
                                                            pki.server_key.read_bytes()), quorum=2)
        observer.hub = hub
        port = hub.start()
        try:
            for k in range(len(clients)):
                observer.commands[k] = agent_command(
                    ref_dir / "clients" / f"client_{k:02d}" / "teacher.pt", port,
                    tmp_path / "tokens" / f"{names[k]}.token", pki.ca_cert, config=config, session="kill-test",
                    device=torch.device("cpu"), threads=1)
                observer.procs[k] = subprocess.Popen(observer.commands[k], stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
            hub.wait_for_teachers(timeout=60)
            yield hub.pool
        finally:
            hub.end_session()
            for proc in observer.procs.values():
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            hub.stop()

    out = tmp_path / "run"
    for src in ref_dir.glob("clients/*/teacher.pt"):
        dst = out / src.relative_to(ref_dir)
        dst.parent.mkdir(parents=True)
        dst.write_bytes(src.read_bytes())
    summary = run_experiment(config, out, observer=observer, transport=transport)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in epochs if "stage" not in h] == [0, 1, 2]  # every epoch ran
    assert observer.joined_again_at == 15 and observer.hub.slots[2].joins == 2
    per = summary["queries"]["per_client"]
    assert per[0]["missed"] == per[1]["missed"] == 0
    assert per[2]["missed"] > 0  # the steps it was away
    assert per[2]["forward_calls"] < per[0]["forward_calls"]
    # Back after the restart: it answered queries in the remaining rounds (30 rounds, 1 Forward each).
    assert per[2]["forward_calls"] > per[0]["forward_calls"] - 12
    report = summary["queries"]["reported_by_clients"][2]
    assert 0 < report["forward_calls"] < per[2]["forward_calls"]  # the restarted process only saw its part
    assert summary["student"]["test_accuracy"] > 0.2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fedkd_distill_and_fedkd_teacher_commands(in_process_run, tmp_path):
    ref_dir, _ = in_process_run
    port = _free_port()
    out = tmp_path / "coordinator"
    sets = [a for k, v in TINY.items() if k not in ("num-clients",) for a in ("--set", f"{k}={v}")]
    fedkd = [sys.executable, "-m", "fedkd.server.cli"]
    coordinator = subprocess.Popen([*fedkd, "distill", "--listen", f"127.0.0.1:{port}", "--teachers", "2",
                                    "--out", str(out), "--wait", "60", *sets],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    teachers = []
    try:
        deadline = time.monotonic() + 60
        while not (out / "tokens" / "teacher-001.token").exists() or not (out / "tls" / "ca.pem").exists():
            assert time.monotonic() < deadline and coordinator.poll() is None, coordinator.stdout.read().decode()
            time.sleep(0.2)
        from PIL import Image

        for c in range(10):  # teacher 1's held-out images: a checkpoint's classes are named 0, 1, ...
            (tmp_path / "held-out" / str(c)).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), color=25 * c + 7 * i).save(tmp_path / "held-out" / str(c) / f"{i}.png")
        for k in range(2):
            teachers.append(subprocess.Popen(
                [*fedkd, "teacher", "--checkpoint", str(ref_dir / "clients" / f"client_{k:02d}" / "teacher.pt"),
                 "--connect", f"localhost:{port}", "--token-file", str(out / "tokens" / f"teacher-{k:03d}.token"),
                 "--ca", str(out / "tls" / "ca.pem"), *(["--eval-data", str(tmp_path / "held-out")] if k else [])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        log = coordinator.communicate(timeout=300)[0].decode()
        assert coordinator.returncode == 0, log
        results = [t.communicate(timeout=30) for t in teachers]
    finally:
        for p in [coordinator, *teachers]:
            if p.poll() is None:
                p.kill()
    assert all(t.returncode == 0 for t in teachers), results
    released = [json.loads(r[0].decode().strip().splitlines()[-1])["released"] for r in results]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transport"] == "grpc" and len(summary["teachers"]) == 2
    assert [r["forward_calls"] for r in released] == [c["forward_calls"] for c in summary["queries"]["per_client"]]
    assert "student" in log and summary["student"]["test_accuracy"] > 0.2
    rows = summary["federated_evaluation"]["clients"]  # the coordinator's test set and teacher 1's own, both
    assert [(r["client"], r["evaluated"], r["num-examples"]) for r in rows] == [(1, True, 20.0)]
    assert "released the student's accuracy" in results[1][1].decode() and 0.0 <= rows[0]["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_teacher_pointed_at_nothing_gives_up_with_a_clear_error(in_process_run, tmp_path):
    ref_dir, _ = in_process_run
    token = tmp_path / "t.token"
    token.write_text("x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.client", "--checkpoint", str(ref_dir / "clients" / "client_00" / "teacher.pt"),
         "--connect", f"127.0.0.1:{_free_port()}", "--token-file", str(token), "--insecure", "--give-up-after", "1"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no session with the hub" in proc.stderr and "UNAVAILABLE" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "fedkd.client", "--checkpoint", str(Path(tmp_path) / "missing.pt"),
                          "--connect", "127.0.0.1:1", "--token-file", str(token), "--insecure"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_a_teacher_connected_to_a_peer_that_never_answers_gives_up_in_time(in_process_run, tmp_path):
    """A peer that accepts the connection and never speaks (not a hub, a wedged hub, or a loopback socket that
    connected to itself) held the agent forever: each attempt now waits for the Welcome a bounded time."""
    ref_dir, _ = in_process_run
    token = tmp_path / "t.token"
    token.write_text("x\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever reads or writes
        proc = subprocess.run(
            [sys.executable, "-m", "fedkd.client", "--checkpoint",
             str(ref_dir / "clients" / "client_00" / "teacher.pt"), "--connect",
             f"127.0.0.1:{silent.getsockname()[1]}", "--token-file", str(token), "--insecure", "--give-up-after", "1"],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "no session with the hub" in proc.stderr and "no Welcome within 2 s" in proc.stderr


def test_an_agent_says_when_the_hub_is_slow_to_welcome_it_before_it_connects_again(
        in_process_run, monkeypatch, caplog):
    """An operator waiting on a wedged connection learns it while it lasts, not only when the attempt is dropped."""
    import fedkd.client.agent as agent_module
    from fedkd.client.agent import AgentError, AgentSettings, TeacherAgent
    from fedkd.client.cli import host_from_checkpoint

    ref_dir, _ = in_process_run
    monkeypatch.setattr(agent_module, "WELCOME_SLOW", 0.3)
    host = host_from_checkpoint(ref_dir / "clients" / "client_00" / "teacher.pt", client=0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        agent = TeacherAgent(host, AgentSettings(target=target, token="x", welcome_timeout=1.0, give_up_after=0.5,
                                                 status_every=0))
        with caplog.at_level("WARNING", logger="fedkd.client.agent"), pytest.raises(AgentError, match="no Welcome"):
            agent.serve()
    slow = [r.getMessage() for r in caplog.records if "no Welcome from the hub" in r.getMessage()]
    assert slow and slow[0] == (f"no Welcome from the hub at {target} 0.3 s after connecting; waiting up to 0.7 s "
                                "more before connecting again")


def _distill(out, port, *extra):
    sets = [a for k, v in {**TINY, "epochs": 3, "steps-per-epoch": 6, "student-steps": 4}.items()
            if k != "num-clients" for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "fedkd.server.cli", "distill", "--listen", f"127.0.0.1:{port}",
                             "--teachers", "2", "--out", str(out), "--wait", "60", *sets, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _teachers(ref_dir, out, port):
    deadline = time.monotonic() + 60
    while not (out / "tokens" / "teacher-001.token").exists() or not (out / "tls" / "ca.pem").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return [subprocess.Popen(
        [sys.executable, "-m", "fedkd.client", "--checkpoint",
         str(ref_dir / "clients" / f"client_{k:02d}" / "teacher.pt"),
         "--connect", f"localhost:{port}", "--token-file", str(out / "tokens" / f"teacher-{k:03d}.token"),
         "--ca", str(out / "tls" / "ca.pem")], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]


@pytest.mark.slow
def test_a_killed_coordinator_resumes_with_its_teachers_and_ends_where_an_uninterrupted_run_ends(in_process_run,
                                                                                                 tmp_path):
    ref_dir, _ = in_process_run
    procs = []
    try:
        port = _free_port()
        whole = tmp_path / "uninterrupted"
        procs.append(coordinator := _distill(whole, port))
        procs += _teachers(ref_dir, whole, port)
        assert coordinator.wait(timeout=300) == 0, coordinator.stdout.read().decode()

        port = _free_port()
        out = tmp_path / "killed"
        procs.append(coordinator := _distill(out, port))
        procs += (agents := _teachers(ref_dir, out, port))
        ca = (out / "tls" / "ca.pem").read_bytes()
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():  # the first epoch is checkpointed ...
            assert time.monotonic() < deadline and coordinator.poll() is None
            time.sleep(0.05)
        ledger = (out / "queries.json").read_text()
        while (out / "queries.json").read_text() == ledger:  # ... and the second has begun
            assert time.monotonic() < deadline and coordinator.poll() is None
            time.sleep(0.02)
        coordinator.kill()  # SIGKILL: no goodbye, no cleanup
        coordinator.wait()
        procs.append(resumed := _distill(out, port, "--resume"))
        log = resumed.communicate(timeout=300)[0].decode()
        assert resumed.returncode == 0, log
        results = [a.communicate(timeout=30) for a in agents]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "reusing the run development CA" in log and (out / "tls" / "ca.pem").read_bytes() == ca
    assert all(a.returncode == 0 for a in agents), results  # they reconnected on their own and were thanked
    a = load_safe(out / "checkpoint.pt", "fedkd.run.v1")["method"]["trainer"]["student"]
    b = load_safe(whole / "checkpoint.pt", "fedkd.run.v1")["method"]["trainer"]["student"]
    for key in b:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    # The coordinator's ledger counts the repeated part of epoch 2 too (the teachers answered it twice); what it
    # could not count (a round in flight at the kill) is stated with the reason.
    queries = json.loads((out / "summary.json").read_text())["queries"]
    released = [json.loads(r[0].decode().strip().splitlines()[-1])["released"] for r in results]
    assert [r["samples"] for r in released] == [c["samples"] for c in queries["reported_by_clients"]]
    reconciliation = queries["reconciliation"]
    for difference in reconciliation["differences"]:
        assert "in flight when the coordinator stopped" in difference["why"]
        assert 0 < difference["reported_minus_counted"]["samples"] <= 4 * 64
    assert reconciliation["agree"] == (not reconciliation["differences"])


@pytest.mark.slow
def test_a_mixed_run_of_gradient_logits_and_labels_teachers_gives_the_same_student_in_process_and_over_grpc(
        in_process_run, tmp_path):
    ref_dir, _ = in_process_run
    students = []
    for transport in ("inprocess", "grpc"):
        out = tmp_path / transport
        for src in ref_dir.glob("clients/*/teacher.pt"):  # the same teachers, now granting different access
            dst = out / src.relative_to(ref_dir)
            dst.parent.mkdir(parents=True)
            dst.write_bytes(src.read_bytes())
        config = config_from_mapping({**TINY, "teacher-access": "gradient,logits,labels", "epochs": 1,
                                      "steps-per-epoch": 3, "student-steps": 2, "transport": transport})
        summary = run_experiment(config, out, transport=grpc_transport if transport == "grpc" else None)
        per_client = summary["queries"]["per_client"]
        # the logits teacher was never sent a Backward, its gradient was estimated from extra Forwards; the
        # labels teacher answered Forwards (labels) only, one per fan-out; the gradient teacher one per fan-out
        # and one per check of its gradients against its own answers
        fan_outs = per_client[2]["forward_calls"]
        checks = summary["ensemble"]["teachers"][0]["gradient_checks"]
        assert per_client[1]["backward_calls"] == 0 and per_client[0]["backward_calls"] > 0
        assert per_client[1]["forward_calls"] > fan_outs and per_client[2]["backward_calls"] == 0
        assert checks >= 3 and per_client[0]["forward_calls"] == fan_outs + checks
        assert [t["gradient_checks"] for t in summary["ensemble"]["teachers"][1:]] == [0, 0]  # estimates: not judged
        assert per_client[2]["bytes"] == per_client[2]["samples"] * (8 * 8 * 4 + 8)  # inputs out, int64 labels back
        assert all(r.get("refused", 0) == 0 for r in summary["queries"]["reported_by_clients"])
        students.append(load_safe(out / "checkpoint.pt", "fedkd.run.v1")["method"]["trainer"]["student"])
    for key in students[0]:
        torch.testing.assert_close(students[1][key].float(), students[0][key].float(), rtol=1e-4, atol=1e-5, msg=key)
