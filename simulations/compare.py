"""Every method side by side, federated, under the same teacher-query budget.

    python simulations/compare.py                    # the quick preset (~15 min on 2 cores): digits
    python simulations/compare.py --preset full      # digits and MNIST-5k, the default schedule
    python simulations/compare.py --methods cudfkd,dafl --settings dirichlet-0.5 --seeds 0
    python simulations/compare.py --preset full --datasets mnist5k --settings single --methods dafl \
        --seeds 0 --set steps-per-epoch=200 --set batch-size=256 --set query-budget=0   # DAFL, 20x the budget

Settings: IID, Dirichlet(0.5) and pathological (2 classes per client) splits over 5 clients, and
``single`` (one client holding the whole training pool: the papers' single-teacher MNIST pairs), on each
dataset of the preset; every method with its defaults (``fedkd keys``), seeds 0, 1, 2. Every run of a
(dataset, setting, seed) distils from the same teachers (trained once, then copied into each run). Each
run's query budget (``query-budget``) is what the preset's number of synthesis rounds costs one
generator-step-per-round method: rounds x batch x 2 (Forward + Backward) x clients.

Results are cached per (method, setting, seed) under ``--results`` (one JSON each, keyed by the run's
whole configuration): a rerun computes only what is missing or changed. Writes ``compare-PRESET.md`` (the
Markdown table the README shows) and one plot per setting (student accuracy against query samples,
every method on one chart) next to it, and prints the table and the targets. ``--set KEY=VALUE`` changes
any run-config key for every run (the preset's query budget included); such a run's files are named
``compare-PRESET-set-HASH``, so they never overwrite the preset's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedkd.config import config_from_mapping, parse_assignments
from fedkd.coordinator.experiment import prepare_clients, run_experiment
from fedkd.coordinator.flow import LogObserver, setup
from fedkd.coordinator.methods import METHODS
from fedkd.data import load_dataset
from fedkd.options import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # ~15 minutes on 2 cores: digits only, with the default schedule (10 epochs of 20 rounds, 20 student steps).
    "quick": {"datasets": ["digits"], "run": {}},
    # The same on both built-in datasets (its digits runs are the quick preset's, cached).
    "full": {"datasets": ["digits", "mnist5k"], "run": {}},
    # Seconds, for tests of the harness itself: nothing to read in its numbers.
    "smoke": {"datasets": ["digits"], "run": {"teacher-epochs": 2, "epochs": 2, "steps-per-epoch": 2,
                                               "student-steps": 2, "batch-size": 32}},
}
SETTINGS: dict[str, dict[str, Any]] = {
    "iid": {"partition": "iid"},
    "dirichlet-0.5": {"partition": "dirichlet", "alpha": 0.5},
    "pathological": {"partition": "pathological", "classes-per-client": 2},
    "single": {"num-clients": 1, "partition": "iid"},
}
NUM_CLIENTS = 5
CHANCE = 0.1  # every built-in dataset has 10 classes
# What the papers report for their MNIST pair (student / teacher), where they have one.
PAPER_RATIOS = {"dafl": (0.982 / 0.989, "DAFL: LeNet-5 -> LeNet-5-half on full MNIST, 98.2 % of 98.9 %")}


def run_config(preset: str, dataset: str, setting: str, method: str, seed: int) -> dict[str, Any]:
    """The run's whole configuration (what the cache is keyed on)."""
    base = {"num-clients": NUM_CLIENTS, "dataset": dataset, **PRESETS[preset]["run"], **SETTINGS[setting],
            "method": method, "seed": seed}
    config = config_from_mapping(base)
    rounds = config.epochs * config.steps_per_epoch
    return {**base, "query-budget": rounds * config.batch_size * 2 * config.num_clients}


def _key(mapping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:16]


def teachers(mapping: dict[str, Any], cache: Path) -> Path:
    """The clients' trained teachers for a (dataset, setting, seed), trained once (method-independent)."""
    teacher_keys = {k: v for k, v in mapping.items() if k not in ("method", "query-budget")}
    path = cache / f"teachers-{mapping['dataset']}-{_key(teacher_keys)}"
    if not (path / "done").exists():
        config = config_from_mapping({k: v for k, v in mapping.items() if k != "query-budget"})
        data = load_dataset(config.dataset, config.data_root, seed=config.seed)
        prepare_clients(config, data, path, setup(config), LogObserver())
        (path / "done").write_text("")
    return path / "clients"


def run_one(mapping: dict[str, Any], runs: Path, cache: Path) -> dict[str, Any]:
    """One run from scratch (the setting's teachers copied in); the figures the table needs."""
    config = config_from_mapping(mapping)
    out = runs / f"{mapping['method']}-{mapping['dataset']}-{_key(mapping)}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(teachers(mapping, cache), out / "clients")
    started = time.perf_counter()
    summary = run_experiment(config, out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    student, ensemble = summary["student"], summary["ensemble"]["test_accuracy"]
    return {
        "config": mapping, "resolved": config.to_dict(),
        "student": student["test_accuracy"], "ensemble": ensemble,
        "best_teacher": max(t["test_accuracy"] for t in summary["teachers"]),
        "agreement": student["agreement"], "loyalty": student["loyalty"],
        "accuracy_var": student["accuracy_var"], "accuracy_mean": student["accuracy_mean"],
        "query_samples": summary["queries"]["samples"],
        "distillation_samples": summary["queries"]["distillation_samples"],
        "wall_seconds": time.perf_counter() - started,
        "curve": [(h["query_samples"], h["student_accuracy"]) for h in history],
        "method_report": summary.get("method_report", {}),
        "epsilon": (summary.get("privacy") or {}).get("max_epsilon_spent"),
    }


def _record_path(mapping: dict[str, Any], results: Path) -> Path:
    return results / "runs" / f"{mapping['method']}-{mapping['dataset']}-{_key(mapping)}.json"


def load_cached(mapping: dict[str, Any], results: Path) -> dict[str, Any] | None:
    """The cached record of a run, or None when there is none or it was made under other settings (reused only
    while every setting it resolves to is the same: a changed default reruns what it changes)."""
    path = _record_path(mapping, results)
    if path.exists():
        record: dict[str, Any] = json.loads(path.read_text())
        if record.get("config") == mapping and same_settings(record.get("resolved") or {},
                                                              config_from_mapping(mapping).to_dict()):
            return record
    return None


def same_settings(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a record's resolved settings are the run's. A key the record predates matches at its default: a new
    key's default keeps what runs did before it (``density-gate=auto`` leaves every run without densities as it
    was), so adding one does not stale every record; a key set otherwise, a changed default or a key since removed
    reruns."""
    if not set(recorded) <= set(now):
        return False
    newer = set(now) - set(recorded)
    defaults = config_from_mapping({}).to_dict() if newer else {}
    return (all(recorded[k] == now[k] for k in recorded)
            and all(k in defaults and now[k] == defaults[k] for k in newer))


def cached_run(mapping: dict[str, Any], results: Path, runs: Path, cache: Path) -> tuple[dict[str, Any], bool]:
    cached = load_cached(mapping, results)
    if cached is not None:
        return cached, False
    path = _record_path(mapping, results)
    record = run_one(mapping, runs, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record, True


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    fields = {
        "student": [r["student"] for r in records],
        "ratio": [r["student"] / r["ensemble"] for r in records],
        "teacher_ratio": [r["student"] / r["best_teacher"] for r in records],
        "agreement": [r["agreement"] for r in records],
        "loyalty": [r["loyalty"] for r in records],
        "accuracy_var": [r["accuracy_var"] for r in records],
        "queries": [float(r["distillation_samples"] or 0) for r in records],
        "wall": [r["wall_seconds"] for r in records],
        "ensemble": [r["ensemble"] for r in records],
    }
    return {k: _ms(v) for k, v in fields.items()}


def table(rows: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]], methods: list[str]) -> str:
    lines = []
    for (dataset, setting), per_method in rows.items():
        ens = next(iter(per_method.values()))["ensemble"][0]
        lines += [f"**{dataset}, {setting}** (ensemble {ens:.3f})", "",
                  "| method | student | student / ensemble | Agreement@1 | loyalty | acc. variance over training "
                  "| query samples | wall (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        best = max(per_method.values(), key=lambda a: a["student"][0])["student"][0]
        for method in methods:
            if method not in per_method:
                continue
            a = per_method[method]
            mark = " **best**" if a["student"][0] == best else ""
            lines.append(f"| {method}{mark} | {a['student'][0]:.4f} +- {a['student'][1]:.4f} | {a['ratio'][0]:.3f} "
                         f"| {a['agreement'][0]:.3f} | {a['loyalty'][0]:.3f} | {a['accuracy_var'][0]:.5f} "
                         f"| {a['queries'][0]:,.0f} | {a['wall'][0]:.0f} |")
        lines.append("")
    return "\n".join(lines)


def check_targets(rows: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]]) -> list[str]:
    out = []
    worst = min(((a["student"][0], m, d, s) for (d, s), per in rows.items() for m, a in per.items()),
                default=None)
    if worst is not None:
        ok = worst[0] >= 3 * CHANCE
        out.append(f"[{'met' if ok else 'MISSED'}] every method >= 3 x chance ({3 * CHANCE:.2f}) on every setting: "
                   f"lowest {worst[0]:.4f} ({worst[1]}, {worst[2]}, {worst[3]})")
    for (dataset, setting), per in rows.items():
        if not setting.startswith("dirichlet") or "cudfkd" not in per:
            continue
        best_m, best = max(per.items(), key=lambda kv: kv[1]["student"][0])
        cu = per["cudfkd"]
        within = cu["student"][0] >= best["student"][0] - best["student"][1]
        lowest_var = min(per.items(), key=lambda kv: kv[1]["accuracy_var"][0])[0]
        out.append(f"[{'met' if within else 'MISSED'}] {dataset}/{setting}: cudfkd {cu['student'][0]:.4f} is best or "
                   f"within one std of the best ({best_m} {best['student'][0]:.4f} +- {best['student'][1]:.4f})")
        out.append(f"[{'met' if lowest_var == 'cudfkd' else 'MISSED'}] {dataset}/{setting}: lowest accuracy "
                   f"variance over training: {lowest_var} ({per[lowest_var]['accuracy_var'][0]:.5f}; cudfkd "
                   f"{cu['accuracy_var'][0]:.5f})")
    for (dataset, setting), per in rows.items():
        if setting != "single":
            continue
        for method, (ratio, what) in PAPER_RATIOS.items():
            if method in per:
                got = per[method]["teacher_ratio"][0]
                data = "the sklearn 8x8 digits" if dataset == "digits" else "5,000 MNIST images (4,000 to train)"
                out.append(f"[report] {dataset}/single: {method} student / teacher {got:.3f} (paper {ratio:.3f}: "
                           f"{what}; {dataset} is {data}, not the 60,000 of full MNIST)")
    return out


def _typed(value: str) -> Any:
    """A ``--set`` value as TOML would give it (so the cache key does not depend on how it was typed)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def plot(records: dict[tuple[str, str, str], list[dict[str, Any]]], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, setting in sorted({(d, s) for d, s, _ in records}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (d, s, method), runs in sorted(records.items()):
            if (d, s) != (dataset, setting):
                continue
            n = min(len(r["curve"]) for r in runs)
            xs = [statistics.fmean(r["curve"][i][0] for r in runs) for i in range(n)]
            ys = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(n)]
            ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.set_xlabel("query samples (all teachers)")
        ax.set_ylabel("student test accuracy (mean over seeds)")
        ax.set_title(f"{dataset}, {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"compare-{name}-{dataset}-{setting}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated from {', '.join(SETTINGS)}")
    parser.add_argument("--datasets", default=None, help="comma-separated (default: the preset's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", default="simulations/results/compare", help="cached runs, table, plots")
    parser.add_argument("--runs", default="runs/compare", help="run directories (kept until the next rerun)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a run-config key for every run (repeatable), e.g. --set query-budget=0")
    parser.add_argument("--cached", action="store_true",
                        help="the table from the cached runs only: run nothing; a method with a run missing or made "
                             "under other settings is left out of that setting's rows and named under the table "
                             "(exit status 1)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    methods = args.methods.split(",")
    settings = args.settings.split(",")
    for name, valid in (("method", METHODS), ("setting", SETTINGS)):
        bad = [v for v in (methods if name == "method" else settings) if v not in valid]
        if bad:
            parser.error(f"unknown {name} {', '.join(bad)}; valid: {', '.join(valid)}")
    datasets = args.datasets.split(",") if args.datasets else PRESETS[args.preset]["datasets"]
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        overrides = {key: _typed(value) for key, value in parse_assignments(args.set).items()}
        for dataset, setting, method in ((d, s, m) for d in datasets for s in settings for m in methods):
            config_from_mapping({**run_config(args.preset, dataset, setting, method, seeds[0]), **overrides})
    except ConfigError as exc:
        parser.error(str(exc))
    name = args.preset + (f"-set-{_key(overrides)}" if overrides else "")
    if args.threads:
        torch.set_num_threads(args.threads)
    results, runs = Path(args.results), Path(args.runs)
    results.mkdir(parents=True, exist_ok=True)
    cache = runs / "teachers"
    records: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    started = time.perf_counter()
    todo = [(d, s, m, seed) for d in datasets for s in settings for m in methods for seed in seeds]
    missing: list[str] = []
    if args.cached:  # a (dataset, setting, method) with any seed not cached is left out whole, and named
        absent = [(d, s, m, seed) for d, s, m, seed in todo
                  if load_cached({**run_config(args.preset, d, s, m, seed), **overrides}, results) is None]
        incomplete = {(d, s, m) for d, s, m, _ in absent}
        todo = [(d, s, m, seed) for d, s, m, seed in todo if (d, s, m) not in incomplete]
        missing = [f"{d} {s} {m} seed {seed}" for d, s, m, seed in absent]
        if missing:
            print(f"--cached: {len(missing)} runs are not cached under today's settings (missing, or made under "
                  "other defaults); their methods are left out of those settings' rows:\n  "
                  + "\n  ".join(missing), file=sys.stderr)
    for i, (dataset, setting, method, seed) in enumerate(todo, 1):
        mapping = {**run_config(args.preset, dataset, setting, method, seed), **overrides}
        record, fresh = cached_run(mapping, results, runs, cache)
        records.setdefault((dataset, setting, method), []).append(record)
        print(f"[{i}/{len(todo)}] {dataset} {setting} {method} seed {seed}: student {record['student']:.4f} "
              f"({'ran' if fresh else 'cached'}, {record['wall_seconds']:.0f} s; "
              f"{time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
    rows: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]] = {}
    for (dataset, setting, method), recs in records.items():
        rows.setdefault((dataset, setting), {})[method] = aggregate(recs)
    text = table(rows, methods)
    goals = check_targets(rows)
    command = " ".join(["python simulations/compare.py", *(argv if argv is not None else sys.argv[1:])])
    report = (f"Made by `{command}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {NUM_CLIENTS} clients "
              f"unless `single`; every run's query budget: "
              + (f"{overrides['query-budget']} (from --set)" if "query-budget" in overrides
                 else "the preset's rounds x batch x 2 x clients") + ").\n\n"
              + text + "\nTargets:\n\n" + "\n".join(f"- {g}" for g in goals) + "\n"
              + ("\nLeft out (not in the cache under today's settings; run without --cached to compute them): "
                 + ", ".join(missing) + ".\n" if missing else ""))
    (results / f"compare-{name}.md").write_text(report)
    plots = plot(records, results, name)
    print(report)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
