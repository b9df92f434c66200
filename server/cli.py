"""The ``fedkd`` command: thin entry points that parse, build and delegate.

    fedkd run [--config FILE.toml] [--set KEY=VALUE ...] [--out DIR] [--resume]
    fedkd distill --listen HOST:PORT --teachers N [--cert F --key F | --insecure] ...   (alias: fedkd hub)
    fedkd teacher --checkpoint FILE --connect HOST:PORT --token-file FILE [--ca FILE]
    fedkd certs --out DIR [--hosts NAME,...] [--clients N]
    fedkd simulate [--clients N] [--set KEY=VALUE ...]   # the Flower app: flwr run . --stream, offline
    fedkd partition --out DIR [--set KEY=VALUE ...]      # one .npz per client, to try a deployment
    fedkd keys            # every config key with its default and allowed values

The parser and ``--help`` load neither torch nor a model: each command imports what it runs once its
arguments are read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkd.client.flags import add_teacher_arguments, add_training_arguments
from rich.console import Console
from rich.table import Table

from fedkd.options import TIMEOUT_LIMIT, ConfigError, address, argument
from fedkd.provenance import version

if TYPE_CHECKING:
    from rich.progress import Progress

    from fedkd.config import RunConfig

    from .credentials import ServerTLS

# Errors that name what the user gave (printed as one line, exit 2), by the module that defines them: a command
# that never loaded a module cannot have raised its error, so none is imported to check.
USER_ERRORS = {"fedkd.checkpoint": "CheckpointError", "fedkd.data": "DatasetNotFoundError",
               "fedkd.coordinator.rundir": "RunDirectoryError", "fedkd.coordinator.pool": "QuorumError",
               "fedkd.tls": "CertificateError", "fedkd.server.hub": "ListenError"}


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConfigError, TimeoutError, FileNotFoundError)):
        return True
    return any(isinstance(exc, getattr(sys.modules[module], name)) for module, name in USER_ERRORS.items()
               if module in sys.modules)


class ConsoleObserver:
    """What a run shows while it runs: stage messages, and per epoch a live progress bar on a terminal, or one
    line (student accuracy, seconds, query samples so far) when the output is a file, a pipe or a batch log.
    The bar starts with the first epoch, so nothing of it is drawn before an error at start-up."""

    def __init__(self, console: Console, *, epochs: int, steps_per_epoch: int) -> None:
        self.console = console
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.progress: Progress | None = None
        self.task: Any = None
        self.last = ""

    def __enter__(self) -> ConsoleObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def stage(self, message: str) -> None:
        if self.console.is_terminal:
            self.console.log(message)
        else:
            self.console.print(f"{time.strftime('%H:%M:%S')} {message}", soft_wrap=True, markup=False,
                               highlight=False)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        if not self.console.is_terminal:
            return
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console)
            self.task = self.progress.add_task("distilling", total=self.epochs * self.steps_per_epoch,
                                               completed=epoch * self.steps_per_epoch)
            self.progress.start()
        self.progress.update(self.task, description=f"epoch {epoch + 1}/{self.epochs}{self.last}")

    def step(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def epoch_finished(self, record: dict[str, Any]) -> None:
        from fedkd.coordinator.distillation import epoch_line

        if self.progress is None:
            self.stage(epoch_line(record, self.epochs))
            return
        acc = record["student_accuracy"]
        self.last = f" (student {acc:.3f})" if acc is not None else ""
        self.progress.update(self.task, completed=(record["epoch"] + 1) * self.steps_per_epoch)


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given by --config and --set (later wins), unresolved."""
    from fedkd.config import load_config_file, parse_assignments

    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    values.update(parse_assignments(args.set or []))
    return values


def _build_config(args: argparse.Namespace, given: dict[str, Any] | None = None) -> RunConfig:
    """The run's config: --config and --set (``given``, when the caller read them already); with --resume, the
    run directory's own config.json, which --config and --set may change only where a resumed run allows it
    (checked when the directory is opened)."""
    from fedkd.config import UnknownKeyError, config_from_mapping

    values = _config_values(args) if given is None else dict(given)
    if getattr(args, "resume", False):
        if not args.out:
            raise ConfigError("--resume needs --out DIR: the run directory to continue (its config.json holds the "
                              "run's settings)")
        saved = Path(args.out) / "config.json"
        if saved.is_file():
            from fedkd.coordinator.rundir import read_config_json

            values = {**read_config_json(saved), **values}
    try:  # the run-wide keys first, torch-free: a wrong value is named at once, before torch is imported
        config_from_mapping(values, resolve=False)
    except UnknownKeyError:
        pass  # it may be a method's option: the full check below names the method it belongs to
    return config_from_mapping(values)


def _figure(value: float | None) -> str:
    """A fraction for the table; "-" where nothing was measured (no labelled data at the coordinator)."""
    return "-" if value is None else f"{value:.4f}"


def _results_footer(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """The lines under the results table: what its columns mean, then the run's costs and where the student is."""
    s, q = summary["student"], summary["queries"]
    check = s.get("synthetic_check") or {}
    if s["agreement"] is not None:
        lines = ["test acc, agreement and loyalty are fractions (1 = all). agreement: share of test images where the "
                 "student picks the ensemble's class; loyalty: 1 - sqrt(Jensen-Shannon distance) between their "
                 "probabilities, averaged (1 = identical)"]
    elif check.get("agreement") is not None:
        lines = [f"no labelled data at the coordinator: accuracy was not measured (give eval-data=DIR). agreement and "
                 f"loyalty (*) were measured on {check['samples']:,} fresh synthetic samples the student never trained "
                 f"on (the ensemble's mean confidence there {check['ensemble_confidence']:.2f}): how closely the "
                 "student follows its teachers, not how accurate either is"]
    else:
        lines = ["no labelled data at the coordinator: nothing was scored (give eval-data=DIR to score the student)"
                 + (f"; {check['note']}" if check.get("note") else "")]
    federated = summary.get("federated_evaluation") or {}
    if "clients" in federated:  # institutions that evaluated the student on held-out data of their own
        rows = federated["clients"]
        refused = "; ".join(f"client {r['client']}: {r['why']}" for r in rows if not r["evaluated"])
        lines.append(f"the federated row: {sum(r['evaluated'] for r in rows)} of {len(rows)} institutions evaluated "
                     "the student on their own held-out data and released only the counts"
                     + (" (noised by their privacy policies)" if federated.get("noised") else "")
                     + (f"; not evaluated: {refused}" if refused else ""))
    if s["accuracy_mean"] is not None:
        lines.append(f"student accuracy over the epochs: mean {s['accuracy_mean']:.4f}, standard deviation "
                     f"{s['accuracy_var'] ** 0.5:.4f}")
    lines.append(f"queries: {q['samples']:,} samples, {q['bytes'] / 1e6:,.1f} MB"
                 + (f" (budget {q['budget']:,})" if q.get("budget") else "")
                 + f"; synthetic pool: {summary['pool']['samples'] or 0:,} samples; wall "
                 f"{summary['wall_seconds']:.0f} s")
    lines.append(f"the student: {run_dir / 'student.pt2'} (deploy: torch.export.load(...).module()), its card "
                 f"student.json, its weights student.pt (fedkd.load_student); everything else: {run_dir}")
    return lines


def _print_results(console: Console, summary: dict[str, Any], run_dir: Path) -> None:
    console.print(_results_table(summary, run_dir))
    for line in _results_footer(summary, run_dir):
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def _results_table(summary: dict[str, Any], run_dir: Path) -> Table:
    on = summary["dataset"] or f"task {summary['task']['name']!r}"
    held_out = (f"{summary['test_samples']} held-out test images" if summary["test_samples"]
                else "no labelled data at the coordinator")
    table = Table(title=f"fedkd {summary['method']} on {on} ({summary['num_clients']} clients, {held_out})")
    table.add_column("model")
    table.add_column("who", style="dim")
    table.add_column("test acc", justify="right")
    table.add_column("agreement", justify="right")
    table.add_column("loyalty", justify="right")
    for t in summary["teachers"]:
        held = "sample count kept private" if t["num_samples"] is None else f"{t['num_samples']} private samples"
        table.add_row(f"teacher {t['client']}", f"{t['model']}, {held}", _figure(t["test_accuracy"]), "", "")
    table.add_row("ensemble", f"{summary['ensemble']['aggregation']} of {len(summary['teachers'])} teachers",
                  _figure(summary["ensemble"]["test_accuracy"]), "", "", style="green")
    refs = summary["references"]
    if (refs.get("prob_mean_ensemble") or {}).get("test_accuracy") is not None:  # what the aggregation bought
        table.add_row("probability mean", "reference: the same answers, plainly averaged",
                      _figure(refs["prob_mean_ensemble"]["test_accuracy"]), "", "", style="dim")
    if refs.get("fedavg"):
        table.add_row("one-shot FedAvg", "reference: needs teacher weights", f"{refs['fedavg']['test_accuracy']:.4f}",
                      "", "", style="dim")
    if refs.get("centralised"):
        table.add_row("centralised", "reference: needs pooled data", f"{refs['centralised']['test_accuracy']:.4f}",
                      "", "", style="dim")
    s = summary["student"]
    check = s.get("synthetic_check") or {}
    unlabelled = s["agreement"] is None and check.get("agreement") is not None  # measured on synthetic samples
    refit = s.get("refit") or {}
    along = refit.get("along_the_way") or {}
    if along.get("accuracy") is not None:  # student-refit: what the run's epochs left, before the refit
        table.add_row("along the way", "the student the epochs trained, before the refit", _figure(along["accuracy"]),
                      _figure(along["agreement"]), _figure(along["loyalty"]), style="dim")
    refitted = (", refitted on the final pool" + (f" and {refit['blends']:,} blends" if refit.get("blends") else "")
                if refit else "")
    table.add_row("student", f"{s['model']}, data-free{refitted}",
                  _figure(s["test_accuracy"]),
                  _figure(check["agreement"] if unlabelled else s["agreement"]) + ("*" if unlabelled else ""),
                  _figure(check["loyalty"] if unlabelled else s["loyalty"]) + ("*" if unlabelled else ""),
                  style="bold")
    federated = summary.get("federated_evaluation") or {}
    if federated.get("student_accuracy") is not None:
        where = "the nodes hold" if "nodes" in federated else "the institutions hold"
        noised = ", noised counts" if federated.get("noised") else ""
        table.add_row("student", f"on {int(federated.get('num_examples') or 0)} examples {where} (federated{noised})",
                      _figure(federated["student_accuracy"]), "", "", style="bold")
    return table


def _out(args: argparse.Namespace, config: RunConfig) -> Path:
    if config.flower.resume_from:
        raise ConfigError(f"resume-from: {config.flower.resume_from!r} is the Flower app's way to continue a run; here "
                          f"pass --out {config.flower.resume_from} --resume")
    name = config.dataset if not config.task else Path(config.task).stem
    if args.out:
        out = Path(args.out)
    else:
        out = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{name}-{config.method}")
        if not args.resume:
            out = _claim_fresh(out)
    args.run_dir = out  # named by the Ctrl-C message
    return out


def _claim_fresh(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first of them no other run holds, claimed by creating it (two
    runs started in the same second get a directory each; checking for a free name first would race)."""
    for n in range(1, 10_000):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            continue
        return out
    raise ConfigError(f"no free run directory beside {str(base)!r}; pass --out")


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = _build_config(args)  # (before torch is imported: a wrong key is named at once)
    out = _out(args, config)
    from fedkd.coordinator.experiment import run_experiment

    from .loopback import grpc_transport

    transport = grpc_transport if config.queries.transport == "grpc" else None
    with ConsoleObserver(console, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch) as observer:
        summary = run_experiment(config, out, resume=args.resume, observer=observer, transport=transport)
    _print_results(console, summary, out)
    return 0


def _server_tls(args: argparse.Namespace, out: Path, console: Console) -> ServerTLS | None:
    from fedkd.tls import read_certificates, read_private_key, run_pki

    from .credentials import ServerTLS

    if args.insecure:
        if args.cert or args.client_ca:
            raise ConfigError("--insecure cannot be combined with --cert or --client-ca")
        console.log("[bold red]plaintext hub[/]: tokens and queries travel unencrypted (loopback experiments only)")
        return None
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert and --key go together")
    if args.cert:
        cert, key = read_certificates(args.cert, "--cert"), read_private_key(args.key, "--key")
    else:
        host = args.listen.rsplit(":", 1)[0]
        hosts = [h for h in dict.fromkeys([host, "localhost", "127.0.0.1", *args.hosts.split(",")]) if h
                 and h not in ("0.0.0.0", "[::]")]
        existed = (out / "tls" / "ca.pem").exists()
        pki = run_pki(out / "tls", hosts=hosts)
        console.log(f"no --cert given: {'reusing the run' if existed else 'created a'} development CA; give teachers "
                    f"--ca {pki.ca_cert} (server certificate for {', '.join(hosts)})")
        cert, key = pki.server_cert.read_bytes(), pki.server_key.read_bytes()
    client_ca = read_certificates(args.client_ca, "--client-ca") if args.client_ca else None
    return ServerTLS(cert, key, client_ca)


def cmd_distill(args: argparse.Namespace, console: Console) -> int:
    given = _config_values(args)
    config = _build_config(args, given)
    from .distill import run_distillation, teacher_names

    out = _out(args, config)
    if "transport" in given:  # (the user's keys: a resumed run's config.json says grpc, which distill wrote)
        raise ConfigError("transport: fedkd distill always serves teachers over gRPC; leave transport unset")
    config = config.replace(num_clients=args.teachers, queries=replace(config.queries, transport="grpc"))
    tls = _server_tls(args, out, console)
    token_dir = Path(args.token_dir) if args.token_dir else out / "tokens"
    serves = (f"--model SPEC --weights FILE --task {config.task}" if config.task else "--checkpoint TEACHER.pt")
    console.log(f"each teacher runs: fedkd teacher {serves} --connect {args.listen} "
                f"--token-file {token_dir}/<{teacher_names(1)[0]} ...>.token"
                + (f" --ca {out / 'tls' / 'ca.pem'}" if tls and not args.cert else ""))
    with ConsoleObserver(console, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch) as observer:
        summary = run_distillation(config, out, listen=args.listen, teachers=args.teachers, tls=tls,
                                   token_dir=token_dir, wait=args.wait, resume=args.resume, observer=observer)
    _print_results(console, summary, out)
    return 0


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from fedkd.tls import make_dev_pki

    from .distill import teacher_names

    hosts = [h for h in args.hosts.split(",") if h]
    pki = make_dev_pki(args.out, hosts=hosts, clients=teacher_names(args.clients), days=args.days)
    console.print(f"CA: {pki.ca_cert}\nhub: --cert {pki.server_cert} --key {pki.server_key} (valid for "
                  f"{', '.join(hosts)})")
    for name, (cert, key) in pki.clients.items():
        console.print(f"{name}: --cert {cert} --key {key}")
    console.print(f"teachers: --ca {pki.ca_cert}; with client certificates, the hub adds --client-ca {pki.ca_cert}")
    return 0


def cmd_keys(args: argparse.Namespace, console: Console) -> int:
    from fedkd.options import toml_value

    from .keys import every_key

    table = Table(title="fedkd config keys (TOML, --set KEY=VALUE, Flower run config); docs/configuration.md")
    table.add_column("key", no_wrap=True)
    table.add_column("default")
    table.add_column("allowed")
    table.add_column("meaning")
    where = {"run": "", "flower": "[dim](Flower app only)[/] ", "client": "[dim](each client's own)[/] "}
    method = None
    for row in every_key():
        if row.method != method:
            method = row.method
            table.add_section()
            table.add_row(f"[bold]{method}.*[/]", "", "", f"options of method={method}; a \\[{method}] table in TOML")
        table.add_row(row.key, toml_value(row.default), row.allowed, where[row.scope] + row.meaning)
    console.print(table)
    return 0


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from .simulate import simulate

    values = _config_values(args)
    if args.clients is not None:
        values["num-clients"] = args.clients
    code, status = simulate(values, flwr_home=Path(args.flwr_home) if args.flwr_home else None, raw=args.raw)
    detail = status.get("status-details")
    console.print(f"Flower run {status.get('run-id', '?')}: {status.get('status')}"
                  + (f" ({detail})" if detail and detail != "N/A" else ""), soft_wrap=True, highlight=False)
    run_dir = Path(status["run-dir"]) if status.get("run-dir") else None
    if code == 0 and run_dir is not None and (run_dir / "summary.json").is_file():
        _print_results(console, json.loads((run_dir / "summary.json").read_text()), run_dir)
    return code


def cmd_partition(args: argparse.Namespace, console: Console) -> int:
    from fedkd.data import export_node_files, load_dataset
    from fedkd.institution.training import client_partitions

    config = _build_config(args)
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    parts = client_partitions(config, split.train.labels)
    for path in export_node_files(split, parts, args.out, seed=config.seed):
        console.print(f"{path}  (--node-config 'data-path=\"{path.resolve()}\"')")
    return 0


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    """The run's exported student on a labelled ImageFolder: per-class accuracy, and every prediction as CSV."""
    import csv

    import torch

    from fedkd.data import DatasetNotFoundError, load_image_folder
    from fedkd.task import Task

    run = Path(args.student)
    card_path = run / "student.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{str(card_path)!r} does not exist; --student takes a run directory fedkd wrote")
    try:
        card = json.loads(card_path.read_text())
        task = Task.from_mapping(card["task"], where=str(card_path))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(card_path)!r} is not a student's model card ({exc})") from None
    program = run / "student.pt2"
    if not program.is_file():
        raise FileNotFoundError(f"{str(program)!r} does not exist (the run's exported student)")
    try:
        student = torch.export.load(program).module()
    except Exception as exc:  # torch raises many kinds for a file that is not an exported program
        raise ConfigError(f"{str(program)!r} is not a torch.export program ({type(exc).__name__})") from None
    paths: list[str] = []
    try:
        data = load_image_folder(args.data, task.classes, task.input_shape, paths=paths)
    except DatasetNotFoundError:
        raise
    except ValueError as exc:
        raise ConfigError(f"--data: {exc}") from None
    inputs = task.spec.normalize(data.images)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(student(inputs[i:i + 512]), 1) for i in range(0, len(inputs), 512)])
    predicted = probs.argmax(1)
    table = Table(title=f"the student of {run} on {args.data} ({len(data)} images)")
    for column, justify in (("class", "left"), ("images", "right"), ("accuracy", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for k, name in enumerate(task.classes):
        mine = data.labels == k
        table.add_row(name, str(int(mine.sum())), f"{float((predicted[mine] == k).float().mean()):.4f}"
                      if bool(mine.any()) else "-")
    table.add_row("all", str(len(data)), f"{float((predicted == data.labels).float().mean()):.4f}", style="bold")
    console.print(table)
    out = Path(args.out) if args.out else run / "predictions.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", "confidence"])
        for path, label, guess, p in zip(paths, data.labels.tolist(), predicted.tolist(), probs.max(1).values):
            writer.writerow([path, task.classes[label], task.classes[guess], f"{float(p):.4f}"])
    console.print(f"predictions: {out}")
    return 0


RUN_EPILOG = """examples:
  fedkd run                                       the main job: MNIST-5k, 5 clients, CuDFKD
  fedkd run --set dataset=digits --set epochs=2   any config key as --set KEY=VALUE (fedkd keys lists them)
  fedkd run --config exp.toml --out runs/exp      keys from a TOML file, into a chosen run directory
  fedkd run --out runs/exp --resume               continue an interrupted run with its own settings

The run directory holds config.json, metrics.jsonl, summary.json, plots/ and the student (student.pt2 to
deploy with torch.export, student.json its card, student.pt its weights)."""

DISTILL_EPILOG = """The coordinator needs no data: it needs the task the teachers serve, either a built-in dataset's
(--set dataset=NAME; their held-out images then score the student) or a task card (--set task=task.toml, for
institutions' own models; --set eval-data=DIR to score the student on a labelled ImageFolder you hold).

examples:
  fedkd distill --listen 0.0.0.0:50051 --teachers 3 --set task=derm7.toml
  fedkd distill --listen 127.0.0.1:50051 --teachers 2 --insecure --set dataset=digits"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description="Federated data-free knowledge distillation: one "
                                     "student from many institutions' classifiers, without sharing their data.",
                                     epilog="Config keys (fedkd keys) go after a command as --set KEY=VALUE.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fedkd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatted = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser("run", help="run an experiment on one machine (teachers in-process, or with "
                         "transport=grpc as agent processes on loopback)", formatter_class=formatted,
                         description="Run an experiment on one machine: train each client's teacher on its share "
                         "of a built-in dataset, distil a student from them data-free, and score it.",
                         epilog=RUN_EPILOG)
    run.add_argument("--config", help="TOML file of config keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable; fedkd keys "
                     "lists them)")
    run.add_argument("--out", help="run directory (default: runs/<time>-<dataset>-<method>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                     "with the settings in its config.json")
    run.set_defaults(func=cmd_run)
    for name in ("distill", "hub"):
        d = sub.add_parser(name, help="coordinator: open the hub, wait for teachers to dial in, distil"
                           + (" (same as distill)" if name == "hub" else ""), formatter_class=formatted,
                           description="The coordinator of a real consortium: open the hub, issue each "
                           "institution's token, wait for the teachers to dial in, distil the student.",
                           epilog=DISTILL_EPILOG)
        d.add_argument("--listen", required=True, metavar="HOST:PORT", type=address,
                       help="address to listen on, e.g. 0.0.0.0:50051")
        d.add_argument("--teachers", type=argument(int, 1, 1000), required=True,
                       help="number of teachers that will connect")
        d.add_argument("--config", help="TOML file of config keys")
        d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable; fedkd "
                       "keys lists them)")
        d.add_argument("--out", help="run directory (default: runs/<time>-<dataset>-<method>)")
        d.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                       "with the settings in its config.json")
        d.add_argument("--cert", help="hub certificate chain (PEM); default: a development CA in <out>/tls")
        d.add_argument("--key", help="key of --cert (PEM)")
        d.add_argument("--hosts", default="", help="extra names/addresses for the development certificate")
        d.add_argument("--client-ca", help="require client certificates signed by this CA (mutual TLS); "
                       "the certificate's common name is the teacher's name, no token needed")
        d.add_argument("--insecure", action="store_true", help="plaintext (loopback experiments only)")
        d.add_argument("--token-dir", help="where the per-teacher tokens are (created when missing; "
                       "default <out>/tokens)")
        d.add_argument("--wait", type=argument(float, 0.0, TIMEOUT_LIMIT), default=600.0,
                       help="seconds to wait for all teachers (default 600)")
        d.set_defaults(func=cmd_distill)
    teacher = sub.add_parser("teacher", help="institution: serve a teacher (a checkpoint, or your own model) to a "
                             "coordinator's hub")
    add_teacher_arguments(teacher)
    train = sub.add_parser("train-teacher", help="institution: train a teacher on your own data (an ImageFolder), "
                           "DP-SGD optional")
    add_training_arguments(train)
    certs = sub.add_parser("certs", help="create a development CA, a hub certificate and teacher certificates")
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument("--hosts", default="localhost,127.0.0.1", help="names/addresses the hub is reached at")
    certs.add_argument("--clients", type=argument(int, 0, 1000), default=0,
                       help="client certificates for teacher-000.. (mutual TLS)")
    certs.add_argument("--days", type=argument(int, 1, 3650), default=30, help="validity in days (default 30)")
    certs.set_defaults(func=cmd_certs)
    sim = sub.add_parser("simulate", help="the Flower app in Flower's simulation engine (flwr run . --stream, "
                         "offline, one SuperNode per client); exits 1 when the run fails")
    sim.add_argument("--clients", type=argument(int, 1, 1000),
                     help="number of clients (= num-clients and num-supernodes)")
    sim.add_argument("--config", help="TOML file of config keys")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
    sim.add_argument("--flwr-home", help="FLWR_HOME for the local SuperLink (default ~/.cache/fedkd/flwr-home)")
    sim.add_argument("--raw", action="store_true", help="Flower's whole log as it streams (default: fedkd's "
                     "lines, Flower's warnings and errors)")
    sim.set_defaults(func=cmd_simulate)
    part = sub.add_parser("partition", help="write one .npz per client (its partition and held-out share) to try "
                          "a deployment with --node-config data-path")
    part.add_argument("--config", help="TOML file of config keys")
    part.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
    part.add_argument("--out", required=True, help="directory for client-NNN.npz")
    part.set_defaults(func=cmd_partition)
    predict = sub.add_parser("predict", help="a run's exported student on a labelled ImageFolder: per-class "
                             "accuracy, and predictions as CSV")
    predict.add_argument("--student", required=True, metavar="RUN_DIR", help="the run directory (student.pt2, "
                         "student.json)")
    predict.add_argument("--data", required=True, metavar="DIR", help="an ImageFolder: one sub-folder per class, "
                         "named as the task's classes")
    predict.add_argument("--out", help="the CSV of predictions (default RUN_DIR/predictions.csv)")
    predict.set_defaults(func=cmd_predict)
    keys = sub.add_parser("keys", help="list every config key: its default, allowed values, meaning and where it "
                          "applies")
    keys.set_defaults(func=cmd_keys)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # where a misuse of the command is reported
    return parser


FLAG = re.compile(r"--([a-z][a-z0-9_.-]*)(?:=(.*))?$")


def _flag_hint(unknown: list[str]) -> str | None:
    """For ``fedkd run --epochs 2``: the --set that was meant, when the flag is a config key."""
    match = FLAG.match(unknown[0]) if unknown else None
    if match is None:
        return None
    from .keys import every_key

    key = match.group(1).replace("_", "-")
    if key not in {row.key for row in every_key()}:
        return None
    value = match.group(2) if match.group(2) is not None else (
        unknown[1] if len(unknown) > 1 and not unknown[1].startswith("--") else "VALUE")
    return (f"{unknown[0].split('=')[0]} is a config key, not an option: give it as --set {key}={value} (fedkd "
            "keys lists them)")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; a config key given as a flag (``--epochs 2``) is pointed to ``--set epochs=2``."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = _flag_hint(unknown)
        where = getattr(args, "command_parser", parser)
        if hint is None:
            import difflib

            flags = [o for action in where._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
            hint = f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {close[0]}?" if close else "")
        where.error(hint)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "teacher":
        from fedkd.client.cli import command as teacher

        return teacher(args)
    if args.command == "train-teacher":
        from fedkd.client.train import command as train

        return train(args)
    from rich.logging import RichHandler

    console = Console(stderr=False, log_path=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a log file or a pipe: rich's 80 columns would fold every row of the results table
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        return int(args.func(args, console))
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        again = (f"fedkd {args.command} --out {run_dir} --resume" if run_dir is not None else None)
        if again and args.command in ("distill", "hub"):
            again = (f"fedkd {args.command} --listen {args.listen} --teachers {args.teachers} --out {run_dir} "
                     "--resume (and the same --cert/--key or --insecure)")
        print("fedkd: interrupted" + (f"; continue with: {again}" if again else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
