"""What one client's PATE answers are worth, and what they cost: labels, abstentions and epsilon per answered row.

    python simulations/pate_client.py                  # MNIST-5k, client 0 of 5 (IID), 5 / 10 / 20 shard teachers

The client trains ``pate-teachers`` shard teachers on its own records (fedkd's teacher recipe,
``fedkd.institution.training.train_teacher`` with ``pate``) and answers ``--queries`` test images (standing in for the
coordinator's queries; real images are the easy case, synthetic ones are harder) through its host under
``privacy-mode=pate``. Printed per setting: the mean shard teacher's and the plurality vote's accuracy, the
fraction answered, the accuracy of the answered labels, and epsilon at delta 1e-5 (the data-independent
bound the budget enforces, and the data-dependent one, reported only). Writes ``pate-client.md`` under
``--results``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fedkd.config import config_from_mapping
from fedkd.contract import QueryContext
from fedkd.data import load_dataset
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.privacy.pate import ABSTAIN, pate_record
from fedkd.institution.privacy.policy import PrivacySettings, ReleasePolicy
from fedkd.institution.training import client_partitions, train_teacher

# (shard teachers, threshold, sigma1, sigma2): the default (10 teachers) and its scaled neighbours.
SETTINGS = [(5, 3.5, 1.0, 0.5), (10, 7.0, 2.0, 1.0), (20, 14.0, 4.0, 2.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="simulations/results/privacy")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_mapping({"dataset": args.dataset, "partition": "iid", "seed": args.seed})
    split = load_dataset(config.dataset, config.data_root, seed=args.seed)
    spec = split.spec
    part = client_partitions(config, split.train.labels)[0]
    data = split.train.subset(part)
    x = spec.normalize(split.test.images[:args.queries])
    y = split.test.labels[:args.queries]
    rows = []
    for teachers, threshold, sigma1, sigma2 in SETTINGS:
        model, record = train_teacher(config.teacher_models()[0], data, spec, config, init_seed=args.seed,
                                      order_seed=args.seed, pate=teachers)
        with torch.no_grad():
            members = [(m(x).argmax(1) == y).float().mean().item() for m in model.members]
            plurality = (model(x).argmax(1) == y).float().mean().item()
        settings = PrivacySettings(mode="pate", delta=1e-5, pate_threshold=threshold, pate_sigma1=sigma1,
                                   pate_sigma2=sigma2, share_label_counts=False)
        with tempfile.TemporaryDirectory() as tmp:
            policy = ReleasePolicy(settings, num_records=len(data),
                                   training=pate_record(teachers, record["shard_sizes"]),
                                   ledger_path=Path(tmp) / "ledger.json",
                                   generator=torch.Generator().manual_seed(args.seed))
            ckpt = {"model": config.teacher_models()[0], "num_classes": spec.num_classes,
                    "input_shape": list(spec.input_shape), "mean": list(spec.mean), "std": list(spec.std),
                    "num_samples": len(data), "label_counts": data.label_counts(spec.num_classes), "privacy": record}
            host = TeacherHost(model, describe_checkpoint(ckpt, model, client=0, policy=policy), policy=policy)
            labels = torch.cat([host.forward(x[i:i + 256], QueryContext(), labels=True).labels
                                for i in range(0, len(x), 256)])
            out = policy.record()
        answered = labels != ABSTAIN
        rows.append({"teachers": teachers, "records": len(data), "threshold": threshold, "sigma1": sigma1,
                     "sigma2": sigma2, "member": statistics.fmean(members), "plurality": plurality,
                     "answered": answered.float().mean().item(),
                     "answered_acc": (labels[answered] == y[answered]).float().mean().item() if answered.any() else 0.0,
                     "n_answered": int(answered.sum()), "epsilon": out["epsilon_spent"],
                     "dependent": out["pate"]["data_dependent_epsilon"]})
        r = rows[-1]
        print(f"{teachers} teachers: member {r['member']:.3f}, plurality {r['plurality']:.3f}, answered "
              f"{r['answered']:.2f} at {r['answered_acc']:.3f}, epsilon {r['epsilon']:.1f} "
              f"(data-dependent {r['dependent']:.1f})", file=sys.stderr, flush=True)
    lines = [f"Made by `python simulations/pate_client.py --dataset {args.dataset} --queries {args.queries} --seed "
             f"{args.seed}` (client 0 of 5, IID, {rows[0]['records']} records; {args.queries} test images as the "
             "queries; delta 1e-5).", "",
             "| shard teachers (records each) | threshold, sigma1, sigma2 | shard teacher acc. | plurality acc. | "
             "answered | acc. of answered | epsilon (data-independent, enforced) | epsilon (data-dependent, "
             "reported only) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teachers']} ({r['records'] // r['teachers']}) | {r['threshold']:g}, {r['sigma1']:g}, "
                     f"{r['sigma2']:g} | {r['member']:.3f} | {r['plurality']:.3f} | {r['n_answered']} "
                     f"({r['answered']:.0%}) | {r['answered_acc']:.3f} | {r['epsilon']:.1f} | {r['dependent']:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "pate-client.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
