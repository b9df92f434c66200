"""The ``fedkd`` command: thin entry points that parse, build and delegate.

    fedkd run [--config FILE.toml] [--set KEY=VALUE ...] [--out DIR] [--resume]
    fedkd keys            # every config key with its default and allowed values
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedkd.checkpoint import CheckpointError
from fedkd.config import ConfigError, RunConfig, config_from_mapping, load_config_file, parse_assignments
from fedkd.data import DatasetNotFoundError
from fedkd.experiment import RunDirectoryError, run_experiment

USER_ERRORS = (ConfigError, CheckpointError, DatasetNotFoundError, RunDirectoryError)


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
        self.last = f" (student {record['student_accuracy']:.3f})"
        self.progress.update(self.task, completed=(record["epoch"] + 1) * self.steps_per_epoch)


def _build_config(args: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    values.update(parse_assignments(args.set or []))
    return config_from_mapping(values)


def _results_table(summary: dict[str, Any], run_dir: Path) -> Table:
    table = Table(title=f"fedkd {summary['method']} on {summary['dataset']} "
                        f"({summary['num_clients']} clients, {summary['test_samples']} held-out test images)")
    table.add_column("model")
    table.add_column("who", style="dim")
    table.add_column("test acc", justify="right")
    table.add_column("agreement", justify="right")
    table.add_column("loyalty", justify="right")
    for t in summary["teachers"]:
        table.add_row(f"teacher {t['client']}", f"{t['model']}, {t['num_samples']} private samples",
                      f"{t['test_accuracy']:.4f}", "", "")
    table.add_row("ensemble", f"{summary['ensemble']['aggregation']} of {len(summary['teachers'])} teachers",
                  f"{summary['ensemble']['test_accuracy']:.4f}", "", "", style="green")
    refs = summary["references"]
    if refs.get("fedavg"):
        table.add_row("one-shot FedAvg", "reference: needs teacher weights", f"{refs['fedavg']['test_accuracy']:.4f}",
                      "", "", style="dim")
    if refs.get("centralised"):
        table.add_row("centralised", "reference: needs pooled data", f"{refs['centralised']['test_accuracy']:.4f}",
                      "", "", style="dim")
    s = summary["student"]
    table.add_row("student", f"{s['model']}, data-free", f"{s['test_accuracy']:.4f}", f"{s['agreement']:.4f}",
                  f"{s['loyalty']:.4f}", style="bold")
    q = summary["queries"]
    table.caption = (f"accuracy over epochs: mean {100 * s['accuracy_mean']:.2f} %, variance "
                     f"{1e4 * s['accuracy_var']:.2f} %^2 | queries: {q['samples']:,} samples, "
                     f"{q['bytes'] / 1e6:,.1f} MB | wall {summary['wall_seconds']:.0f} s | run directory: {run_dir}")
    return table


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = _build_config(args)
    default_out = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{config.dataset}-{config.method}")
    out = Path(args.out) if args.out else default_out
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        observer = RichObserver(console, progress, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch)
        summary = run_experiment(config, out, resume=args.resume, observer=observer)
    console.print(_results_table(summary, out))
    return 0


def cmd_keys(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="fedkd config keys (TOML, --set KEY=VALUE, Flower run config)")
    table.add_column("key")
    table.add_column("default")
    table.add_column("allowed")
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        allowed = ", ".join(meta["choices"]) if "choices" in meta else ""
        if meta.get("low") is not None or meta.get("high") is not None:
            low = meta.get("low")
            allowed = f"{'>' if meta.get('open_low') else '>='} {low}" if low is not None else ""
            if meta.get("high") is not None:
                allowed += f", <= {meta['high']}"
        table.add_row(f.name.replace("_", "-"), repr(f.default), allowed)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description="Federated data-free knowledge distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment on one machine (teachers in-process)")
    run.add_argument("--config", help="TOML file of config keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<time>-<dataset>-<method>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.set_defaults(func=cmd_run)
    keys = sub.add_parser("keys", help="list every config key with its default")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
