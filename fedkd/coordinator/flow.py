"""One coordinator flow for every entry point: ``fedkd run``, ``fedkd distill`` and the Flower ServerApp.

    check the config -> claim (or resume) the run directory -> reach the teachers
    -> distil -> end the session -> what only this entry point adds (federated
    evaluation of the student, in memory) -> the summary, built once and written once

The one thing the entry points differ in is where the teachers are and how
the coordinator reaches them: a :class:`Teachers` (in-process hosts or
loopback agent processes for ``fedkd run``, agents that dial in for ``fedkd
distill``, Flower nodes for the ServerApp). Everything else is
:func:`coordinate`, so a capability lands once for all three.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedkd.config import RunConfig
from fedkd.coordinator.distillation import Distillation, RunObserver, build, distill, epoch_line
from fedkd.coordinator.evaluation import evaluate_at_institutions
from fedkd.coordinator.export import export_program, model_card, onnx_available, write_model_card, write_onnx
from fedkd.coordinator.pool import TeacherPool
from fedkd.coordinator.rundir import claim_run_dir
from fedkd.coordinator.summary import build_summary, save_student, write_results
from fedkd.coordinator.synthetic_pool import pool_bytes
from fedkd.data import DatasetSpec, ImageData, load_dataset
from fedkd.imports import load_heavy
from fedkd.models import build_classifier, is_code_spec, is_model_name, is_student_spec, model_names
from fedkd.options import ConfigError, resolve_device
from fedkd.task import Task

logger = logging.getLogger(__name__)


class LogObserver:
    """The observer of a run without one: progress goes to the ``fedkd.coordinator.flow`` logger (INFO), nothing is
    printed."""

    def stage(self, message: str) -> None:
        logger.info(message)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_finished(self, record: dict[str, Any]) -> None:
        logger.info("%s", epoch_line(record))


@dataclass
class Session:
    """The teachers of one run as the coordinator reaches them, and what the entry point brings beside them."""

    pool: TeacherPool
    transport: str  # inprocess | grpc | flower, for the summary
    test: ImageData | None = None  # the coordinator's own labelled data, None when it holds none
    references: dict[str, Any] | None = None  # experiment-only references (one-shot FedAvg, centralised)
    # Each client's own privacy record, where the coordinator may read it (a one-machine experiment).
    privacy_records: Callable[[], list[dict[str, Any]]] | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # summary sections only this entry point has


class Teachers(Protocol):
    """Where a run's teachers are and how the coordinator reaches them."""

    def session(self, run_dir: Path, device: torch.device, observer: RunObserver) -> AbstractContextManager[Session]:
        """Reach the teachers (train them, start their agents, wait for them to dial in). Leaving ends the
        session: afterwards the pool's ``client_reports`` hold what each client says it released."""
        ...

    def finish(self, result: Distillation, session: Session, observer: RunObserver) -> None:
        """After the session ended: what only this entry point does with the student (in memory), recorded in
        ``session.sections``."""
        ...


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable, else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_pool_memory(config: RunConfig, memory: int | None = None, spec: DatasetSpec | None = None) -> None:
    """Refuse a synthetic pool that would take more than half the memory available, naming its size (``spec``:
    the run task's, read from the config when not given)."""
    spec = spec or config.run_task().spec
    need = pool_bytes(config.pool.size, spec.input_shape, spec.num_classes)
    memory = available_memory() if memory is None else memory
    if need > memory // 2:
        raise ConfigError(f"pool-size: {config.pool.size:,} samples of {spec.name} would need "
                          f"{need / 2**20:,.0f} MiB, more than half the {memory / 2**20:,.0f} MiB available; "
                          f"lower pool-size")


def check_names(config: RunConfig, spec: DatasetSpec) -> None:
    """Fail at start-up on a model that cannot be built for the task (an unknown name, a wide ResNet depth
    that is not 6n+4, images too small), naming the key: built on the meta device, so nothing is allocated."""
    for name in dict.fromkeys(config.teacher_models()):
        if not is_model_name(name):
            raise ConfigError(f"teacher-model: unknown model {name!r}; valid: {', '.join(model_names())}")
        try:
            with torch.device("meta"):
                build(name, spec)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"teacher-model: {exc.args[0] if exc.args else exc}") from None
    if not is_student_spec(config.student.model):
        raise ConfigError(f"student-model: unknown model {config.student.model!r}; valid: {', '.join(model_names())}, "
                          "torchvision:NAME or PACKAGE.MODULE:CALLABLE (your own code)")
    load_heavy("torch._dynamo")  # (the forward below on the meta device imports it: see fedkd.imports)
    try:
        with torch.device("meta"):
            student = build_classifier(config.student.model, num_classes=spec.num_classes, channels=spec.channels,
                                       image_size=spec.side, args=config.student.arguments())
            out = student.eval()(torch.zeros(2, *spec.input_shape))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        hint = (f" (torchvision's classifiers take 3 channels and the task has {spec.channels}: give a fedkd model or "
                "your own PACKAGE.MODULE:CALLABLE)" if config.student.model.startswith("torchvision:")
                and spec.channels != 3 else "")
        raise ConfigError(f"student-model: {exc.args[0] if exc.args else exc}{hint}") from None
    if tuple(out.shape) != (2, spec.num_classes):
        raise ConfigError(f"student-model: {config.student.model!r} answers {tuple(out.shape)} for a batch of 2; the "
                          f"task has {spec.num_classes} classes")


def refuse_task(config: RunConfig, what: str) -> None:
    """An entry point whose clients train their teachers on a built-in dataset cannot take a task card."""
    if config.task:
        raise ConfigError(f"task: {what} trains each client's teacher on a built-in dataset; with a task card the "
                          "institutions serve their own models: run fedkd distill, and at each institution fedkd "
                          "teacher --model SPEC --weights FILE --task CARD (or a Flower deployment whose "
                          "SuperNodes name their model in --node-config)")


def refuse_code_student(config: RunConfig, what: str) -> None:
    """An entry point whose institutions rebuild the student (to evaluate it) cannot take a student of the
    coordinator's own code: a node imports no code that a run config names."""
    if is_code_spec(config.student.model):
        raise ConfigError(f"student-model: {config.student.model!r} is built by your own code, and in {what} every "
                          "institution rebuilds the student to evaluate it, which would make it import code the run "
                          "config names; give a fedkd model name or torchvision:NAME, or run fedkd distill")


def coordinator_test_data(config: RunConfig) -> ImageData | None:
    """The coordinator's own labelled data: ``eval-data`` when given, none with a task card (the institutions'
    own models: nothing built in to evaluate on), else the built-in dataset's test split."""
    if config.eval_data:
        return config.run_task().load_images(config.eval_data)
    if config.task:
        return None
    return load_dataset(config.dataset, config.data_root, seed=config.seed).test


def setup(config: RunConfig, task: Task | None = None) -> torch.device:
    """Checks and settings every entry point does first (``task``: the run's, read from the config when not
    given)."""
    spec = (task or config.run_task()).spec
    check_names(config, spec)
    check_pool_memory(config, spec=spec)
    if config.export_onnx == "yes" and not onnx_available():
        raise ConfigError("export-onnx: yes needs the onnx extra (onnx and onnxscript): pip install 'fedkd[onnx]'")
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    return device


def coordinate(config: RunConfig, run_dir: Path, teachers: Teachers, *, resume: bool = False,
               observer: RunObserver | None = None) -> dict[str, Any]:
    """Run (or resume) one distillation from ``teachers`` and return its summary (also written to summary.json)."""
    observer = observer or LogObserver()
    task = config.run_task()
    device = setup(config, task)
    with claim_run_dir(config, run_dir, resume=resume) as saved_state:
        started = time.perf_counter()
        with teachers.session(run_dir, device, observer) as session:
            result = distill(config, session.pool, task.spec, session.test, run_dir, device=device,
                             saved_state=saved_state, observer=observer, started=started)
            # Institutions that hold labelled data of their own judge the student before the session ends.
            evaluated = evaluate_at_institutions(session.pool, result.student, model=config.student.model,
                                                 args=config.student.arguments(), method=config.method)
            if evaluated is not None:
                session.sections["federated_evaluation"] = evaluated
                done = [r for r in evaluated["clients"] if r["evaluated"]]
                observer.stage(f"the institutions' evaluation: {len(done)} of {len(evaluated['clients'])} evaluated "
                               "the student" + (f", accuracy {evaluated['student_accuracy']:.4f} on "
                                                f"{evaluated['num_examples']:.0f} examples"
                                                if evaluated["student_accuracy"] is not None else ""))
        # The session has ended: the clients have reported what they released.
        save_student(result, config, task.spec, run_dir / "student.pt")
        export_error = export_program(result.student, task.input_shape, run_dir / "student.pt2")
        onnx_error = write_onnx(config.export_onnx, result.student, task.input_shape, run_dir / "student.onnx")
        teachers.finish(result, session, observer)
        summary = build_summary(config, task, result, session.pool, test=session.test, transport=session.transport,
                                wall=result.earlier_seconds + time.perf_counter() - started,
                                references=session.references,
                                privacy_records=session.privacy_records() if session.privacy_records else None,
                                sections=session.sections)
        write_model_card(model_card(summary, task, result.student, export_error=export_error, onnx_error=onnx_error),
                         run_dir / "student.json")
        write_results(summary, result, run_dir, task)  # summary.json last: the run is finished once it exists
    observer.stage(f"summary written to {run_dir / 'summary.json'}")
    return summary
