"""Benchmark: the quality targets, measured over seeds and printed (never asserted in tests).

    python simulations/benchmark.py                      # every experiment, 3 seeds
    python simulations/benchmark.py --only default --seeds 0
    python simulations/benchmark.py --only aggregators   # ensemble accuracy per aggregator and split
    python simulations/benchmark.py --only digits --seeds 0 --threads 1 --results /tmp/a.json &   # side by side,
    python simulations/benchmark.py --only digits --seeds 1 --threads 1 --results /tmp/b.json     # one thread each,
    python simulations/benchmark.py --merge /tmp/a.json --merge /tmp/b.json   # then one table (runs nothing)
    python simulations/benchmark.py --only density --set student-refit-climb=0 --results /tmp/no-climb.json \
        --runs runs/no-climb                             # a key changed on every row of a group, beside the defaults

Experiments (each seed runs from scratch: partition, teachers, distillation):

- ``default``: the main job (``fedkd run`` with no flags). Targets: student >= 0.95,
  >= best single teacher + 0.03, >= 0.99 x its own ensemble; query samples <= 300 k;
  wall time <= 300 s on a 2-core CPU.
- ``one-client``: one client holding the whole training pool, IID. Target: student >= 0.99 x teacher.
- ``pathological``: 2 classes per client, 5 clients (every class owned). Target: student >= 0.85. Beside it
  ``pathological-open-set``: the same with ``teacher-recipe=open-set`` (teachers that can say "not mine"), and
  ``pathological-density``: with ``teacher-density=on`` (teachers that answer how much an input looks like their
  data; group ``density``, with the main job and two hostile teachers with densities, all three with
  ``density-gate=on``, and the main job at the default ``density-gate=auto``, which does not weigh by densities
  there: only the refit's climb asks for them, since stop 76).
- ``default-open-set``: the main job with ``teacher-recipe=open-set`` (group ``open-set``, with
  ``pathological-open-set``): the target is the main job's, student >= 0.955.
- ``curriculum``: the main job with ``cudfkd.self-paced`` = log / soft / hard / none (log is the default).
- ``hostile``: the main job with client 0's teacher replaced by a hostile one (a fixed wrong class, or
  random logits; both claiming a large label histogram), with the reliability estimate (the default) and
  without it; a fixed-class liar less sure than the honest teachers (``hostile-unsure``), one that claims its
  class alone (``hostile-narrow``), and one honest but on a random 30 % of the inputs (``hostile-partial``; 15 %:
  ``hostile-partial15``).
  Target: student within 0.02 of the default run. With ``teacher-density=on`` (``hostile-fixed-density``, and
  ``hostile-claims-density`` whose density claims every input): within 0.02 of ``default-density``.
- ``access``: the main job with every client granting logits only (zeroth-order gradient estimates). Target:
  student >= 0.95 x the gradient-mode student; the extra query samples reported.
- ``poisoned``: digits (5 clients, Dirichlet(0.5)) and the main job, honest, then with one and with two
  teachers whose logits are honest and whose input gradients are -8 times the honest ones (issue 27's probe:
  0.610 -> 0.156 on digits before the coordinator judged gradients). Target: student within 0.03 of the
  honest run.
- ``swap``: the main job with one (then two colluding) teachers honest except that they swap the classes 3 and
  5 (targeted poisoning, their histograms honest), and ``redirect-1``: the client holding the most 3s calls 5
  whatever it would call 3 (its lies on one class of the inputs). Target: the student's recall on those classes
  within 0.05 of the honest run's.
- ``aggregators``: no distillation: every aggregator's test accuracy on the teachers of the IID,
  Dirichlet(0.5), Dirichlet(0.1) and pathological splits (what picked ``ensemble=auto``), and on the
  pathological split's open-set teachers (``teacher-recipe=open-set``), and on teachers that answer their inputs'
  log-densities (``teacher-density=on``) at Dirichlet(0.5), Dirichlet(0.1) and pathological.

Prints Markdown tables (pasted into the README) and writes ``simulations/results/benchmark.json``;
``--only`` keeps the other experiments' last results in that file. Run directories go under
``--runs`` (default ``runs/benchmark``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedkd.checkpoint import save_atomic
from fedkd.config import ConfigError, config_from_mapping, parse_assignments
from fedkd.coordinator.aggregation import AGGREGATORS
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.evaluation import query_ensemble
from fedkd.coordinator.experiment import in_process, prepare_clients, run_experiment
from fedkd.coordinator.flow import setup
from fedkd.data import load_dataset
from fedkd.files import write_atomic
from fedkd.institution.host import TeacherHost
from fedkd.metrics import accuracy

DEFAULT_RESULTS = "simulations/results/benchmark.json"
RUNS: dict[str, dict[str, Any]] = {
    "default": {},
    "one-client": {"num-clients": 1, "partition": "iid"},
    "pathological": {"partition": "pathological", "classes-per-client": 2},
    # ... with open-set teachers (teacher-recipe=open-set: each can say "not mine"; issue 28)
    "pathological-open-set": {"partition": "pathological", "classes-per-client": 2, "teacher-recipe": "open-set"},
    # ... and the main job with them (what open-set teachers cost or buy where the clients overlap)
    "default-open-set": {"teacher-recipe": "open-set"},
    # ... with closed teachers that answer each input's log-density under their own images (teacher-density=on:
    # the ensemble weighs them by the posterior of who knows the input), on the pathological split (density-gate=auto
    # uses them there) and the main job: with the gate forced on (what it costs where the clients overlap), and at
    # the default density-gate=auto, which does not weigh by them there (only the refit's climb asks for them)
    "pathological-density": {"partition": "pathological", "classes-per-client": 2, "teacher-density": True},
    "default-density": {"teacher-density": True, "density-gate": "on"},
    "default-density-auto": {"teacher-density": True},
    # ... with every client releasing its per-class BatchNorm statistics (teacher-class-statistics=on; CuDFKD's
    # cudfkd.class-statistics=1 weighs them in place of each client's global term; issue 26)
    "default-class-statistics": {"teacher-class-statistics": True},
    "curriculum-soft": {"cudfkd.self-paced": "soft"},
    "curriculum-hard": {"cudfkd.self-paced": "hard"},
    "curriculum-none": {"cudfkd.self-paced": "none"},
    # One hostile teacher among five (client 0's checkpoint doctored after training; docs/robustness.md):
    # "fixed" answers class 0 with logit 20 on everything, "random" answers random logits (scale 10); both
    # claim a label histogram of 10,000 per class. "-trusting" turns the reliability estimate off.
    "hostile-fixed": {},
    "hostile-fixed-trusting": {"reliability": False},
    "hostile-random": {},
    "hostile-random-trusting": {"reliability": False},
    # "unsure" answers class 0 with logit 2 (top probability 0.45, below the honest teachers' 0.48-0.53): a liar
    # that stays less sure than the median teacher, so the reliability estimate keeps its voice.
    "hostile-unsure": {},
    # "narrow" answers class 0 with logit 20 and claims class 0 alone (10,000 records of it, none of any other): judged
    # by its claims only where the others call an input 0, where it agrees, it keeps its overall weight; the class
    # check must keep its "0", which tells nothing apart, from owning the class-weighted ensemble.
    "hostile-narrow": {},
    # "partial" is honest except on a random 30 % of the inputs (drawn by a hash of each input, so a repeated input
    # gets the same answer), where it names class 0 with logit 20, and claims 10,000 records of every class: its lies
    # are spread over inputs, not classes, so its agreement and per-class scores stay within honest teachers' (stop
    # 64: the per-input veto of a teacher that contradicts a sure consensus far more often than the median one).
    "hostile-partial": {},
    # "partial15": the same on 15 % of the inputs, a dissent rate about the veto's bar (stop 65: flagged on nine of
    # fourteen replays of finished runs, costing up to 10 points of the ensemble where it is not).
    "hostile-partial15": {},
    # Teachers with densities (teacher-density=on), client 0 hostile: "fixed-density" answers class 0 (logit 20)
    # with its honest density; "claims-density" does the same and claims every input as its own (its density
    # raised by 5 nats per input value, far above any honest teacher's): it must not win the gate.
    # (the gate forced on: auto would not use the densities on the main job's split, and the liar's claim with them)
    "hostile-fixed-density": {"teacher-density": True, "density-gate": "on"},
    "hostile-claims-density": {"teacher-density": True, "density-gate": "on"},
    # Targeted poisoning: client 0 (and 1, colluding) honest except that it answers class 5 for class 3 and the
    # reverse (the digits 3 and 5 on MNIST-5k): its last layer's two rows swapped, its label histogram honest.
    # What it costs is measured as the student's recall on those two classes.
    "swap-1": {},
    "swap-2": {},
    # The client holding the most 3s, honest except that whatever it would call 3 it calls 5, sure of it (its logits
    # of 3 and 5 swapped on those inputs only; its histogram honest): its lies land on the one class the consensus
    # calls 3, which the veto's dissent rate sets aside since stop 70, so the class check alone stands against it.
    "redirect-1": {},
    # Every client grants logits only: the teachers' input gradients are estimated by zeroth order.
    "logits-only": {"teacher-access": "logits"},
    # Gradient poisoning on digits: clients 0 (and 1) answer honest logits and -8x the honest input gradient.
    "digits": {"dataset": "digits"},
    "digits-poison-1": {"dataset": "digits"},
    "digits-poison-2": {"dataset": "digits"},
    # ... and on the main job
    "poison-1": {},
    "poison-2": {},
}
POISONED = {"digits-poison-1": {0}, "digits-poison-2": {0, 1}, "poison-1": {0}, "poison-2": {0, 1}}
GROUPS = {"default": ["default"], "one-client": ["one-client"],
          "pathological": ["pathological", "pathological-open-set", "pathological-density"],
          "open-set": ["default-open-set", "pathological-open-set"],
          "density": ["default-density", "default-density-auto", "pathological-density", "hostile-fixed-density",
                      "hostile-claims-density"],
          "class-statistics": ["default", "default-class-statistics"],
          "curriculum": ["default", "curriculum-soft", "curriculum-hard", "curriculum-none"],
          "hostile": ["default", "hostile-fixed", "hostile-fixed-trusting", "hostile-random",
                      "hostile-random-trusting", "hostile-unsure", "hostile-narrow", "hostile-partial",
                      "hostile-partial15"],
          "access": ["default", "logits-only"],
          "poisoned": ["digits", "digits-poison-1", "digits-poison-2", "default", "poison-1", "poison-2"],
          "swap": ["default", "swap-1", "swap-2", "redirect-1"]}
SWAPPED = (3, 5)  # the classes a targeted-poisoning teacher swaps
REDIRECTED = {"redirect-1"}  # rows whose largest holder of class 3 calls 5 what it would call 3
PARTIAL = {"hostile-partial": 0.3, "hostile-partial15": 0.15}  # the share of the inputs client 0 lies on
SWAPPERS = {"swap-1": (0,), "swap-2": (0, 1)}
SPLITS = {"iid": {"partition": "iid"}, "dirichlet-0.5": {"alpha": 0.5}, "dirichlet-0.1": {"alpha": 0.1},
          "pathological": {"partition": "pathological", "classes-per-client": 2},
          # the same split's teachers trained to say "not mine" (teacher-recipe=open-set)
          "pathological-open-set": {"partition": "pathological", "classes-per-client": 2,
                                    "teacher-recipe": "open-set"},
          # closed teachers that answer their inputs' log-densities (teacher-density=on)
          # (the gate forced on: the columns measure what it does to the ensemble wherever it is used)
          "dirichlet-0.5-density": {"alpha": 0.5, "teacher-density": True, "density-gate": "on"},
          "dirichlet-0.1-density": {"alpha": 0.1, "teacher-density": True, "density-gate": "on"},
          "pathological-density": {"partition": "pathological", "classes-per-client": 2, "teacher-density": True}}


class _Quiet:
    def stage(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_finished(self, record: dict[str, Any]) -> None:
        pass


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def machine() -> dict[str, Any]:
    """What a results file says of the machine it was measured on (its wall times mean nothing without it)."""
    return {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
            "python": platform.python_version()}


def doctor_teacher(path: Path, kind: str, seed: int) -> None:
    """Turn the teacher checkpoint at ``path`` into a hostile one (the last layer rewritten) that claims a large,
    balanced label histogram: ``fixed`` answers class 0 with logit 20, ``unsure`` class 0 with logit 2 (top
    probability 0.45), ``random`` random logits of scale 10; ``claims`` is ``fixed`` whose density (a teacher with
    teacher-density=on) is raised by 5 nats per input value, claiming every input as its own; ``narrow`` is
    ``fixed`` claiming class 0 alone (10,000 records of it)."""
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    classes = ckpt["num_classes"]
    last = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and v.shape[0] == classes][-1]
    bias = last[: -len("weight")] + "bias"
    if kind == "swap":  # honest except for two classes, its histogram honest too
        a, b = SWAPPED
        for key in (last, bias):
            state[key][[a, b]] = state[key][[b, a]].clone()
        save_atomic(ckpt, path)
        return
    if kind in ("partial", "partial15"):  # its answers are doctored as it answers (partial_lies); its claims here
        ckpt["label_counts"] = [10_000] * classes
        ckpt["num_samples"] = sum(ckpt["label_counts"])
        save_atomic(ckpt, path)
        return
    if kind == "claims":
        density = ckpt["density"]
        density["log_prior"] = density["log_prior"] + 5.0 * density["means"].shape[1]
        kind = "fixed"
    if kind in ("fixed", "unsure", "narrow"):
        state[last] = torch.zeros_like(state[last])
        state[bias] = torch.zeros_like(state[bias])
        state[bias][0] = 2.0 if kind == "unsure" else 20.0
    else:
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(state[last].shape, generator=g)
        state[last] = 10 * weight / weight.norm(dim=1, keepdim=True)
        state[bias] = torch.zeros_like(state[bias])
    ckpt["label_counts"] = [10_000] + [0] * (classes - 1) if kind == "narrow" else [10_000] * classes
    ckpt["num_samples"] = sum(ckpt["label_counts"])
    save_atomic(ckpt, path)


@contextmanager
def poisoned_gradients(clients: set[int], factor: float = -8.0) -> Iterator[None]:
    """Teachers of ``clients`` answer every Backward with ``factor`` times the honest input gradient (their
    logits stay honest): the in-process hosts' backward, wrapped for the duration."""
    original = TeacherHost.backward

    def backward(self: TeacherHost, *args: Any, **kwargs: Any) -> torch.Tensor:
        grad = original(self, *args, **kwargs)
        return grad * factor if self.description.client in clients else grad

    TeacherHost.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        TeacherHost.backward = original  # type: ignore[method-assign]


@contextmanager
def doctored_forwards(clients: set[int], doctor: Any) -> Iterator[None]:
    """Teachers of ``clients`` answer ``doctor(host, inputs, logits)`` in place of their logits (a copy, doctor's to
    change), the others honestly: the in-process hosts' forward, wrapped for the duration (input gradients and
    labels-only answers stay honest)."""
    original = TeacherHost.forward

    def forward(self: TeacherHost, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reply = original(self, inputs, *args, **kwargs)
        if self.description.client not in clients or reply.labels is not None:
            return reply
        return dataclasses.replace(reply, logits=doctor(self, inputs, reply.logits.detach().clone()))

    TeacherHost.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        TeacherHost.forward = original  # type: ignore[method-assign]


def partial_lies(clients: set[int], share: float = 0.3) -> Any:
    """Teachers of ``clients`` answer class 0 with logit 20 on a share of the inputs drawn by a hash of each input's
    bytes (a repeated input gets the same answer), honestly elsewhere (a context manager)."""

    def doctor(host: TeacherHost, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rows = inputs.detach().cpu().contiguous().flatten(1).numpy()
        drawn = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "big") / 2**64 for r in rows]
        lies = torch.tensor([d < share for d in drawn], device=logits.device)
        logits[lies, : host.description.num_classes] = 0.0
        logits[lies, 0] = 20.0
        return logits

    return doctored_forwards(clients, doctor)


def largest_holder(out: Path, label: int) -> int:
    """The client of the run in ``out`` whose teacher holds the most records of class ``label``."""
    counts = [torch.load(p, weights_only=True)["label_counts"][label]
              for p in sorted((out / "clients").glob("client_*/teacher.pt"))]
    return max(range(len(counts)), key=counts.__getitem__)


def redirected(clients: set[int], source: int = SWAPPED[0], target: int = SWAPPED[1]) -> Any:
    """Teachers of ``clients`` answer ``target`` wherever they would answer ``source`` (their two logits swapped on
    those inputs), honestly elsewhere (a context manager): its lies land on one class of the inputs, not spread
    over them."""

    def doctor(host: TeacherHost, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rows = logits[:, : host.description.num_classes].argmax(1) == source
        logits[rows, source], logits[rows, target] = logits[rows, target].clone(), logits[rows, source].clone()
        return logits

    return doctored_forwards(clients, doctor)


def distil(name: str, seed: int, out_root: Path, sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run experiment ``name`` at ``seed`` under ``out_root`` and keep its :func:`record`; ``sets``: config keys
    changed in every experiment (``--set``)."""
    config = config_from_mapping({**RUNS[name], **(sets or {}), "seed": seed})
    out = out_root / f"{name}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    if name.startswith(("hostile-", "swap-", "redirect-")):  # the honest federation's teachers, then some lie
        data = load_dataset(config.dataset, config.data_root, seed=seed)
        prepare_clients(config, data, out, setup(config), _Quiet())
        for client in SWAPPERS.get(name, () if name in REDIRECTED else (0,)):
            doctor_teacher(out / "clients" / f"client_{client:02d}" / "teacher.pt",
                           "swap" if name.startswith("swap-") else name.split("-")[1], seed)
        (out / "config.json").unlink(missing_ok=True)
    liars = {largest_holder(out, SWAPPED[0])} if name in REDIRECTED else set()
    with poisoned_gradients(POISONED.get(name, set())), partial_lies({0} if name in PARTIAL else set(),
                                                                     PARTIAL.get(name, 0.3)), \
            redirected(liars):
        run_experiment(config, out, observer=_Quiet())
    result = record(out, config, seed)
    if liars:  # which client lied
        result["redirecting_client"] = next(iter(liars))
    return result


def record(out: Path, config: Any, seed: int) -> dict[str, Any]:
    """What the benchmark keeps of the finished run in ``out`` (its summary, metrics and student)."""
    summary = json.loads((out / "summary.json").read_text())
    best = max(t["test_accuracy"] for t in summary["teachers"])
    swapped, *each = _recalls(out, config, [SWAPPED, *((c,) for c in SWAPPED)])
    return {"seed": seed, "student": summary["student"]["test_accuracy"],
            # the same run's student before student-refit trained one afresh on the final pool (None: no refit)
            "along_the_way": ((summary["student"].get("refit") or {}).get("along_the_way") or {}).get("accuracy"),
            "ensemble": summary["ensemble"]["test_accuracy"],
            # the plain probability mean of the same teachers: what the run's aggregation bought
            "prob_mean_ensemble": (summary["references"].get("prob_mean_ensemble") or {}).get("test_accuracy"),
            "best_teacher": best, "agreement": summary["student"]["agreement"],
            "query_samples": summary["queries"]["samples"], "wall_seconds": summary["wall_seconds"],
            "admitted": [json.loads(line).get("admitted") for line in (out / "metrics.jsonl").read_text().splitlines()],
            "teacher_weights": [t["weight"] for t in summary["ensemble"]["teachers"]],
            "gradient_weights": [t.get("gradient_weight") for t in summary["ensemble"]["teachers"]],
            "swapped_recall": swapped, "run_dir": str(out),
            # each of the two classes alone (a redirecting teacher costs its source class, not both)
            "class_recall": {str(c): r for c, r in zip(SWAPPED, each)},
            # how the student was trained (the defaults change; a table that mixes records says which is which)
            "student_recipe": _recipe(config)}


def _recipe(config: Any) -> str:
    """The student's model, its steps per synthesis round and its refit share: what changed the students most (and
    its gradient clip where there is one)."""
    clip = f", clip {config.student.clip:g}" if config.student.clip else ""
    # the climb acts only where teachers answer densities: named there alone
    climb = f", climb {config.student.refit_climb}" if config.student.refit_climb and config.teachers.density \
        else ""
    if climb and config.student.refit_draw and set(config.privacy.modes) == {"none"}:  # they draw (stop 79)
        climb += " (draws)"
    return f"{config.student.model}, {config.student_steps}, {config.student.refit:g}{clip}{climb}"


def _recalls(out: Path, config: Any, groups: list[tuple[int, ...]]) -> list[float]:
    """The run's student's recall on each group of classes of the test set (what a targeted swap of them costs),
    from one prediction of the test set."""
    from fedkd.institution.loading import load_teacher
    from fedkd.metrics import predict

    student, _ = load_teacher(out / "student.pt")
    data = load_dataset(config.dataset, config.data_root, seed=config.seed)
    guess, labels = predict(student, data.spec.normalize(data.test.images)).argmax(1), data.test.labels
    masks = [torch.isin(labels, torch.tensor(classes)) for classes in groups]
    return [float((guess[mask] == labels[mask]).float().mean()) for mask in masks]


def targets(name: str, runs: list[dict[str, Any]], default: list[dict[str, Any]] | None = None
            ) -> list[tuple[str, str, bool]]:
    student = _mean_std([r["student"] for r in runs])[0]
    if name == "default":
        best = statistics.fmean(r["best_teacher"] for r in runs)
        ratio = statistics.fmean(r["student"] / r["ensemble"] for r in runs)
        queries = max(r["query_samples"] for r in runs)
        wall = max(r["wall_seconds"] for r in runs)
        return [("student >= 0.95", f"{student:.4f}", student >= 0.95),
                ("student >= best teacher + 0.03", f"{student:.4f} vs {best + 0.03:.4f}", student >= best + 0.03),
                ("student >= 0.99 x ensemble", f"{ratio:.4f}", ratio >= 0.99),
                ("query samples <= 300 k", f"{queries:,}", queries <= 300_000),
                ("wall <= 300 s", f"{wall:.0f} s", wall <= 300)]
    if name in ("default-open-set", "default-density", "default-density-auto", "default-class-statistics"):
        return [("student >= 0.955", f"{student:.4f}", student >= 0.955)]
    if name == "one-client":
        ratio = statistics.fmean(r["student"] / r["best_teacher"] for r in runs)
        return [("student >= 0.99 x teacher", f"{ratio:.4f}", ratio >= 0.99)]
    if name in ("pathological", "pathological-open-set", "pathological-density"):
        return [("student >= 0.85", f"{student:.4f}", student >= 0.85)]
    if name == "logits-only" and default:
        reference = _mean_std([r["student"] for r in default])[0]
        extra = (statistics.fmean(r["query_samples"] for r in runs)
                 / statistics.fmean(r["query_samples"] for r in default))
        return [("student >= 0.95 x gradient-mode student", f"{student / reference:.4f}",
                 student >= 0.95 * reference),
                ("query samples vs gradient mode (reported)", f"{extra:.2f}x", True)]
    if name in POISONED and default:
        reference = _mean_std([r["student"] for r in default])[0]
        return [("student >= honest run - 0.03", f"{student:.4f} vs {reference - 0.03:.4f}",
                 student >= reference - 0.03)]
    if (name in SWAPPERS or name in REDIRECTED) and default:
        reference = statistics.fmean(r["swapped_recall"] for r in default)
        recall = statistics.fmean(r["swapped_recall"] for r in runs)
        return [("recall on the swapped classes >= honest run - 0.05", f"{recall:.4f} vs {reference - 0.05:.4f}",
                 recall >= reference - 0.05)]
    if name in ("hostile-fixed", "hostile-random", "hostile-unsure", "hostile-narrow", "hostile-partial",
                "hostile-partial15", "hostile-fixed-density", "hostile-claims-density") and default:
        reference = _mean_std([r["student"] for r in default])[0]
        return [("student >= default - 0.02", f"{student:.4f} vs {reference - 0.02:.4f}",
                 student >= reference - 0.02)]
    return []


def aggregators(seeds: list[int], out_root: Path, splits: list[str] | None = None) -> dict[str, Any]:
    """Test accuracy of every aggregator on each split's teachers (the same teachers for all); ``splits``: only
    those (default: every split)."""
    table: dict[str, Any] = {}
    for split, overrides in SPLITS.items():
        if splits and split not in splits:
            continue
        per_seed = []
        for seed in seeds:
            config = config_from_mapping({**overrides, "seed": seed})
            device = setup(config)
            data = load_dataset(config.dataset, config.data_root, seed=seed)
            clients = prepare_clients(config, data, out_root / f"aggregators-{split}-seed{seed}", device, _Quiet())
            inputs = data.spec.normalize(data.test.images)
            with in_process(clients, config, out_root, device) as pool:
                answers = query_ensemble(Ensemble(pool, "logit-mean"), inputs, batch_size=1024)
                members, gate = answers.members, answers.competence
                logits = torch.stack(members)  # (K, N, C): asked once, combined every way below
                row = {name: accuracy(Ensemble(pool, name).combine(logits, range(len(members)), gate),
                                      data.test.labels) for name in AGGREGATORS}
                row["best teacher"] = max(accuracy(m, data.test.labels) for m in members)
            per_seed.append(row)
        table[split] = {name: _mean_std([r[name] for r in per_seed]) for name in per_seed[0]}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=lambda text: text.split(","), default=None,
                        help="with --only aggregators: these splits only, comma-separated (the others' last results "
                        f"are kept); of {', '.join(SPLITS)}")
    parser.add_argument("--only", choices=sorted({*GROUPS, *RUNS, "aggregators"}), action="append",
                        help="an experiment group, one experiment, or aggregators (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--runs", default="runs/benchmark", help="where run directories go")
    parser.add_argument("--results", default=DEFAULT_RESULTS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key changed in every experiment run (repeatable; needs --results other than "
                        "the default, so the benchmark's own table keeps the defaults)")
    parser.add_argument("--merge", action="append", default=[], metavar="FILE",
                        help="runs nothing: takes the experiments' runs from FILE (a --results file of benchmark "
                        "processes run side by side, repeatable) into --results, seed by seed, and recomputes the "
                        "targets")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(Path(args.results), [Path(f) for f in args.merge])
    try:
        sets = parse_assignments(args.set)
    except ConfigError as exc:
        parser.error(str(exc))
    if sets and Path(args.results) == Path(DEFAULT_RESULTS):
        parser.error("--set changes the runs: give their own --results, so the benchmark's table keeps the defaults")
    seeds = [int(s) for s in args.seeds.split(",")]
    groups = args.only or [*GROUPS, "aggregators"]
    out_root = Path(args.runs)
    path = Path(args.results)
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine()
    results.setdefault("experiments", {})
    for key in [k for k in results["experiments"] if k not in RUNS]:
        del results["experiments"][key]  # results of experiments that no longer exist
    names = list(dict.fromkeys(n for g in groups if g != "aggregators" for n in GROUPS.get(g, [g])))
    for name in names:  # a bad --set fails before hours of work, naming the key
        try:
            config_from_mapping({**RUNS[name], **sets})
        except ConfigError as exc:
            parser.error(f"--set in {name}: {exc}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    for name in names:
        runs = []
        for seed in seeds:
            print(f"running {name}, seed {seed} ...", file=sys.stderr, flush=True)
            runs.append(distil(name, seed, out_root, sets))
        results["experiments"][name] = {"overrides": {**RUNS[name], **sets}, "runs": runs,
                                        "targets": _judged(name, runs, results["experiments"])}
        _write(path, results, started)  # each experiment as it ends: an interrupted benchmark keeps what it measured
    if "aggregators" in groups:
        print("aggregators ...", file=sys.stderr, flush=True)
        # --splits measures some columns again and keeps the others' last results
        kept = results.get("aggregators", {}) if args.splits else {}
        results["aggregators"] = {**kept, **aggregators(seeds, out_root, args.splits)}
    _write(path, results, started)
    print_tables(results)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}; results in {path}")
    return 0


def _judged(name: str, runs: list[dict[str, Any]], experiments: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of experiment ``name`` on ``runs``, a variant judged against the honest runs of the same teachers
    (its reference experiment's runs in ``experiments``), as the results file keeps them."""
    reference = ("digits" if name.startswith("digits-") else
                 "default-density" if name.startswith("hostile-") and name.endswith("-density") else "default")
    default = experiments.get(reference, {}).get("runs")
    return [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(name, runs, default)]


def merge(path: Path, others: list[Path]) -> int:
    """Takes the runs of every experiment in ``others`` into the results file ``path`` (a run replaces the one of its
    seed; the files in the order given, the last one's run winning), recomputes every experiment's targets against
    the merged references, writes the file and prints the tables: benchmark processes run side by side (one torch
    thread each, their own ``--results``) become one table without running anything again."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    experiments = results.setdefault("experiments", {})
    for other in others:
        try:  # every experiment's runs by seed, read whole before any is taken
            theirs = {name: {r["seed"]: r for r in experiment["runs"]}
                      for name, experiment in json.loads(other.read_text())["experiments"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(f"--merge {other}: not a benchmark results file ({exc!r})") from None
        for name, by_seed in theirs.items():
            if name not in RUNS:
                raise SystemExit(f"--merge {other}: unknown experiment {name!r}")
            runs = {r["seed"]: r for r in experiments.get(name, {}).get("runs", [])} | by_seed
            experiments[name] = {"overrides": RUNS[name], "runs": [runs[s] for s in sorted(runs)]}
    for name, experiment in experiments.items():
        experiment["targets"] = _judged(name, experiment["runs"], experiments)
    write_atomic(path, json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"\nmerged {', '.join(map(str, others))} into {path}")
    return 0


def _write(path: Path, results: dict[str, Any], started: float) -> None:
    """The results file, replaced atomically (a reader never sees half of it)."""
    results["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(results, indent=2) + "\n")


def print_tables(results: dict[str, Any]) -> None:
    exps = results["experiments"]
    print("| experiment | seeds | student: model, steps per round, refit | best teacher | ensemble | student (mean ± "
          "std) | student / ensemble | query samples | wall (s) | targets | student along the way |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, exp in exps.items():
        runs = exp["runs"]

        def ms(key: str, runs: list[dict[str, Any]] = runs) -> str:
            m, s = _mean_std([r[key] for r in runs])
            return f"{m:.4f} ± {s:.4f}"

        ratio = statistics.fmean(r["student"] / r["ensemble"] for r in runs)
        # the student before the refit (student-refit), where every run recorded it
        along = ms("along_the_way") if all(r.get("along_the_way") is not None for r in runs) else ""
        met = "; ".join(f"{t['target']}: {t['measured']} {'met' if t['met'] else '**missed**'}"
                        for t in exp["targets"])
        recipe = " / ".join(dict.fromkeys(str(r.get("student_recipe", "?")) for r in runs))
        print(f"| {name} | {','.join(str(r['seed']) for r in runs)} | {recipe} | {ms('best_teacher')} | "
              f"{ms('ensemble')} | "
              f"{ms('student')} | {ratio:.4f} | {max(r['query_samples'] for r in runs):,} | "
              f"{statistics.fmean(r['wall_seconds'] for r in runs):.0f} | {met} | {along} |")
    if "aggregators" in results:
        table = results["aggregators"]
        names = list(next(iter(table.values())))
        print("\n| aggregator | " + " | ".join(table) + " |")
        print("|---|" + "---|" * len(table))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{table[s][name][0]:.4f} ± {table[s][name][1]:.4f}" for s in table)
                  + " |")


if __name__ == "__main__":
    sys.exit(main())
