"""PATE on one client: shard teachers, Confident-GNMax answers, and their privacy cost.

``privacy-mode=pate`` (Papernot et al. 2017, 2018): the client splits its
records into ``pate-teachers`` disjoint shards and trains one teacher on each
(no DP in training). A query row is answered with a label only, by
Confident-GNMax on the teachers' votes n_c (the histogram of their argmaxes):

    if max_c n_c + N(0, sigma1^2) >= T:  answer argmax_c (n_c + N(0, sigma2^2))
    else:                                abstain (-1 on the wire)

One record lies in one shard, so it changes one teacher's vote: the vote
histogram moves by at most 1 in its max (threshold check, L2 sensitivity 1)
and by sqrt 2 overall (GNMax). The guarantee is record-level.

Accounting, in the client's ledger (RDP accountant, one Gaussian step per row):
every row pays the threshold check (noise multiplier sigma1), every answered
row also GNMax (noise multiplier sigma2 / sqrt 2), which is Propositions 8 and
the threshold analysis of Papernot et al. 2018 written as Gaussian mechanisms.
That is the data-independent bound, and it is what the budget enforces.

The data-dependent bound (Theorem 6 with Proposition 7's q, the threshold's
own data-dependent analysis) is far smaller when the teachers agree by a wide
margin; it is computed for every answered row and reported beside it
(``data_dependent_epsilon``), but it is a function of the private votes: the
paper publishes it through smooth sensitivity, which fedkd does not implement,
so it is never used to allow a release. With the few teachers one client can
train (5-10, against the paper's 250 on MNIST for 98.5 % at epsilon 1.97) the
noise has to be small for the labels to be right, and epsilon is in the tens
after a few hundred answered rows: a client's ``privacy-budget`` is what keeps
it there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.imports import load_heavy

MECHANISM = "pate"
ABSTAIN = -1  # the label a PATE client answers a row it is not confident about with

def _orders() -> np.ndarray:
    """The Renyi orders of Opacus's RDP accountant, so both bounds are converted alike."""
    load_heavy("opacus")
    from opacus.accountants import RDPAccountant

    return np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=np.float64)


ORDERS = _orders()


class ShardVotes(nn.Module):
    """The shard teachers of one client; ``forward`` returns their vote histogram (B, C), float32 counts."""

    def __init__(self, members: list[nn.Module], num_classes: int) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"pate-teachers: PATE needs at least 2 shard teachers, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        votes = torch.zeros(len(x), self.num_classes, device=x.device)
        for member in self.members:
            votes += nn.functional.one_hot(member(x).argmax(-1), self.num_classes).to(votes.dtype)
        return votes


def shards(num_records: int, teachers: int, seed: int) -> list[np.ndarray]:
    """Disjoint shards of ``range(num_records)``, as equal as possible, in a seeded random order."""
    if teachers < 2:
        raise ValueError(f"pate-teachers: {teachers!r}; PATE needs at least 2 shard teachers")
    if num_records < 2 * teachers:
        raise ValueError(f"pate-teachers: {teachers} shard teachers need at least {2 * teachers} records, this "
                         f"client has {num_records}; lower pate-teachers")
    order = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(s) for s in np.array_split(order, teachers)]


def confident_gnmax(votes: Tensor, *, threshold: float, sigma1: float, sigma2: float,
                    generator: torch.Generator | None = None) -> Tensor:
    """(B, C) vote counts -> (B,) int64 labels, ABSTAIN where the noisy maximum vote is below ``threshold``."""
    v = votes.detach().cpu().to(torch.float64)
    noisy_max = v.max(1).values + torch.randn(len(v), generator=generator, dtype=torch.float64) * sigma1
    answer = (v + torch.randn(v.shape, generator=generator, dtype=torch.float64) * sigma2).argmax(1)
    return torch.where(noisy_max >= threshold, answer, torch.full_like(answer, ABSTAIN))


# Data-dependent RDP (Papernot et al. 2018): reported, never used to allow a release -------------------------


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x <= 0, stable."""
    if x < -1:
        return math.log1p(-math.exp(x))
    if x < 0:
        return math.log(-math.expm1(x))
    return -math.inf


def _logq_gnmax(votes: np.ndarray, sigma: float) -> float:
    """Proposition 7: an upper bound on ln Pr[GNMax's answer != argmax] (union bound over the other classes)."""
    from scipy.stats import norm

    top = int(np.argmax(votes))
    gaps = np.delete(votes[top] - votes, top)
    logq = float(np.logaddexp.reduce(norm.logsf(gaps, scale=math.sqrt(2) * sigma)))
    return min(logq, math.log(1 - 1 / len(votes)))


def _rdp_gaussian_dependent(logq: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Theorem 6: the RDP of GNMax (noise sigma, L2 sensitivity sqrt 2) given ln q, never above lambda / sigma^2."""
    bound = orders / sigma ** 2
    if math.isinf(logq) and logq < 0:
        return np.zeros_like(orders)
    mu2 = math.sqrt(sigma ** 2 * -logq)
    mu1 = mu2 + 1
    mask = (mu1 > orders) & (mu2 > 1)
    rdp1, rdp2 = mu1 / sigma ** 2, mu2 / sigma ** 2
    log_a2 = (mu2 - 1) * rdp2
    if mask.any() and logq <= log_a2 - mu2 * (math.log(1 + 1 / (mu1 - 1)) + math.log(1 + 1 / (mu2 - 1))) \
            and -logq > rdp2:
        log1q = _log1mexp(logq)
        log_a = (orders - 1) * (log1q - _log1mexp((logq + rdp2) * (1 - 1 / mu2)))
        log_b = (orders - 1) * (rdp1 - logq / (mu1 - 1))
        log_s = np.logaddexp(log1q + log_a, logq + log_b)
        bound = np.where(mask, np.minimum(bound, log_s / (orders - 1)), bound)
    return bound


def data_dependent_rdp(votes: Tensor, answered: Tensor, *, threshold: float, sigma1: float,
                       sigma2: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """The data-dependent RDP curve of one batch of Confident-GNMax answers (summed over its rows)."""
    from scipy.stats import norm

    total = np.zeros_like(orders)
    for row, ans in zip(votes.detach().cpu().to(torch.float64).numpy(), answered.tolist()):
        # The threshold check releases one bit; its data-dependent analysis uses Pr[answered] (a Gaussian with
        # noise sqrt 2 sigma1 in GNMax's terms, as its sensitivity is 1 where GNMax's is sqrt 2).
        log_pr = float(norm.logsf(threshold - round(float(row.max())), scale=sigma1))
        logq = min(log_pr, _log1mexp(log_pr))
        total += _rdp_gaussian_dependent(logq, math.sqrt(2) * sigma1, orders)
        if ans:
            total += _rdp_gaussian_dependent(_logq_gnmax(row, sigma2), sigma2, orders)
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """The epsilon at ``delta`` of an RDP curve, with the conversion Opacus's RDP accountant uses (so it compares
    with the ledger's data-independent figure)."""
    import warnings

    load_heavy("opacus")
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        curve = [float(v) for v in np.asarray(rdp, dtype=np.float64)]
        return float(get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)[0])


def pate_record(teachers: int, sizes: list[int]) -> dict[str, Any]:
    """What a PATE checkpoint records of its training (the release parameters are the client's policy's)."""
    return {"mechanism": MECHANISM, "teachers": int(teachers), "shard_sizes": [int(s) for s in sizes],
            "unit": "record"}
