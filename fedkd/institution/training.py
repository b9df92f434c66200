"""The client-side teacher recipe: the clients' partitions, and a classifier trained on one client's private data
only (teachers, references; DP-SGD and PATE teachers included), loaded from its checkpoint when it exists.

The client side (``client/``) uses this module, never the coordinator's driver (``fedkd.coordinator``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.checkpoint import CheckpointError, field_error, save_atomic, save_teacher
from fedkd.config import RunConfig
from fedkd.data import DatasetSpec, ImageData, partition_indices
from fedkd.institution.density import WithDensity, classifier_of, density_of
from fedkd.institution.loading import load_teacher
from fedkd.institution.open_set import HARDENING_STEP, open_set_loss
from fedkd.institution.terms import attach_class_statistics, class_statistics_of
from fedkd.options import check_finite

logger = logging.getLogger(__name__)
_INIT_LOCK = threading.Lock()


def train_classifier(
    model: nn.Module,
    data: ImageData,
    spec: DatasetSpec,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    label_smoothing: float = 0.0,
    open_set: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train with Adam and a cosine schedule on ``data`` only; deterministic for a seed.

    Light augmentation (random shifts of up to 2 pixels) helps the small
    partitions clients hold; label smoothing keeps the teachers' logits on a
    comparable scale, which the logit-averaging ensemble needs (measured on
    MNIST-5k, 5 Dirichlet(0.5) clients, 20 epochs: mean-logit ensemble 0.84
    without, 0.91 with 0.1). With ``open_set`` the model has ``C + 1`` outputs and learns the last, "unknown",
    from its own images corrupted (:mod:`fedkd.institution.open_set`). Returns the model in eval mode.
    """
    model.to(device).train()
    if epochs == 0 or len(data) == 0:
        return model.eval()
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * max(1, -(-len(data) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    inputs = spec.normalize(data.images)
    hardening = HARDENING_STEP / (sum(spec.std) / len(spec.std))  # one pixel-space step, in normalised units
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=rng)
        total = 0.0
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            x, y = _shift(inputs[idx], rng).to(device), data.labels[idx].to(device)
            if open_set:
                loss = open_set_loss(model, x, y, rng, num_classes=spec.num_classes,
                                     label_smoothing=label_smoothing, hardening_step=hardening)
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            number = check_finite(loss, "teacher-lr", lr, f"training in epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += number * len(idx)
        logger.debug("epoch %d: loss %.4f", epoch, total / len(data))
    return model.eval()


def _shift(x: torch.Tensor, rng: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Randomly translate a batch by up to ``max_shift`` pixels (zero padding at the edges)."""
    if x.shape[-1] < 16:
        max_shift = 1
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=rng))
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), value=float(x.min()))
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def train_teacher(name: str, data: ImageData, spec: DatasetSpec, config: RunConfig, *, init_seed: int,
                  order_seed: int, device: torch.device | str = "cpu", dp: bool = False, pate: int = 0,
                  model_args: dict[str, Any] | None = None,
                  open_set: bool = False) -> tuple[nn.Module, dict[str, Any] | None]:
    """A client's teacher: built from ``init_seed``, trained on ``data`` only with the teacher settings.

    With ``dp`` (the client's privacy-mode is dp-sgd) it is trained with Opacus DP-SGD (BatchNorm
    replaced by GroupNorm) and the privacy record comes back with it; with ``pate`` (privacy-mode=pate,
    pate-teachers) it is ``pate`` shard teachers, one per disjoint shard of ``data``, as one
    :class:`~fedkd.institution.privacy.pate.ShardVotes` (its output: their vote counts), with a PATE record;
    otherwise the privacy record is None. With ``open_set`` (teacher-recipe=open-set) the teacher has one more
    output, "unknown" (:mod:`fedkd.institution.open_set`); not with DP-SGD or PATE.
    """
    from fedkd.models import build_classifier

    if open_set and (dp or pate):
        raise ValueError("teacher-recipe=open-set trains without DP-SGD or PATE (their training and votes know the "
                         "classes only); use privacy-mode=none or output-noise")
    if pate:
        from fedkd.institution.privacy.pate import ShardVotes, pate_record, shards

        parts = shards(len(data), pate, order_seed)
        members = [train_teacher(name, data.subset(p), spec, config, init_seed=init_seed + i,
                                 order_seed=order_seed + 7919 * (i + 1), device=device)[0]
                   for i, p in enumerate(parts)]
        return ShardVotes(members, spec.num_classes).eval(), pate_record(pate, [len(p) for p in parts])

    with _INIT_LOCK:  # the global RNG: teachers trained in threads of one process must not interleave here
        torch.manual_seed(init_seed)
        model = build_classifier(name, num_classes=spec.num_classes + int(open_set), channels=spec.channels,
                                 image_size=spec.side, args=model_args)
    if not dp:
        return train_classifier(model, data, spec, epochs=config.teachers.epochs, lr=config.teachers.lr,
                                batch_size=config.teachers.batch_size, seed=order_seed,
                                label_smoothing=config.teachers.label_smoothing, open_set=open_set,
                                device=device), None
    from fedkd.institution.privacy import DPSettings, make_private_model, train_dp_sgd
    from fedkd.institution.privacy.dpsgd import release_feature_statistics

    private = config.dp_training
    model, record = train_dp_sgd(make_private_model(model), data, spec,
                                 DPSettings(private.epsilon, config.privacy.delta, private.max_grad_norm),
                                 epochs=config.teachers.epochs, lr=private.lr, batch_size=private.batch_size,
                                 seed=order_seed, label_smoothing=config.teachers.label_smoothing, device=device)
    if private.feature_epsilon > 0:
        record["feature_statistics"] = release_feature_statistics(
            model, data, spec, epsilon=private.feature_epsilon, delta=record["delta"],
            clip=private.feature_clip, seed=order_seed, device=device)
    return model.eval(), record


def client_partitions(config: RunConfig, labels: Tensor) -> list[np.ndarray]:
    """The clients' shares of a training pool, as the config's partition settings split it."""
    return partition_indices(labels, config.num_clients, config.partition, alpha=config.alpha,
                             classes_per_client=config.classes_per_client,
                             min_partition_size=config.min_partition_size, seed=config.seed)


def load_or_train_teacher(path: Path, name: str, data: ImageData, spec: DatasetSpec, config: RunConfig, *,
                          client: int, device: torch.device | str, expected_model: str | None,
                          stage: Callable[[str], None], dp: bool = False,
                          pate: int = 0) -> tuple[nn.Module, dict[str, Any], bool]:
    """Client ``client``'s teacher: loaded from ``path`` when it exists, else trained on ``data`` alone and
    saved there. Returns (model, checkpoint, trained).

    Training starts from a shared initialisation per architecture, as a one-shot FL server would
    broadcast; only the data order differs between clients (it makes the FedAvg reference meaningful).
    """
    open_set = config.teachers.recipe == "open-set"
    if path.exists():
        stage(f"client {client}: loading teacher from {path}")
        model, ckpt = load_teacher(path, expected_model=expected_model, num_classes=spec.num_classes,
                                   input_shape=spec.input_shape)
        held = "open-set" if ckpt.get("unknown_output", False) else "closed"
        if held != config.teachers.recipe:
            raise CheckpointError(f"checkpoint {str(path)!r} holds a teacher of teacher-recipe={held}, but the config "
                                  f"asks for teacher-recipe={config.teachers.recipe}; use another run directory or set "
                                  f"teacher-recipe={held}")
        held_density = "density" in ckpt
        if held_density != config.teachers.density:
            on, asked = ("on" if held_density else "off"), ("on" if config.teachers.density else "off")
            raise CheckpointError(f"checkpoint {str(path)!r} holds a teacher of teacher-density={on}, but the config "
                                  f"asks for teacher-density={asked}; use another run directory or set "
                                  f"teacher-density={on}")
        return _with_class_statistics(path, model, ckpt, data, spec, config, client, stage), ckpt, False
    how = " with DP-SGD" if dp else f" x {pate} shard teachers (PATE)" if pate else ""
    stage(f"client {client}: training {name}{how} on {len(data)} private samples")
    model, privacy = train_teacher(name, data, spec, config, init_seed=config.seed * 1000,
                                   order_seed=config.seed * 1000 + client, device=device, dp=dp, pate=pate,
                                   open_set=open_set)
    density = None
    if config.teachers.density:  # the density of its own images, fitted once, beside the classifier
        stage(f"client {client}: fitting the density of its {len(data)} images (teacher-density)")
        density = density_of(data, spec)
    ckpt = save_teacher(path, model, model_name=name, num_classes=spec.num_classes, input_shape=spec.input_shape,
                        num_samples=len(data), label_counts=data.label_counts(spec.num_classes),
                        mean=spec.mean, std=spec.std, privacy=privacy, unknown_output=open_set,
                        density=None if density is None else density.to_state())
    model = model if density is None else WithDensity(model, density).eval()
    return _with_class_statistics(path, model, ckpt, data, spec, config, client, stage), ckpt, True


def _with_class_statistics(path: Path, model: nn.Module, ckpt: dict[str, Any], data: ImageData, spec: DatasetSpec,
                           config: RunConfig, client: int, stage: Callable[[str], None]) -> nn.Module:
    """With teacher-class-statistics=on, the teacher carrying the per-class BatchNorm statistics of the client's own
    images (computed once and kept in its checkpoint: the weights do not change); otherwise as it is."""
    if not config.teachers.class_statistics:
        return model
    if "class_statistics" not in ckpt:
        stage(f"client {client}: computing the per-class BatchNorm statistics of its {len(data)} images "
              "(teacher-class-statistics)")
        try:
            ckpt["class_statistics"] = class_statistics_of(classifier_of(model), data, spec)
        except ValueError as exc:
            raise CheckpointError(f"client {client}: teacher-class-statistics=on, but {exc}") from None
        save_atomic(ckpt, path)
    try:
        attach_class_statistics(classifier_of(model), ckpt["class_statistics"], spec.num_classes)
    except ValueError as exc:
        raise field_error(path, "class_statistics", str(exc)) from None
    return model
