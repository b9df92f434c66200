"""What one institution's node holds: its private data, its teacher checkpoint, its local evaluation.

Flower-independent, so the ClientApp stays a thin translation of messages.

Where the data comes from (the node's Flower ``node_config``):

- ``data-path``: a deployment. The institution's own ``.npz`` file
  (``x_train``, ``y_train`` and, for local evaluation, ``x_test``, ``y_test``),
  for the run's ``dataset`` (input shape, classes, normalisation).
- ``partition-id`` / ``num-partitions``: a simulation. Partition
  ``partition-id`` of the run's dataset, split exactly as ``fedkd run`` splits
  it (so the teachers are the same), and an IID share of the test split as
  the node's held-out data.

Or the institution's own classifier (a deployment), named by its node config as ``fedkd teacher`` takes it:
``model`` (``torchvision:NAME``, ``PACKAGE.MODULE:CALLABLE``, an exported ``.pt2`` or a fedkd model name),
``weights`` (a state dict), ``task`` (the run's task card, a path on the node), and optionally ``model-args``
(JSON), ``label-counts`` (counts, or the training data's ImageFolder directory) and ``eval-data`` (an ImageFolder
directory to evaluate the student on). The node then trains nothing and holds no training data.

The teacher checkpoint lives on the node: at ``teacher-ckpt`` when the node
config names one (loaded when it exists, trained and written there when not),
otherwise in ``$FEDKD_CACHE_DIR`` (default ``~/.cache/fedkd``) under a
fingerprint of everything that determines the teacher, so a repeated run
loads instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.config import RunConfig, config_from_mapping
from fedkd.contract import access_modes
from fedkd.data import SPECS, DatasetSpec, ImageData, holdout_indices, load_dataset, load_node_file
from fedkd.institution.classifier import parse_model_args
from fedkd.institution.host import TeacherHost
from fedkd.institution.privacy.settings import DPTrainingSettings, PrivacySettings, privacy_keys
from fedkd.institution.training import client_partitions, load_or_train_teacher
from fedkd.metrics import predict
from fedkd.options import ConfigError
from fedkd.task import Task

from .cli import host_from_model, parse_label_counts

logger = logging.getLogger(__name__)

TEACHER_RECIPE = "fedkd-teacher/1"  # bump when train_teacher changes what a config produces


class NodeConfigError(ValueError):
    """The node's own configuration (``--node-config``) is missing something or contradicts the run."""


@dataclass(frozen=True)
class NodeData:
    spec: DatasetSpec
    train: ImageData
    holdout: ImageData | None  # local held-out data for federated evaluation
    source: str  # where it came from, for logs and fingerprints
    partition: int | None  # the simulation partition, None in a deployment


def data_source(config: RunConfig, node_config: Mapping[str, Any]) -> tuple[str, int | None]:
    """Where this node's data comes from ("file:<path>" or "partition:<k>/<n>") and its partition, unread."""
    if "data-path" in node_config:
        return f"file:{Path(str(node_config['data-path'])).expanduser().resolve()}", None
    if "partition-id" in node_config:
        k, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", config.num_clients))
        if n != config.num_clients:
            raise NodeConfigError(f"the simulation has {n} nodes but num-clients={config.num_clients}; start it "
                                  f"with num-supernodes={config.num_clients} or set num-clients={n}")
        return f"partition:{k}/{n}", k
    raise NodeConfigError("node config has neither data-path (a deployment: the node's .npz file) nor "
                          "partition-id (a simulation); start the SuperNode with "
                          "--node-config 'data-path=\"/path/to/data.npz\"'")


def node_data(config: RunConfig, node_config: Mapping[str, Any]) -> NodeData:
    """This node's private data, from its data path (deployment) or its partition (simulation)."""
    spec = SPECS[config.dataset]
    source, k = data_source(config, node_config)
    if k is None:
        train, holdout = load_node_file(source[len("file:"):], spec)
        return NodeData(spec, train, holdout, source, None)
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    parts = client_partitions(config, split.train.labels)
    held = holdout_indices(split.test.labels, config.num_clients, config.seed)
    return NodeData(spec, split.train.subset(parts[k]), split.test.subset(held[k]), source, k)


def _fingerprint(config: RunConfig, source: str, model_name: str, client: int) -> str:
    keys = ("dataset", "data-root", "num-clients", "partition", "alpha", "classes-per-client", "min-partition-size",
            "seed", "teacher-epochs", "teacher-lr", "teacher-batch-size", "teacher-label-smoothing",
            "dp-epsilon", "dp-delta", "dp-max-grad-norm", "dp-batch-size", "dp-lr", "dp-feature-epsilon",
            "dp-feature-clip", "pate-teachers")
    settings = {k: config.to_dict()[k] for k in keys}
    settings["data-root"] = str(Path(config.data_root).resolve())
    settings["dp-sgd"] = config.privacy_modes()[client] == "dp-sgd"
    settings["pate"] = config.privacy_modes()[client] == "pate"
    if config.teachers.recipe != "closed":  # (closed teachers keep the fingerprints they had before the key)
        settings["teacher-recipe"] = config.teachers.recipe
    if config.teachers.density:  # a teacher with a density is another checkpoint (teachers without keep theirs)
        settings["teacher-density"] = True
    if source.startswith("file:") and Path(source[5:]).exists():
        stat = Path(source[5:]).stat()
        source += f":{stat.st_size}:{stat.st_mtime_ns}"
    blob = json.dumps({"recipe": TEACHER_RECIPE, "model": model_name, "client": client, "source": source,
                       **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDKD_CACHE_DIR") or Path.home() / ".cache" / "fedkd")


def teacher_path(config: RunConfig, node_config: Mapping[str, Any], client: int) -> Path:
    """Where this node keeps its teacher: ``teacher-ckpt``, or the cache under the teacher's fingerprint."""
    if "teacher-ckpt" in node_config:
        return Path(str(node_config["teacher-ckpt"])).expanduser()
    name = config.teacher_models()[client]
    source, _ = data_source(config, node_config)
    return cache_dir() / "teachers" / f"{name}-{_fingerprint(config, source, name, client)}.pt"


# The keys of a node's privacy settings (the privacy and DP-training sections). In a deployment they come from the
# node config only (defaults otherwise), never from the coordinator's run config; in a simulation
# (``partition-id``) the experimenter is every party and the run config stands in for each node's own.
PRIVACY_KEYS = privacy_keys()


def node_privacy(config: RunConfig, node_config: Mapping[str, Any], client: int) -> tuple[PrivacySettings, RunConfig]:
    """This node's privacy settings, and the run config with them in place (what trains and serves its teacher)."""
    if "partition-id" in node_config:
        own = config
    else:
        values = {key: node_config[key] for key in PRIVACY_KEYS if key in node_config}
        if "," in str(values.get("privacy-mode", "")):
            raise NodeConfigError(f"privacy-mode: {values['privacy-mode']!r}; a node sets one mode, its own")
        try:  # one mode stands for every client of the run config; this node only ever uses its own
            own = config_from_mapping(values, base=config.replace(privacy=PrivacySettings(),
                                                                  dp_training=DPTrainingSettings()))
        except ConfigError as exc:
            raise NodeConfigError(f"node config: {exc}") from None
    return own.privacy.for_client(client), own


OWN_MODEL_KEYS = ("model", "weights", "task", "model-args", "label-counts", "eval-data", "unknown-output",
                  "density-data", "class-statistics-data")


@dataclass(frozen=True)
class OwnModel:
    """The institution's own classifier, as its node config names it (read on the node only)."""

    spec: str
    task: Task
    weights: str | None
    model_args: dict[str, Any]
    label_counts: list[int] | None
    eval_data: str | None
    unknown_output: bool = False  # the model answers one logit more, last "unknown" (fedkd teacher --unknown-output)
    density_data: str | None = None  # its own images, whose density it answers too (fedkd teacher --density-data)
    # its own labelled images, whose per-class BatchNorm statistics it releases a term on (--class-statistics-data)
    class_statistics_data: str | None = None

    @property
    def source(self) -> Path:
        """The file the model comes from (its weights, or the exported program): its ledger is kept beside it."""
        return Path(self.weights or self.spec)


def own_model(node_config: Mapping[str, Any]) -> OwnModel | None:
    """The node's own classifier (node config ``model``), None when the node trains fedkd's teacher instead;
    NodeConfigError naming the key that is missing or contradicts the rest."""
    if "model" not in node_config:
        stray = [k for k in OWN_MODEL_KEYS if k in node_config]
        if stray:
            raise NodeConfigError(f"node config: {stray[0]} goes with model (your own classifier), which is not set")
        return None
    other = [k for k in ("data-path", "teacher-ckpt") if k in node_config]
    if other:
        raise NodeConfigError(f"node config: model serves your own classifier and {other[0]} is for a teacher fedkd "
                              "trains; give one or the other")
    if "task" not in node_config:
        raise NodeConfigError("node config: model needs task, the run's task card (a path on this node)")
    def text(key: str) -> str | None:
        return str(node_config[key]) if key in node_config else None

    task = Task.from_toml(str(node_config["task"]))
    try:
        counts = parse_label_counts(text("label-counts"), task, "node config label-counts")
        args = parse_model_args(text("model-args"))
    except ValueError as exc:
        raise NodeConfigError(str(exc).replace("--model-args", "node config model-args")) from None
    unknown = node_config.get("unknown-output", False)
    if not isinstance(unknown, bool):  # as every boolean key: TOML's true or false, never a quoted string
        quoted = "; write it without quotes" if isinstance(unknown, str) else ""
        raise NodeConfigError(f"node config: unknown-output is {unknown!r}; give true or false{quoted}")
    return OwnModel(str(node_config["model"]), task, text("weights"), args, counts, text("eval-data"), unknown,
                    text("density-data"), text("class-statistics-data"))


def own_model_host(own: OwnModel, config: RunConfig, privacy: PrivacySettings, client: int) -> TeacherHost:
    """The host of the node's own classifier, checked (SPEC, weights, a dry forward on the task) as ``fedkd
    teacher --model`` checks it."""
    return host_from_model(own.spec, own.task, weights=own.weights, model_args=own.model_args,
                           label_counts=own.label_counts, max_batch=config.teachers.max_query_batch, client=client,
                           privacy=privacy, access=access_modes(config.teacher_access_modes()[client]),
                           unknown_output=own.unknown_output, density_data=own.density_data,
                           class_statistics_data=own.class_statistics_data)


@dataclass
class NodeTeacher:
    path: Path
    model: nn.Module
    checkpoint: dict[str, Any]
    trained: bool  # False: loaded from an existing checkpoint
    seconds: float

    @property
    def privacy(self) -> dict[str, Any] | None:
        return self.checkpoint.get("privacy")


def ensure_teacher(config: RunConfig, node_config: Mapping[str, Any], data: NodeData, client: int, *,
                   device: torch.device | str = "cpu") -> NodeTeacher:
    """Load this node's teacher, or train it on the node's data alone and keep the checkpoint on the node.

    ``config`` is the run config with this node's own privacy settings in place (:func:`node_privacy`)."""
    if not 0 <= client < config.num_clients:
        raise ConfigError(f"client index {client} is outside 0..{config.num_clients - 1} (num-clients)")
    started = time.perf_counter()
    name = config.teacher_models()[client]
    # The data's client index decides the training order seed; in a simulation it is the partition.
    k = data.partition if data.partition is not None else client
    # An institution's own checkpoint (teacher-ckpt) may hold any architecture that fits the data.
    expected = None if "teacher-ckpt" in node_config else name
    path = teacher_path(config, node_config, client)
    model, ckpt, trained = load_or_train_teacher(path, name, data.train, data.spec, config, client=k,
                                                 device=device, expected_model=expected, stage=logger.info,
                                                 dp=config.privacy_modes()[client] == "dp-sgd",
                                                 pate=config.dp_training.pate_teachers
                                                 if config.privacy_modes()[client] == "pate" else 0)
    return NodeTeacher(path, model.cpu(), ckpt, trained, time.perf_counter() - started)


def count_correct(model: nn.Module, data: ImageData, spec: DatasetSpec, *,
                  device: torch.device | str = "cpu") -> tuple[int, int]:
    """(correct, total) of ``model`` on ``data``; computed on the node, released only as the caller decides."""
    if len(data) == 0:
        return 0, 0
    logits = predict(model, spec.normalize(data.images), device=device)
    return int((logits.argmax(1) == data.labels).sum()), len(data)
