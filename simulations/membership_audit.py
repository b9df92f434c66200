"""Membership inference against a run's teachers (through their hosts) and its student: what an attacker learns.

    python simulations/membership_audit.py                       # the privacy-utility runs of seed 0: no DP, dp 8, 1
    python simulations/membership_audit.py --run runs/privacy/NAME --client 0 --shadows 8

For client ``--client`` of each run: the candidates are its training records (members) and the test split
(non-members, never trained on by anyone). The attacker is the coordinator: it sends the candidates to the
teacher's host as queries (under the client's own release policy, as every query is answered) and reads
the student it distilled. Two attacks, each scored by AUC and the true-positive rate at 0.1 % and 1 %
false positives (``fedkd.institution.privacy.audit``):

Members and non-members are drawn with the same label histogram (a non-IID teacher is surer of its own
classes; an imbalance would pass for membership signal).

- loss threshold (Yeom et al.): the lower the loss, the likelier a member;
- LiRA, offline (Carlini et al.): ``--shadows`` models trained with the client's own recipe (DP-SGD
  included) on records of the other clients with the client's label histogram, none of them a candidate,
  give each candidate's OUT distribution of logit-scaled confidence; the student is attacked with the
  same OUT reference (shadow students would need a federation each).

Each figure is printed beside the bound the client's reported (epsilon, delta) implies for any attack
(``dp_tpr_bound``); an attack above it would mean the guarantee or its accounting is wrong. Writes
``membership-audit.md`` under ``--results`` and prints the targets: AUC against the student at most
0.55, and the TPR at 0.1 % FPR within the bound for DP-SGD teachers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import _key, run_one  # noqa: E402
from privacy_utility import mapping  # noqa: E402

from fedkd.config import config_from_mapping  # noqa: E402
from fedkd.contract import QueryContext  # noqa: E402
from fedkd.data import ImageData, load_dataset  # noqa: E402
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher  # noqa: E402
from fedkd.institution.privacy.audit import (
    FPRS,
    attack_metrics,
    dp_tpr_bound,
    lira_offline_scores,
    loss_scores,
    scaled_confidence,
)
from fedkd.institution.privacy.ledger import ledger_path  # noqa: E402
from fedkd.institution.privacy.policy import ReleasePolicy  # noqa: E402
from fedkd.institution.training import client_partitions, train_teacher  # noqa: E402
from fedkd.metrics import predict  # noqa: E402

STUDENT_AUC_TARGET = 0.55


def _through_host(host: TeacherHost, inputs: torch.Tensor) -> torch.Tensor:
    """The logits the coordinator gets for ``inputs``: Forward queries, as many as the host's batch limit needs."""
    step = host.max_batch
    return torch.cat([host.forward(inputs[i:i + step], QueryContext()).logits for i in range(0, len(inputs), step)])


def _shadow_data(train: ImageData, exclude: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Indices of ``train`` outside ``exclude`` with (at most) ``counts[c]`` records of each class c."""
    labels = train.labels.numpy()
    allowed = np.setdiff1d(np.arange(len(labels)), exclude)
    picked = [rng.choice(pool, size=min(n, len(pool)), replace=False)
              for c, n in enumerate(counts) if n and len(pool := allowed[labels[allowed] == c])]
    return np.concatenate(picked) if picked else np.array([], dtype=np.int64)


def audit_run(run_dir: Path, *, client: int = 0, shadows: int = 8, seed: int = 0) -> dict[str, Any]:
    """Both attacks against client ``client``'s teacher and against the student of the run in ``run_dir``."""
    config = config_from_mapping(json.loads((run_dir / "config.json").read_text()))
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    spec = split.spec
    part = client_partitions(config, split.train.labels)[client]
    rng = np.random.default_rng(seed)
    # Members and non-members with the same label histogram: a non-IID client's teacher is surer of its own
    # classes, and a class imbalance between the two sets would pass for membership signal.
    own, test = split.train.labels.numpy()[part], split.test.labels.numpy()
    keep_in, keep_out = [], []
    for c in range(split.spec.num_classes):
        mine, theirs = part[own == c], np.flatnonzero(test == c)
        n = min(len(mine), len(theirs))
        keep_in.append(rng.choice(mine, n, replace=False))
        keep_out.append(rng.choice(theirs, n, replace=False))
    members = split.train.subset(np.concatenate(keep_in))
    nonmembers = split.test.subset(np.concatenate(keep_out))
    x_in, x_out = spec.normalize(members.images), spec.normalize(nonmembers.images)
    y_in, y_out = members.labels, nonmembers.labels

    teacher_path = run_dir / "clients" / f"client_{client:02d}" / "teacher.pt"
    model, ckpt = load_teacher(teacher_path)
    settings = config.privacy.for_client(client)
    with tempfile.TemporaryDirectory() as tmp:  # the audit's queries go to a copy of the ledger, not the run's
        ledger = Path(tmp) / "teacher.ledger.json"
        if ledger_path(teacher_path).exists():
            shutil.copy(ledger_path(teacher_path), ledger)
        policy = ReleasePolicy(settings, num_records=len(part), training=ckpt.get("privacy"), ledger_path=ledger)
        host = TeacherHost(model, describe_checkpoint(ckpt, model, client=client, policy=policy), policy=policy)
        teacher_in, teacher_out = _through_host(host, x_in), _through_host(host, x_out)
        epsilon, delta = (policy.ledger.spent, policy.ledger.delta) if policy.mode != "none" else (float("inf"), 0.0)
    student, _ = load_teacher(run_dir / "student.pt")
    student_in, student_out = predict(student, x_in), predict(student, x_out)

    counts = np.bincount(y_in.numpy(), minlength=spec.num_classes).tolist()
    dp = settings.mode == "dp-sgd"
    phi_in, phi_out = [], []
    for s in range(shadows):
        idx = _shadow_data(split.train, part, counts, rng)
        shadow, _ = train_teacher(config.teacher_models()[client], split.train.subset(idx), spec, config,
                                  init_seed=10_000 + s, order_seed=20_000 + s, dp=dp)
        phi_in.append(scaled_confidence(predict(shadow, x_in), y_in))
        phi_out.append(scaled_confidence(predict(shadow, x_out), y_out))
        print(f"  shadow {s + 1}/{shadows} trained on {len(idx)} records", file=sys.stderr, flush=True)

    rows = []
    for target, (a_in, a_out) in (("teacher", (teacher_in, teacher_out)), ("student", (student_in, student_out))):
        for attack in ("loss threshold", "LiRA offline"):
            if attack == "loss threshold":
                s_in, s_out = loss_scores(a_in, y_in), loss_scores(a_out, y_out)
            else:
                s_in = lira_offline_scores(scaled_confidence(a_in, y_in), phi_in)
                s_out = lira_offline_scores(scaled_confidence(a_out, y_out), phi_out)
            rows.append({"target": target, "attack": attack, **attack_metrics(s_in, s_out)})
    return {"run": run_dir.name, "client": client, "mode": settings.mode, "epsilon": epsilon, "delta": delta,
            "shadows": shadows, "rows": rows,
            "bounds": {f"{f:g}": dp_tpr_bound(epsilon, delta, f) for f in FPRS}}


def _format(results: list[dict[str, Any]]) -> str:
    head = ("| teachers | client epsilon | target | attack | AUC | TPR at 0.1 % FPR (bound) | "
            "TPR at 1 % FPR (bound) | members / non-members |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "none (no guarantee)" if r["mode"] == "none" else f"{r['epsilon']:.2f} (delta {r['delta']:.0e})"
        for row in r["rows"]:
            lines.append(f"| {r['label']} | {eps} | {row['target']} | {row['attack']} | {row['auc']:.3f} | "
                         f"{row['tpr_at_0.001']:.4f} ({r['bounds']['0.001']:.4f}) | "
                         f"{row['tpr_at_0.01']:.4f} ({r['bounds']['0.01']:.4f}) | "
                         f"{row['members']:.0f} / {row['nonmembers']:.0f} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        for row in r["rows"]:
            if row["target"] == "student":
                ok = row["auc"] <= STUDENT_AUC_TARGET
                out.append(f"[{'met' if ok else 'MISSED'}] {r['label']}: {row['attack']} AUC against the student "
                           f"{row['auc']:.3f} (target <= {STUDENT_AUC_TARGET})")
            if r["mode"] == "dp-sgd":
                ok = row["tpr_at_0.001"] <= r["bounds"]["0.001"]
                out.append(f"[{'met' if ok else 'MISSED'}] {r['label']}: {row['attack']} against the {row['target']}: "
                           f"TPR at 0.1 % FPR {row['tpr_at_0.001']:.4f} within the DP bound {r['bounds']['0.001']:.4f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="a run directory to audit (repeatable); default: the "
                        "privacy-utility runs of --seed at --epsilons (run first if missing)")
    parser.add_argument("--epsilons", default="8,1", help="dp-epsilon values of the default runs (none is added)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--results", default="simulations/results/privacy")
    parser.add_argument("--runs", default="runs/privacy")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shadows < 2:
        parser.error("--shadows: LiRA needs at least 2 shadow models")
    runs = Path(args.runs)
    targets_: list[tuple[str, Path]] = [(Path(r).name, Path(r)) for r in args.run or []]
    if not args.run:
        for eps in [None, *[float(e) for e in args.epsilons.split(",")]]:
            m = mapping(eps, args.seed, {})
            run_dir = runs / f"{m['method']}-{m['dataset']}-{_key(m)}"
            if not (run_dir / "student.pt").exists():
                run_one(m, runs, runs / "teachers")
            targets_.append(("no DP" if eps is None else f"DP-SGD, dp-epsilon {eps:g}", run_dir))
    results = []
    for label, run_dir in targets_:
        if not (run_dir / "config.json").exists() or not (run_dir / "student.pt").exists():
            parser.error(f"--run: {str(run_dir)!r} is not a finished run (no config.json or student.pt)")
        print(f"auditing {run_dir} (client {args.client}, {args.shadows} shadows)", file=sys.stderr, flush=True)
        result = audit_run(run_dir, client=args.client, shadows=args.shadows, seed=args.seed)
        result["label"] = label
        results.append(result)
    text = (f"Made by `python simulations/membership_audit.py{' --run ...' if args.run else ''} --seed {args.seed} "
            f"--client {args.client} --shadows {args.shadows}` (client {args.client}'s training records against the "
            "test split; the teacher attacked through its host, the student directly; bound: the highest TPR "
            "any attack reaches at that FPR against the client's reported (epsilon, delta)).\n\n"
            + _format(results) + "\n\n" + "\n".join(f"- {t}" for t in targets(results)) + "\n")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership-audit.md").write_text(text)
    (out / "membership-audit.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
