"""Which targets teach a student best on a finished run's own synthetic pool.

For each run directory (``fedkd run --out RUN`` or a ``simulations/fashion_mnist.py`` run, its teachers under
``RUN/clients`` and its final pool in ``RUN/checkpoint.pt``), the run's student is trained afresh, with the run's
own trainer, schedule and step count, on the final pool: once on the answers the pool stored (what
``student-refit`` does, without the method's curriculum), and once per aggregation named on the same teachers'
answers to the same images (``prob-mean``, ``class-weighted``, ``logit-mean``, ``powG``: class weights from the
label counts raised to G). The synthesis is held fixed, so what differs is the student's targets only.
Experiment-only: it reads the teachers' files, which a deployment's coordinator does not hold.

    python simulations/pool_targets.py runs/fashion-mnist/a0.5-s1-... --targets stored,prob-mean,class-weighted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_probe import answers, run_teachers  # noqa: E402
from student_ceiling import train_on_real  # noqa: E402

from fedkd.config import config_from_mapping  # noqa: E402
from fedkd.coordinator.aggregation import AGGREGATORS, claimed_counts, column_shares  # noqa: E402
from fedkd.data import ImageData, load_dataset  # noqa: E402
from fedkd.institution.loading import load_teacher  # noqa: E402
from fedkd.metrics import predict  # noqa: E402


def aggregate(name: str, logits: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
    """(N, C) log-probabilities of aggregation ``name`` from the teachers' (K, N, C) logits."""
    if name.startswith("pow"):
        return AGGREGATORS["class-weighted"].combine(logits, column_shares(counts ** float(name[3:])).unsqueeze(1))
    if name == "class-weighted":
        return AGGREGATORS["class-weighted"].combine(logits, weights.unsqueeze(1))
    if name in AGGREGATORS and not AGGREGATORS[name].needs_counts:
        return AGGREGATORS[name].combine(logits, None)
    raise SystemExit(f"unknown targets {name!r}: stored, class-weighted, powG, or one of "
                     f"{', '.join(a for a in AGGREGATORS if not AGGREGATORS[a].needs_counts)}")


def pool_targets(run: Path, targets: list[str]) -> list[dict[str, object]]:
    saved = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if v is not None}
    config = config_from_mapping(saved)
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    spec, test = split.spec, split.test
    c = spec.num_classes
    pool = torch.load(run / "checkpoint.pt", weights_only=False)["method"]["pool"]
    images = pool["images"].float() / 255
    teachers, weights, _ = run_teachers(run, c)
    counts = claimed_counts([load_teacher(p)[1]["label_counts"]
                             for p in sorted((run / "clients").glob("client_*/teacher.pt"))], c)
    on_pool = answers(teachers, spec.normalize(images))[..., :c]  # (K, N, C)
    on_test = answers(teachers, spec.normalize(test.images))[..., :c]
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long))  # labels unused by the kd mode
    rows = []
    for name in targets:
        stored = name == "stored"
        target = pool["answers"] if stored else aggregate(name, on_pool, weights, counts)
        student = train_on_real(config, spec, data, target, "kd", torch.device("cpu"))
        guess = predict(student, spec.normalize(test.images), device="cpu").argmax(1)
        rows.append({"run": run.name, "targets": name, "pool": len(images),
                     "ensemble_on_test": None if stored else float(
                         (aggregate(name, on_test, weights, counts).argmax(1) == test.labels).float().mean()),
                     "mean_top_probability_on_pool": float(F.softmax(target, 1).amax(1).mean()),
                     "student": float((guess == test.labels).float().mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--targets", default="stored,prob-mean,class-weighted")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "checkpoint.pt").is_file() or not (run / "clients").is_dir():
            parser.error(f"{run} is not a finished run directory (checkpoint.pt and clients/ are needed)")
    print("| run | targets | pool | ensemble on the test set | mean top probability on the pool | student |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        for r in pool_targets(run, args.targets.split(",")):
            ens = "" if r["ensemble_on_test"] is None else f"{r['ensemble_on_test']:.4f}"
            print(f"| {r['run']} | {r['targets']} | {r['pool']:,} | {ens} | {r['mean_top_probability_on_pool']:.3f} "
                  f"| {r['student']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
