"""One federated data-free distillation experiment on one machine, end to end.

data -> client partitions -> each client trains its teacher on its own
partition and serves it through a :class:`TeacherHost` -> the coordinator
evaluates the teachers and their ensemble through queries -> the method
distils a student, evaluating every epoch and checkpointing -> summary.json,
metrics.jsonl and plots in the run directory.

The method only reaches the teachers through a :class:`~fedkd.pool.TeacherPool`:
in-process hosts by default, or (``transport=grpc``) teacher agents behind the
hub, which the ``server`` package supplies as a :class:`Transport`.
:func:`distill` is the coordinator's half alone (used by ``fedkd distill`` with
teachers that live elsewhere). One-shot FedAvg and the centralised model are
experiment-only references that need the teachers' weights or the pooled data,
which no deployment would have.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedkd.checkpoint import RUN_FORMAT, CheckpointError, load_run_state, save_atomic, save_teacher
from fedkd.config import ConfigError, RunConfig
from fedkd.data import SPECS, DatasetSpec, DataSplit, ImageData, load_dataset
from fedkd.ensemble import Ensemble, ZerothOrder
from fedkd.methods import MethodContext, build_method
from fedkd.metrics import EnsembleAnswers, accuracy, agreement, loyalty, mean_and_variance, predict, query_ensemble
from fedkd.models import average_weights, build_model, is_model_name, model_names
from fedkd.plots import plot_accuracy, plot_curriculum, plot_queries, plot_samples
from fedkd.pool import LocalPool, TeacherPool
from fedkd.privacy.ledger import ledger_path
from fedkd.privacy.policy import ReleasePolicy
from fedkd.synthetic_pool import pool_bytes
from fedkd.teacher import (
    QueryStats,
    TeacherDescription,
    TeacherHost,
    access_modes,
    describe_checkpoint,
    unusable,
)
from fedkd.training import client_partitions, load_or_train_teacher, train_teacher

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"device", "num-threads"}
LEDGER = "queries.json"  # the coordinator's per-teacher query counts, after every round


class RunObserver(Protocol):
    """Progress hooks for entry points (a progress bar); the library itself prints nothing."""

    def stage(self, message: str) -> None: ...

    def epoch_started(self, epoch: int, total_steps: int) -> None: ...

    def step(self) -> None: ...

    def epoch_finished(self, record: dict[str, Any]) -> None: ...


class LogObserver:
    """The observer of a run without one: progress goes to the ``fedkd.experiment`` logger (INFO), nothing is
    printed."""

    def stage(self, message: str) -> None:
        logger.info(message)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_finished(self, record: dict[str, Any]) -> None:
        if record["student_accuracy"] is None:
            logger.info("epoch %d done", record["epoch"] + 1)
        else:
            logger.info("epoch %d: student accuracy %.4f", record["epoch"] + 1, record["student_accuracy"])


class RunDirectoryError(FileExistsError):
    """The run directory cannot be used as asked (exists without --resume, or nothing to resume)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable, else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_pool_memory(config: RunConfig, memory: int | None = None) -> None:
    """Refuse a synthetic pool that would take more than half the memory available, naming its size."""
    spec = SPECS[config.dataset]
    need = pool_bytes(config.pool_size, spec.input_shape, spec.num_classes)
    memory = available_memory() if memory is None else memory
    if need > memory // 2:
        raise ConfigError(f"pool-size: {config.pool_size:,} samples of {config.dataset} would need "
                          f"{need / 2**20:,.0f} MiB, more than half the {memory / 2**20:,.0f} MiB available; "
                          f"lower pool-size")


def check_names(config: RunConfig) -> None:
    """Fail at start-up on a model that cannot be built for the dataset (an unknown name, a wide ResNet depth
    that is not 6n+4, images too small), naming the key: built on the meta device, so nothing is allocated."""
    spec = SPECS[config.dataset]
    for key, names in (("teacher-model", config.teacher_models()), ("student-model", [config.student_model])):
        for name in dict.fromkeys(names):
            if not is_model_name(name):
                raise ConfigError(f"{key}: unknown model {name!r}; valid: {', '.join(model_names())}")
            try:
                with torch.device("meta"):
                    _build(name, spec)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{key}: {exc.args[0] if exc.args else exc}") from None


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
    yield LocalPool([TeacherHost(c.model, c.description, max_batch=config.max_query_batch, device=device,
                                 policy=c.policy) for c in clients])


def _build(name: str, spec: DatasetSpec) -> nn.Module:
    return build_model(name, num_classes=spec.num_classes, channels=spec.channels, image_size=spec.image_size)


def _teacher_path(run_dir: Path, client: int) -> Path:
    return run_dir / "clients" / f"client_{client:02d}" / "teacher.pt"


def prepare_clients(config: RunConfig, split: DataSplit, run_dir: Path, device: torch.device,
                    observer: RunObserver) -> list[ClientTeacher]:
    """Each client trains (or reloads) its teacher on its own partition and starts its host."""
    clients = []
    for k, (indices, model_name) in enumerate(zip(client_partitions(config, split.train.labels),
                                                  config.teacher_models())):
        path = _teacher_path(run_dir, k)
        settings = config.client_privacy(k)
        model, ckpt, _ = load_or_train_teacher(path, model_name, split.train.subset(indices), split.spec, config,
                                               client=k, device=device, expected_model=model_name,
                                               stage=observer.stage, dp=settings.mode == "dp-sgd",
                                               pate=config.pate_teachers if settings.mode == "pate" else 0)
        try:
            policy = ReleasePolicy(settings, num_records=len(indices), training=ckpt.get("privacy"),
                                   ledger_path=ledger_path(path))
        except ValueError as exc:
            raise ConfigError(f"client {k}: {exc}") from None
        description = describe_checkpoint(ckpt, model, client=k, share_label_counts=config.share_label_counts,
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
        avg = _build(names[0], spec)
        avg.load_state_dict(average_weights([c.model for c in clients]))
        refs["fedavg"] = {"model": names[0], "test_accuracy": accuracy(
            predict(avg.to(device), test_inputs, device=device), split.test.labels)}
    if config.centralised:
        observer.stage(f"centralised reference: training {names[0]} on the pooled {len(split.train)} samples")
        seed = config.seed * 1000 + 999
        model, _ = train_teacher(names[0], split.train, spec, config, init_seed=seed,
                                 order_seed=seed, device=device)
        refs["centralised"] = {"model": names[0], "test_accuracy": accuracy(
            predict(model, test_inputs, device=device), split.test.labels)}
    return refs


def _stage_epochs(epochs: int, stages: int) -> set[int]:
    if stages == 1:
        return {epochs - 1}
    return {round(i * (epochs - 1) / (stages - 1)) for i in range(stages)}


def _check_resume_config(saved: dict[str, Any], config: RunConfig, path: Path) -> None:
    current = config.to_dict()
    changed = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume {str(path)!r} with a different config ({detail}); "
                          "use the original settings or start a new run directory")


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{str(path)!r} is corrupt ({exc}); it records the run's settings, so the run cannot "
                                "be resumed safely: restore it from a copy or start a new run directory") from None
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{str(path)!r} holds a {type(saved).__name__}, not the run's settings; restore it "
                                "from a copy or start a new run directory")
    return saved


def open_run_dir(config: RunConfig, run_dir: Path, *, resume: bool) -> dict[str, Any] | None:
    """Claim ``run_dir`` for a new run, or check it for resumption; returns the saved state if any."""
    ckpt_path = run_dir / "checkpoint.pt"
    config_path = run_dir / "config.json"
    saved_state: dict[str, Any] | None = None
    if resume:
        if not config_path.exists():
            raise RunDirectoryError(f"nothing to resume in {str(run_dir)!r} (no config.json); run without --resume")
        _check_resume_config(_read_config_json(config_path), config, config_path)
        if ckpt_path.exists():
            saved_state = load_run_state(ckpt_path)
            if saved_state["epoch"] >= config.epochs and (run_dir / "summary.json").exists():
                raise RunDirectoryError(f"the run in {str(run_dir)!r} is finished (all {config.epochs} epochs); its "
                                        f"results are in {str(run_dir / 'summary.json')!r}; nothing to resume")
    elif config_path.exists() or ckpt_path.exists():
        raise RunDirectoryError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue "
                                "it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return saved_state


def _has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds work worth resuming: a run checkpoint or a trained teacher."""
    return (run_dir / "checkpoint.pt").exists() or any((run_dir / "clients").glob("*/teacher.pt"))


@contextmanager
def claim_run_dir(config: RunConfig, run_dir: Path, *, resume: bool) -> Iterator[dict[str, Any] | None]:
    """:func:`open_run_dir` for the duration of a run: a new run that fails before it has made any progress
    gives the directory back (its config.json removed), so the same command can run again once the cause is
    fixed. An interrupt keeps it: the operator was told to --resume."""
    saved_state = open_run_dir(config, run_dir, resume=resume)
    try:
        yield saved_state
    except Exception:
        if not resume and not _has_progress(run_dir):
            (run_dir / "config.json").unlink(missing_ok=True)
        raise


def setup(config: RunConfig) -> torch.device:
    """Checks and settings every entry point does first."""
    check_names(config)
    check_pool_memory(config)
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    return device


def run_experiment(config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                   observer: RunObserver | None = None, transport: Transport | None = None) -> dict[str, Any]:
    """Run (or resume) one experiment and return its summary (also written to summary.json)."""
    observer = observer or LogObserver()
    run_dir = Path(run_dir)
    device = setup(config)
    if transport is None:
        if config.transport != "inprocess":
            raise ConfigError(f"transport: {config.transport!r} needs the coordinator's hub; run it with "
                              "`fedkd run` (or pass server.loopback.grpc_transport)")
        transport = in_process
    with claim_run_dir(config, run_dir, resume=resume) as saved_state:
        started = time.perf_counter()
        observer.stage(f"loading {config.dataset}")
        split = load_dataset(config.dataset, config.data_root, seed=config.seed)
        clients = prepare_clients(config, split, run_dir, device, observer)
        test_inputs = split.spec.normalize(split.test.images)
        references = _references(config, split, clients, test_inputs, device, observer)
        with transport(clients, config, run_dir, device) as pool:
            summary = distill(config, pool, split.spec, split.test, run_dir, device=device,
                              saved_state=saved_state, observer=observer, references=references, started=started)
    # Leaving the transport ends the session: clients have now reported what they released.
    summary["privacy"] = privacy_summary(clients, summary.get("privacy"))
    return finish_summary(summary, pool.client_reports(), run_dir)


def privacy_summary(clients: list[ClientTeacher], seen: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each client's own privacy record (its ledger, read back from the client's directory: in a one-machine
    run the experimenter may look) beside what the coordinator saw in Describe (``seen``)."""
    records = []
    for c in clients:
        if c.policy is None:
            continue
        c.policy.ledger.reload()
        records.append({"client": c.client, **c.policy.record()})
    if seen is None and all(r["mode"] == "none" for r in records):
        return None
    spent = [float(r["epsilon_spent"]) for r in records if r["mode"] != "none"]
    return {**(seen or {}), "clients": records, "max_epsilon_spent": max(spent, default=0.0)}


def distill(config: RunConfig, pool: TeacherPool, spec: DatasetSpec, test: ImageData | None, run_dir: Path, *,
            device: torch.device, saved_state: dict[str, Any] | None, observer: RunObserver,
            references: dict[str, Any] | None = None, started: float | None = None) -> dict[str, Any]:
    """The coordinator's half: evaluate the teachers through queries, distil, evaluate, checkpoint, report.

    ``test`` is the coordinator's own labelled data for evaluation, or None
    for a coordinator that holds none (accuracies are then left to federated
    evaluation and are None here); the teachers are only reached through ``pool``.
    """
    started = time.perf_counter() if started is None else started
    elapsed_before = float(saved_state["elapsed"]) if saved_state else 0.0
    _check_teachers(pool, spec)
    try:
        ensemble = Ensemble(pool, config.ensemble, reliability=config.reliability, logit_bound=config.logit_bound,
                            gradient_bound=config.gradient_bound,
                            zeroth_order=ZerothOrder(config.zo_directions, config.zo_radius, config.max_query_batch))
    except ValueError as exc:
        raise ConfigError(f"ensemble: {exc}") from None
    if ensemble.aggregation != config.ensemble:
        observer.stage(f"ensemble: {ensemble.aggregation} ({config.ensemble})")
    test_inputs = spec.normalize(test.images) if test is not None else None
    ckpt_path = run_dir / "checkpoint.pt"
    ledger_path = run_dir / LEDGER

    answers: EnsembleAnswers | None = None
    if saved_state is not None:
        if saved_state["answers"] is not None:
            answers = EnsembleAnswers(saved_state["answers"]["ensemble"], list(saved_state["answers"]["members"]))
        try:
            # The ledger is written after every round, the checkpoint after every epoch: after a crash the
            # ledger also holds the queries of the epoch that is about to be repeated (the teachers answered them).
            pool.restore_stats(_read_ledger(ledger_path, len(saved_state["query_stats"]))
                               or saved_state["query_stats"])
        except TypeError as exc:
            raise CheckpointError(f"checkpoint {str(run_dir / 'checkpoint.pt')!r}: field 'query_stats' does not "
                                  f"fit this run: {exc}") from None
    elif test_inputs is not None:
        observer.stage(f"evaluating {len(ensemble)} teachers and their ensemble through queries")
        answers = query_ensemble(ensemble, test_inputs, batch_size=config.max_query_batch)

    torch.manual_seed(config.seed + 1)
    student = _build(config.student_model, spec)
    method = build_method(config.method, MethodContext(config, spec, ensemble, student, device))
    history: list[dict[str, Any]] = []
    stages: list[tuple[int, Tensor]] = []
    start_epoch = 0
    if saved_state is not None:
        try:
            method.load_state_dict(saved_state["method"])
            if saved_state.get("ensemble") is not None:  # absent from checkpoints of older versions
                ensemble.load_state_dict(saved_state["ensemble"])
            torch.set_rng_state(saved_state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not fit this run "
                                  f"({type(exc).__name__}: {exc})") from None
        history = list(saved_state["history"])
        stages = [(int(e), img) for e, img in zip(saved_state["stage_epochs"], saved_state["stage_images"])]
        start_epoch = int(saved_state["epoch"])
        observer.stage(f"resuming at epoch {start_epoch + 1} of {config.epochs}" if start_epoch < config.epochs
                       else f"all {config.epochs} epochs were done before the restart; writing the results")

    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    stage_epochs = _stage_epochs(config.epochs, config.sample_stages)
    for epoch in range(start_epoch, config.epochs):
        observer.epoch_started(epoch, config.steps_per_epoch)
        epoch_start = time.perf_counter()
        def step() -> None:
            observer.step()
            _write_ledger(pool, ledger_path)

        train_metrics = method.train_epoch(epoch, step)
        record: dict[str, Any] = {"epoch": epoch, "student_accuracy": None, "agreement": None, "loyalty": None}
        if test is not None and test_inputs is not None and answers is not None:
            student_logits = predict(method.student, test_inputs, device=device)
            record.update(student_accuracy=accuracy(student_logits, test.labels),
                          agreement=agreement(student_logits, answers.ensemble),
                          loyalty=loyalty(student_logits, answers.ensemble))
        record.update({
            **train_metrics,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "query_samples": sum(s.samples for s in pool.stats()),
        })
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if epoch in stage_epochs:
            stages.append((epoch, method.synthetic_samples()))
        save_atomic({
            "format": RUN_FORMAT,
            "epoch": epoch + 1,
            "method": method.state_dict(),
            "history": history,
            "stage_epochs": [e for e, _ in stages],
            "stage_images": [img for _, img in stages],
            "rng": torch.get_rng_state(),
            "elapsed": elapsed_before + time.perf_counter() - started,
            "answers": {"ensemble": answers.ensemble, "members": answers.members} if answers else None,
            "query_stats": [s.as_dict() for s in pool.stats()],
            "ensemble": ensemble.state_dict(),
        }, ckpt_path)
        observer.epoch_finished(record)

    # The distilled model, in the teacher checkpoint format (load_teacher reads it; it could serve as a teacher).
    save_teacher(run_dir / "student.pt", method.student, model_name=config.student_model,
                 num_classes=spec.num_classes, input_shape=spec.input_shape, num_samples=0,
                 label_counts=[0] * spec.num_classes, mean=spec.mean, std=spec.std)
    summary = _summary(config, test, pool, ensemble, answers, references or {"fedavg": None, "centralised": None},
                       history, elapsed_before + time.perf_counter() - started)
    report = getattr(method, "report", None)
    summary["method_report"] = report() if report is not None else {}
    write_summary(summary, run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if answers is not None:
        best_teacher = max(t["test_accuracy"] for t in summary["teachers"])
        plot_accuracy(history, summary["ensemble"]["test_accuracy"], best_teacher, plots / "accuracy.png")
    plot_curriculum(history, plots / "curriculum.png")
    if answers is not None:
        plot_queries(history, summary["ensemble"]["test_accuracy"], plots / "queries.png")
    plot_samples(stages, plots / "samples.png")
    return summary


def _write_ledger(pool: TeacherPool, path: Path) -> None:
    """The coordinator's count of each teacher's queries, replaced atomically (after every round)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([s.as_dict() for s in pool.stats()]))
    os.replace(tmp, path)


def _read_ledger(path: Path, teachers: int) -> list[dict[str, int]] | None:
    """The ledger if it is readable and fits ``teachers`` (else None: the checkpoint's counts are used)."""
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    fields = set(QueryStats().as_dict())
    if (not isinstance(stats, list) or len(stats) != teachers
            or not all(isinstance(s, dict) and set(s) == fields for s in stats)):
        logger.warning("%s does not fit this run; using the checkpoint's query counts", path)
        return None
    return stats


def reconcile_queries(per_client: list[dict[str, Any]], reported: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the coordinator's count of each teacher's queries with what the teacher reports it released.

    They differ when answers reached a teacher but not the coordinator's count (late past query-timeout, refused
    as malformed, or in flight when the coordinator was killed: the ledger is written after every round), or
    when a teacher's own count started again (its agent or host process restarted).
    """
    differences = []
    for counted, report in zip(per_client, reported):
        client = counted.get("client")
        if report.get("reported") is False:
            differences.append({"client": client, "reported": None,
                                "why": "the teacher sent no report (not connected when the session ended)"})
            continue
        delta = {k: int(report.get(k, 0)) - int(counted.get(k, 0))
                 for k in ("forward_calls", "backward_calls", "samples") if report.get(k) != counted.get(k)}
        if not delta:
            continue
        why = ("the teacher answered queries the coordinator did not count: late past query-timeout, refused as "
               "malformed, or in flight when the coordinator stopped" if all(v > 0 for v in delta.values()) else
               "the teacher's own count started again: its agent or host process restarted during the run")
        differences.append({"client": client, "reported_minus_counted": delta, "why": why})
    return {"agree": not differences, "differences": differences}


def finish_summary(summary: dict[str, Any], reports: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """Add what the clients report they released (after the session ended) and how it compares with the
    coordinator's count, and write summary.json."""
    queries = summary["queries"]
    queries["reported_by_clients"] = reports
    queries["reconciliation"] = reconcile_queries(queries["per_client"], reports)
    if not queries["reconciliation"]["agree"]:
        logger.warning("the teachers' own query counts differ from the coordinator's: %s",
                       queries["reconciliation"]["differences"])
    write_summary(summary, run_dir)
    return summary


def write_summary(summary: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _check_teachers(pool: TeacherPool, spec: DatasetSpec) -> None:
    """The coordinator evaluates on its own data: every teacher must take that data's inputs and classes."""
    for k, d in enumerate(pool.descriptions):
        if (why := unusable(d, spec)) is not None:
            raise ConfigError(f"dataset: teacher {k} ({d.model}) cannot take the run's {spec.name!r} data: {why}")


def _summary(config: RunConfig, test: ImageData | None, pool: TeacherPool, ensemble: Ensemble,
             answers: EnsembleAnswers | None, references: dict[str, Any], history: list[dict[str, Any]],
             wall: float) -> dict[str, Any]:
    last = history[-1]
    if test is None or answers is None:  # no coordinator data: only what the queries and training tell
        accuracies: list[float | None] = [None] * len(pool.descriptions)
        ensemble_accuracy = None
        student: dict[str, Any] = {"model": config.student_model, "test_accuracy": None, "best_accuracy": None,
                                   "agreement": None, "loyalty": None, "accuracy_mean": None, "accuracy_var": None}
    else:
        accuracies = [accuracy(logits, test.labels) for logits in answers.members]
        ensemble_accuracy = accuracy(answers.ensemble, test.labels)
        accs = [h["student_accuracy"] for h in history]
        acc_mean, acc_var = mean_and_variance(accs)
        student = {"model": config.student_model, "test_accuracy": last["student_accuracy"],
                   "best_accuracy": max(accs), "agreement": last["agreement"], "loyalty": last["loyalty"],
                   "accuracy_mean": acc_mean, "accuracy_var": acc_var}
    return {
        "method": config.method,
        "dataset": config.dataset,
        "num_clients": config.num_clients,
        "seed": config.seed,
        "teachers": [
            {"client": d.client, "model": d.model, "num_samples": d.num_samples, "test_accuracy": acc}
            for d, acc in zip(pool.descriptions, accuracies)
        ],
        "ensemble": {"aggregation": ensemble.aggregation, "requested": config.ensemble,
                     "test_accuracy": ensemble_accuracy,
                     # a release by the clients (their label histograms), visible here; None = not used
                     "label_counts_from": ensemble.label_counts_from,
                     # per teacher: reliability weight, agreement with the others, what was clipped
                     "teachers": ensemble.report()},
        "student": student,
        "references": references,
        "transport": config.transport,
        "pool": {"samples": last.get("pool_size"), "size_limit": config.pool_size},
        "queries": {
            "samples": sum(s.samples for s in pool.stats()),
            "distillation_samples": last.get("budget_spent"),
            "budget": config.query_budget or None,
            "bytes": sum(s.bytes for s in pool.stats()),
            "per_client": [{"client": d.client, **s.as_dict()} for d, s in zip(pool.descriptions, pool.stats())],
            "reported_by_clients": pool.client_reports(),
        },
        "privacy": _privacy_summary(pool),
        "test_samples": len(test) if test is not None else 0,
        "wall_seconds": wall,
        "config": config.to_dict(),
    }


def _privacy_summary(pool: TeacherPool) -> dict[str, Any] | None:
    """What each teacher states about its privacy (its Describe); None when no teacher uses a mechanism."""
    teachers = [{"client": d.client, **d.privacy} for d in pool.descriptions if d.privacy]
    if not teachers:
        return None
    return {"teachers": teachers, "max_epsilon_spent": max(float(t.get("epsilon_spent", 0.0)) for t in teachers)}
