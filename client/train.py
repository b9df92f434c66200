"""``fedkd train-teacher``: an institution with data but no model trains a teacher with fedkd's recipe.

    fedkd train-teacher --task task.toml --data train/ --model lenet5 --out teacher.pt
    fedkd train-teacher --task task.toml --data train/ --model torchvision:resnet18 --privacy-mode dp-sgd \\
                        --set dp-epsilon=8 --set teacher-epochs=30 --out teacher.pt

The data is an ImageFolder (one sub-folder per class, named as the task card's classes) or an ``.npz`` with
``x_train``/``y_train``; it never leaves this machine. The checkpoint (``fedkd.teacher.v1``) records the task's
shape and normalisation, the label counts and, with DP-SGD, the privacy guarantee; ``fedkd teacher --checkpoint``
serves it, and the guarantee is what its ledger starts from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedkd.checkpoint import save_teacher
from fedkd.config import config_from_mapping, default_values, parse_assignments
from fedkd.data import DatasetNotFoundError, load_node_file
from fedkd.institution.classifier import parse_model_args
from fedkd.institution.density import density_of
from fedkd.institution.terms import class_statistics_of
from fedkd.institution.training import train_teacher
from fedkd.models import is_code_spec, is_student_spec
from fedkd.options import ConfigError, resolve_device
from fedkd.task import Task

from .flags import TRAINING_KEYS, training_parser


def train(args: argparse.Namespace) -> dict[str, object]:
    task = Task.from_toml(args.task)
    values = parse_assignments(args.set)
    other = [k for k in values if k not in TRAINING_KEYS]
    if other:
        raise ConfigError(f"--set {other[0]}: not a teacher's training setting; give {', '.join(TRAINING_KEYS)}")
    config = config_from_mapping({**values, "privacy-mode": args.privacy_mode}, resolve=False)
    if not is_student_spec(args.model) or is_code_spec(args.model):
        raise ConfigError(f"--model {args.model!r}: give a fedkd model name or torchvision:NAME (to serve a model "
                          "you built yourself, train it and use fedkd teacher --model)")
    model_args = parse_model_args(args.model_args)
    data_path = Path(args.data)
    if data_path.suffix == ".npz":
        data, _ = load_node_file(data_path, task.spec)
    elif data_path.is_dir():
        data = task.load_images(data_path)
    else:
        raise DatasetNotFoundError(f"--data {args.data!r} is neither an ImageFolder directory nor a .npz file")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    started = time.perf_counter()
    open_set = config.teachers.recipe == "open-set"
    model, privacy = train_teacher(args.model, data, task.spec, config, init_seed=config.seed * 1000,
                                   order_seed=config.seed * 1000, device=device,
                                   dp=args.privacy_mode == "dp-sgd", model_args=model_args,
                                   open_set=open_set)
    counts = data.label_counts(task.num_classes)
    density = density_of(data, task.spec).to_state() if config.teachers.density else None
    statistics = class_statistics_of(model, data, task.spec) if config.teachers.class_statistics else None
    save_teacher(args.out, model.cpu(), model_name=args.model, model_args=model_args, num_classes=task.num_classes,
                 input_shape=task.input_shape, num_samples=len(data), label_counts=counts, mean=task.mean,
                 std=task.std, privacy=privacy, unknown_output=open_set, density=density,
                 class_statistics=statistics)
    return {"checkpoint": str(args.out), "model": args.model, "records": len(data), "label_counts": counts,
            "seconds": round(time.perf_counter() - started, 1),
            "epsilon_spent": None if privacy is None else privacy.get("epsilon_spent"),
            "defaults": {k: v for k, v in default_values().items() if k in TRAINING_KEYS and k not in values}}


def main(argv: Sequence[str] | None = None) -> int:
    return command(training_parser().parse_args(argv))


def command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.INFO)  # Opacus, once imported, has configured it at WARNING
    try:
        report = train(args)
    except (ConfigError, DatasetNotFoundError, ValueError, FileNotFoundError) as exc:
        print(f"fedkd train-teacher: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report), flush=True)
    return 0
