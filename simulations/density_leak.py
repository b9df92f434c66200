"""What a served density gives away: a coordinator that climbs a teacher's answered log-density recovers the
client's class-mean images.

    python simulations/density_leak.py                       # MNIST-5k pathological, seeds 0, 1, 2, client 0
    python simulations/density_leak.py --seeds 0 --steps 1000 --starts 8

``teacher-density=on`` makes each client answer, beside its logits, the log-density of the input under a
probabilistic-PCA Gaussian per class it holds (``fedkd/institution/density.py``). The density is differentiable and
reaches the coordinator's Backward like any output. This attack uses nothing but the contract, on a real
:class:`~fedkd.institution.host.TeacherHost` with the client's release policy (``privacy-mode`` none, as densities
require): ``--starts`` random inputs, each moved ``--steps`` times by Adam along the input gradient the teacher
returns for ``grad_logits`` = 1 on the density column (a Forward keeping its graph, then a Backward naming it). A
Gaussian's log-density climbs to its mean: each input ends at one of the client's class-mean images. The control
is the same climb on the client's closed teacher (``teacher-density=off``, the same data) along the logit of the
class the input is first answered as: what gradient access alone gives.

Printed per seed and teacher: the query samples spent, and for the inputs reached, the cosine similarity and the
relative distance ``|x - m| / |m|`` to the nearest class mean of the client's own images (normalised as the teacher
takes them) and to the nearest class mean of the other clients' images. Writes ``density-leak.md`` under
``--results``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fedkd.contract import QueryContext  # noqa: E402
from fedkd.coordinator.experiment import prepare_clients  # noqa: E402
from fedkd.coordinator.flow import LogObserver  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.institution.host import TeacherHost  # noqa: E402
from fedkd.institution.training import client_partitions  # noqa: E402


def class_means(images: Tensor, labels: Tensor, normalize: Any) -> dict[int, Tensor]:
    """The mean image of every class present, normalised as the teachers take their inputs, flattened."""
    return {int(c): normalize(images[labels == c].float().mean(0, keepdim=True)).flatten()
            for c in labels.unique()}


def nearest(x: Tensor, means: dict[int, Tensor]) -> tuple[int, float, float]:
    """(class, cosine, relative distance) of the mean nearest to ``x`` by cosine."""
    scores = {c: float(F.cosine_similarity(x.flatten(), m, dim=0)) for c, m in means.items()}
    best = max(scores, key=lambda c: scores[c])
    return best, scores[best], float((x.flatten() - means[best]).norm() / means[best].norm())


def climb(host: TeacherHost, *, column: int | None, starts: int, steps: int, lr: float,
          seed: int) -> tuple[Tensor, int]:
    """``starts`` inputs climbed ``steps`` times along the teacher's answered gradient of one output column
    (``column``; None: the class each input is first answered as). Returns the inputs and the query samples spent
    (every Forward and every Backward counts its inputs)."""
    shape = host.description.input_shape
    draw = torch.Generator().manual_seed(seed)
    x = torch.randn(starts, *shape, generator=draw)
    optimizer = torch.optim.Adam([x.requires_grad_(True)], lr=lr)
    # (a coordinator that asks for the density: the teacher releases it to any query whose state does)
    state = dataclasses.replace(QueryContext.of(purpose="synthesis", method="density-leak"), log_density=True)
    spent, chosen = 0, None
    for step in range(steps):
        reply = host.forward(x.detach(), state, keep=step)
        spent += starts
        if chosen is None:
            chosen = (torch.full((starts,), column) if column is not None
                      else reply.logits[:, :host.description.num_classes].argmax(-1))
        grad_logits = F.one_hot(chosen, host.description.outputs).float()
        gradient = host.backward(None, grad_logits, state, forward_id=step)
        spent += starts
        optimizer.zero_grad()
        x.grad = -gradient  # ascent
        optimizer.step()
    return x.detach(), spent


def attack(seed: int, client: int, starts: int, steps: int, lr: float, root: Path) -> list[dict[str, Any]]:
    rows = []
    base = {"dataset": "mnist5k", "partition": "pathological", "num-clients": 5, "seed": seed}
    split = load_dataset("mnist5k", "data", seed=seed)
    parts = client_partitions(config_from_mapping(base), split.train.labels)
    own = parts[client]
    others = torch.cat([torch.as_tensor(p) for k, p in enumerate(parts) if k != client])
    normalize = split.spec.normalize
    own_means = class_means(split.train.images[own], split.train.labels[own], normalize)
    other_means = class_means(split.train.images[others], split.train.labels[others], normalize)
    for density in (True, False):
        config = config_from_mapping({**base, "teacher-density": density})
        teachers = prepare_clients(config, split, root / f"seed{seed}-{'density' if density else 'closed'}",
                                   torch.device("cpu"), LogObserver())
        teacher = teachers[client]
        host = TeacherHost(teacher.model, teacher.description, policy=teacher.policy)
        column = teacher.description.num_classes if density else None
        found, spent = climb(host, column=column, starts=starts, steps=steps, lr=lr, seed=seed)
        mine = [nearest(x, own_means) for x in found]
        theirs = [nearest(x, other_means) for x in found]
        rows.append({
            "seed": seed, "teacher": "density" if density else "closed", "classes": sorted(own_means),
            "query_samples": spent,
            "own_cosine": statistics.fmean(m[1] for m in mine),
            "own_distance": statistics.fmean(m[2] for m in mine),
            "own_reached": sorted({m[0] for m in mine if m[1] >= 0.99}),
            "other_cosine": statistics.fmean(t[1] for t in theirs),
        })
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--starts", type=int, default=16, help="inputs climbed at once (one query batch)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--results", default="simulations/results")
    args = parser.parse_args(argv)
    if not 0 <= args.client < 5:
        parser.error(f"--client must be one of the 5 clients 0-4, got {args.client}")
    if args.starts < 1 or args.steps < 1 or not args.lr > 0:
        parser.error("--starts and --steps must be at least 1 and --lr above 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="density-leak-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += attack(seed, args.client, args.starts, args.steps, args.lr, Path(tmp))
    command = " ".join(["python simulations/density_leak.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Made by `{command}` (MNIST-5k, pathological split, 5 clients, client {args.client}; {args.starts} "
             f"inputs climbed {args.steps} times each, Adam at {args.lr}).", "",
             "| seed | teacher (the client's classes) | climbed | query samples | cosine to the nearest own class mean "
             "| relative distance to it | own classes reached (cosine >= 0.99) | cosine to the nearest other "
             "client's class mean |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        climbed = "its log-density" if r["teacher"] == "density" else "the logit of its first answer"
        lines.append(f"| {r['seed']} | {r['teacher']} ({', '.join(map(str, r['classes']))}) | {climbed} | "
                     f"{r['query_samples']:,} | {r['own_cosine']:.3f} | {r['own_distance']:.3f} | "
                     f"{', '.join(map(str, r['own_reached'])) or 'none'} | {r['other_cosine']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "density-leak.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
