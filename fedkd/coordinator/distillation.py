"""The distillation loop: evaluate the teachers through queries, distil epoch by epoch, checkpoint every epoch.

The coordinator's half of a run, whichever entry point runs it: the teachers
are only reached through a :class:`~fedkd.coordinator.pool.TeacherPool`. It returns a
:class:`Distillation`, the typed result every summary is built from
(:mod:`fedkd.coordinator.summary`); :func:`fedkd.coordinator.flow.coordinate` is what calls it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedkd.checkpoint import RUN_FORMAT, CheckpointError, save_atomic
from fedkd.config import RunConfig
from fedkd.contract import QueryContext, QueryError, unusable
from fedkd.coordinator.ensemble import Ensemble, ZerothOrder
from fedkd.coordinator.evaluation import EnsembleAnswers, agreement, loyalty, query_ensemble
from fedkd.coordinator.methods import MethodContext, build_method
from fedkd.coordinator.methods.base import DistillationMethod
from fedkd.coordinator.pool import QuorumError, TeacherPool
from fedkd.coordinator.rundir import QUERY_LEDGER, read_query_ledger, write_query_ledger
from fedkd.data import DatasetSpec, ImageData
from fedkd.metrics import accuracy, predict
from fedkd.models import build_classifier, build_model
from fedkd.options import ConfigError


class RunObserver(Protocol):
    """Progress hooks for entry points (a progress bar, Flower's log); the library itself prints nothing."""

    def stage(self, message: str) -> None: ...

    def epoch_started(self, epoch: int, total_steps: int) -> None: ...

    def step(self) -> None: ...

    def epoch_finished(self, record: dict[str, Any]) -> None: ...


def epoch_line(record: dict[str, Any], epochs: int | None = None) -> str:
    """One epoch of ``metrics.jsonl`` as one log line: the student's accuracy (and agreement with its ensemble)
    where the coordinator holds labelled data, the epoch's seconds, the query samples so far."""
    done = f"epoch {record['epoch'] + 1}" + (f"/{epochs}" if epochs else "")
    acc = record.get("student_accuracy")
    shown = "done" if acc is None else f"student accuracy {acc:.4f}" + (
        f", agreement {record['agreement']:.4f}" if record.get("agreement") is not None else "")
    queries = record.get("query_samples")
    asked = f", {queries:,} query samples so far" if isinstance(queries, int) else ""
    return f"{done}: {shown} ({record['epoch_seconds']:.1f} s{asked})"


@dataclass
class Distillation:
    """What a distillation produced: the student, in memory, and everything its summary is built from."""

    student: nn.Module
    ensemble: Ensemble
    answers: EnsembleAnswers | None  # the teachers' and the ensemble's answers on the coordinator's test set
    history: list[dict[str, Any]]  # one record per epoch (metrics.jsonl)
    stages: list[tuple[int, Tensor]]  # (epoch, synthetic samples) for the samples plot
    method_report: dict[str, Any]
    earlier_seconds: float  # wall time of the run's earlier sessions (a resumed run), 0 for a run in one go
    # Without labelled data at the coordinator: the student against its ensemble on fresh synthetic samples
    synthetic_check: dict[str, Any] | None = None


def build(name: str, spec: DatasetSpec) -> nn.Module:
    return build_model(name, num_classes=spec.num_classes, channels=spec.channels, image_size=spec.side)


def stage_epochs(epochs: int, stages: int) -> set[int]:
    if stages == 1:
        return {epochs - 1}
    return {round(i * (epochs - 1) / (stages - 1)) for i in range(stages)}


def check_teachers(pool: TeacherPool, spec: DatasetSpec) -> None:
    """The coordinator evaluates on its own data: every teacher must take that data's inputs and classes."""
    for k, d in enumerate(pool.descriptions):
        if (why := unusable(d, spec)) is not None:
            raise ConfigError(f"dataset: teacher {k} ({d.model}) cannot take the run's {spec.name!r} data: {why}")


def distill(config: RunConfig, pool: TeacherPool, spec: DatasetSpec, test: ImageData | None, run_dir: Path, *,
            device: torch.device, saved_state: dict[str, Any] | None, observer: RunObserver,
            started: float | None = None) -> Distillation:
    """Evaluate the teachers through queries, distil, evaluate and checkpoint every epoch.

    ``test`` is the coordinator's own labelled data for evaluation, or None
    for a coordinator that holds none (accuracies are then left to federated
    evaluation); ``saved_state`` is the run checkpoint to continue from;
    ``started`` is when this session of the run began (``time.perf_counter``;
    default now), so the checkpoint's elapsed time counts the set-up too.
    """
    started = time.perf_counter() if started is None else started
    elapsed_before = float(saved_state["elapsed"]) if saved_state else 0.0
    check_teachers(pool, spec)
    try:
        guard = config.ensemble
        ensemble = Ensemble(pool, guard.rule, reliability=guard.reliability, logit_bound=guard.logit_bound,
                            gradient_bound=guard.gradient_bound,
                            zeroth_order=ZerothOrder(guard.zo_directions, guard.zo_radius,
                                                     config.teachers.max_query_batch),
                            check_seed=config.seed, density_sharpness=guard.density_sharpness,
                            density_gate=guard.density_gate)
    except ValueError as exc:
        raise ConfigError(f"ensemble: {exc}") from None
    if ensemble.aggregation != config.ensemble.rule:
        observer.stage(f"ensemble: {ensemble.aggregation} ({config.ensemble.rule})")
    with_densities = any(d.log_density_output for d in pool.descriptions)  # some teacher answers a density
    if with_densities:
        gate = ensemble.density_gate
        observer.stage(f"density gate: {'on' if gate.used else 'off'} ({gate.reason})")
    test_inputs = spec.normalize(test.images) if test is not None else None
    ckpt_path = run_dir / "checkpoint.pt"
    ledger_path = run_dir / QUERY_LEDGER

    answers: EnsembleAnswers | None = None
    clients = [d.client for d in pool.descriptions]  # whose teachers, in the pool's order
    if saved_state is not None:
        saved_clients = saved_state.get("clients")  # absent from checkpoints of older versions: the count decides
        if (saved_clients is not None and list(saved_clients) != clients) or len(saved_state["query_stats"]) != len(
                clients):
            written = (f"the teachers of clients {', '.join(map(str, saved_clients))}" if saved_clients is not None
                       else f"{len(saved_state['query_stats'])} teachers")
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} was written with {written}, and the teachers of "
                                  f"clients {', '.join(map(str, clients)) or 'none'} answer now; resume with the "
                                  "same teachers")
        if saved_state["answers"] is not None:
            answers = EnsembleAnswers(saved_state["answers"]["ensemble"], list(saved_state["answers"]["members"]),
                                      saved_state["answers"].get("competence"))
        try:
            # The ledger is written after every round, the checkpoint after every epoch: after a crash the
            # ledger also holds the queries of the epoch that is about to be repeated (the teachers answered them).
            pool.restore_stats(read_query_ledger(ledger_path, len(saved_state["query_stats"]))
                               or saved_state["query_stats"])
        except TypeError as exc:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r}: field 'query_stats' does not "
                                  f"fit this run: {exc}") from None
    elif test_inputs is not None:
        observer.stage(f"evaluating {len(ensemble)} teachers and their ensemble through queries")
        answers = query_ensemble(ensemble, test_inputs, batch_size=config.teachers.max_query_batch)

    torch.manual_seed(config.seed + 1)
    student = build_student(config, spec)
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
    snapshots = stage_epochs(config.epochs, config.sample_stages)

    def step() -> None:
        observer.step()
        write_query_ledger(pool.stats(), ledger_path)

    def checkpoint(next_epoch: int) -> None:
        save_atomic({
            "format": RUN_FORMAT,
            "epoch": next_epoch,
            "method": method.state_dict(),
            "history": history,
            "stage_epochs": [e for e, _ in stages],
            "stage_images": [img for _, img in stages],
            "rng": torch.get_rng_state(),
            "elapsed": elapsed_before + time.perf_counter() - started,
            "answers": ({"ensemble": answers.ensemble, "members": answers.members, "competence": answers.competence}
                        if answers else None),
            "query_stats": [s.as_dict() for s in pool.stats()],
            "clients": clients,
            "ensemble": ensemble.state_dict(),
        }, ckpt_path)

    for epoch in range(start_epoch, config.epochs):
        observer.epoch_started(epoch, config.steps_per_epoch)
        epoch_start = time.perf_counter()
        train_metrics = method.train_epoch(epoch, step)
        record: dict[str, Any] = {"epoch": epoch, "student_accuracy": None, "agreement": None, "loyalty": None}
        if test is not None and test_inputs is not None and answers is not None:
            answers = answers.recombined(ensemble)  # the ensemble as the method has weighed it so far
            record.update(scores(method.student, test_inputs, test.labels, answers, device))
        record.update({
            **train_metrics,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "query_samples": sum(s.samples for s in pool.stats()),
        })
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if epoch in snapshots:
            stages.append((epoch, method.synthetic_samples()))
        checkpoint(epoch + 1)
        observer.epoch_finished(record)

    if answers is not None:  # the summary's ensemble: the one the student learned from last
        answers = answers.recombined(ensemble)
    final: nn.Module = method.student
    blends = None
    if config.student.refit > 0 and config.student.refit_mixup > 0:
        blends = method.answer_blends(config.student.refit_mixup, config.seed + 3, step, config.student.refit_warp)
        if blends.asked:  # the answers go into the checkpoint: a resume asks the teachers nothing again
            write_query_ledger(pool.stats(), ledger_path)
            checkpoint(config.epochs)
        warped = f" (each image warped first, student-refit-warp={config.student.refit_warp:g})" \
            if config.student.refit_warp > 0 else ""
        observer.stage(f"student-refit-mixup: {blends.answered:,} blends of pool samples{warped} answered by the "
                       "teachers"
                       + (" (kept from before the restart)" if blends.answered and not blends.asked else "")
                       + (f"; {blends.stopped}" if blends.stopped else ""))
    climbs = None
    # only where a teacher answers a density: a run without any (most) neither climbs nor says so
    if config.student.refit > 0 and config.student.refit_climb > 0 and with_densities:
        climbs = method.answer_climbs(config.student.refit_climb, step)
        if climbs.asked:  # into the checkpoint, as the blends
            write_query_ledger(pool.stats(), ledger_path)
            checkpoint(config.epochs)
        drawn = min(climbs.answered, sum(s.drawn_samples for s in pool.stats()))  # student-refit-draw
        made = (f"{climbs.answered:,} pool samples climbed a teacher's density ({config.student.refit_climb} steps "
                "each)" if not drawn else f"{drawn:,} samples drawn from a teacher's density and "
                f"{climbs.answered - drawn:,} pool samples climbed one ({config.student.refit_climb} steps each)")
        observer.stage(f"student-refit-climb: {made} and answered by the teachers"
                       + (" (kept from before the restart)" if climbs.answered and not climbs.asked else "")
                       + (f"; {climbs.stopped}" if climbs.stopped else ""))
    if config.student.refit > 0:
        extra = (blends.answered if blends is not None else 0) + (climbs.answered if climbs is not None else 0)
        final, refitted = refit(method, config, spec, device, observer, history[-1] if history else {}, test_inputs,
                                test.labels if test is not None else None, answers, extra)
        if refitted is not None:
            if blends is not None or climbs is not None:  # their queries counted like the epochs'
                total, before = sum(s.samples for s in pool.stats()), refitted.get("query_samples")
                if isinstance(before, int) and isinstance(refitted.get("budget_spent"), int):
                    refitted["budget_spent"] += total - before
                refitted.update(query_samples=total, refit_blends=blends.answered if blends is not None else 0,
                                refit_climbs=climbs.answered if climbs is not None else 0)
            history.append(refitted)
            with metrics_path.open("a") as f:
                f.write(json.dumps(refitted) + "\n")
    report = getattr(method, "report", None)
    check = None
    if test is None and config.synthetic_check:
        observer.stage(f"judging the student against its ensemble on {config.synthetic_check:,} fresh synthetic "
                       "samples (no labelled data here)")
        check = synthetic_check(method, final, ensemble, config, device)
        write_query_ledger(pool.stats(), ledger_path)
    return Distillation(final, ensemble, answers, history, stages, report() if report is not None else {},
                        elapsed_before, check)


def build_student(config: RunConfig, spec: DatasetSpec) -> nn.Module:
    """The run's student architecture, freshly initialised from torch's current random stream."""
    return build_classifier(config.student.model, num_classes=spec.num_classes, channels=spec.channels,
                            image_size=spec.side, args=config.student.arguments())


def scores(student: nn.Module, test_inputs: Tensor, labels: Tensor, answers: EnsembleAnswers,
           device: torch.device) -> dict[str, float]:
    """A student's test accuracy, and its agreement and loyalty with the ensemble's cached test answers."""
    logits = predict(student, test_inputs, device=device)
    return {"student_accuracy": accuracy(logits, labels), "agreement": agreement(logits, answers.ensemble),
            "loyalty": loyalty(logits, answers.ensemble)}


def refit(method: DistillationMethod, config: RunConfig, spec: DatasetSpec, device: torch.device,
          observer: RunObserver, last: dict[str, Any], test_inputs: Tensor | None, labels: Tensor | None,
          answers: EnsembleAnswers | None, extra: int = 0) -> tuple[nn.Module, dict[str, Any] | None]:
    """``student-refit``: a student built afresh and trained on the whole final pool and the ``extra`` samples the
    teachers answered after the epochs (``student-refit-mixup``'s blends, ``student-refit-climb``'s climbed
    samples; the refit itself asks nothing), with its record
    for ``metrics.jsonl`` (``"stage": "refit"``, ``"epoch"`` one past the last epoch's record ``last``, which keeps
    the student trained along the way). Run again on a resume: it depends only on the checkpointed pool and the
    seed. The method's own student and no record, when the method keeps no pool to refit on."""
    started = time.perf_counter()
    what = "the final pool" + (f" and {extra:,} samples answered after the epochs" if extra else "")
    grown = " (grown in proportion with those samples)" if extra else ""
    observer.stage(f"student-refit: a fresh student, {config.student.refit:g}x the run's student steps{grown} on "
                   f"{what}, no queries ...")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        student = build_student(config, spec)
    samples, steps = method.refit(student, config.student.refit, config.seed + 2)
    if not samples:
        observer.stage(f"student-refit: method {config.method} keeps no pool beyond its last batch; the student "
                       "trained along the way is the run's")
        return method.student, None
    record: dict[str, Any] = {"epoch": config.epochs, "stage": "refit", "refit_steps": steps,
                              "refit_samples": samples, "student_accuracy": None, "agreement": None, "loyalty": None,
                              **{k: last.get(k) for k in ("query_samples", "pool_size", "budget_spent")}}
    if test_inputs is not None and labels is not None and answers is not None:
        record.update(scores(student, test_inputs, labels, answers, device))
    record["epoch_seconds"] = time.perf_counter() - started
    before = last.get("student_accuracy")
    done = (f": test accuracy {record['student_accuracy']:.4f}" if record["student_accuracy"] is not None else "")
    done += f" (the student trained along the way: {before:.4f})" if before is not None and done else ""
    observer.stage(f"student refitted afresh on {what} ({samples:,} samples, {steps:,} steps, no queries){done}")
    return student, record


def synthetic_check(method: DistillationMethod, student: nn.Module, ensemble: Ensemble, config: RunConfig,
                    device: torch.device) -> dict[str, Any]:
    """The student's agreement and loyalty with its ensemble on ``synthetic-check`` fresh samples of the final
    generator: how closely it follows the teachers where they were never asked during training, which needs
    no labels (it does not say how accurate either is). The teachers are asked to evaluate; a refusal (a spent
    budget) is reported, not raised: the student is finished."""
    inputs = method.fresh_inputs(config.synthetic_check, config.seed + 101)
    if inputs is None:
        return {"samples": 0, "agreement": None, "loyalty": None,
                "note": f"method {config.method} has no generator to draw fresh samples from"}
    state, step = QueryContext(purpose="evaluate"), config.teachers.max_query_batch
    try:  # the run's quorum, as in training: a teacher that left does not void the check
        with torch.no_grad():
            ensemble_logits = torch.cat([ensemble(inputs[i:i + step], state).logits
                                         for i in range(0, len(inputs), step)])
    except (QueryError, QuorumError) as exc:
        return {"samples": len(inputs), "agreement": None, "loyalty": None, "note": f"not answered: {exc}"}
    student_logits = predict(student, inputs, device=device)
    return {"samples": len(inputs), "agreement": agreement(student_logits, ensemble_logits),
            "loyalty": loyalty(student_logits, ensemble_logits),
            # how sure the ensemble itself is there: agreeing with confident answers means more
            "ensemble_confidence": float(torch.softmax(ensemble_logits.double(), 1).amax(1).mean())}
