"""TA-DFKD: the teacher as a lenient expert (Shin et al., AAAI 2024, arXiv 2402.12406); docs/methods.md.

Authors' code: bigdata-inha/TA-DFKD-Official (``TA-DFKD-main-CIFAR.py``, ``Sample_Selection.py``). The
generator gets no class prior (no one-hot, no entropy term); the teachers only vouch for samples:

- clean-sample selection: c_i = CE(T(x_i), argmax T(x_i)), min-max normalised, a two-component Gaussian
  mixture (scikit-learn's, max_iter 10, tol 1e-2, reg_covar 5e-4) fitted to it; x_i is kept when its
  posterior for the low-loss component exceeds ``tadfkd.selection-score`` (0.5);
- generator step on a batch: L_G = L_adv(kept) + w_bn * L_bn + w_l2 * ||x||_2 + w_tv * TV_2(x), with
  L_adv = 1 - clamp(JS_3(p_S, p_T), 0, 1) over the kept samples: the generator looks for clean samples
  the student still gets wrong;
- the student learns kept samples only, L1 between logits.

In fedkd the kept samples of every batch go to the synthetic pool with the ensemble's answers (the
generator step's batch costs no extra query; ``tadfkd.fresh-batches`` more Forward-only batches per
round are selected the same way), and the student's ``student-steps`` steps per round draw from the
pool, where the code draws fresh batches until one is full of kept samples: the same selection, far
fewer queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import FEATURE_STATISTICS, QueryContext
from fedkd.coordinator.losses import js_divergence_per_sample, total_variation
from fedkd.coordinator.methods.base import (
    GeneratorMethod,
    MethodContext,
    require_terms,
)
from fedkd.coordinator.student import judging
from fedkd.coordinator.synthesis import SynthesisLoss, SyntheticBatch
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, validate_fields


def select_clean(teacher_logits: Tensor, score: float = 0.5, seed: int = 0) -> Tensor:
    """(B,) bool: the samples a two-component Gaussian mixture on the normalised one-hot loss puts in the
    low-loss component with posterior > ``score`` (TA-DFKD's ``Sample_Selection.split``)."""
    from sklearn.mixture import GaussianMixture

    losses = F.cross_entropy(teacher_logits, teacher_logits.argmax(1), reduction="none").detach().cpu().double()
    span = float(losses.max() - losses.min())
    if len(losses) < 2 or span < 1e-12:  # nothing to tell apart: every sample is as clean as the others
        return torch.ones(len(losses), dtype=torch.bool, device=teacher_logits.device)
    normalised = ((losses - losses.min()) / span).numpy().reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(normalised)
    clean = gmm.predict_proba(normalised)[:, int(np.argmin(gmm.means_.ravel()))]
    return torch.as_tensor(clean > score, device=teacher_logits.device)


@dataclass(frozen=True)
class TADFKDOptions:
    """TA-DFKD's own keys (``tadfkd.KEY``); defaults as the authors' CIFAR script."""

    weight_bn: float = field(default=10.0, metadata=bounded(
        0.0, 1e6, help="weight of the BatchNorm-statistics term"))
    weight_l2: float = field(default=6e-3, metadata=bounded(
        0.0, 1e6, help="weight of the l2 image prior"))
    weight_tv: float = field(default=1.5e-5, metadata=bounded(
        0.0, 1e6, help="weight of the total-variation image prior"))
    adv_temperature: float = field(default=3.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="temperature of the JS-divergence adversarial term"))
    selection_score: float = field(default=0.5, metadata=bounded(
        0.0, 1.0, help="posterior of the 'kept' mixture component a sample needs to reach the pool"))
    fresh_batches: int = field(default=1, metadata=bounded(
        0, 100, help="fresh batches drawn per round until one is full of kept samples (at most this many)"))

    def __post_init__(self) -> None:
        validate_fields(self)


class TADFKD(GeneratorMethod[TADFKDOptions]):
    name = "tadfkd"

    def __init__(self, context: MethodContext) -> None:
        cfg = context.config
        super().__init__(context, synthesis=replace(cfg.synthesis, conditional=False),
                         student=replace(cfg.student, loss="l1"))
        self.terms = require_terms(self.ensemble, self.name,
                                   {FEATURE_STATISTICS: ("weight-bn", self.options.weight_bn)})
        self.selections = 0

    def _select(self, logits: Tensor) -> Tensor:
        self.selections += 1
        return select_clean(logits, self.options.selection_score, seed=self.config.seed * 100_003 + self.selections)

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        opts = self.options

        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            out = self.ensemble(x, state, terms=self.terms)
            kept = self._select(out.logits)
            with judging(self.student) as student:
                js = js_divergence_per_sample(student(x[kept]), out.logits[kept], opts.adv_temperature)
            adv = 1 - js.mean().clamp(0, 1) if bool(kept.any()) else out.logits.sum() * 0
            bn = opts.weight_bn * out.terms[FEATURE_STATISTICS] if self.terms else adv * 0
            prior = opts.weight_l2 * x.norm() + opts.weight_tv * total_variation(x)  # normalised, as the code
            loss = adv + bn + prior
            return loss, out.logits, {"loss_generator": loss, "loss_adv": adv, "loss_bn": bn, "loss_prior": prior,
                                      "kept": kept.float().mean()}

        return loss_fn

    def _keep(self, batch: SyntheticBatch) -> float:
        kept = self._select(batch.answers)
        self.pool.add(batch.images[kept], batch.answers[kept], batch.targets[kept])
        return float(kept.float().mean())

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        batch = self.synthesise(self.generator_loss(self.curriculum_state(epoch)), epoch)
        if batch is None:
            return False
        metrics.add(batch.terms)
        metrics.add({"kept_share": self._keep(batch)})
        for _ in range(self.options.fresh_batches):
            fresh = self.fresh_batch(epoch)
            if fresh is None:
                break
            metrics.add({"kept_share": self._keep(fresh)})
        return True

    def extra_state(self) -> dict[str, int]:
        return {"selections": self.selections}

    def load_extra_state(self, state: dict[str, int]) -> None:
        self.selections = int(state["selections"])
