"""Full Fashion-MNIST (60,000 training images, the official 10,000 to test) in DENSE's setting (Zhang et al.,
NeurIPS 2022, Table 1): 5 clients, Dirichlet(0.1), (0.3) and (0.5) splits, 3 seeds each.

    apt-get install dataset-fashion-mnist      # the four IDX files in /usr/share/datasets/fashion-mnist
    python simulations/fashion_mnist.py        # the whole table: 9 splits, the default student (hours on 2 cores)
    python simulations/fashion_mnist.py --alphas 0.5 --seeds 0 --students default      # one run
    python simulations/fashion_mnist.py --alphas 0.5 --tag gen32 --set generator-width=32    # one factor
    python simulations/fashion_mnist.py --alphas pathological --tag patho   # 2 classes per client, each an owner
    python simulations/fashion_mnist.py --factors    # every factor measured so far, from the records
    python simulations/fashion_mnist.py --diagnose runs/fashion-mnist/a0.5-s0-...   # where one student falls short

Each (alpha, seed) trains its five LeNet-5 teachers once (fedkd's client recipe, cached under ``--runs``); every
student of that split distils from the same teachers. Students (``--students``): fedkd's default (``default``:
LeNet-5, as large as the teachers, as DENSE distils into the network its clients train), ``half`` (LeNet-5-half,
the default until issue 26's measurements) and ``teacher-size`` (LeNet-5 by name: the records from when it was
not the default).
Per run: the best teacher, the run's ensemble (``ensemble=auto``: class-weighted), the plain probability mean of
the same teachers, the student, student / ensemble, query samples and wall time. Results are cached per run (one
JSON each, keyed by the whole configuration, in ``--results``/records, committed with the table); a rerun computes
only what is missing, and ``--cached`` tabulates what is done. Teachers and students run on CUDA where there is a
GPU (``device=auto``); each record names the machine it was measured on (``machine``: device, accelerator, threads,
platform, torch, python), since its wall time means nothing without it.
Writes ``fashion-mnist[-TAG].md`` (the table, DENSE's published rows and the targets) and a plot of student
accuracy against query samples per split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedkd.config import config_from_mapping, parse_assignments
from fedkd.coordinator.experiment import prepare_clients, run_experiment
from fedkd.coordinator.flow import LogObserver, setup
from fedkd.data import load_dataset
from fedkd.metrics import predict
from fedkd.options import resolve_device

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
# fedkd's default student (LeNet-5 since issue 26 measured it: the teachers' size, as DENSE distils), the previous
# default at half the width, and the teachers' size by name (the records of before, when it was not the default)
STUDENTS = {"default": {}, "half": {"student-model": "lenet5-half"}, "teacher-size": {"student-model": "lenet5"}}
# DENSE (NeurIPS 2022), Table 1, Fashion-MNIST, 5 clients: ensemble and DENSE's student, by Dirichlet alpha.
DENSE = {0.1: (0.6771, 0.5029), 0.3: (0.8725, 0.8396), 0.5: (0.8942, 0.8594)}
# The issue's targets, by alpha: (student at least, student / ensemble at least) for the default student.
TARGETS = {0.5: (0.88, 0.96), 0.3: (0.8396, 0.95), 0.1: (0.80, 0.0)}
DEFAULTS = "(the defaults)"  # the factor table's name for a record with no change
TEACHER_KEYS = ("dataset", "data-root", "num-clients", "partition", "alpha", "classes-per-client", "seed",
                "teacher-model", "teacher-epochs", "teacher-lr", "teacher-batch-size", "teacher-label-smoothing",
                "teacher-recipe", "teacher-density")


def _key(mapping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:16]


PATHOLOGICAL = "pathological"  # the split of --alphas that is not a Dirichlet alpha: 2 classes per client


def split_part(split: str) -> dict[str, Any]:
    """The run-config keys of one entry of ``--alphas``: a Dirichlet alpha, or the pathological split."""
    if split == PATHOLOGICAL:
        return {"partition": "pathological", "classes-per-client": 2}
    return {"partition": "dirichlet", "alpha": float(split)}


def split_of(mapping: dict[str, Any]) -> str:
    """How a run's split is named in tables (``0.5``, ``pathological``)."""
    return str(mapping["alpha"]) if mapping.get("partition", "dirichlet") == "dirichlet" else PATHOLOGICAL


def _prefix(mapping: dict[str, Any]) -> str:
    """The start of a run's file names: ``a0.5-s0`` (Dirichlet, as always), ``pathological-s0``."""
    split = split_of(mapping)
    return f"{'' if split == PATHOLOGICAL else 'a'}{split}-s{mapping['seed']}"


def _split_rank(split: str) -> tuple[bool, float]:
    """Dirichlet splits by alpha, the pathological one after them."""
    return split == PATHOLOGICAL, 0.0 if split == PATHOLOGICAL else float(split)


def _order(item: tuple[tuple[str, str], Any]) -> tuple[bool, float, str]:
    """A row of a table by (split, student)."""
    (split, student), _ = item
    return *_split_rank(split), student


def _dense(split: str) -> tuple[float, float] | None:
    return None if split == PATHOLOGICAL else DENSE.get(float(split))


def teachers(mapping: dict[str, Any], cache: Path) -> tuple[Path, dict[str, float]]:
    """The split's five teachers, trained once, and what they score on the test set on their own and as a plain
    probability mean (the reference every aggregator is measured against)."""
    keys = {k: v for k, v in mapping.items() if k in TEACHER_KEYS}
    path = cache / f"teachers-{_prefix(mapping)}-{_key(keys)}"
    scores = path / "scores.json"
    count = int(mapping.get("num-clients", 5))
    complete = all((path / "clients" / f"client_{k:02d}" / "teacher.pt").exists() for k in range(count))
    if not scores.exists() or not complete:  # (a teacher removed, or a training cut short: trained again)
        config = config_from_mapping(keys)
        data = load_dataset(config.dataset, config.data_root, seed=config.seed)
        device = setup(config)
        clients = prepare_clients(config, data, path, device, LogObserver())
        inputs = data.spec.normalize(data.test.images)
        classes = data.spec.num_classes  # (open-set teachers answer "unknown" last: the classes only here)
        probs = [torch.softmax(predict(c.model.to(device), inputs, device=device)[:, :classes], 1) for c in clients]
        labels = data.test.labels
        per = [float((p.argmax(1) == labels).float().mean()) for p in probs]
        mean = float((torch.stack(probs).mean(0).argmax(1) == labels).float().mean())
        scores.write_text(json.dumps({"teachers": per, "best_teacher": max(per), "prob_mean": mean}))
    return path / "clients", json.loads(scores.read_text())


def references(mapping: dict[str, Any], runs: Path, results: Path) -> dict[str, float]:
    """What the run's student reaches on REAL data with the run's own student schedule and trainer (steps, batch,
    SGD, cosine, temperature): distilled from the same teachers' class-weighted ensemble on the real training
    images (no labels: the ceiling a perfect synthesizer would give), and trained on the pooled labelled data (the
    student's capacity). Experiment-only: no deployment holds either."""
    from student_ceiling import train_on_real

    from fedkd.coordinator.aggregation import AGGREGATORS, class_weights
    from fedkd.institution.loading import load_teacher

    path = results / "records" / f"references-{_prefix(mapping)}-{_key(mapping)}.json"
    if path.exists() and (record := json.loads(path.read_text())).get("config") == mapping:
        return record["references"]
    clients, _ = teachers(mapping, runs / "teachers")
    config = config_from_mapping(mapping)
    device = setup(config)
    data = load_dataset(config.dataset, config.data_root, seed=config.seed)
    spec, train = data.spec, data.train
    loaded = [load_teacher(p) for p in sorted(clients.glob("client_*/teacher.pt"))]
    weights = class_weights([ckpt["label_counts"] for _, ckpt in loaded], spec.num_classes)
    logits = torch.stack([predict(m.to(device), spec.normalize(train.images), device=device)[:, :spec.num_classes]
                          for m, _ in loaded])
    answers = AGGREGATORS["class-weighted"].combine(logits, weights)
    out = {}
    for name, mode in (("real_kd", "kd"), ("real_labels", "labels")):
        student = train_on_real(config, spec, train, answers, mode, device)
        guess = predict(student, spec.normalize(data.test.images), device=device).argmax(1)
        out[name] = float((guess == data.test.labels).float().mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": mapping, "references": out}, indent=1))
    return out


def machine(config: Any) -> dict[str, Any]:
    """Where a run was measured (its wall time means nothing without it): what benchmark.py's results file says of
    its machine (threads, platform, torch, python), and the torch device with the accelerator's name, if any."""
    from benchmark import machine as described

    device = resolve_device(config.device)
    return {"device": str(device), "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            **described()}


def run_one(mapping: dict[str, Any], runs: Path) -> dict[str, Any]:
    clients, scores = teachers(mapping, runs / "teachers")
    config = config_from_mapping(mapping)
    out = runs / f"{_prefix(mapping)}-{_key(mapping)}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(clients, out / "clients")
    started = time.perf_counter()
    summary = run_experiment(config, out)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"config": mapping, "resolved": config.to_dict(), "machine": machine(config), **scores,
            "ensemble": summary["ensemble"]["test_accuracy"],
            "student": summary["student"]["test_accuracy"], "agreement": summary["student"]["agreement"],
            "query_samples": summary["queries"]["samples"], "wall_seconds": wall,
            "curve": [(h["query_samples"], h["student_accuracy"]) for h in history]}


# Keys whose default changed after they were added, with the value they had before: a record made before the key
# existed was measured at that value, not at today's default (student-clip: 0 until stop 58 made 5 the default;
# student-refit-climb: 0 until stop 75 made 2 the default).
EARLIER_DEFAULTS: dict[str, Any] = {"student-clip": 0.0, "student-refit-climb": 0}  # climb: 2 since stop 75


def _as_added() -> dict[str, Any]:
    """Each key's value when it was added: today's default, or its earlier one where the default changed since."""
    return {**config_from_mapping({}).to_dict(), **EARLIER_DEFAULTS}


def same_run(stored: Any, now: dict[str, Any]) -> bool:
    """Whether a record's resolved config is the run ``now`` would make: every key it holds has today's value, and
    every key added since is at the value it had when it was added (its default then: a key fedkd adds keeps, at its
    default, the behaviour from before it; a removed key or a changed default reruns)."""
    if not isinstance(stored, dict) or not set(stored) <= set(now):
        return False
    defaults = _as_added()
    return all(stored[k] == now[k] for k in stored) and all(
        k in defaults and now[k] == defaults[k] for k in set(now) - set(stored))


def _keep_earlier(record: dict[str, Any], mapping: dict[str, Any], records: Path) -> None:
    """A record made stale by a changed default (only ``EARLIER_DEFAULTS`` keys tell it apart) is kept as the record
    of the run that sets those keys to their earlier values, by name: nothing measured is lost to a new default."""
    stored, now = record.get("resolved"), config_from_mapping(mapping).to_dict()
    if not isinstance(stored, dict) or record.get("config") != mapping:
        return
    defaults = _as_added()
    changed = {k for k in now if stored.get(k, defaults.get(k)) != now[k]}
    if not changed or not changed <= set(EARLIER_DEFAULTS) - set(mapping):
        return
    earlier = {**mapping, **parse_assignments([f"{k}={EARLIER_DEFAULTS[k]:g}" for k in sorted(changed)])}
    target = records / f"{_prefix(earlier)}-{_key(earlier)}.json"
    if not target.exists():
        target.write_text(json.dumps({**record, "config": earlier}, indent=1))


def _measured(mapping: dict[str, Any], records: Path) -> dict[str, Any] | None:
    """A record of the same resolved run under another name (``same_run``): a variant measured under a tag whose
    keys have since become the defaults is the default run, and a run from before a default changed is the run
    that sets the key to its earlier value."""
    now = config_from_mapping(mapping).to_dict()
    for path in sorted(records.glob(f"{_prefix(mapping)}-*.json")):
        record = json.loads(path.read_text())
        if "student" in record and same_run(record.get("resolved"), now):
            return {**record, "config": mapping, "measured_as": record.get("config")}
    return None


def cached(mapping: dict[str, Any], results: Path, runs: Path, compute: bool = True) -> dict[str, Any] | None:
    """The run's record, computed unless it is cached (None when it is not and ``compute`` is off)."""
    path = results / "records" / f"{_prefix(mapping)}-{_key(mapping)}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("config") == mapping and \
                same_run(record.get("resolved"), config_from_mapping(mapping).to_dict()):  # a changed default reruns
            return record
        _keep_earlier(record, mapping, path.parent)
    if (record := _measured(mapping, path.parent)) is not None:
        path.write_text(json.dumps(record, indent=1))
        return record
    if not compute:
        return None
    print(f"running split={split_of(mapping)} seed={mapping['seed']} student={mapping.get('student-model', 'default')}"
          f" ...", file=sys.stderr, flush=True)
    record = run_one(mapping, runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").replace(path)
    return record


def _ms(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.pstdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def reference_table(refs: dict[tuple[str, str], list[dict[str, float]]],
                    rows: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    lines = ["The same students with the same schedule on real data (`--references`): distilled from the same "
             "ensemble on the 60,000 real training images without their labels, and trained on them with labels.",
             "", "| Dirichlet alpha | student | seeds | data-free student | distilled on real images | trained on "
             "real labels |", "|---|---|---|---|---|---|"]
    for key, values in sorted(refs.items(), key=_order):
        free = _ms([r["student"] for r in rows[key]]) if key in rows else ""
        lines.append(f"| {key[0]} | {key[1]} | {len(values)} | {free} | {_ms([v['real_kd'] for v in values])} "
                     f"| {_ms([v['real_labels'] for v in values])} |")
    return lines


def table(rows: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    lines = ["| Dirichlet alpha | student | seeds | best teacher | ensemble (class-weighted) | plain probability mean "
             "| student | student / ensemble | query samples | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (alpha, student), records in sorted(rows.items(), key=_order):
        lines.append(
            f"| {alpha} | {student} | {len(records)} | {_ms([r['best_teacher'] for r in records])} "
            f"| {_ms([r['ensemble'] for r in records])} | {_ms([r['prob_mean'] for r in records])} "
            f"| **{_ms([r['student'] for r in records])}** | {_ms([r['student'] / r['ensemble'] for r in records])} "
            f"| {statistics.fmean(r['query_samples'] for r in records):,.0f} "
            f"| {statistics.fmean(r['wall_seconds'] for r in records):.0f} |")
    for published, (ens, dense) in sorted(DENSE.items()):
        lines.append(f"| {published} | DENSE (published) | | | {ens:.4f} | | {dense:.4f} | {dense / ens:.4f} | | |")
    return lines


def targets(rows: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    out = []
    for (alpha, student), records in sorted(rows.items(), key=_order):
        if student != "default" or alpha == PATHOLOGICAL or float(alpha) not in TARGETS:
            continue
        floor, ratio = TARGETS[float(alpha)]
        acc = statistics.fmean(r["student"] for r in records)
        got = statistics.fmean(r["student"] / r["ensemble"] for r in records)
        out.append(f"[{'met' if acc >= floor else 'MISSED'}] Dirichlet({alpha}): student {acc:.4f} >= {floor:.4f} "
                   f"({len(records)} seeds)")
        if ratio:
            out.append(f"[{'met' if got >= ratio else 'MISSED'}] Dirichlet({alpha}): student / ensemble {got:.4f} "
                       f">= {ratio:.2f}")
    return out


SPLIT_KEYS = ("dataset", "data-root", "num-clients", "partition", "alpha", "seed")


# how the student is trained: the context of every other change
RECIPE_KEYS = ("student-model", "student-steps", "student-refit", "student-clip")
# the student as issue 26 found it: LeNet-5-half, 20 steps a round, no refit, its gradient not clipped
BASE_RECIPE = ("lenet5-half", 20, 0.0, 0.0)


def factors(results: Path, alpha: float) -> list[str]:
    """Every cached variant at ``alpha`` against the defaults on the same seeds (the factor table: what each change
    does), the largest gain first; read from the records, nothing runs.

    A variant is compared with the defaults run with the same torch threads (results differ between 1 and 2) and
    the same student recipe (``student-model``, ``student-steps``, ``student-refit``, ``student-clip``; a key a
    record does not set is the value its resolved configuration records, else today's default, and the records made
    before a default changed set the old value or predate the key, ``EARLIER_DEFAULTS``); a recipe other than the one
    issue 26 started from, with no other change, is compared with the defaults under that one."""
    today = config_from_mapping({})
    default = {"student-model": today.student.model, "student-steps": today.student_steps,
               "student-refit": today.student.refit, **EARLIER_DEFAULTS}
    variants: dict[tuple[str, int, tuple[str, int, float, float]], dict[int, dict[str, Any]]] = {}
    for path in sorted((results / "records").glob(f"a{alpha}-s*.json")):
        record = json.loads(path.read_text())
        config = record["config"]
        if config.get("alpha") != alpha:
            continue
        change = " ".join(f"{k}={v}" for k, v in sorted(config.items())
                          if k not in (*SPLIT_KEYS, "num-threads", *RECIPE_KEYS)) or DEFAULTS
        resolved = {**default, **record.get("resolved", {}), **config}
        recipe = (str(resolved["student-model"]), int(resolved["student-steps"]), float(resolved["student-refit"]),
                  float(resolved["student-clip"]))
        variants.setdefault((change, int(config.get("num-threads", 0)), recipe), {})[config["seed"]] = record
    lines = [f"Dirichlet({alpha}): each change (`--set`) against the defaults on the same seeds, torch threads and "
             "student recipe (`python simulations/fashion_mnist.py --factors`; threads 0: torch's choice, 2 here; "
             "student: model, student steps per round, refit, the gradient clip where there is one)", "",
             "| change | threads | student | seeds | student accuracy | vs the defaults, same seeds | query samples "
             "| wall (s) |",
             "|---|---|---|---|---|---|---|---|"]

    def mean(records: list[dict[str, Any]], key: str) -> float:
        return statistics.fmean(r[key] for r in records)

    rows = []
    for (change, threads, recipe), by_seed in variants.items():
        if change == DEFAULTS and recipe != BASE_RECIPE:  # the recipe itself, against the one issue 26 started from
            label = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v, b in zip(RECIPE_KEYS, recipe, BASE_RECIPE) if v != b)
            base = variants.get((DEFAULTS, threads, BASE_RECIPE), {})
        else:
            label, base = change, variants.get((DEFAULTS, threads, recipe), {})
        seeds = sorted(s for s in by_seed if s in base)
        if not seeds:
            continue
        runs = [by_seed[s] for s in seeds]
        delta = mean(runs, "student") - mean([base[s] for s in seeds], "student")
        student = f"{recipe[0]}, {recipe[1]}, {recipe[2]:g}" + (f", clip {recipe[3]:g}" if recipe[3] else "")
        rows.append((delta, f"| `{label}` | {threads} | {student} | {','.join(map(str, seeds))} "
                     f"| {_ms([r['student'] for r in runs])} | {delta:+.4f} | {mean(runs, 'query_samples'):,.0f} "
                     f"| {mean(runs, 'wall_seconds'):.0f} |"))
    return lines + [row for _, row in sorted(rows, reverse=True)]


def diagnose(run_dir: Path, data_root: str) -> list[str]:
    """Where a run's student falls short of its ensemble, from its run directory: recall per class (student,
    plain probability mean of the teachers) and how often each calls a class (a class the student seldom
    predicts on real images though the pool holds it), the student with its BatchNorm statistics re-estimated on
    the real test images (AdaBN: is the gap in the statistics?), and the synthetic pool against the real images
    (mean, total variation, the ensemble's top probability per class). Per class also the class-weighted ensemble's
    recall (by the teachers' label counts, without the run's reliability factors) and who holds the class: the
    clients holding at least a tenth of its records, and the largest one's share (whether the student falls short
    on the classes one client holds: at Dirichlet(0.1), mostly not; docs/results.md)."""
    from gate_probe import density_weighed

    from fedkd.coordinator.aggregation import AGGREGATORS, claimed_counts, column_shares, density_gate
    from fedkd.institution.loading import load_teacher

    data = load_dataset("fashion-mnist", data_root, seed=0)
    x, y = data.spec.normalize(data.test.images), data.test.labels
    student, _ = load_teacher(run_dir / "student.pt")
    loaded = [load_teacher(p) for p in sorted(run_dir.glob("clients/client_*/teacher.pt"))]
    teachers = [model for model, _ in loaded]
    counts = claimed_counts([meta.get("label_counts") for _, meta in loaded], data.spec.num_classes)
    shares = column_shares(counts)  # (K, C) each client's share of each class's records
    c = data.spec.num_classes
    has_density, sharpness = density_weighed(run_dir, teachers)
    gated = bool(has_density.all())
    with torch.no_grad():
        guess = student.eval()(x).argmax(1)
        outputs = torch.stack([t.eval()(x) for t in teachers])
        logits = outputs[..., :c]  # (a teacher with a density answers its log-density last)
        mean = logits.softmax(-1).mean(0).argmax(1)
        weights = shares.unsqueeze(1)
        if gated:  # the run weighed each answer by the density gate too (teacher-density=on)
            weights = weights * density_gate(outputs[..., c], sharpness=sharpness).unsqueeze(-1)
        weighted = AGGREGATORS["class-weighted"].combine(logits, weights).argmax(1)
        for m in student.modules():  # AdaBN: running statistics from the real test images
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        student.train()
        for i in range(0, len(x), 500):
            student(x[i:i + 500])
        adabn = student.eval()(x).argmax(1)
    lines = [f"{run_dir}: student {float((guess == y).float().mean()):.4f}, with BatchNorm statistics from the "
             f"real test images {float((adabn == y).float().mean()):.4f}, plain probability mean of the teachers "
             f"{float((mean == y).float().mean()):.4f}", "",
             "| class | student recall | teachers' mean recall | class-weighted recall"
             + (" (density-gated, as the run weighed)" if gated else "") + " | clients holding a tenth or "
             "more (largest share) | test images the student calls it | the teachers' mean calls it | pool samples "
             "the ensemble calls it |", "|---|---|---|---|---|---|---|---|"]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")["method"]["pool"]
    pool = state["images"].float() / 255
    best = state["answers"].argmax(1)  # the class the ensemble picks for each pool sample
    calls = [torch.bincount(a, minlength=data.spec.num_classes).tolist() for a in (guess, mean, best)]
    for c in range(data.spec.num_classes):
        k = y == c
        recall = [float((answer[k] == c).float().mean()) for answer in (guess, mean, weighted)]
        holders = int((shares[:, c] >= 0.1).sum())
        lines.append(f"| {c} | {recall[0]:.3f} | {recall[1]:.3f} | {recall[2]:.3f} | {holders} "
                     f"({float(shares[:, c].max()):.2f}) | {calls[0][c]} | {calls[1][c]} | {calls[2][c]} |")

    def tv(images: torch.Tensor) -> float:
        return float((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
                     + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())

    top = state["answers"].float().softmax(1)
    lines += ["", f"pixels: real test images mean {float(data.test.images.mean()):.3f}, total variation "
                  f"{tv(data.test.images):.3f}; the synthetic pool ({len(pool):,}) mean {float(pool.mean()):.3f}, "
                  f"total variation {tv(pool):.3f}",
              "the ensemble's top probability on the pool, per class it picks: "
              + ", ".join(f"{c}: {float(top.max(1).values[best == c].mean()):.2f}" for c in range(top.shape[1]))]
    return lines


def plot(rows: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({a for a, _ in rows}, key=_split_rank)
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for (a, student), records in sorted(rows.items()):
            if a != alpha:
                continue
            for i, r in enumerate(records):
                xs, ys = zip(*r["curve"])
                ax.plot([x / 1000 for x in xs], ys, color="C0" if student == "default" else "C1", alpha=0.7,
                        label=f"{student} student" if i == 0 else None)
            ax.axhline(statistics.fmean(r["ensemble"] for r in records), color="gray", ls="--",
                       label="ensemble" if student == "default" else None)
        dense = _dense(alpha)
        ax.axhline(dense[1], color="C3", ls=":", label="DENSE's student") if dense else None
        name = "pathological (2 classes per client)" if alpha == PATHOLOGICAL else f"Dirichlet({alpha})"
        ax.set(title=f"Fashion-MNIST, {name}, 5 clients", xlabel="query samples (thousands)",
               ylabel="student test accuracy")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DEBIAN_ROOT, help=f"the IDX files (default {DEBIAN_ROOT})")
    parser.add_argument("--alphas", default="0.1,0.3,0.5",
                        help=f"Dirichlet alphas, and {PATHOLOGICAL} for 2 classes per client (every class an owner)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--students", default="default", help=f"of {', '.join(STUDENTS)} (default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key for every run (repeatable); give such runs a --tag")
    parser.add_argument("--tag", default="", help="names this variant's table and plot")
    parser.add_argument("--runs", default="runs/fashion-mnist", help="teachers and run directories")
    parser.add_argument("--results", default="simulations/results/fashion-mnist")
    parser.add_argument("--references", action="store_true",
                        help="also train each student on the real data (distilled from the ensemble, and on labels)")
    parser.add_argument("--cached", action="store_true",
                        help="tabulate the runs already computed (the others are left out, and said so); run nothing")
    parser.add_argument("--factors", action="store_true",
                        help="print the factor table of Dirichlet(0.5) from the records (every --set variant "
                             "against the defaults on the same seeds); run nothing")
    parser.add_argument("--diagnose", metavar="RUN_DIR",
                        help="where one run's student falls short of its ensemble (per-class recall, its BatchNorm "
                             "statistics, the synthetic pool against real images); run nothing")
    args = parser.parse_args(argv)
    if args.diagnose:
        print("\n".join(diagnose(Path(args.diagnose), args.data_root)))
        return 0
    if args.factors:
        print("\n".join(factors(Path(args.results), 0.5)))
        return 0
    alphas = [a.strip() for a in args.alphas.split(",")]
    for a in alphas:
        try:
            split_part(a)
        except ValueError:
            parser.error(f"--alphas: {a!r} is neither a Dirichlet alpha nor {PATHOLOGICAL}")
    seeds = [int(s) for s in args.seeds.split(",")]
    students = args.students.split(",")
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        parser.error(f"unknown student(s) {', '.join(unknown)}; choose from {', '.join(STUDENTS)}")
    if args.set and not args.tag:
        parser.error("--set changes the runs: name the variant with --tag so its table does not replace the default")
    if not Path(args.data_root).is_dir():
        parser.error(f"{args.data_root} does not exist: apt-get install dataset-fashion-mnist, or give --data-root")
    overrides = parse_assignments(args.set)
    results, runs = Path(args.results), Path(args.runs)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing: list[str] = []
    refs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for alpha in alphas:
        for student in students:
            for seed in seeds:
                mapping = {"dataset": "fashion-mnist", "data-root": args.data_root, "num-clients": 5,
                           **split_part(alpha), "seed": seed, **STUDENTS[student], **overrides}
                label = split_of(mapping)
                config_from_mapping(mapping)  # a bad --set fails before hours of work
                record = cached(mapping, results, runs, compute=not args.cached)
                if record is None:
                    missing.append(f"{'alpha=' if label != PATHOLOGICAL else ''}{label} seed={seed} "
                                   f"student={student}")
                else:
                    rows.setdefault((label, student), []).append(record)
                if args.references and (record is not None or not args.cached):
                    refs.setdefault((label, student), []).append(references(mapping, runs, results))
    if missing:
        print(f"not computed yet, left out: {'; '.join(missing)}", file=sys.stderr)
    if not rows:
        parser.error("no run computed yet for these alphas, seeds and students (drop --cached to run them)")
    name = "fashion-mnist" + (f"-{args.tag}" if args.tag else "")
    command = " ".join(["python simulations/fashion_mnist.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Full Fashion-MNIST, 5 clients (`{command}`)", "", *table(rows), "", *targets(rows),
             *(["", *reference_table(refs, rows)] if refs else [])]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, results / f"{name}.png")
    print("\n".join(lines))
    print(f"\nwritten: {results / (name + '.md')}, {results / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
