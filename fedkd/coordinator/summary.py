"""A run's results, built once from its typed result: summary.json, student.pt and the plots.

:func:`build_summary` takes the :class:`~fedkd.coordinator.distillation.Distillation`,
the pool as it stands after the session ended (the coordinator's count of
every teacher's queries, and what each client reports it released) and the
sections only some entry points have (references, the clients' own privacy
records, federated evaluation, the Flower nodes); :func:`write_results`
writes it with the student and the plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedkd.checkpoint import save_teacher
from fedkd.config import RunConfig
from fedkd.coordinator.aggregation import AGGREGATORS
from fedkd.coordinator.distillation import Distillation
from fedkd.coordinator.plots import plot_accuracy, plot_curriculum, plot_queries, plot_samples
from fedkd.coordinator.pool import TeacherPool
from fedkd.coordinator.student import judging
from fedkd.data import DatasetSpec, ImageData
from fedkd.files import write_atomic
from fedkd.metrics import accuracy, mean_and_variance
from fedkd.provenance import provenance
from fedkd.task import Task

logger = logging.getLogger(__name__)

NO_REFERENCES: dict[str, Any] = {"fedavg": None, "centralised": None}


def reconcile_queries(per_client: list[dict[str, Any]], reported: list[dict[str, Any]], *,
                      resumed: bool = False) -> dict[str, Any]:
    """Compare the coordinator's count of each teacher's queries with what the teacher reports it released.

    They differ when answers reached a teacher but not the coordinator's count (late past query-timeout, refused
    as malformed, or in flight when the coordinator was killed: the ledger is written after every round), or
    when a teacher's own count started again (its agent or host process restarted). In a ``resumed`` run the
    latter is expected: the teachers' processes started again with the run, the coordinator's count covers the
    whole run; such a difference says so (``expected``), and ``agree`` counts only the unexpected ones.
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
        fewer = all(v < 0 for v in delta.values())
        why = ("the teacher's report contradicts the coordinator's count: it claims answers the coordinator did not "
               "count (late past query-timeout, refused as malformed, in flight when the coordinator stopped), or "
               "its report is false" if all(v > 0 for v in delta.values()) else
               "expected: the run was resumed, and the teacher's own count started again with its process while "
               "the coordinator's covers the whole run" if resumed and fewer else
               "the teacher's report contradicts the coordinator's count: its own count started again (its agent "
               "or host process restarted during the run), or its report is false")
        differences.append({"client": client, "reported_minus_counted": delta, "why": why,
                            "expected": bool(resumed and fewer)})
    return {"agree": all(d.get("expected") for d in differences), "differences": differences}


def privacy_summary(pool: TeacherPool, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """What each teacher states about its privacy (its Describe) and, where the coordinator may read them (a
    one-machine experiment), each client's own record (``records``, from its ledger); None when no teacher uses
    a mechanism."""
    teachers = [{"client": d.client, **d.privacy} for d in pool.descriptions if d.privacy]
    seen = None
    if teachers:
        seen = {"teachers": teachers,
                "max_epsilon_spent": max(float(t.get("epsilon_spent", 0.0)) for t in teachers)}
    if records is None or (seen is None and all(r["mode"] == "none" for r in records)):
        return seen
    spent = [float(r["epsilon_spent"]) for r in records if r["mode"] != "none"]
    return {**(seen or {}), "clients": records, "max_epsilon_spent": max(spent, default=0.0)}


def build_summary(config: RunConfig, task: Task, result: Distillation, pool: TeacherPool, *, test: ImageData | None,
                  transport: str, wall: float, references: Mapping[str, Any] | None = None,
                  privacy_records: list[dict[str, Any]] | None = None,
                  sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's summary.json, from the distillation's result and the pool after the session ended."""
    history, answers = result.history, result.answers
    last = history[-1]
    # the epochs' records: student-refit appends the run's student's record after them (stage "refit"; a method's
    # own epoch records may carry a numeric stage of their own, RDSKD's 1 and 2)
    epochs = [h for h in history if h.get("stage") != "refit"]
    refitted = next((h for h in history if h.get("stage") == "refit"), None)
    if test is None or answers is None:  # no coordinator data: only what the queries and training tell
        accuracies: list[float | None] = [None] * len(pool.descriptions)
        ensemble_accuracy = prob_mean = None
        student: dict[str, Any] = {"model": config.student.model, "test_accuracy": None, "best_accuracy": None,
                                   "agreement": None, "loyalty": None, "accuracy_mean": None, "accuracy_var": None,
                                   # what needs no labels: the student against its ensemble on fresh synthetic data
                                   "synthetic_check": result.synthetic_check}
    else:
        accuracies = [accuracy(logits, test.labels) for logits in answers.members]
        ensemble_accuracy = accuracy(answers.ensemble, test.labels)
        # what the run's aggregation bought: the plain probability mean of the same teachers' answers
        prob_mean = accuracy(AGGREGATORS["prob-mean"].combine(torch.stack(answers.members).float(), None), test.labels)
        accs = [h["student_accuracy"] for h in history]
        acc_mean, acc_var = mean_and_variance([h["student_accuracy"] for h in epochs])  # over the epochs only
        student = {"model": config.student.model, "test_accuracy": last["student_accuracy"],
                   "best_accuracy": max(accs), "agreement": last["agreement"], "loyalty": last["loyalty"],
                   "accuracy_mean": acc_mean, "accuracy_var": acc_var}
    # student-refit: the student above was trained afresh on the final pool; the one trained along the way beside it
    along = epochs[-1] if epochs else {}
    student["refit"] = None if refitted is None else {
        "steps": refitted["refit_steps"], "samples": refitted["refit_samples"],
        # of those samples, the blends of pool samples the teachers answered after the epochs (student-refit-mixup)
        "blends": refitted.get("refit_blends", 0),
        # and the pool samples that climbed a teacher's density, answered likewise (student-refit-climb)
        "climbs": refitted.get("refit_climbs", 0),
        "along_the_way": {"accuracy": along.get("student_accuracy"), "agreement": along.get("agreement"),
                          "loyalty": along.get("loyalty")}}
    ensemble = result.ensemble
    stats = pool.stats()
    # answer_ms: what the coordinator waited for each teacher (a straggler sets the pace of every query)
    per_client = [{"client": d.client, **s.as_dict(),
                   "mean_answer_ms": round(s.answer_ms / max(1, s.forward_calls + s.backward_calls + s.missed), 1)}
                  for d, s in zip(pool.descriptions, stats)]
    reports = pool.client_reports()
    reconciliation = reconcile_queries(per_client, reports, resumed=result.earlier_seconds > 0)
    if not reconciliation["agree"]:
        logger.warning("the teachers' own query counts differ from the coordinator's: %s",
                       reconciliation["differences"])
    summary = {
        "method": config.method,
        "dataset": config.dataset if not config.task else None,
        "task": task.to_dict(),
        "num_clients": config.num_clients,
        "seed": config.seed,
        "teachers": [
            {"client": d.client, "model": d.model, "num_samples": d.num_samples, "test_accuracy": acc}
            for d, acc in zip(pool.descriptions, accuracies)
        ],
        "ensemble": {"aggregation": ensemble.aggregation, "requested": config.ensemble.rule,
                     "test_accuracy": ensemble_accuracy,
                     # a release by the clients (their label histograms), visible here; None = not used
                     "label_counts_from": ensemble.label_counts_from,
                     # whether the answers were weighed by the teachers' densities (density-gate), and why
                     "density_gate": ensemble.density_gate.report(),
                     # per teacher: reliability weight, agreement with the others, what was clipped
                     "teachers": ensemble.report()},
        "student": student,
        "references": {**dict(references or NO_REFERENCES),
                       "prob_mean_ensemble": None if prob_mean is None else {"test_accuracy": prob_mean}},
        "transport": transport,
        "pool": {"samples": last.get("pool_size"), "size_limit": config.pool.size},
        "queries": {
            "samples": sum(s.samples for s in stats),
            "distillation_samples": last.get("budget_spent"),
            "budget": config.pool.query_budget or None,
            "bytes": sum(s.bytes for s in stats),
            "per_client": per_client,
            "reported_by_clients": reports,
            "reconciliation": reconciliation,
        },
        "privacy": privacy_summary(pool, privacy_records),
        "method_report": result.method_report,
        "test_samples": len(test) if test is not None else 0,
        "wall_seconds": wall,
        "config": config.to_dict(),
        **provenance(),  # fedkd_version, commit: the code that made these figures
    }
    for key, value in (sections or {}).items():
        if key in summary:
            raise KeyError(f"summary section {key!r} would replace one the summary builds itself")
        summary[key] = value
    return summary


def save_student(result: Distillation, config: RunConfig, spec: DatasetSpec, path: Path) -> None:
    """The distilled model, in the teacher checkpoint format (load_teacher reads it; it could serve as a teacher)."""
    save_teacher(path, result.student, model_name=config.student.model, model_args=config.student.arguments(),
                 num_classes=spec.num_classes,
                 input_shape=spec.input_shape, num_samples=0, label_counts=[0] * spec.num_classes, mean=spec.mean,
                 std=spec.std)


def write_results(summary: dict[str, Any], result: Distillation, run_dir: Path, task: Task | None = None) -> None:
    """summary.json and the plots (accuracy, curriculum, queries, synthetic samples) in the run directory, each
    titled with the run; under the synthetic samples, the final student's class for each (the coordinator's own
    model: no query, nothing released). summary.json is written last, whole or not at all: a run counts as
    finished once it exists, so everything else must be there by then."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    on = summary["dataset"] or (task.name if task is not None else "a task")
    title = f"{summary['method']} on {on}, {summary['num_clients']} clients ({run_dir.name})"
    if result.answers is not None:
        best_teacher = max(t["test_accuracy"] for t in summary["teachers"])
        plot_accuracy(result.history, summary["ensemble"]["test_accuracy"], best_teacher, plots / "accuracy.png",
                      title)
        plot_queries(result.history, summary["ensemble"]["test_accuracy"], plots / "queries.png", title)
    plot_curriculum(result.history, plots / "curriculum.png", title)
    labels = None
    if task is not None and result.stages:
        labels = [_student_labels(result.student, images, task) for _, images in result.stages]
    plot_samples(result.stages, plots / "samples.png", title, labels)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def _student_labels(student: torch.nn.Module, images: torch.Tensor, task: Task) -> list[str]:
    """What the student takes each image in [0, 1] for: its class name and probability."""
    device = next(student.parameters(), torch.empty(0)).device
    with torch.no_grad(), judging(student):
        probs = torch.softmax(student(task.spec.normalize(images).to(device)), 1).cpu()
    return [f"{task.classes[int(k)][:10]} {float(p):.2f}" for p, k in zip(*probs.max(1))]
