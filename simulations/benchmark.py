"""Benchmark: the core targets, measured and printed (not asserted in tests).

    python simulations/benchmark.py                 # both experiments below
    python simulations/benchmark.py --only default  # just the main job

Experiments:
- ``default``: the main job (``fedkd run`` with no flags). Targets: wall time
  <= 10 min on a 2-core CPU; student >= ensemble - 2 points; student > best
  single teacher.
- ``class-weighted``: the main job with the class-weighted ensemble (same targets).
- ``one-client``: one client holding the whole training pool, IID. Target:
  student >= 0.97 x teacher.

Prints a Markdown table (pasted into the README) and writes
``simulations/results/benchmark.json``. Each experiment's run directory is kept
under ``runs/benchmark-*``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedkd.config import RunConfig, config_from_mapping
from fedkd.experiment import run_experiment

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "default": {},
    "class-weighted": {"ensemble": "class-weighted"},
    "one-client": {"num-clients": 1, "partition": "iid"},
}


def _targets(name: str, s: dict[str, Any]) -> list[tuple[str, str, bool]]:
    student = s["student"]["test_accuracy"]
    ensemble = s["ensemble"]["test_accuracy"]
    best = max(t["test_accuracy"] for t in s["teachers"])
    if name in ("default", "class-weighted"):
        return [
            ("wall time <= 600 s", f"{s['wall_seconds']:.0f} s", s["wall_seconds"] <= 600),
            ("student >= ensemble - 0.02", f"{student:.4f} vs {ensemble - 0.02:.4f}", student >= ensemble - 0.02),
            ("student > best teacher", f"{student:.4f} vs {best:.4f}", student > best),
        ]
    return [("student >= 0.97 x teacher", f"{student:.4f} vs {0.97 * best:.4f}", student >= 0.97 * best)]


def run(name: str, overrides: dict[str, Any], out_root: Path) -> dict[str, Any]:
    config: RunConfig = config_from_mapping(overrides)
    out = out_root / f"benchmark-{name}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = run_experiment(config, out)
    summary["benchmark_seconds"] = time.perf_counter() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    parser.add_argument("--runs", default="runs", help="where run directories go")
    parser.add_argument("--results", default="simulations/results/benchmark.json")
    args = parser.parse_args(argv)
    names = args.only or list(EXPERIMENTS)
    results: dict[str, Any] = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "experiments": {},
    }
    rows = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        s = run(name, EXPERIMENTS[name], Path(args.runs))
        checks = _targets(name, s)
        results["experiments"][name] = {"overrides": EXPERIMENTS[name], "summary": s,
                                        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]}
        best = max(t["test_accuracy"] for t in s["teachers"])
        rows.append((name, best, s["ensemble"]["test_accuracy"], s["student"]["test_accuracy"],
                     s["student"]["agreement"], s["student"]["loyalty"], s["wall_seconds"], checks))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # --only reruns some experiments: keep the others' last results
        kept = json.loads(path.read_text()).get("experiments", {})
        results["experiments"] = {**kept, **results["experiments"]}
    path.write_text(json.dumps(results, indent=2) + "\n")

    print("| experiment | best teacher | ensemble | student | agreement | loyalty | wall (s) | targets |")
    print("|---|---|---|---|---|---|---|---|")
    for name, best, ens, stu, agr, loy, wall, checks in rows:
        met = "; ".join(f"{t}: {m} {'met' if ok else 'MISSED'}" for t, m, ok in checks)
        print(f"| {name} | {best:.4f} | {ens:.4f} | {stu:.4f} | {agr:.4f} | {loy:.4f} | {wall:.0f} | {met} |")
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
