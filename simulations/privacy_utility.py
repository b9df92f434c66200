"""What differential privacy costs the student: the main job with DP-SGD teachers at several epsilons.

    python simulations/privacy_utility.py                    # epsilon 1, 2, 4, 8 and none; seeds 0, 1, 2
    python simulations/privacy_utility.py --seeds 0 --epsilons 8

Every client trains its teacher with Opacus DP-SGD (``privacy-mode=dp-sgd``, ``dp-epsilon=E``, delta
1 / (10 n) at most 1e-5, PRV accountant) and releases its label histogram with Gaussian noise at
``label-count-epsilon`` (0.5, accounted in its ledger with the training), so the class-weighted ensemble
stays available; every answer after training is post-processing. The coordinator keeps its defaults, the
reliability estimate included (docs/privacy.md). Runs are cached like
``simulations/compare.py`` (same run files). Writes ``privacy-utility[-TAG].md`` and ``.png``
(student accuracy against the epsilon each client spent) under ``--results`` and prints the target:
at epsilon 8 the student keeps at least 0.90 of the accuracy of the same run without DP.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import cached_run  # noqa: E402

from fedkd.config import config_from_mapping, parse_assignments  # noqa: E402
from fedkd.options import ConfigError  # noqa: E402

TARGET = 0.90


def mapping(epsilon: float | None, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    run: dict[str, Any] = {"method": "cudfkd", "seed": seed, "dataset": "mnist5k", **extra}
    if epsilon is not None:
        # The DP-SGD recipe is spelled out so that the cache key changes with it.
        run.update({"privacy-mode": "dp-sgd", "dp-epsilon": epsilon, "dp-batch-size": 256, "dp-lr": 0.003})
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="1,2,4,8", help="comma-separated dp-epsilon values (and none)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", default="simulations/results/privacy")
    parser.add_argument("--runs", default="runs/privacy")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key for every run (repeatable; for example student-model=lenet5-half "
                        "student-steps=20 student-refit=0, the student before stop 40); the table and plot get a "
                        "-set suffix unless --tag names them")
    parser.add_argument("--tag", default="", help="suffix of the table and plot (privacy-utility-TAG.md)")
    args = parser.parse_args(argv)
    try:  # a bad --set fails before anything runs, naming the key
        extra = parse_assignments(args.set)
        config_from_mapping(mapping(None, 0, extra))
    except ConfigError as exc:
        parser.error(str(exc))
    suffix = f"-{args.tag}" if args.tag else "-set" if extra else ""
    if args.threads:
        torch.set_num_threads(args.threads)
    epsilons: list[float | None] = [None, *[float(e) for e in args.epsilons.split(",")]]
    seeds = [int(s) for s in args.seeds.split(",")]
    results, runs = Path(args.results), Path(args.runs)
    rows = []
    for eps in epsilons:
        recs = []
        for seed in seeds:
            record, fresh = cached_run(mapping(eps, seed, extra), results, runs, runs / "teachers")
            print(f"epsilon {eps or 'none'} seed {seed}: student {record['student']:.4f} "
                  f"({'ran' if fresh else 'cached'}, {record['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
            recs.append(record)
        students = [r["student"] for r in recs]
        rows.append({"epsilon": eps, "spent": max((r.get("epsilon") or 0.0) for r in recs),
                     "student": statistics.fmean(students),
                     "std": statistics.stdev(students) if len(students) > 1 else 0.0,
                     "ensemble": statistics.fmean(r["ensemble"] for r in recs),
                     "best_teacher": statistics.fmean(r["best_teacher"] for r in recs)})
    base = rows[0]["student"]
    sets = "".join(f" --set {item}" for item in args.set) + (f" --tag {args.tag}" if args.tag else "")
    lines = [f"Made by `python simulations/privacy_utility.py --epsilons {args.epsilons} --seeds {args.seeds}{sets}` "
             "(main job, MNIST-5k, 5 clients, Dirichlet(0.5); DP-SGD teachers, noisy label counts).", "",
             "| teachers | epsilon spent (max over clients) | student | student / no DP | ensemble | best teacher |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "no DP" if r["epsilon"] is None else f"DP-SGD, dp-epsilon {r['epsilon']:g}"
        lines.append(f"| {name} | {r['spent']:.2f} | {r['student']:.4f} +- {r['std']:.4f} | "
                     f"{r['student'] / base:.3f} | {r['ensemble']:.4f} | {r['best_teacher']:.4f} |")
    at8 = [r for r in rows if r["epsilon"] == 8.0]
    if at8:
        ratio = at8[0]["student"] / base
        lines += ["", f"- [{'met' if ratio >= TARGET else 'MISSED'}] at dp-epsilon 8 the student keeps {ratio:.3f} "
                  f"of the no-DP student (target >= {TARGET})"]
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"privacy-utility{suffix}.md").write_text(text)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    dp = [r for r in rows if r["epsilon"] is not None]
    ax.errorbar([r["spent"] for r in dp], [r["student"] for r in dp], yerr=[r["std"] for r in dp], marker="o",
                label="DP-SGD teachers")
    ax.axhline(base, color="gray", linestyle="--", label="no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent per client (delta <= 1e-5)")
    ax.set_ylabel("student test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / f"privacy-utility{suffix}.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
