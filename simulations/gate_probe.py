"""A gate learned on the synthetic pool (IntactOFL), measured on finished runs before it is built into fedkd.

IntactOFL (Zeng et al., ACM MM 2024; ``zenghui9977/IntactOFL``, ``synthesizer_utils.py`` ``LinearGatingNetwork``,
``MoEEnsemble``; ``oneshot_intactofl.py`` ``intactofl_moe_train``) trains a small gate g(x) -> one weight per
teacher and input on the synthetic samples, with cross-entropy to the synthesis label, a balance term (the standard
deviation of the weights) and, with weight beta, KL to the plain ensemble. Its gate is one linear layer on the
pixels; this probe also tries one on the teachers' own answers (their probabilities and, for open-set teachers,
1 - p(unknown)). The gate multiplies the run's ensemble weights, per input: p(c | x) ~ sum_k g_k(x) w[k, c]
comp_k(x) p_k(c | x), w the label-count class weights, comp_k the open-set competence (1 without that output).

It needs nothing but a finished run directory: the teachers (``clients/client_NN/teacher.pt``, loaded in process),
the synthetic pool (``checkpoint.pt``), and the run's dataset for the test score. Labels: ``self`` (the plain
ensemble's own class, all an unconditional generator's pool offers) or ``targets`` (the class each sample was made
for: meaningful only in a run with ``conditional-generator=true`` and ``cudfkd.targets=balanced``).

    python simulations/gate_probe.py runs/benchmark/pathological-open-set-seed0 [more run directories]
    python simulations/gate_probe.py --no-gate RUN...    # only who owns the pool: the shares below

Each run's line also gives, for open-set teachers, the share of the last 5,000 pool samples and of the test images
that every teacher calls unknown (1 - p(unknown) < 0.5 for all): how far the synthesis strays from anything a
teacher calls its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.checkpoint import load_run_state
from fedkd.coordinator.aggregation import AGGREGATORS, class_weights, competence
from fedkd.data import load_dataset
from fedkd.institution.density import WithDensity
from fedkd.institution.loading import load_teacher


def answers(teachers: list[torch.nn.Module], x: Tensor, batch: int = 1024) -> Tensor:
    """(K, N, outputs) logits of every teacher, padded to the widest."""
    with torch.no_grad():
        return stacked([torch.cat([t(x[i:i + batch]) for i in range(0, len(x), batch)]) for t in teachers])


def stacked(rows: list[Tensor]) -> Tensor:
    """(K, N, outputs): the teachers' logits (N, outputs_k) each, padded to the widest (an open-set teacher's unknown
    output beside closed ones)."""
    width = max(r.shape[-1] for r in rows)
    return torch.stack([F.pad(r, (0, width - r.shape[-1])) for r in rows])


def combine(logits: Tensor, weights: Tensor, has_unknown: Tensor, num_classes: int,
            gate: Tensor | None = None, has_density: Tensor | None = None, sharpness: float = 4.0) -> Tensor:
    """Log-probabilities of the ensemble from (K, N, C[+1]) logits; ``gate`` (N, K) multiplies each vote;
    ``has_density`` (K,) bool: the teachers whose last column is a log-density the run weighed by (the density gate
    at ``sharpness``, as the coordinator forms it; :func:`density_weighed`)."""
    comp = (competence(logits, num_classes, has_unknown, has_density, sharpness=sharpness)
            if logits.shape[-1] > num_classes else torch.ones(logits.shape[:2]))
    w = weights.unsqueeze(1) * comp.unsqueeze(-1)
    if gate is not None:
        w = w * gate.T.unsqueeze(-1)
    return AGGREGATORS["class-weighted"].combine(logits[..., :num_classes], w)  # per-input weights (K, N, C)


def features(kind: str, images: Tensor, logits: Tensor, num_classes: int) -> Tensor:
    if kind == "pixels":
        return images.flatten(1)
    probs = F.softmax(logits[..., :num_classes], -1).permute(1, 0, 2).flatten(1)
    if logits.shape[-1] > num_classes:
        has = torch.ones(len(logits), dtype=torch.bool)
        probs = torch.cat([probs, competence(logits, num_classes, has).T], 1)
    return probs


def unknown_to_all(logits: Tensor, num_classes: int) -> float:
    """The share of inputs that every teacher calls unknown (1 - p(unknown) < 0.5 for all)."""
    has = torch.ones(len(logits), dtype=torch.bool)
    return float((competence(logits, num_classes, has).max(0).values < 0.5).float().mean())


def run_teachers(run: Path, num_classes: int) -> tuple[list[torch.nn.Module], Tensor, Tensor]:
    """A finished run's teachers (``RUN/clients``), in eval mode, with the run's class weights (K, C) and which of
    them answer an unknown output (K,)."""
    teachers, counts, unknown = [], [], []
    for path in sorted((run / "clients").glob("client_*/teacher.pt")):
        model, ckpt = load_teacher(path)
        teachers.append(model.eval())
        counts.append(ckpt.get("label_counts"))
        unknown.append(bool(ckpt.get("unknown_output", False)))
    return teachers, class_weights(counts, num_classes), torch.tensor(unknown)


def records_of(run: Path) -> list[list[int]]:
    """Each teacher's label counts (its records per class), as its checkpoint shares them."""
    return [list(load_teacher(path)[1].get("label_counts") or [])
            for path in sorted((run / "clients").glob("client_*/teacher.pt"))]


def density_weighed(run: Path, teachers: list[torch.nn.Module]) -> tuple[Tensor, float]:
    """(K,) bool, the teachers whose last column is a log-density that ``run`` weighed its answers by (its summary's
    ``density_gate``: teacher-density=on and the gate used), and the run's ``density-sharpness``."""
    config = json.loads((run / "config.json").read_text())
    summary = run / "summary.json"
    used = summary.is_file() and bool(
        json.loads(summary.read_text()).get("ensemble", {}).get("density_gate", {}).get("used", False))
    has = torch.tensor([used and isinstance(t, WithDensity) for t in teachers])
    return has, float(config.get("density-sharpness") or 4.0)


def probe(run: Path, epochs: int, seed: int, train_gate: bool = True) -> dict[str, float]:
    config = json.loads((run / "config.json").read_text())
    split = load_dataset(config["dataset"], config["data-root"], seed=config["seed"])
    spec = split.spec
    c = spec.num_classes
    teachers, weights, has_unknown = run_teachers(run, c)
    pool = load_run_state(run / "checkpoint.pt")["method"]["pool"]
    pool_x = spec.normalize(pool["images"].float() / 255)
    pool_logits = answers(teachers, pool_x)
    test_x = spec.normalize(split.test.images)
    test_logits = answers(teachers, test_x)
    y_test = split.test.labels
    plain_test = combine(test_logits, weights, has_unknown, c)
    out = {"plain": float((plain_test.argmax(1) == y_test).float().mean())}
    if bool(has_unknown.all()):
        out["pool unknown to all (last 5,000)"] = unknown_to_all(pool_logits[:, -5000:], c)
        out["test unknown to all"] = unknown_to_all(test_logits, c)
    if not train_gate:
        return out
    plain_pool = combine(pool_logits, weights, has_unknown, c)
    labels = {"self": plain_pool.argmax(1)}
    if config.get("conditional-generator") and config.get("cudfkd.targets") == "balanced":
        labels["targets"] = pool["targets"]
    k = len(teachers)
    for kind in ("pixels", "answers"):
        f_pool = features(kind, pool_x, pool_logits, c)
        f_test = features(kind, test_x, test_logits, c)
        for label, y in labels.items():
            for beta in (0.0, 1.0):
                torch.manual_seed(seed)
                gate = torch.nn.Linear(f_pool.shape[1], k)
                opt = torch.optim.SGD(gate.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                for _ in range(epochs):
                    order = torch.randperm(len(f_pool))
                    for i in range(0, len(f_pool), 128):
                        idx = order[i:i + 128]
                        g = F.softmax(gate(f_pool[idx]), -1) * k  # mean weight 1: the plain ensemble at g = 1
                        mixed = combine(pool_logits[:, idx], weights, has_unknown, c, g)
                        loss = F.nll_loss(mixed, y[idx]) + 0.1 * g.std()
                        if beta:
                            loss = loss + beta * F.kl_div(mixed, plain_pool[idx].exp(), reduction="batchmean")
                        opt.zero_grad()
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(gate.parameters(), 10.0)
                        opt.step()
                with torch.no_grad():
                    g = F.softmax(gate(f_test), -1) * k
                    gated = combine(test_logits, weights, has_unknown, c, g)
                out[f"{kind}, {label}, beta {beta:g}"] = float((gated.argmax(1) == y_test).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (teachers and checkpoint.pt)")
    parser.add_argument("--epochs", type=int, default=20, help="gate training epochs over the pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gate", action="store_true", help="only the shares of inputs unknown to every teacher")
    args = parser.parse_args(argv)
    results = {}
    for run in args.runs:
        results[str(run)] = probe(run, args.epochs, args.seed, train_gate=not args.no_gate)
        print(run, json.dumps({k: round(v, 4) for k, v in results[str(run)].items()}), flush=True)
    rows = sorted({k for r in results.values() for k in r}, key=lambda k: (k != "plain", k))
    print("\n| test accuracy of the ensemble | " + " | ".join(Path(r).name for r in results) + " | mean |")
    print("|---" * (len(results) + 2) + "|")
    for row in rows:
        values = [r.get(row) for r in results.values()]
        known = [v for v in values if v is not None]
        print(f"| {row} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values)
              + f" | {statistics.mean(known):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
