"""Flower at scale: the app in Flower's simulation engine with many clients, and a bare `flwr run .`.

    python simulations/flower_scale.py                       # bare flwr run ., then 20 and 50 clients
    python simulations/flower_scale.py --clients 10 --no-bare

Each run is ``fedkd simulate`` (``flwr run . --stream`` with a fresh FLWR_HOME, the runtime-dependency
install off, a local SuperLink stopped afterwards) on MNIST-5k split among the clients as the default
says (Dirichlet 0.5), every other key at its default; the bare run passes nothing at all (the
federation's defaults: 2 SuperNodes). Printed
per run: status, wall time, peak memory (the summed proportional set size of the run's processes: the
SuperLink and everything it started, the simulation workers with every teacher and the ServerApp with
the hub, sampled every 0.5 s), the best teacher, the ensemble and the student. Writes
``flower-scale.md`` under ``--results``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedkd.server.simulate import run_processes, simulate  # noqa: E402


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


def one_run(clients: int | None, run_dir: Path, timeout: float) -> dict[str, Any]:
    changes: dict[str, Any] = {"run-dir": str(run_dir)}
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
        summary = json.loads(summaries[-1].read_text())
        row.update({"clients": summary["config"]["num-clients"],
                    "best_teacher": max(t["test_accuracy"] for t in summary["teachers"]),
                    "ensemble": summary["ensemble"]["test_accuracy"],
                    "student": summary["student"]["test_accuracy"],
                    "failed_nodes": len(summary["flower"]["failed"])})
    else:
        row["log_tail"] = log.getvalue()[-2000:]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="20,50", help="comma-separated numbers of simulated clients")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare `flwr run .`")
    parser.add_argument("--runs", default="runs/flower-scale")
    parser.add_argument("--results", default="simulations/results")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    plan: list[int | None] = ([] if args.no_bare else [None]) + [int(c) for c in args.clients.split(",") if c]
    rows = []
    for clients in plan:
        name = "bare" if clients is None else f"clients-{clients}"
        print(f"{name}: running", file=sys.stderr, flush=True)
        row = one_run(clients, Path(args.runs) / name, args.timeout)
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    lines = ["Made by `python simulations/flower_scale.py"
             + (f" --clients {args.clients}" if args.clients != "20,50" else "")
             + (" --no-bare" if args.no_bare else "") + "` (MNIST-5k, Dirichlet(0.5), every other key at its default).",
             "",
             "| run | clients | status | wall (s) | peak memory (GiB) | best teacher | ensemble | student | "
             "student - best teacher |", "|---|---|---|---|---|---|---|---|---|"]
    for clients, r in zip(plan, rows):
        name = "`flwr run .` (bare)" if clients is None else f"`fedkd simulate --set num-clients={clients}`"
        if "student" in r:
            lines.append(f"| {name} | {r['clients']} | {r['status']} | {r['wall_seconds']:.0f} | "
                         f"{r['peak_memory_gib']:.2f} | {r['best_teacher']:.4f} | {r['ensemble']:.4f} | "
                         f"{r['student']:.4f} | {r['student'] - r['best_teacher']:+.4f} |")
        else:
            lines.append(f"| {name} | {r['clients']} | {r['status']} | {r['wall_seconds']:.0f} | "
                         f"{r['peak_memory_gib']:.2f} | | | | |")
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "flower-scale.md").write_text(text)
    print(text)
    return 0 if all("student" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
