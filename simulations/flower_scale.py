"""Flower at scale: the app in Flower's simulation engine with many clients, and a bare `flwr run .`.

    python simulations/flower_scale.py                       # fedkd run, bare flwr run ., then 20 and 50 clients
    python simulations/flower_scale.py --clients 10 --no-bare --no-reference
    python simulations/flower_scale.py --clients "" --set epochs=1     # reference and bare only, one epoch

Each run is ``fedkd simulate`` (``flwr run . --stream`` with a fresh FLWR_HOME, the runtime-dependency
install off, a local SuperLink stopped afterwards) on MNIST-5k split among the clients as the default
says (Dirichlet 0.5), every other key at its default; the bare run passes nothing at all (the
federation's defaults: 2 SuperNodes). Printed
per run: status, wall time, peak memory (the summed proportional set size of the run's processes: the
SuperLink and everything it started, the simulation workers with every teacher and the ServerApp with
the hub, sampled every 0.5 s), the best teacher, the ensemble and the student, and where the run's time went
(its synthesis epochs and its student refit, from ``metrics.jsonl``). First, unless ``--no-reference``, the
same work without Flower: ``fedkd run --set num-clients=2`` (the bare run's two clients, teachers in process),
so that the Flower rows are read against a run of the same session (the host's speed has differed 1.8x between
sessions). Writes ``flower-scale.md`` under ``--results`` (``flower-scale-CLIENTS.md`` for other ``--clients``:
``flower-scale-2.md`` for ``--clients ""``, the reference and the bare run alone).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedkd.server.simulate import run_processes, simulate  # noqa: E402

from fedkd.config import config_from_mapping, parse_assignments  # noqa: E402
from fedkd.options import ConfigError  # noqa: E402


def _pss_kib(pid: int) -> int:
    """A process's proportional set size (shared pages split among their users), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """The run's peak memory: the summed PSS of the local SuperLink started for ``flwr_home`` and everything it
    started (the simulation process, Ray, its workers with every teacher, the ServerApp with the hub), sampled in
    a thread. Other processes on the machine are not counted."""

    def __init__(self, flwr_home: Path, every: float = 0.5) -> None:
        self.flwr_home, self.every, self.peak_kib = flwr_home, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            pids = run_processes(self.flwr_home)
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in pids))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak_kib / 2 ** 20


def time_split(run_dir: Path) -> dict[str, float]:
    """Seconds of a run's synthesis epochs and of its student refit, from its ``metrics.jsonl`` (one line per
    epoch with ``epoch_seconds``; the refit's line has ``stage: refit``); a run without a refit has 0 there."""
    epochs = refit = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("stage") == "refit":
                refit += float(record["epoch_seconds"])
            else:
                epochs += float(record["epoch_seconds"])
    return {"epoch_seconds": epochs, "refit_seconds": refit}


def _row_from(run_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` completed from a finished run directory's summary and metrics."""
    summary = json.loads((run_dir / "summary.json").read_text())
    row.update({"clients": summary["config"]["num-clients"],
                "best_teacher": max(t["test_accuracy"] for t in summary["teachers"]),
                "ensemble": summary["ensemble"]["test_accuracy"],
                "student": summary["student"]["test_accuracy"],
                "run_seconds": summary["wall_seconds"], **time_split(run_dir)})
    return row


def reference_run(run_dir: Path, timeout: float, changes: dict[str, str] | None = None) -> dict[str, Any]:
    """``fedkd run --set num-clients=2`` into a fresh directory under ``run_dir``: the bare run's work without
    Flower (two teachers in process, no gRPC), timed the same way (wall from the command's start, peak memory of
    its process)."""
    run_dir = run_dir / time.strftime("run-%Y%m%d-%H%M%S")  # fresh each time, as the Flower runs' are
    command = [sys.executable, "-c", "import sys; from fedkd.cli import main; sys.exit(main())",
               "run", "--set", "num-clients=2", "--out", str(run_dir)]
    for key, value in (changes or {}).items():
        command += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None and time.perf_counter() - started < timeout:
        peak = max(peak, _pss_kib(process.pid))
        time.sleep(0.5)
    if process.poll() is None:
        process.kill()
    _, err = process.communicate()
    row: dict[str, Any] = {"clients": 2, "status": "completed" if process.returncode == 0 else
                           f"failed ({process.returncode})", "wall_seconds": time.perf_counter() - started,
                           "peak_memory_gib": peak / 2 ** 20}
    if process.returncode == 0:
        return _row_from(run_dir, row)
    row["log_tail"] = err[-2000:]
    return row


def one_run(clients: int | None, run_dir: Path, timeout: float,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    changes: dict[str, Any] = {**(overrides or {}), "run-dir": str(run_dir)}
    if clients is not None:
        changes["num-clients"] = clients
    log = io.StringIO()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as tmp:
        home = Path(tmp).resolve()
        with PeakMemory(home) as memory:
            code, status = simulate(changes, flwr_home=home, stream=log, timeout=timeout, bare=clients is None)
    wall = time.perf_counter() - started
    row: dict[str, Any] = {"clients": clients, "status": status.get("status"), "wall_seconds": wall,
                           "peak_memory_gib": memory.peak_gib}
    summaries = sorted(run_dir.glob("run-*/summary.json"), key=lambda p: p.stat().st_mtime)
    if code == 0 and summaries:
        _row_from(summaries[-1].parent, row)
        row["failed_nodes"] = len(json.loads(summaries[-1].read_text())["flower"]["failed"])
    else:
        row["log_tail"] = log.getvalue()[-2000:]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="20,50", help="comma-separated numbers of simulated clients")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare `flwr run .`")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference run without Flower (`fedkd run --set num-clients=2`)")
    parser.add_argument("--runs", default="runs/flower-scale")
    parser.add_argument("--results", default="simulations/results")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a run-config key for every run (repeatable), e.g. --set epochs=1")
    args = parser.parse_args(argv)
    try:
        # as `fedkd simulate --set` and `fedkd run --set` take them: each typed where the config resolves it
        overrides = parse_assignments(args.set)
        if bad := sorted({"num-clients", "run-dir"} & set(overrides)):
            raise ConfigError(f"--set {', '.join(bad)}: set by this benchmark itself (--clients, --runs)")
        config_from_mapping(overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    plan: list[int | str | None] = (([] if args.no_reference else ["reference"]) + ([] if args.no_bare else [None])
                                    + [int(c) for c in args.clients.split(",") if c])
    rows = []
    for clients in plan:
        name = "reference" if clients == "reference" else "bare" if clients is None else f"clients-{clients}"
        print(f"{name}: running", file=sys.stderr, flush=True)
        if clients == "reference":
            row = reference_run(Path(args.runs) / name, args.timeout, overrides)
        else:
            row = one_run(clients if isinstance(clients, int) else None, Path(args.runs) / name, args.timeout,
                          overrides)
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    lines = ["Made by `python simulations/flower_scale.py"
             + (f" --clients {args.clients or chr(34) * 2}" if args.clients != "20,50" else "")
             + (" --no-bare" if args.no_bare else "") + (" --no-reference" if args.no_reference else "")
             + "".join(f" --set {a}" for a in args.set)
             + "` (MNIST-5k, Dirichlet(0.5), every other key at its default; one run after the other).",
             "",
             "| run | clients | status | wall (s) | of it: epochs / refit (s) | peak memory (GiB) | best teacher | "
             "ensemble | student | student - best teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
    for clients, r in zip(plan, rows):
        name = ("`fedkd run --set num-clients=2` (no Flower)" if clients == "reference" else
                "`flwr run .` (bare)" if clients is None else f"`fedkd simulate --set num-clients={clients}`")
        if "student" in r:
            lines.append(f"| {name} | {r['clients']} | {r['status']} | {r['wall_seconds']:.0f} | "
                         f"{r['epoch_seconds']:.0f} / {r['refit_seconds']:.0f} | "
                         f"{r['peak_memory_gib']:.2f} | {r['best_teacher']:.4f} | {r['ensemble']:.4f} | "
                         f"{r['student']:.4f} | {r['student'] - r['best_teacher']:+.4f} |")
        else:
            lines.append(f"| {name} | {r['clients']} | {r['status']} | {r['wall_seconds']:.0f} | | "
                         f"{r['peak_memory_gib']:.2f} | | | | |")
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    # the default plan's table is flower-scale.md; another plan's is named by its clients, so it never replaces it
    name = "flower-scale" + ("" if args.clients == "20,50" else "-" + (args.clients.replace(",", "-") or "2"))
    (Path(args.results) / f"{name}.md").write_text(text)
    print(text)
    return 0 if all("student" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
