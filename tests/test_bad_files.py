"""Malformed files get a named error and exit code 2, never a traceback: teacher checkpoints (served by
``fedkd teacher``, reloaded by ``fedkd run --resume``), run checkpoints and config.json on resume."""

import json
import shutil
from fractions import Fraction

import fedkd.client.cli
import pytest
import torch
from fedkd.server.cli import main

from fedkd.checkpoint import save_atomic

SMALL = ["--set", "dataset=digits", "--set", "num-clients=2", "--set", "partition=iid", "--set", "epochs=2",
         "--set", "steps-per-epoch=2", "--set", "student-steps=1", "--set", "teacher-epochs=1",
         "--set", "batch-size=16", "--set", "generator-width=4", "--set", "latent-dim=8"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-files") / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _teacher(finished_run):
    return torch.load(finished_run / "clients" / "client_00" / "teacher.pt", weights_only=True)


def _doctored(finished_run, path, **changes):
    ckpt = _teacher(finished_run)
    for key, value in changes.items():
        if value is KeyError:
            del ckpt[key]
        else:
            ckpt[key] = value
    save_atomic(ckpt, path)


TEACHER_CASES = {
    "empty": (lambda run, p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated": (lambda run, p: p.write_bytes((run / "clients/client_00/teacher.pt").read_bytes()[:300]),
                  "truncated or not a torch file"),
    "text": (lambda run, p: p.write_text("hello, I am not a checkpoint\n"), "(it is truncated or not a torch file)"),
    "random-bytes": (lambda run, p: p.write_bytes(bytes(range(256)) * 8), "(it is truncated or not a torch file)"),
    "other-format": (lambda run, p: save_atomic({"format": "something.else"}, p),
                     "is not a fedkd.teacher.v1 checkpoint (found 'something.else')"),
    "pickled-object": (lambda run, p: torch.save({"format": "fedkd.teacher.v1", "x": Fraction(1, 3)}, p),
                       "it holds Python objects (fractions.Fraction) other than tensors"),
    "missing-input-shape": (lambda run, p: _doctored(run, p, input_shape=KeyError), "field 'input_shape' is missing"),
    "unknown-model": (lambda run, p: _doctored(run, p, model="lenet7"), "field 'model' is 'lenet7', not a known model"),
    "malformed-input-shape": (lambda run, p: _doctored(run, p, input_shape="8x8"), "field 'input_shape' is '8x8'"),
    "short-input-shape": (lambda run, p: _doctored(run, p, input_shape=[1, 8]), "field 'input_shape' is [1, 8]"),
    "nan-mean": (lambda run, p: _doctored(run, p, mean=[float("nan")]), "field 'mean' is [nan]"),
    "bad-classes": (lambda run, p: _doctored(run, p, num_classes="ten"), "field 'num_classes' is 'ten'"),
    "wrong-depth": (lambda run, p: _doctored(run, p, model="wrn-17-2"), "depth must be 6n+4"),
}


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_fedkd_teacher_names_what_is_wrong_with_its_checkpoint(finished_run, tmp_path, capsys, case):
    make, message = TEACHER_CASES[case]
    path = tmp_path / "teacher.pt"
    make(finished_run, path)
    token = tmp_path / "t.token"
    token.write_text("x\n")
    code = fedkd.client.cli.main(["--checkpoint", str(path), "--connect", "127.0.0.1:1", "--token-file", str(token),
                            "--insecure"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert "weights_only" not in err  # never torch's advice to unpickle a file that may be malicious


def test_resume_names_a_broken_teacher_checkpoint(run_copy, capsys):
    (run_copy / "checkpoint.pt").unlink()  # resume reloads the teachers, then finds the broken one
    (run_copy / "summary.json").unlink()
    (run_copy / "clients" / "client_01" / "teacher.pt").write_bytes(b"")
    assert main(["run", *SMALL, "--out", str(run_copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "client_01/teacher.pt' is empty (0 bytes)" in err and "Traceback" not in err


def _run_state(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


RUN_CASES = {
    "empty": (lambda run: (run / "checkpoint.pt").write_bytes(b""), "is empty (0 bytes)"),
    "missing-rng": (lambda run: save_atomic({k: v for k, v in _run_state(run).items() if k != "rng"},
                                            run / "checkpoint.pt"), "field 'rng' is missing"),
    "history-not-a-list": (lambda run: save_atomic({**_run_state(run), "history": "x"}, run / "checkpoint.pt"),
                           "field 'history' is a str, not a list"),
    "method-state-of-another-run": (
        lambda run: save_atomic({**_run_state(run), "method": {"synthesizer": {}}}, run / "checkpoint.pt"),
        "does not fit this run"),
    "clients-not-indices": (lambda run: save_atomic({**_run_state(run), "clients": ["a"]}, run / "checkpoint.pt"),
                            "field 'clients' is not a list of client indices"),
    "other-clients": (lambda run: save_atomic({**_run_state(run), "clients": [0, 7]}, run / "checkpoint.pt"),
                      "written with the teachers of clients 0, 7, and the teachers of clients 0, 1 answer"),
    "corrupt-config-json": (lambda run: (run / "config.json").write_text('{"dataset": "dig'),
                            "config.json' is corrupt"),
    "config-json-not-a-table": (lambda run: (run / "config.json").write_text("[1, 2]"),
                                "config.json' holds a list, not the run's settings"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_resume_names_what_is_wrong_with_the_run_directory(run_copy, capsys, case):
    make, message = RUN_CASES[case]
    (run_copy / "summary.json").unlink()  # as after a crash: the run has not finished
    state = _run_state(run_copy)
    save_atomic({**state, "epoch": 1}, run_copy / "checkpoint.pt")
    make(run_copy)
    assert main(["run", *SMALL, "--out", str(run_copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_resume_of_a_finished_run_says_it_is_finished(run_copy, capsys):
    assert main(["run", *SMALL, "--out", str(run_copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is finished (all 2 epochs)" in err and "summary.json" in err
    # killed after the last checkpoint but before the summary: resuming writes the results
    (run_copy / "summary.json").unlink()
    assert main(["run", *SMALL, "--out", str(run_copy), "--resume"]) == 0
    assert json.loads((run_copy / "summary.json").read_text())["student"]["test_accuracy"] is not None


@pytest.mark.parametrize("flag, content, message", [
    ("--ca", "not a certificate\n", "CA certificate (--ca) '{path}' is not a PEM certificate"),
    ("--ca", None, "CA certificate (--ca) '{path}' does not exist"),
])
def test_fedkd_teacher_checks_its_ca_file_at_start_up(finished_run, tmp_path, capsys, flag, content, message):
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    token = tmp_path / "t.token"
    token.write_text("x\n")
    code = fedkd.client.cli.main(["--checkpoint", str(finished_run / "clients" / "client_00" / "teacher.pt"),
                            "--connect", "127.0.0.1:1", "--token-file", str(token), flag, str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message.format(path=path) in err


def test_fedkd_distill_checks_its_certificate_and_key_at_start_up(tmp_path, capsys):
    cert, key = tmp_path / "hub.pem", tmp_path / "hub.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    key.write_text("garbage")
    args = ["distill", "--listen", "127.0.0.1:0", "--teachers", "1", "--out", str(tmp_path / "run")]
    assert main([*args, "--cert", str(cert), "--key", str(key)]) == 2
    assert f"--cert '{cert}' is not a PEM certificate" in capsys.readouterr().err
    from fedkd.tls import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki")
    assert main([*args, "--cert", str(pki.server_cert), "--key", str(key)]) == 2
    assert f"--key '{key}' is not an unencrypted PEM private key" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-batch", "-1", "argument --max-batch: '-1' is out of range"),
    ("--max-message-mb", "nan", "argument --max-message-mb: 'nan' is not a finite number"),
    ("--max-message-mb", "inf", "argument --max-message-mb: 'inf' is not a finite number"),
    ("--give-up-after", "nan", "argument --give-up-after: 'nan' is not a finite number"),
    ("--num-threads", "-1", "argument --num-threads: '-1' is out of range"),
])
def test_fedkd_teacher_refuses_bad_numbers_naming_the_flag(finished_run, tmp_path, capsys, flag, value, message):
    token = tmp_path / "t.token"
    token.write_text("x\n")
    with pytest.raises(SystemExit) as exit_:
        fedkd.client.cli.main(["--checkpoint", str(finished_run / "clients" / "client_00" / "teacher.pt"),
                         "--connect", "127.0.0.1:1", "--token-file", str(token), "--insecure", flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_token_file_that_is_not_text_is_named(finished_run, tmp_path, capsys):
    token = tmp_path / "t.token"
    token.write_bytes(b"\xff\xfe\x00garbage")
    code = fedkd.client.cli.main(["--checkpoint", str(finished_run / "clients" / "client_00" / "teacher.pt"),
                            "--connect", "127.0.0.1:1", "--token-file", str(token), "--insecure"])
    assert code == 2 and f"token file '{token}' is not a token" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--teachers", "0"], "argument --teachers: '0' is out of range"),
    (["--teachers", "2", "--wait", "inf"], "argument --wait: 'inf' is not a finite number"),
    (["--teachers", "1", "--listen", "garbage"], "argument --listen: 'garbage' is not HOST:PORT"),
    (["--teachers", "1", "--listen", "127.0.0.1:99999"], "argument --listen: '127.0.0.1:99999' is not HOST:PORT"),
])
def test_fedkd_distill_refuses_bad_numbers_naming_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--listen", "127.0.0.1:0", "--out", str(tmp_path / "run"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_address_the_hub_cannot_bind_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--listen", "192.0.2.1:50051", "--teachers", "1", "--out", str(out), "--wait", "1"]
    assert main(args) == 2  # 192.0.2.1 (TEST-NET-1) is no interface of this machine
    assert "cannot listen on '192.0.2.1:50051'" in capsys.readouterr().err
    assert not (out / "config.json").exists()  # nothing ran: the same --out can be used again


def test_a_run_killed_while_writing_its_results_is_not_finished_and_resume_writes_them(run_copy, capsys,
                                                                                      monkeypatch):
    """summary.json marks a run finished, so it is written last and whole: a crash while plotting leaves none,
    and --resume writes every result."""
    import fedkd.coordinator.summary as summary_module

    (run_copy / "summary.json").unlink()
    shutil.rmtree(run_copy / "plots")
    original = summary_module.plot_samples

    def killed(*args, **kwargs):
        raise RuntimeError("killed while plotting")

    monkeypatch.setattr(summary_module, "plot_samples", killed)
    with pytest.raises(RuntimeError, match="killed while plotting"):
        main(["run", "--out", str(run_copy), "--resume"])
    assert not (run_copy / "summary.json").exists()
    monkeypatch.setattr(summary_module, "plot_samples", original)
    assert main(["run", "--out", str(run_copy), "--resume"]) == 0
    assert (run_copy / "plots" / "samples.png").is_file() and (run_copy / "student.json").is_file()
    assert json.loads((run_copy / "summary.json").read_text())["student"]["test_accuracy"] is not None


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import os

    from fedkd.files import write_atomic

    path = tmp_path / "config.json"
    write_atomic(path, '{"old": 1}')

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, '{"new": 2, "much": "' + "x" * 10000 + '"}')
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_development_server_key_that_does_not_match_its_certificate_is_issued_again(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedkd.tls import PUBLIC, make_dev_pki, run_pki

    pki = make_dev_pki(tmp_path / "tls", hosts=["localhost"])
    other = ec.generate_private_key(ec.SECP256R1())
    pki.server_key.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    again = run_pki(tmp_path / "tls", hosts=["localhost"])
    cert = x509.load_pem_x509_certificate(again.server_cert.read_bytes())
    key = serialization.load_pem_private_key(again.server_key.read_bytes(), password=None)
    assert cert.public_key().public_bytes(*PUBLIC) == key.public_key().public_bytes(*PUBLIC)
    assert again.ca_cert.read_bytes() == pki.ca_cert.read_bytes()  # the same CA: the teachers keep trusting it
