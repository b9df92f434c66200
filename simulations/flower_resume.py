"""A ServerApp that dies, resumed: real Flower processes, the ServerApp killed mid-run, then `resume-from`.

    python simulations/flower_resume.py                 # digits, 3 clients, 40 epochs, killed after epoch 3

1. ``fedkd simulate`` (``flwr run . --stream`` on a local SuperLink) starts the run; once its run directory
   records ``--kill-after`` epochs, the simulation runtime that hosts the ServerApp (``flwr-simulation``) is
   killed with SIGKILL, as a crash would. Flower marks the run failed.
2. ``fedkd simulate --set resume-from=<that run directory>``: a new run on a new SuperLink (new node ids)
   continues it.
3. The same settings uninterrupted, for reference.

Printed, and written to ``flower-resume.md`` under ``--results``: each run's status, the epoch the resumed
run started at, the student's accuracy (coordinator and federated), the query samples, and the largest
difference between the resumed and the uninterrupted students' weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedkd.server.simulate import run_processes, simulate  # noqa: E402

from fedkd.institution.loading import load_teacher  # noqa: E402


def kill_server_app_after(flwr_home: Path, runs: Path, epochs: int, timeout: float) -> dict[str, Any]:
    """Wait until the run directory under ``runs`` records ``epochs`` epochs, then SIGKILL the simulation
    runtime (the ServerApp's process) of this FLWR_HOME's SuperLink."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [len(p.read_text().splitlines()) for p in runs.glob("run-*/metrics.jsonl")]
        if done and done[0] >= epochs:
            for pid in run_processes(flwr_home):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"flwr-simulation" in cmdline:
                    os.kill(pid, signal.SIGKILL)
                    return {"killed_pid": pid, "epochs_done": done[0]}
        time.sleep(0.2)
    return {"killed_pid": None}


def run(changes: dict[str, Any], flwr_home: Path, timeout: float) -> dict[str, Any]:
    log = io.StringIO()
    started = time.perf_counter()
    code, status = simulate(changes, flwr_home=flwr_home, timeout=timeout, stream=log)
    return {"code": code, "status": status.get("status"), "details": status.get("status-details"),
            "wall": time.perf_counter() - started, "log": log.getvalue()}


def result(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"student": summary["student"]["test_accuracy"],
            "federated": summary["federated_evaluation"]["student_accuracy"],
            "queries": summary["queries"]["samples"], "resumed": summary["flower"]["resumed"],
            "epochs": sum(json.loads(line).get("stage") != "refit"
                          for line in (run_dir / "metrics.jsonl").read_text().splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--kill-after", type=int, default=3, help="epochs done when the ServerApp is killed")
    parser.add_argument("--runs", default="runs/flower-resume")
    parser.add_argument("--results", default="simulations/results")
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    shutil.rmtree(runs, ignore_errors=True)
    base = {"dataset": "digits", "num-clients": args.clients, "epochs": args.epochs, "steps-per-epoch": 10}
    home = Path(tempfile.mkdtemp(prefix="fedkd-flwr-home-"))
    os.environ.setdefault("FEDKD_CACHE_DIR", str(runs / "node-cache"))  # the nodes' teachers, kept across runs

    killed: dict[str, Any] = {}
    watcher = threading.Thread(target=lambda: killed.update(
        kill_server_app_after(home / "died", runs / "died", args.kill_after, args.timeout)), daemon=True)
    watcher.start()
    died = run({**base, "run-dir": str(runs / "died")}, home / "died", args.timeout)
    watcher.join(5)
    (died_dir,) = (runs / "died").glob("run-*")
    print(f"1. killed the ServerApp after {killed.get('epochs_done')} epochs: {died['status']} "
          f"({died['details']})")
    resumed = run({**base, "run-dir": str(runs / "died"), "resume-from": str(died_dir)}, home / "resumed",
                  args.timeout)
    started_at = next((line.split("resuming at epoch ")[1].split(" of")[0] for line in resumed["log"].splitlines()
                       if "resuming at epoch" in line), None)
    print(f"2. resumed: {resumed['status']}, started at epoch {started_at}, {resumed['wall']:.0f} s")
    whole = run({**base, "run-dir": str(runs / "whole")}, home / "whole", args.timeout)
    (whole_dir,) = (runs / "whole").glob("run-*")
    print(f"3. uninterrupted: {whole['status']}, {whole['wall']:.0f} s")

    a, b = load_teacher(died_dir / "student.pt")[0].state_dict(), load_teacher(whole_dir / "student.pt")[0].state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    rows = [("killed, then resumed", resumed, result(died_dir)), ("uninterrupted", whole, result(whole_dir))]
    lines = [f"# A ServerApp killed after epoch {killed.get('epochs_done')} of {args.epochs}, resumed",
             "", f"`python simulations/flower_resume.py --clients {args.clients} --epochs {args.epochs} "
             f"--kill-after {args.kill_after}` (digits, {args.clients} simulated clients, 10 steps per epoch). "
             f"The killed run ended `{died['status']}` ({died['details']}); the resumed run started at epoch "
             f"{started_at}.", "",
             "| run | status | epochs in metrics.jsonl | student (coordinator) | student (federated) | query samples |",
             "|---|---|---|---|---|---|"]
    for name, outcome, r in rows:
        lines.append(f"| {name} | {outcome['status']} | {r['epochs']} | {r['student']:.4f} | {r['federated']:.4f} "
                     f"| {r['queries']:,} |")
    lines += ["", f"Largest difference between the two students' weights: {diff:.3g}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower-resume.md").write_text(text)
    ok = resumed["status"] == whole["status"] == "finished:completed" and diff < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
