"""Bigger inputs: seconds per synthesis round and per student step, by input shape and architecture.

Three settings, each a task with in-process teachers run through the Python API (``fedkd.distill``) with
fedkd's defaults (CuDFKD, synthetic batch 128, one synthesis step per round):

- ``1x28x28``: LeNet-5 teachers, a LeNet-5-half student (the main job's shapes);
- ``3x32x32``: ResNet-34 teachers (fedkd's CIFAR-style), a ResNet-18 student;
- ``3x64x64``: torchvision ResNet-18 teachers, a torchvision MobileNetV3-small student (7 classes, as a
  dermatology task would have).

The teachers carry fresh weights: the time of a forward, a Backward or a student step does not depend on what
the weights say. Each setting runs twice, two epochs of ``--steps`` rounds each, the second timed: once with no
student steps (a round is synthesis alone: the generator, every teacher's Forward and Backward), once with
``--student-steps`` per round; the difference per student step is a student step. ``--device auto`` puts the
generator, the student and the in-process teachers on CUDA where there is one.

    .venv/bin/python simulations/benchmark_shapes.py [--steps 3] [--student-steps 5] [--teachers 2]
        [--device auto] [--only 3x32x32]

Prints a table and writes ``simulations/results/benchmark-shapes[-DEVICE].md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fedkd  # noqa: E402
from fedkd.config import RunConfig  # noqa: E402
from fedkd.models import build_classifier  # noqa: E402

DEFAULTS = RunConfig()
DEFAULT_STEPS = DEFAULTS.student_steps  # student steps a round of the default run


@dataclass(frozen=True)
class Setting:
    name: str
    task: fedkd.Task
    teacher: str  # a spec build_classifier knows
    student: str

    def teachers(self, count: int) -> list[nn.Module]:
        c, h, _ = self.task.input_shape
        return [build_classifier(self.teacher, num_classes=self.task.num_classes, channels=c, image_size=h).eval()
                for _ in range(count)]


SETTINGS = [
    Setting("1x28x28", fedkd.Task(classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                                  name="mnist-shape"), "lenet5", "lenet5-half"),
    Setting("3x32x32", fedkd.Task(classes=10, input_shape=(3, 32, 32), mean=(0.49, 0.48, 0.45),
                                  std=(0.25, 0.24, 0.26), name="cifar-shape"), "resnet34", "resnet18"),
    Setting("3x64x64", fedkd.Task(classes=7, input_shape=(3, 64, 64), mean=(0.76, 0.55, 0.57),
                                  std=(0.14, 0.15, 0.17), name="derm-shape"), "torchvision:resnet18",
            "torchvision:mobilenet_v3_small"),
]


def seconds_per_round(setting: Setting, *, teachers: int, steps: int, student_steps: int, device: str,
                      out: Path) -> float:
    """Mean seconds of one round (synthesis, then ``student_steps`` student steps) over ``steps`` rounds: the
    second of two epochs of ``steps`` rounds (the first warms up, and fills the pool the student trains on)."""
    torch.manual_seed(0)
    result = fedkd.distill(teachers=setting.teachers(teachers), task=setting.task, out=out, student=setting.student,
                           epochs=2, steps_per_epoch=steps, student_steps=student_steps, synthetic_check=0,
                           device=device, sample_stages=1, seed=0)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["epoch_seconds"] / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds per measurement")
    parser.add_argument("--student-steps", type=int, default=5, help="student steps per round in the second run")
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--only", default="", help="comma-separated settings (of " +
                        ", ".join(s.name for s in SETTINGS) + ")")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--out", default="", help="the table's file (default simulations/results/"
                        "benchmark-shapes[-cuda].md)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.student_steps < 1 or args.teachers < 1:
        parser.error("--steps, --student-steps and --teachers must be at least 1")
    chosen = [s for s in SETTINGS if not args.only or s.name in args.only.split(",")]
    if not chosen:
        parser.error(f"--only {args.only!r}: choose from {', '.join(s.name for s in SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    where = torch.cuda.get_device_name(0) if device == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        "torch threads)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in chosen:
            started = time.perf_counter()
            synthesis = seconds_per_round(setting, teachers=args.teachers, steps=args.steps, student_steps=0,
                                          device=device, out=Path(tmp) / f"{setting.name}-synthesis")
            both = seconds_per_round(setting, teachers=args.teachers, steps=args.steps,
                                     student_steps=args.student_steps, device=device,
                                     out=Path(tmp) / f"{setting.name}-student")
            student_step = max(0.0, both - synthesis) / args.student_steps
            c, h, w = setting.task.input_shape
            rows.append((setting, synthesis, student_step, time.perf_counter() - started))
            print(f"{setting.name}: {args.teachers} x {setting.teacher} -> {setting.student}: synthesis round "
                  f"{synthesis:.3f} s, student step {student_step:.3f} s", flush=True)
    lines = [f"# Seconds per synthesis round and per student step by input shape ({device})", "",
             f"`python simulations/benchmark_shapes.py --steps {args.steps} --student-steps {args.student_steps} "
             f"--teachers {args.teachers} --device {args.device}`; device: {where}; torch {torch.__version__}; "
             f"batch 128, {args.teachers} in-process teachers, CuDFKD defaults.", "",
             "| input | teachers | student | synthesis round (s) | student step (s) | round of the default run "
             f"(1 synthesis + {DEFAULT_STEPS} student steps, s) |", "|---|---|---|---|---|---|"]
    for setting, synthesis, step, _ in rows:
        c, h, w = setting.task.input_shape
        lines.append(f"| {c}x{h}x{w} | {args.teachers} x {setting.teacher} | {setting.student} | {synthesis:.3f} | "
                     f"{step:.3f} | {synthesis + DEFAULT_STEPS * step:.2f} |")
    lines += ["", "A synthesis round: the generator's forward and backward, every teacher's Forward and Backward of "
              "the batch (in process: no network). A student step: one batch of the synthetic pool through the "
              "student, forward and backward. The default run makes "
              f"{DEFAULTS.steps_per_epoch} rounds per epoch."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else (
        ROOT / "simulations" / "results" / f"benchmark-shapes{'-cuda' if device == 'cuda' else ''}.md")
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
