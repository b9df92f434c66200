"""DeepInversion (Yin et al., CVPR 2020); docs/methods.md.

Authors' code: NVlabs/DeepInversion (``deepinversion.py``). No generator: each batch of images is
optimised directly, from noise, against the teachers. Per round, a batch x in [0, 1] with balanced
target classes y gets ``deepinversion.iterations`` Adam steps (lr ``deepinversion.lr``, betas (0.5, 0.9),
cosine-decayed as the code does) on

    L = CE(T(x~), y)                                  # the asked class
        + w_bn * L_bn(x~)                             # the teachers' BatchNorm statistics (each client's own)
        + w_tv * TV_2(x) + w_l2 * ||x||_2             # image priors
        + w_adi * (1 - clamp(JS(p_S^3(x~), p_T^3(x~)), 0, 1))   # ADI's competition term (0 = plain DI)

where x~ is x randomly shifted by up to ``synthesis-shift`` pixels (the code's jitter; no flips, digits
are not symmetric). The iterate with the lowest loss goes to the synthetic pool with the teachers'
answers (the code's ``best_inputs``); the student trains on the pool, ``student-steps`` steps per round.
Costly in queries by design: a Forward and a Backward per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.augment import random_shift
from fedkd.contract import FEATURE_STATISTICS
from fedkd.coordinator.losses import js_divergence_per_sample, total_variation
from fedkd.coordinator.methods.base import NUM_SAMPLE_IMAGES, MethodContext, PoolMethod, require_terms
from fedkd.coordinator.student import judging
from fedkd.coordinator.synthesis import balanced_targets
from fedkd.coordinator.synthetic_pool import quantise
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, validate_fields


@dataclass(frozen=True)
class DeepInversionOptions:
    """DeepInversion's own keys (``deepinversion.KEY``). Iterations are far fewer than the code's 2,000 (a
    2-core CPU and a query budget); the weights are the main job's BN scale and the code's priors."""

    iterations: int = field(default=20, metadata=bounded(
        1, 100_000, help="optimisation steps of each batch from noise"))
    lr: float = field(default=0.1, metadata=bounded(
        0.0, 10.0, open_low=True, help="Adam learning rate of the images"))
    weight_bn: float = field(default=10.0, metadata=bounded(
        0.0, 1e6, help="weight of the BatchNorm-statistics term"))
    weight_tv: float = field(default=1e-3, metadata=bounded(
        0.0, 1e6, help="weight of the total-variation prior"))
    weight_l2: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="weight of the l2 prior"))
    weight_adi: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="weight of ADI's competition term (student against the teachers)"))

    def __post_init__(self) -> None:
        validate_fields(self)


class DeepInversion(PoolMethod[DeepInversionOptions]):
    name = "deepinversion"

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.terms = require_terms(self.ensemble, self.name,
                                   {FEATURE_STATISTICS: ("weight-bn", self.options.weight_bn)})
        self.last_images = torch.zeros(0, *self.spec.input_shape)

    def round_cost(self, steps: int = 1) -> int:
        return super().round_cost(self.options.iterations)

    def invert(self, epoch: int) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """One batch optimised from noise: (images in [0, 1], the teachers' answers to them, targets, terms)."""
        opts = self.options
        b, shift = self.config.batch_size, self.config.synthesis.shift
        state = self.curriculum_state(epoch)
        targets = balanced_targets(b, self.spec.num_classes, self.device)
        pixels = torch.rand(b, *self.spec.input_shape, device=self.device).requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=opts.lr, betas=(0.5, 0.9), eps=1e-8)
        best: tuple[float, Tensor, Tensor, dict[str, float]] | None = None
        for it in range(opts.iterations):
            for group in optimizer.param_groups:  # the code's cosine learning-rate schedule
                group["lr"] = 0.5 * opts.lr * (1 + math.cos(math.pi * it / opts.iterations))
            images = quantise(pixels)
            jittered = random_shift(images, shift)
            out = self.ensemble(self.spec.normalize(jittered), state, terms=self.terms)
            ce = F.cross_entropy(out.logits, targets)
            bn = opts.weight_bn * out.terms[FEATURE_STATISTICS] if self.terms else ce * 0
            prior = opts.weight_tv * total_variation(images) + opts.weight_l2 * images.norm()
            adi = ce * 0
            if opts.weight_adi > 0:
                with judging(self.student) as student:
                    js = js_divergence_per_sample(student(self.spec.normalize(jittered)), out.logits, 3.0)
                adi = opts.weight_adi * (1 - js.mean().clamp(0, 1))
            loss = ce + bn + prior + adi
            value = float(loss.detach())
            if best is None or value < best[0]:
                best = (value, jittered.detach(), out.logits.detach(),
                        {"loss_inversion": value, "loss_ce": float(ce.detach()), "loss_bn": float(bn.detach()),
                         "loss_prior": float(prior.detach()), "loss_adi": float(adi.detach())})
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[pixels])
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0, 1)
        assert best is not None
        return best[1], best[2], targets, best[3]

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        if not self.budget.allows(self.round_cost()):
            return False
        before = self.budget.spent
        images, answers, targets, terms = self.invert(epoch)
        self.budget.charge(before)
        self.pool.add(images, answers, targets)
        self.last_images = images[:NUM_SAMPLE_IMAGES].cpu()
        metrics.add(terms)
        return True

    def synthetic_samples(self) -> Tensor:
        """The first images of the last inverted batch (DeepInversion has no generator)."""
        return self.last_images.clone()

    def extra_state(self) -> dict[str, Any]:
        return {"last_images": self.last_images}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.last_images = state["last_images"]
