"""What an institution's per-class BatchNorm statistics give away: a coordinator that inverts a teacher through the
``class-feature-statistics`` term, against the same inversion through the global ``feature-statistics`` term
(what every BatchNorm teacher already serves) and through the logits alone.

    python simulations/class_statistics_leak.py                    # MNIST-5k Dirichlet(0.5), seeds 0, 1, 2, client 0
    python simulations/class_statistics_leak.py --seeds 0 --steps 500

``teacher-class-statistics=on`` makes each client answer, beside its logits, the distance of a query batch from the
channel means and variances its own images of each class leave in every BatchNorm layer
(``fedkd/institution/terms.py``, ``ClassFeatureStatistics``); the coordinator gets the value and its input gradient,
never the statistics. This attack uses nothing but the contract, on a real
:class:`~fedkd.institution.host.TeacherHost` with the client's release policy: for each class the client holds
enough images of (the statistics' own, not the running ones), ``--batch`` random inputs are moved ``--steps`` times
by Adam along the input gradient the teacher returns for cross-entropy to that class plus ``--weight`` times the
term (DeepInversion's recipe). Three arms on the same teacher: the class term, the global term (the running
statistics), and cross-entropy alone.

Printed per seed, class and arm, over the inputs reached: the teacher's accuracy on them (the class asked), the
cosine of their mean to the mean of the client's own images of that class and to the mean of the official test
images of that class (the class in general), and per input the cosine to the nearest of the client's own images of
that class against the nearest of as many test images of that class (a gap says the inversion finds the client's
records, not the class). Images are compared normalised as the teacher takes them, less the mean test image (so
the shared background does not count). Writes ``class-statistics-leak.md`` under ``--results``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedkd.config import config_from_mapping  # noqa: E402
from fedkd.contract import CLASS_FEATURE_STATISTICS, FEATURE_STATISTICS, QueryContext  # noqa: E402
from fedkd.coordinator.experiment import prepare_clients  # noqa: E402
from fedkd.coordinator.flow import LogObserver  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.institution.host import TeacherHost  # noqa: E402
from fedkd.institution.terms import MIN_CLASS_IMAGES  # noqa: E402
from fedkd.institution.training import client_partitions  # noqa: E402

ARMS = {"class statistics": CLASS_FEATURE_STATISTICS, "global statistics": FEATURE_STATISTICS, "logits only": None}


def invert(host: TeacherHost, target: int, term: str | None, *, batch: int, steps: int, lr: float, weight: float,
           seed: int) -> tuple[Tensor, int]:
    """``batch`` inputs moved ``steps`` times along the teacher's answered gradient of cross-entropy to ``target``
    plus ``weight`` x ``term`` (none: cross-entropy alone). Returns the inputs and the query samples spent (every
    Forward and every Backward counts its inputs)."""
    draw = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *host.description.input_shape, generator=draw)
    optimizer = torch.optim.Adam([x.requires_grad_(True)], lr=lr)
    state = QueryContext.of(purpose="synthesis", method="class-statistics-leak")
    names = (term,) if term else ()
    labels = torch.full((batch,), target)
    spent = 0
    for step in range(steps):
        reply = host.forward(x.detach(), state, terms=names, keep=step)
        logits = reply.logits[:, :host.description.num_classes].float().requires_grad_(True)
        grad_logits, = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        gradient = host.backward(None, grad_logits, state, grad_terms={term: weight} if term else None,
                                 forward_id=step)
        spent += 2 * batch
        optimizer.zero_grad()
        x.grad = gradient
        optimizer.step()
    return x.detach(), spent


def nearest_cosine(found: Tensor, references: Tensor) -> float:
    """Mean over ``found`` of the cosine to its nearest image in ``references`` (both flattened, centred)."""
    a = F.normalize(found.flatten(1), dim=1)
    b = F.normalize(references.flatten(1), dim=1)
    return float((a @ b.T).max(1).values.mean())


def attack(seed: int, client: int, batch: int, steps: int, lr: float, weight: float,
           root: Path) -> list[dict[str, Any]]:
    base = {"dataset": "mnist5k", "partition": "dirichlet", "alpha": 0.5, "num-clients": 5, "seed": seed,
            "teacher-class-statistics": True}
    config = config_from_mapping(base)
    split = load_dataset("mnist5k", "data", seed=seed)
    own = torch.as_tensor(client_partitions(config, split.train.labels)[client])
    teacher = prepare_clients(config, split, root / f"seed{seed}", torch.device("cpu"), LogObserver())[client]
    host = TeacherHost(teacher.model, teacher.description, policy=teacher.policy)
    normalize = split.spec.normalize
    test_images = normalize(split.test.images.float())
    centre = test_images.mean(0, keepdim=True)  # the background every class shares
    own_images, own_labels = normalize(split.train.images[own].float()) - centre, split.train.labels[own]
    test_images = test_images - centre
    rows = []
    for target in range(split.spec.num_classes):
        mine = own_images[own_labels == target]
        general = test_images[split.test.labels == target]
        if len(mine) < MIN_CLASS_IMAGES or len(general) < len(mine):
            continue  # the class term compares such a class with the running statistics: nothing of its own
        sample = general[torch.randperm(len(general), generator=torch.Generator().manual_seed(seed))[:len(mine)]]
        for arm, term in ARMS.items():
            found, spent = invert(host, target, term, batch=batch, steps=steps, lr=lr, weight=weight,
                                  seed=seed * 100 + target)
            with torch.no_grad():
                answered = teacher.model(found).argmax(-1)
            centred = found - centre
            mean = centred.mean(0).flatten()
            rows.append({
                "seed": seed, "class": target, "own_images": len(mine), "arm": arm, "query_samples": spent,
                "hit": float((answered == target).float().mean()),
                "own_mean": float(F.cosine_similarity(mean, mine.mean(0).flatten(), dim=0)),
                "test_mean": float(F.cosine_similarity(mean, general.mean(0).flatten(), dim=0)),
                "own_nearest": nearest_cosine(centred, mine),
                "test_nearest": nearest_cosine(centred, sample),
            })
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="inputs inverted at once (one query batch)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight", type=float, default=1.0, help="the statistics term's weight beside cross-entropy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--results", default="simulations/results")
    args = parser.parse_args(argv)
    if not 0 <= args.client < 5:
        parser.error(f"--client must be one of the 5 clients 0-4, got {args.client}")
    if args.batch < 2 or args.steps < 1 or not args.lr > 0 or not args.weight > 0:
        parser.error("--batch must be at least 2, --steps at least 1, --lr and --weight above 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="class-statistics-leak-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += attack(seed, args.client, args.batch, args.steps, args.lr, args.weight, Path(tmp))
    command = " ".join(["python simulations/class_statistics_leak.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Made by `{command}` (MNIST-5k, Dirichlet(0.5), 5 clients, client {args.client}; {args.batch} inputs "
             f"inverted {args.steps} times per class, Adam at {args.lr}, the term at weight {args.weight}; cosines of "
             "normalised images less the mean test image).", "",
             "| arm | classes x seeds | teacher calls them the class | batch mean vs the client's class mean | "
             "batch mean vs the test class mean | nearest own image | nearest test image (as many) | own - test |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue

        def mean(key: str) -> float:
            return statistics.fmean(r[key] for r in mine)  # noqa: B023 (used at once)

        gap = statistics.fmean(r["own_nearest"] - r["test_nearest"] for r in mine)
        lines.append(f"| {arm} | {len(mine)} | {mean('hit'):.3f} | {mean('own_mean'):.3f} | {mean('test_mean'):.3f} "
                     f"| {mean('own_nearest'):.3f} | {mean('test_nearest'):.3f} | {gap:+.3f} |")
    lines += ["", "Per seed and class:", "",
              "| seed | class (own images) | arm | query samples | called the class | vs own class mean | "
              "vs test class mean | nearest own | nearest test |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['class']} ({r['own_images']}) | {r['arm']} | {r['query_samples']:,} | "
                     f"{r['hit']:.3f} | {r['own_mean']:.3f} | {r['test_mean']:.3f} | {r['own_nearest']:.3f} | "
                     f"{r['test_nearest']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "class-statistics-leak.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
