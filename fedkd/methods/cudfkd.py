"""CuDFKD: dynamic data-free knowledge distillation by an easy-to-hard strategy.

Li et al., "Dynamic Data-Free Knowledge Distillation by Easy-to-Hard Learning
Strategy", Information Sciences 2023 (arXiv 2208.13648); methods.md section 1.

One iteration = one generator step, then ``student_steps`` student steps on
fresh samples. The teachers are reached only through the ensemble of remote
teachers, so the same code runs on in-process, gRPC and Flower teachers.

Generator step (Adam, lr 1e-3, betas (0.9, 0.99); G is kept, not re-initialised):

    L_G = -w_ent * H(mean_i p_T(x_i))           # class balance
          + w_oh * CE(T(x), argmax T(x))         # confident samples
          + w_bn * L_bn(x)                       # teacher BN statistics (client-side)
          + a_adv(e) * L_adv,  L_adv = -tau_a^2 mean_i KL(p_T^tau_a || p_S^tau_a)

Student step (SGD, cosine schedule), per-sample self-paced weights:

    l_i = loss(S(x_i), T(x_i));  v_i = v(l_i; lam_t);  L_S = mean_i v_i l_i
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fedkd.curriculum import Curriculum, self_paced_weights
from fedkd.generator import Generator
from fedkd.losses import adversarial_loss, class_balance_entropy, distillation_per_sample, onehot_loss
from fedkd.methods.base import MethodContext
from fedkd.teacher import CurriculumState

NUM_SAMPLE_IMAGES = 10


class CuDFKD:
    name = "cudfkd"

    def __init__(self, context: MethodContext) -> None:
        cfg, spec = context.config, context.spec
        self.config, self.spec, self.device = cfg, spec, context.device
        self.ensemble = context.ensemble
        self.student = context.student.to(self.device)
        self.generator = Generator(latent_dim=cfg.latent_dim, width=cfg.generator_width,
                                   channels=spec.channels, image_size=spec.image_size).to(self.device)
        self.opt_generator = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr, betas=(0.9, 0.99))
        self.opt_student = torch.optim.SGD(self.student.parameters(), lr=cfg.student_lr,
                                           momentum=cfg.student_momentum, weight_decay=cfg.student_weight_decay)
        total_student_steps = cfg.epochs * cfg.steps_per_epoch * cfg.student_steps
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_student, T_max=total_student_steps)
        self.curriculum = Curriculum(
            epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch * cfg.student_steps,
            adv_start=cfg.adv_start, adv_step=cfg.adv_step, regulariser=cfg.self_paced,
            lambda_start=cfg.lambda_start, lambda_growth=cfg.lambda_growth,
            end_quantile=cfg.lambda_end_quantile,
        )
        self.use_bn = cfg.weight_bn > 0 and self.ensemble.has_feature_statistics
        self.step = 0  # global student step
        # Fixed latents for the sample grid, drawn from their own RNG so they do not shift training.
        self.fixed_latent = torch.randn(NUM_SAMPLE_IMAGES, cfg.latent_dim,
                                        generator=torch.Generator().manual_seed(cfg.seed + 7)).to(self.device)

    # Curriculum -------------------------------------------------------------------

    def curriculum_state(self, epoch: int) -> CurriculumState:
        lam = self.curriculum.lam(self.step)
        return CurriculumState(epoch=epoch, step=self.step, lam=float(min(lam, 1e30)),
                               adv_weight=self.curriculum.adv_weight(epoch))

    # Training ---------------------------------------------------------------------

    def _synthesize(self, batch_size: int) -> Tensor:
        z = self.generator.sample_latent(batch_size, self.device)  # (B, latent)
        return self.spec.normalize(self.generator(z))  # (B, C, H, W)

    def generator_step(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        state = self.curriculum_state(epoch)
        self.generator.train()
        self.student.train()
        x = self._synthesize(cfg.batch_size)
        out = self.ensemble(x, state, bn_loss=self.use_bn)
        t = out.logits  # (B, C)
        loss_entropy = -cfg.weight_entropy * class_balance_entropy(t)
        loss_onehot = cfg.weight_onehot * onehot_loss(t)
        loss_bn = cfg.weight_bn * out.bn_loss if out.bn_loss is not None else torch.zeros((), device=self.device)
        loss = loss_entropy + loss_onehot + loss_bn
        loss_adv = torch.zeros((), device=self.device)
        if state.adv_weight > 0:
            loss_adv = state.adv_weight * adversarial_loss(self.student(x), t, cfg.adv_temperature)
            loss = loss + loss_adv
        self.opt_generator.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.generator.parameters()))  # teachers' Backward calls happen here
        self.opt_generator.step()
        parts = {"loss_generator": loss, "loss_entropy": loss_entropy, "loss_onehot": loss_onehot,
                 "loss_bn": loss_bn, "loss_adv": loss_adv}
        return {key: float(value.detach()) for key, value in parts.items()}

    def student_step(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        state = self.curriculum_state(epoch)
        self.generator.eval()
        self.student.train()
        with torch.no_grad():
            x = self._synthesize(cfg.batch_size)
            t = self.ensemble(x, state).logits
        losses = distillation_per_sample(self.student(x), t, cfg.student_loss, cfg.temperature)  # (B,)
        self.curriculum.observe(losses)
        weights = self_paced_weights(losses, state.lam, cfg.self_paced)  # (B,), no grad
        loss = (weights * losses).mean()
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_student.step()
        self.schedule.step()
        self.step += 1
        return {"loss_student": float(losses.detach().mean()), "admitted": float((weights > 0.5).float().mean()),
                "weight_mean": float(weights.mean())}

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]:
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(self.config.steps_per_epoch):
            records = [self.generator_step(epoch)]
            records += [self.student_step(epoch) for _ in range(self.config.student_steps)]
            for record in records:
                for key, value in record.items():
                    totals[key] = totals.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
            if on_step is not None:
                on_step()
        metrics = {k: totals[k] / counts[k] for k in totals}
        metrics["adv_weight"] = self.curriculum.adv_weight(epoch)
        metrics["lambda"] = self.curriculum.lam(max(self.step - 1, 0))
        self.curriculum.end_epoch(epoch)
        return metrics

    @torch.no_grad()
    def synthetic_samples(self) -> Tensor:
        """Images in [0, 1] from fixed latents, (10, C, H, W): how the generator's output evolves."""
        self.generator.eval()
        return self.generator(self.fixed_latent).cpu()

    # Checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "opt_generator": self.opt_generator.state_dict(),
            "opt_student": self.opt_student.state_dict(),
            "schedule": self.schedule.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.opt_generator.load_state_dict(state["opt_generator"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.schedule.load_state_dict(state["schedule"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.step = int(state["step"])
