"""One federated data-free distillation experiment on one machine, end to end: ``fedkd run``.

data -> client partitions -> each client trains its teacher on its own
partition (:mod:`fedkd.institution.training`, the recipe the clients use everywhere) and
serves it -> the coordinator's flow (:func:`fedkd.coordinator.flow.coordinate`):
evaluate the teachers and their ensemble through queries, distil, checkpoint,
summary.

The method only reaches the teachers through a :class:`~fedkd.coordinator.pool.TeacherPool`:
in-process hosts by default, or (``transport=grpc``) teacher agents behind the
hub, which the ``server`` package supplies as a :class:`Transport`. One-shot
FedAvg and the centralised model are experiment-only references that need the
teachers' weights or the pooled data, which no deployment would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.config import RunConfig
from fedkd.contract import TeacherDescription, access_modes
from fedkd.coordinator.distillation import Distillation, RunObserver
from fedkd.coordinator.flow import Session, coordinate, refuse_task
from fedkd.coordinator.pool import LocalPool, TeacherPool
from fedkd.data import DataSplit, load_dataset
from fedkd.institution.density import classifier_of
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.privacy.ledger import ledger_path
from fedkd.institution.privacy.policy import ReleasePolicy
from fedkd.institution.training import client_partitions, load_or_train_teacher, train_teacher
from fedkd.metrics import accuracy, predict
from fedkd.models import average_weights, build_model
from fedkd.options import ConfigError


@dataclass
class ClientTeacher:
    """One client's trained teacher, as the one-machine experiment holds it."""

    client: int
    model_name: str
    model: nn.Module  # the weights: used by the client's own host, and by the experiment-only FedAvg reference
    checkpoint: Path
    description: TeacherDescription
    policy: ReleasePolicy | None = None  # the client's release policy (its ledger: ledger.json beside checkpoint)


# A transport turns the clients' teachers into a pool the coordinator can query, for the
# duration of a run: the in-process hosts below, or ``server.loopback.grpc_transport``.
Transport = Callable[[list[ClientTeacher], RunConfig, Path, torch.device], AbstractContextManager[TeacherPool]]


@contextmanager
def in_process(clients: list[ClientTeacher], config: RunConfig, run_dir: Path,
               device: torch.device) -> Iterator[TeacherPool]:
    yield LocalPool([TeacherHost(c.model, c.description, max_batch=config.teachers.max_query_batch, device=device,
                                 policy=c.policy) for c in clients])


def _teacher_path(run_dir: Path, client: int) -> Path:
    return run_dir / "clients" / f"client_{client:02d}" / "teacher.pt"


def prepare_clients(config: RunConfig, split: DataSplit, run_dir: Path, device: torch.device,
                    observer: RunObserver) -> list[ClientTeacher]:
    """Each client trains (or reloads) its teacher on its own partition and starts its host."""
    clients = []
    for k, (indices, model_name) in enumerate(zip(client_partitions(config, split.train.labels),
                                                  config.teacher_models())):
        path = _teacher_path(run_dir, k)
        settings = config.privacy.for_client(k)
        model, ckpt, _ = load_or_train_teacher(path, model_name, split.train.subset(indices), split.spec, config,
                                               client=k, device=device, expected_model=model_name,
                                               stage=observer.stage, dp=settings.mode == "dp-sgd",
                                               pate=config.dp_training.pate_teachers if settings.mode == "pate" else 0)
        try:
            policy = ReleasePolicy(settings, num_records=len(indices), training=ckpt.get("privacy"),
                                   ledger_path=ledger_path(path))
        except ValueError as exc:
            raise ConfigError(f"client {k}: {exc}") from None
        description = describe_checkpoint(ckpt, model, client=k, share_label_counts=config.privacy.share_label_counts,
                                          access_modes=access_modes(config.teacher_access_modes()[k]), policy=policy)
        clients.append(ClientTeacher(k, model_name, model, path, description, policy))
    return clients


def _references(config: RunConfig, split: DataSplit, clients: list[ClientTeacher], test_inputs: Tensor,
                device: torch.device, observer: RunObserver) -> dict[str, Any]:
    """Experiment-only references: one-shot FedAvg (same architectures) and, opt-in, centralised."""
    refs: dict[str, Any] = {"fedavg": None, "centralised": None}
    names = config.teacher_models()
    spec = split.spec
    if len(set(names)) == 1 and set(config.privacy_modes()) == {"none"}:  # private teachers are not averaged
        unknown = int(config.teachers.recipe == "open-set")  # open-set teachers: "unknown" last, left out here
        avg = build_model(names[0], num_classes=spec.num_classes + unknown, channels=spec.channels,
                          image_size=spec.side)
        avg.load_state_dict(average_weights([classifier_of(c.model) for c in clients]))
        refs["fedavg"] = {"model": names[0], "test_accuracy": accuracy(
            predict(avg.to(device), test_inputs, device=device)[:, :spec.num_classes], split.test.labels)}
    if config.centralised:
        observer.stage(f"centralised reference: training {names[0]} on the pooled {len(split.train)} samples")
        seed = config.seed * 1000 + 999
        model, _ = train_teacher(names[0], split.train, spec, config, init_seed=seed,
                                 order_seed=seed, device=device)
        refs["centralised"] = {"model": names[0], "test_accuracy": accuracy(
            predict(model, test_inputs, device=device), split.test.labels)}
    return refs


class LocalTeachers:
    """The teachers of a one-machine experiment: every client trains (or reloads) its teacher in the run
    directory and serves it through ``transport`` (in-process hosts, or loopback agent processes)."""

    def __init__(self, config: RunConfig, transport: Transport) -> None:
        self.config, self.transport = config, transport
        self.clients: list[ClientTeacher] = []

    @contextmanager
    def session(self, run_dir: Path, device: torch.device, observer: RunObserver) -> Iterator[Session]:
        config = self.config
        observer.stage(f"loading {config.dataset}")
        split = load_dataset(config.dataset, config.data_root, seed=config.seed)
        self.clients = prepare_clients(config, split, run_dir, device, observer)
        test_inputs = split.spec.normalize(split.test.images)
        references = _references(config, split, self.clients, test_inputs, device, observer)
        with self.transport(self.clients, config, run_dir, device) as pool:
            yield Session(pool, config.queries.transport, test=split.test,
                          references=references, privacy_records=self.privacy_records)

    def finish(self, result: Distillation, session: Session, observer: RunObserver) -> None:
        pass

    def privacy_records(self) -> list[dict[str, Any]]:
        """Each client's own privacy record (its ledger, read back from the client's directory: in a one-machine
        run the experimenter may look)."""
        records = []
        for c in self.clients:
            if c.policy is not None:
                c.policy.ledger.reload()
                records.append({"client": c.client, **c.policy.record()})
        return records


def run_experiment(config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                   observer: RunObserver | None = None, transport: Transport | None = None) -> dict[str, Any]:
    """Run (or resume) one experiment and return its summary (also written to summary.json)."""
    refuse_task(config, "fedkd run")
    if transport is None:
        if config.queries.transport != "inprocess":
            raise ConfigError(f"transport: {config.queries.transport!r} needs the coordinator's hub; run it with "
                              "`fedkd run` (or pass server.loopback.grpc_transport)")
        transport = in_process
    return coordinate(config, Path(run_dir), LocalTeachers(config, transport), resume=resume, observer=observer)
