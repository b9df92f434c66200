"""CuDFKD: dynamic data-free knowledge distillation by an easy-to-hard strategy.

Li et al., "Dynamic Data-Free Knowledge Distillation by Easy-to-Hard Learning
Strategy", Information Sciences 2023 (arXiv 2208.13648); docs/methods.md.

An epoch is ``steps-per-epoch`` rounds; a round is one synthesis round (the
shared synthesizer, ``synthesis-steps`` generator updates) whose batch goes to
the synthetic pool with the ensemble's answers, then ``student-steps`` student
steps on batches drawn from the whole pool. Once ``query-budget`` is spent
the rounds only train the student. Generator loss, on x = shift(G(z)) (or
G(z, y) with class-balanced targets y when the generator is class-conditional):

    L_G = -w_ent * H(mean_i p_T(x_i))              # class balance (the paper's first term)
          + w_oh * CE(T(x), argmax T(x))            # confident samples (the paper's; targets=balanced:
                                                    #   CE(T(x), y), the asked class)
          + w_bn * L_bn(x)                          # teacher BN statistics, computed by each client
          + a_adv(e) * L_adv,  L_adv = -tau_a^2 mean_i m_i KL(p_T^tau_a(x_i) || p_S^tau_a(x_i))

with the easy-to-hard ramp a_adv(e) (0 for the first quarter of training: the
warm-up) and the mask m_i = [argmax S(x_i) = argmax T(x_i)] as CuDFKD's own
code, CMI, Fast-Datafree and NAYER apply it (``adv-mask``). Student step on a
pool batch with the self-paced curriculum (per sample, scale-free threshold,
see ``fedkd.coordinator.curriculum``):

    l_i = tau^2 KL(p_T^tau(x_i) || p_S^tau(x_i));  v_i = v(l_i; lam_t);  L_S = mean_i v_i l_i
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import FEATURE_STATISTICS, CurriculumState
from fedkd.coordinator.curriculum import REGULARISERS, Curriculum
from fedkd.coordinator.losses import class_balance_entropy, kl_per_sample, onehot_loss
from fedkd.coordinator.methods.base import (
    MethodContext,
    QueryBudget,
    require_input_gradients,
    student_settings,
    synthesis_settings,
)
from fedkd.coordinator.student import StudentTrainer
from fedkd.coordinator.synthesis import SynthesisLoss, Synthesizer
from fedkd.coordinator.synthetic_pool import SyntheticPool
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, choice, validate_fields

NUM_SAMPLE_IMAGES = 10


@dataclass(frozen=True)
class CuDFKDOptions:
    """CuDFKD's own keys (``cudfkd.KEY``). Defaults tuned on the main job (docs/results.md)."""

    weight_entropy: float = field(default=20.0, metadata=bounded(0.0, 1e6))
    weight_onehot: float = field(default=1.0, metadata=bounded(0.0, 1e6))
    weight_bn: float = field(default=30.0, metadata=bounded(0.0, 1e6))
    targets: str = field(default="argmax", metadata=choice("argmax", "balanced"))
    adv_start: float = field(default=0.0, metadata=bounded(0.0, 1e6))
    adv_step: float = field(default=0.5, metadata=bounded(0.0, 1e6))
    adv_temperature: float = field(default=3.0, metadata=bounded(0.0, 100.0, open_low=True))
    adv_mask: str = field(default="agree", metadata=choice("agree", "disagree", "none"))
    self_paced: str = field(default="log", metadata=choice(*REGULARISERS))
    admit_start: float = field(default=0.5, metadata=bounded(0.0, 1.0, open_low=True))
    admit_end: float = field(default=1.0, metadata=bounded(0.0, 1.0, open_low=True))
    lambda_start: float | None = field(default=None, metadata=bounded(0.0, 1e6, open_low=True))
    lambda_growth: float | None = field(default=None, metadata=bounded(0.0, 1e6))

    def __post_init__(self) -> None:
        validate_fields(self)


def adversarial_loss_masked(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: str) -> Tensor:
    """L_adv = -tau^2 mean_i m_i KL_i(p_T || p_S): the generator seeks samples the student gets wrong."""
    kl = kl_per_sample(student_logits, teacher_logits, temperature)  # (B,)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(kl.dtype)
    m = {"agree": agree, "disagree": 1.0 - agree, "none": torch.ones_like(kl)}[mask]
    return -(kl * m).mean()


class CuDFKD:
    name = "cudfkd"

    def __init__(self, context: MethodContext) -> None:
        cfg = context.config
        self.config, self.spec, self.device = cfg, context.spec, context.device
        self.options: CuDFKDOptions = cfg.options
        self.ensemble = context.ensemble
        require_input_gradients(self.ensemble, "cudfkd")
        self.student = context.student.to(self.device)
        self.synthesizer = Synthesizer(self.spec, synthesis_settings(cfg), self.device)
        self.trainer = StudentTrainer(self.student, self.spec, student_settings(cfg), self.device)
        self.pool = SyntheticPool(cfg.pool_size, self.spec.input_shape, self.spec.num_classes)
        self.budget = QueryBudget(self.ensemble, cfg.query_budget)
        opts = self.options
        self.curriculum = Curriculum(
            epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch * cfg.student_steps,
            adv_start=opts.adv_start, adv_step=opts.adv_step, regulariser=opts.self_paced,
            admit_start=opts.admit_start, admit_end=opts.admit_end,
            lambda_start=opts.lambda_start, lambda_growth=opts.lambda_growth,
        )
        self.use_bn = opts.weight_bn > 0 and self.ensemble.has_feature_statistics
        # Fixed latents for the sample grid, drawn from their own RNG so they do not shift training.
        self.fixed_latent = torch.randn(NUM_SAMPLE_IMAGES, cfg.latent_dim,
                                        generator=torch.Generator().manual_seed(cfg.seed + 7))

    # Curriculum -------------------------------------------------------------------

    def curriculum_state(self, epoch: int) -> CurriculumState:
        lam = self.curriculum.lam(self.trainer.steps)
        return CurriculumState(epoch=epoch, step=self.trainer.steps, lam=float(min(lam, 1e30)),
                               adv_weight=self.curriculum.adv_weight(epoch))

    # Training ---------------------------------------------------------------------

    def generator_loss(self, state: CurriculumState) -> SynthesisLoss:
        opts = self.options

        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            out = self.ensemble(x, state, bn_loss=self.use_bn)
            t = out.logits  # (B, C)
            zero = torch.zeros((), device=x.device)
            entropy = -opts.weight_entropy * class_balance_entropy(t)
            onehot = opts.weight_onehot * (F.cross_entropy(t, targets) if opts.targets == "balanced"
                                           else onehot_loss(t))
            bn = opts.weight_bn * out.bn_loss if out.bn_loss is not None else zero
            adv = zero
            if state.adv_weight > 0:
                self.student.eval()  # the student is judged, not trained, here: its BN statistics stay put
                adv = state.adv_weight * adversarial_loss_masked(self.student(x), t, opts.adv_temperature,
                                                                 opts.adv_mask)
                self.student.train()
            loss = entropy + onehot + bn + adv
            return loss, t, {"loss_generator": loss, "loss_entropy": entropy, "loss_onehot": onehot,
                             "loss_bn": bn, "loss_adv": adv}

        return loss_fn

    def synthesis_round(self, epoch: int) -> dict[str, float] | None:
        """One round into the pool, or None when the query budget does not allow another."""
        estimate = self.config.synthesis_steps * self.config.batch_size * 2 * len(self.ensemble)
        if not self.budget.allows(estimate):
            return None
        state = self.curriculum_state(epoch)  # the student does not step during a round: one state serves it
        before = self.budget.spent
        batch = self.synthesizer.round(self.generator_loss(state))
        self.budget.charge(before)
        self.pool.add(batch.images, batch.answers, batch.targets)
        for _ in range(self.config.synthesis_forward_batches):
            if not self.budget.fits(self.config.batch_size * len(self.ensemble)):
                break
            extra = self.synthesizer.draw(lambda x: self.ensemble(x, state).logits)
            self.pool.add(extra.images, extra.answers, extra.targets)
        return batch.terms

    def student_step(self) -> dict[str, float]:
        images, answers = self.pool.sample(self.config.batch_size)
        step = self.trainer.steps
        return self.trainer.step(images, answers, lambda losses: self.curriculum.weights(losses, step))

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]:
        metrics = MetricAverager()
        rounds = 0
        for _ in range(self.config.steps_per_epoch):
            terms = self.synthesis_round(epoch)
            if terms is not None:
                metrics.add(terms)
                rounds += 1
            if len(self.pool):
                for _ in range(self.config.student_steps):
                    metrics.add(self.student_step())
            if on_step is not None:
                on_step()
        out = metrics.means()
        out.update({
            "adv_weight": self.curriculum.adv_weight(epoch),
            "lambda": self.curriculum.lam(max(self.trainer.steps - 1, 0)),
            "admitted_target": self.curriculum.admitted_share(max(self.trainer.steps - 1, 0)),
            "synthesis_rounds": rounds,
            "pool_size": len(self.pool),
            "budget_spent": self.budget.spent,
        })
        return out

    def report(self) -> dict[str, Any]:
        """Which clients' feature statistics the BatchNorm-statistics term used (a DP teacher's only when it
        released them: dp-feature-epsilon)."""
        if not self.use_bn:
            why = "cudfkd.weight-bn is 0" if self.options.weight_bn <= 0 else "no client computes it"
            return {"feature_statistics": f"not used ({why})"}
        lacking = self.ensemble.lacking(FEATURE_STATISTICS)
        users = [d.client for d in self.ensemble.descriptions if d.client not in lacking]
        return {"feature_statistics": f"used, from client(s) {', '.join(map(str, users))}"
                + (f"; client(s) {', '.join(map(str, lacking))} compute none" if lacking else "")}

    def synthetic_samples(self) -> Tensor:
        """Images in [0, 1] from fixed latents, one per class, (10, C, H, W): how the generator evolves."""
        return self.synthesizer.samples(self.fixed_latent)

    # Checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "synthesizer": self.synthesizer.state_dict(),
            "trainer": self.trainer.state_dict(),
            "pool": self.pool.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.trainer.load_state_dict(state["trainer"])
        self.pool.load_state_dict(state["pool"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.budget.load_state_dict(state["budget"])
