"""What a finished run's student could reach on REAL images: the ceiling a perfect synthesizer would give.

For each run directory (``fedkd run --out RUN``, its teachers under ``RUN/clients``), the run's student is trained
afresh with the run's own trainer, optimiser, schedule, batch and step count on the real training images, three
ways: the ensemble's soft answers through the run's loss (``kd``: exactly what the student gets from the pool,
on real inputs instead of synthetic ones), cross-entropy on the ensemble's class (``hard``) and cross-entropy on
the true labels (``labels``, the student's capacity). The ensemble is the run's rule (class weights, and 1 -
p(unknown) for open-set teachers). Experiment-only: no deployment holds the pooled images.

    python simulations/student_ceiling.py runs/benchmark/pathological-open-set-seed{0,1,2,3,4} --set student-warmup=0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_probe import answers, combine, run_teachers  # noqa: E402

from fedkd.config import RunConfig, config_from_mapping, parse_assignments  # noqa: E402
from fedkd.coordinator.student import StudentTrainer  # noqa: E402
from fedkd.data import DatasetSpec, ImageData, load_dataset  # noqa: E402
from fedkd.models import build_model  # noqa: E402

MODES = ("kd", "hard", "labels")


def train_on_real(config: RunConfig, spec: DatasetSpec, train: ImageData, targets: Tensor, mode: str,
                  device: torch.device) -> nn.Module:
    """The run's student trained afresh on the real images ``train`` with the run's trainer, optimiser, schedule,
    batch and step count: through the run's loss on ``targets`` (N, C), the ensemble's answers (``kd``), or with
    cross-entropy on their class (``hard``) or on the true labels (``labels``)."""
    total = config.epochs * config.steps_per_epoch * config.student_steps  # as the run's student trainer
    torch.manual_seed(config.seed)
    student = build_model(config.student.model, num_classes=spec.num_classes, channels=spec.channels,
                          image_size=spec.image_size)
    trainer = StudentTrainer(student, spec, config.student, device, total_steps=total)
    draw = torch.Generator().manual_seed(config.seed)
    for _ in range(total):
        idx = torch.randint(0, len(train), (config.batch_size,), generator=draw)
        if mode == "kd":
            trainer.step(train.images[idx], targets[idx])
            continue
        labels = targets[idx].argmax(1) if mode == "hard" else train.labels[idx]
        student.train()  # the same optimiser and schedule, cross-entropy
        trainer.update(F.cross_entropy(student(spec.normalize(train.images[idx].to(device))), labels.to(device)))
    return student


def ceiling(run: Path, overrides: dict[str, str]) -> dict[str, float]:
    saved = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if v is not None}
    config = config_from_mapping({**saved, **overrides})
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    spec, train, test = split.spec, split.train, split.test
    c = spec.num_classes
    teachers, weights, has_unknown = run_teachers(run, c)
    targets = combine(answers(teachers, spec.normalize(train.images)), weights, has_unknown, c)  # (N, C) log-probs
    on_test = combine(answers(teachers, spec.normalize(test.images)), weights, has_unknown, c)
    out = {"ensemble": float((on_test.argmax(1) == test.labels).float().mean()),
           "ensemble on train": float((targets.argmax(1) == train.labels).float().mean())}
    for mode in MODES:
        student = train_on_real(config, spec, train, targets, mode, torch.device("cpu"))
        student.eval()
        with torch.no_grad():
            out[mode] = float((student(spec.normalize(test.images)).argmax(1) == test.labels).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of fedkd run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of the runs' own config (the student's, for example)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_assignments(args.set)
    rows = {}
    for run in args.runs:
        rows[run.name] = ceiling(run, overrides)
        print(run.name, json.dumps({k: round(v, 4) for k, v in rows[run.name].items()}), flush=True)
    if len(rows) > 1:
        for key in next(iter(rows.values())):
            values = [r[key] for r in rows.values()]
            print(f"{key}: {statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
