"""The ``fedkd`` command: thin entry points that parse, build and delegate.

    fedkd run [--config FILE.toml] [--set KEY=VALUE ...] [--out DIR] [--resume]
    fedkd distill --listen HOST:PORT --teachers N [--cert F --key F | --insecure] ...   (alias: fedkd hub)
    fedkd teacher --checkpoint FILE --connect HOST:PORT --token-file FILE [--ca FILE]
    fedkd certs --out DIR [--hosts NAME,...] [--clients N]
    fedkd simulate [--clients N] [--set KEY=VALUE ...]   # the Flower app: flwr run . --stream, offline
    fedkd partition --out DIR [--set KEY=VALUE ...]      # one .npz per client, to try a deployment
    fedkd keys            # every config key with its default and allowed values
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fedkd.client.cli
import fedkd.client.train
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedkd.checkpoint import CheckpointError
from fedkd.config import RunConfig, config_from_mapping, load_config_file, parse_assignments
from fedkd.coordinator.experiment import run_experiment
from fedkd.coordinator.pool import QuorumError
from fedkd.coordinator.rundir import RunDirectoryError
from fedkd.data import DatasetNotFoundError
from fedkd.options import TIMEOUT_LIMIT, ConfigError, address, argument
from fedkd.tls import CertificateError, make_dev_pki, read_certificates, read_private_key, run_pki

from .credentials import ServerTLS
from .distill import run_distillation, teacher_names
from .hub import ListenError
from .loopback import grpc_transport

USER_ERRORS = (ConfigError, CheckpointError, DatasetNotFoundError, RunDirectoryError, QuorumError, TimeoutError,
               FileNotFoundError, CertificateError, ListenError)


class RichObserver:
    """Progress bar and stage messages for a run."""

    def __init__(self, console: Console, progress: Progress, *, epochs: int, steps_per_epoch: int) -> None:
        self.console = console
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.task = progress.add_task("distilling", total=epochs * steps_per_epoch, start=False)
        self.last = ""

    def stage(self, message: str) -> None:
        self.console.log(message)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        self.progress.start_task(self.task)
        self.progress.update(self.task, description=f"epoch {epoch + 1}{self.last}")

    def step(self) -> None:
        self.progress.advance(self.task)

    def epoch_finished(self, record: dict[str, Any]) -> None:
        acc = record["student_accuracy"]
        self.last = f" (student {acc:.3f})" if acc is not None else ""
        self.progress.update(self.task, completed=(record["epoch"] + 1) * self.steps_per_epoch)


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given by --config and --set (later wins), unresolved."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    values.update(parse_assignments(args.set or []))
    return values


def _build_config(args: argparse.Namespace) -> RunConfig:
    return config_from_mapping(_config_values(args))


def _figure(value: float | None) -> str:
    """A fraction for the table; "-" where nothing was measured (no labelled data at the coordinator)."""
    return "-" if value is None else f"{value:.4f}"


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
    if refs.get("fedavg"):
        table.add_row("one-shot FedAvg", "reference: needs teacher weights", f"{refs['fedavg']['test_accuracy']:.4f}",
                      "", "", style="dim")
    if refs.get("centralised"):
        table.add_row("centralised", "reference: needs pooled data", f"{refs['centralised']['test_accuracy']:.4f}",
                      "", "", style="dim")
    s = summary["student"]
    table.add_row("student", f"{s['model']}, data-free", _figure(s["test_accuracy"]), _figure(s["agreement"]),
                  _figure(s["loyalty"]), style="bold")
    q = summary["queries"]
    over_epochs = ("accuracy over epochs: not measured" if s["accuracy_mean"] is None else
                   f"accuracy over epochs: mean {100 * s['accuracy_mean']:.2f} %, variance "
                   f"{1e4 * s['accuracy_var']:.2f} %^2")
    table.caption = (f"{over_epochs} | queries: {q['samples']:,} samples, "
                     f"{q['bytes'] / 1e6:,.1f} MB" + (f" (budget {q['budget']:,})" if q.get("budget") else "")
                     + f" | synthetic pool: {summary['pool']['samples'] or 0:,} samples | wall "
                     f"{summary['wall_seconds']:.0f} s | run directory: {run_dir} (student.pt, student.pt2, "
                     "student.json)")
    return table


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _out(args: argparse.Namespace, config: RunConfig) -> Path:
    if config.resume_from:
        raise ConfigError(f"resume-from: {config.resume_from!r} is the Flower app's way to continue a run; here "
                          f"pass --out {config.resume_from} --resume")
    default_out = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{config.dataset}-{config.method}")
    return Path(args.out) if args.out else default_out


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = _build_config(args)
    out = _out(args, config)
    transport = grpc_transport if config.transport == "grpc" else None
    with _progress(console) as progress:
        observer = RichObserver(console, progress, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch)
        summary = run_experiment(config, out, resume=args.resume, observer=observer, transport=transport)
    console.print(_results_table(summary, out))
    return 0


def _server_tls(args: argparse.Namespace, out: Path, console: Console) -> ServerTLS | None:
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
    config = _build_config(args)
    out = _out(args, config)
    if config.transport != "inprocess":
        raise ConfigError("transport: fedkd distill always serves teachers over gRPC; leave transport unset")
    config = config.replace(num_clients=args.teachers, transport="grpc")
    tls = _server_tls(args, out, console)
    token_dir = Path(args.token_dir) if args.token_dir else out / "tokens"
    serves = (f"--model SPEC --weights FILE --task {config.task}" if config.task else "--checkpoint TEACHER.pt")
    console.log(f"each teacher runs: fedkd teacher {serves} --connect {args.listen} "
                f"--token-file {token_dir}/<{teacher_names(1)[0]} ...>.token"
                + (f" --ca {out / 'tls' / 'ca.pem'}" if tls and not args.cert else ""))
    with _progress(console) as progress:
        observer = RichObserver(console, progress, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch)
        summary = run_distillation(config, out, listen=args.listen, teachers=args.teachers, tls=tls,
                                   token_dir=token_dir, wait=args.wait, resume=args.resume, observer=observer)
    console.print(_results_table(summary, out))
    return 0


def cmd_teacher(args: argparse.Namespace, console: Console) -> int:
    return fedkd.client.cli.command(args)


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
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
    code, status = simulate(values, flwr_home=Path(args.flwr_home) if args.flwr_home else None)
    detail = status.get("status-details")
    console.print(f"Flower run {status.get('run-id', '?')}: {status.get('status')}"
                  + (f" ({detail})" if detail and detail != "N/A" else ""))
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

    from fedkd.data import load_image_folder
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description="Federated data-free knowledge distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment on one machine (teachers in-process, or with "
                         "transport=grpc as agent processes on loopback)")
    run.add_argument("--config", help="TOML file of config keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<time>-<dataset>-<method>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.set_defaults(func=cmd_run)
    for name in ("distill", "hub"):
        d = sub.add_parser(name, help="coordinator: open the hub, wait for teachers to dial in, distil"
                           + (" (same as distill)" if name == "hub" else ""))
        d.add_argument("--listen", required=True, metavar="HOST:PORT", type=address,
                       help="address to listen on, e.g. 0.0.0.0:50051")
        d.add_argument("--teachers", type=argument(int, 1, 1000), required=True,
                       help="number of teachers that will connect")
        d.add_argument("--config", help="TOML file of config keys")
        d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
        d.add_argument("--out", help="run directory (default: runs/<time>-<dataset>-<method>)")
        d.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
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
    fedkd.client.cli.add_arguments(teacher)
    teacher.set_defaults(func=cmd_teacher)
    train = sub.add_parser("train-teacher", help="institution: train a teacher on your own data (an ImageFolder), "
                           "DP-SGD optional")
    fedkd.client.train.add_arguments(train)
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
    keys = sub.add_parser("keys", help="list every config key with its default")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "teacher":
        return fedkd.client.cli.command(args)
    if args.command == "train-teacher":
        return fedkd.client.train.command(args)
    console = Console(stderr=False, log_path=False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        return int(args.func(args, console))
    except USER_ERRORS as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedkd: interrupted; continue with --resume and the same --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
