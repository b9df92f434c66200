"""Which class check: finished runs' final pools replayed through the reliability estimate, with and without a liar.

The coordinator checks each teacher's claimed label counts class by class against its answers
(``fedkd.coordinator.robustness.Reliability.class_weights``). This replays a finished run's final synthetic pool
(``checkpoint.pt``, in the order it was made, 256 samples a batch) through the estimate, every teacher answering
every sample, then scores the class-weighted ensemble the estimate leaves on the run's test images: the honest
federation, and the same federation with client 0's answers and claimed counts doctored (the liars below; the
claims capped at 4x the median client's total, as the coordinator caps them). Rules:

- ``discrimination`` (fedkd's check since stop 62): recall (of the inputs the others' consensus calls c, how many
  the teacher calls c) times discrimination (that recall less the rate at which it names c where the consensus
  names another class, relative to the best teacher's, full at ``--tolerance`` of it; the library's default 0.75);
- ``precision`` (the check before stop 62): recall times precision where contradicting is plain (of the inputs
  where all the others name one class and the teacher, surer than their median, names c, how many are c, each input
  weighed by the teacher's claim to the others' class), relative to the best teacher's at half of it;
- ``both``: discrimination times that precision (stop 63's probe of whether precision's cuts had helped the
  students of hard tasks);
- ``recall``: recall alone.

Beside each ensemble, the same ensemble with a per-input veto of the lone dissenter (a teacher that names another
class than every other teacher names, each of them at least 0.5 sure of it, is left out of that input; each class's
weights renormalised over the teachers left), probed against the partial liar, whose lies are spread over inputs
rather than classes (the coordinator has no such veto); and beside it the ensemble with fedkd's own per-input veto
(stop 64, ``Reliability.veto``): a teacher whose rate of contradicting a sure consensus of the others on classes it
holds is above ``DISSENT_FLOOR`` and ``DISSENT_RATIO`` times the median teacher's, as the estimate measured it on
the pool, has those contradicting answers left out (the rates and the teachers flagged are printed beside it).
Since stop 65 a flagged teacher's claimed records also count for no more than the median client's total, and for a
class only as far as its answers name it, in every column (the estimate's ``class_weights``).
Since stop 70 the rate sets the teacher's most contradicted class aside (``Reliability._spread``).

Liars (client 0): ``fixed`` class 0 at logit 20 on every input, claiming 10,000 records of every class; ``unsure``
the same at logit 2; ``narrow`` the fixed liar claiming class 0 alone; ``mostly`` the same claiming 3x the others'
records of class 0 and a tenth of theirs of every other class; ``partial`` class 0 at logit 20 on a random 30 % of
the inputs, honest elsewhere, claiming 10,000 of every class (``partial15`` the same on 15 %); ``swap`` and
``swap2`` (clients 0 and 1) the classes 3 and 5 swapped, claims honest; ``oneway`` 5 named for 3, honest elsewhere.

    python simulations/class_check.py RUN [RUN...] --liars honest,narrow,partial --rules precision,discrimination
    python simulations/class_check.py RUN [RUN...] --liars honest,partial15 --dissent-floor 0.2 --dissent-ratio 2

Experiment-only (it reads the teachers' files, which a coordinator never holds); the answers are the teachers' own,
so what differs from a full run is only that the estimate sees the final pool, not the pool as it grew.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_probe import answers  # noqa: E402

import fedkd.coordinator.robustness as robustness  # noqa: E402
from fedkd.checkpoint import load_run_state  # noqa: E402
from fedkd.coordinator.aggregation import AGGREGATORS, claimed_counts, column_shares  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.institution.loading import load_teacher  # noqa: E402

LIARS = ("honest", "fixed", "unsure", "narrow", "mostly", "partial", "partial15", "swap", "swap2", "oneway")
RULES = ("both", "discrimination", "precision", "recall")
SWAP = [0, 1, 2, 5, 4, 3, 6, 7, 8, 9]


class Earlier(robustness.Reliability):
    """The estimate with the check of before stop 62 kept beside it: precision where contradicting is plain, in
    place of discrimination (``precision``) or beside it (``both``)."""

    def __init__(self, *args, rule: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rule = rule
        self.precision = torch.ones(self.teachers, self.num_classes)
        self.precision_seen = torch.zeros(self.teachers, self.num_classes, dtype=torch.bool)

    @torch.no_grad()
    def update(self, members: list[int], logits: Tensor) -> None:
        super().update(members, logits)
        p = F.softmax(logits.float(), -1)
        votes, top = p.argmax(-1), p.max(-1).values
        for i, k in enumerate(members):
            rest = torch.cat([votes[:i], votes[i + 1:]])
            plain = (rest == rest[0]).all(0) & (top[i] > torch.cat([top[:i], top[i + 1:]]).median(0).values)
            theirs, mine = rest[0][plain], votes[i][plain]
            weight = self.shares[k, theirs]
            said = torch.bincount(mine, weights=weight, minlength=self.num_classes)
            right = torch.bincount(mine, weights=weight * (mine == theirs).float(), minlength=self.num_classes)
            named = said > 1e-6
            updated = self._ema(self.precision[k], right / said.clamp_min(1e-12), ~self.precision_seen[k])
            self.precision[k] = torch.where(named, updated, self.precision[k])
            self.precision_seen[k] |= named

    def _discrimination(self) -> Tensor:
        """The factor beside the recall's: the library's discrimination, the earlier precision, both, or none."""
        if self.rule == "recall":
            return torch.ones(self.teachers, self.num_classes)
        if self.rule == "discrimination":
            return super()._discrimination()
        precision = self._relative(self.precision, self.precision_seen)
        return precision if self.rule == "precision" else super()._discrimination() * precision


def doctor(logits: Tensor, claims: Tensor, liar: str) -> tuple[Tensor, Tensor]:
    """Client 0's (and for ``swap2`` client 1's) answers (K, N, C) and claims (K, C) as the liar gives them."""
    logits, claims = logits.clone(), claims.clone()
    total = claims.sum(0)
    if liar in ("fixed", "unsure", "narrow", "mostly"):
        logits[0] = 0
        logits[0, :, 0] = 2.0 if liar == "unsure" else 20.0
        claims[0] = 10_000
        if liar == "narrow":
            claims[0, 1:] = 0
        elif liar == "mostly":
            claims[0] = 0.1 * total
            claims[0, 0] = 3 * total[0]
    elif liar in ("partial", "partial15"):
        share = 0.15 if liar == "partial15" else 0.3
        chosen = torch.rand(logits.shape[1], generator=torch.Generator().manual_seed(0)) < share
        logits[0, chosen] = 0
        logits[0, chosen, 0] = 20.0
        claims[0] = 10_000
    elif liar in ("swap", "swap2"):
        for k in (0, 1) if liar == "swap2" else (0,):
            logits[k] = logits[k][:, SWAP]
    elif liar == "oneway":
        threes = logits[0].argmax(-1) == 3
        logits[0, threes, 5] = logits[0, threes, 3] + 2
    capped, _ = robustness.cap_counts(claims.tolist())  # as the coordinator caps them
    return logits, torch.tensor(capped, dtype=claims.dtype)


def veto(logits: Tensor, sure: float = 0.5) -> Tensor:
    """(K, N) 0 where a teacher names another class than every other teacher names, the others each at least
    ``sure`` of it (a per-input veto of the lone dissenter, probed against the partial liar); 1 elsewhere."""
    p = F.softmax(logits.float(), -1)
    votes, top = p.argmax(-1), p.max(-1).values
    keep = torch.ones(votes.shape)
    for k in range(len(votes)):
        rest, rest_top = torch.cat([votes[:k], votes[k + 1:]]), torch.cat([top[:k], top[k + 1:]])
        against = (rest == rest[0]).all(0) & (rest_top >= sure).all(0) & (votes[k] != rest[0])
        keep[k] = (~against).float()
    return keep


def vetoed(weights: Tensor, keep: Tensor) -> Tensor:
    """(K, N, C) per-input weights: the class weights with each vetoed answer left out, renormalised per class (a
    class whose every holder is vetoed on an input keeps the weights as they were)."""
    w = weights.unsqueeze(1) * keep.unsqueeze(-1)
    total = w.sum(0, keepdim=True)
    return torch.where(total > 1e-12, w / total.clamp_min(1e-12), weights.unsqueeze(1).expand_as(w))


def replay(run: Path, liars: list[str], rules: list[str], tolerances: list[float]) -> list[dict]:
    config = json.loads((run / "config.json").read_text())
    split = load_dataset(config["dataset"], config["data-root"], seed=config["seed"])
    spec, c = split.spec, split.spec.num_classes
    loaded = [load_teacher(p) for p in sorted((run / "clients").glob("client_*/teacher.pt"))]
    teachers = [model.eval() for model, _ in loaded]
    counts = claimed_counts([ckpt.get("label_counts") for _, ckpt in loaded], c)
    pool = load_run_state(run / "checkpoint.pt")["method"]["pool"]
    pool_logits = answers(teachers, spec.normalize(pool["images"].float() / 255))[..., :c]
    test_logits = answers(teachers, spec.normalize(split.test.images))[..., :c]
    y = split.test.labels
    rows = []
    for liar in liars:
        seen, claims = doctor(pool_logits, counts, liar)
        test, _ = doctor(test_logits, counts, liar)
        keep = veto(test)  # the same answers under every rule
        for rule in rules:
            for tolerance in tolerances if rule in ("both", "discrimination") else [None]:
                if tolerance is not None:
                    robustness.DISCRIMINATION_TOLERANCE = tolerance
                estimate = Earlier(len(teachers), c, claims=claims, rule=rule)
                members = list(range(len(teachers)))
                for start in range(0, seen.shape[1], 256):
                    estimate.update(members, seen[:, start:start + 256])
                w = column_shares(claims) * estimate.class_weights() * estimate.weights().unsqueeze(1)
                w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
                guess = AGGREGATORS["class-weighted"].combine(test, w).argmax(1)
                per_input = AGGREGATORS["class-weighted"].combine(test, vetoed(w, keep)).argmax(1)
                # fedkd's own per-input veto (stop 64): the flagged teachers' contradicting answers left out
                kept = estimate.veto(members, test)
                kept = torch.ones(test.shape[:2]) if kept is None else kept
                claimed = AGGREGATORS["class-weighted"].combine(test, vetoed(w, kept)).argmax(1)
                rows.append({"run": run.name, "liar": liar, "rule": rule, "tolerance": tolerance,
                             "ensemble": float((guess == y).float().mean()),
                             "vetoed": float((per_input == y).float().mean()),
                             "veto": float((claimed == y).float().mean()),
                             "veto_share": float(1 - kept.mean()),
                             "dissent": [round(float(v), 3) for v in estimate.dissent],
                             "flagged": [int(k) for k in estimate.flagged().nonzero().flatten()],
                             "weights": [round(float(v), 2) for v in estimate.weights()]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (teachers and checkpoint.pt)")
    parser.add_argument("--liars", default="honest,narrow,partial", help=f"comma-separated, of {', '.join(LIARS)}")
    parser.add_argument("--rules", default="precision,discrimination", help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument("--tolerances", default=str(robustness.DISCRIMINATION_TOLERANCE),
                        help="comma-separated tolerances of the discrimination rule")
    parser.add_argument("--dissent-floor", type=float, default=robustness.DISSENT_FLOOR,
                        help="the veto's floor on the dissent rate, for this replay (fedkd's: %(default)s)")
    parser.add_argument("--dissent-ratio", type=float, default=robustness.DISSENT_RATIO,
                        help="the veto's ratio to the median teacher's rate, for this replay (fedkd's: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dissent_floor < 0 or args.dissent_ratio < 0:
        parser.error("--dissent-floor and --dissent-ratio must be >= 0")
    # (the estimate reads the module's constants when it flags; this process replays, it distils nothing)
    robustness.DISSENT_FLOOR, robustness.DISSENT_RATIO = args.dissent_floor, args.dissent_ratio
    liars, rules = args.liars.split(","), args.rules.split(",")
    for name, given, known in (("liar", liars, LIARS), ("rule", rules, RULES)):
        unknown = [v for v in given if v not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown[0]!r}; choose from {', '.join(known)}")
    tolerances = [float(v) for v in args.tolerances.split(",")]
    torch.set_num_threads(args.threads)
    logging.getLogger("fedkd.coordinator.robustness").setLevel(logging.ERROR)  # the liars' warnings, expected
    print("| run | liar | rule | ensemble | with the lone dissenter vetoed | with fedkd's veto (answers vetoed) | "
          "dissent rates (flagged) | teachers' weights |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        for row in replay(run, liars, rules, tolerances):
            rule = row["rule"] + (f" {row['tolerance']:g}" if row["tolerance"] is not None else "")
            print(f"| {row['run']} | {row['liar']} | {rule} | {row['ensemble']:.4f} | {row['vetoed']:.4f} "
                  f"| {row['veto']:.4f} ({row['veto_share']:.1%}) | {row['dissent']} ({row['flagged']}) "
                  f"| {row['weights']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
