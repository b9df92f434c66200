"""HiDFD: hybrid data-free distillation with a few collected real samples (Tang et al., AAAI 2025, arXiv
2412.13525); docs/methods.md.

Authors' code: tangjialiang97/HiDFD (``generative_distillation/``: a BigGAN trained on the collected
subset, guided by the teacher; ``student_distillation/``: SimKD-style distillation on real + synthetic).
The "collected" data here is a small public pool the coordinator owns (``hidfd.public-pool``: by default
the built-in dataset of the same kind that no client holds; never a client's partition; the summary
names it); the teachers answer for it once, and the answers are cached like any pool batch.

- Teacher-guided generation: a class-conditional generator G(z, y) and a small discriminator D with two
  heads: real/fake, and a regression of the teachers' answers (the feature integration of the paper,
  with the logits the query contract releases standing in for the teacher's features, which never leave
  a client). D learns: BCE(D(x_real), 1) + BCE(D(G(z, y)), 0) + MSE(D_T(x_real), T(x_real)). G learns:

      L_G = w_gan * BCE(D(G(z, y)), 1) + w_ce * CE(T(G(z, y)), y) + L_reg
      L_reg = w_reg * sum_c w_c pbar_c log pbar_c     # category-frequency smoothing

  with n_c the teachers' argmax class counts (decay 0.5 per round), w_c proportional to
  (1 - beta) / (1 - beta^n_c), beta = 0.99, normalised to sum C: classes the teachers rarely see get
  the larger weight.
- Student: each batch is ``hidfd.real-share`` real public samples (the data inflation: the few real
  samples are repeated, shifted by up to ``student-shift`` pixels) and synthetic samples from the pool,
  KL on the teachers' answers.

Left out: the classifier-sharing feature alignment (the student's feature projected through the
teacher's classifier). It needs the teacher's features and classifier on the student's features, which
the query contract cannot carry without sending the student's features to every client; the README
says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.augment import random_shift
from fedkd.contract import QueryContext
from fedkd.coordinator.evaluation import query_ensemble
from fedkd.coordinator.methods.base import GeneratorMethod, MethodContext
from fedkd.coordinator.synthesis import SynthesisLoss
from fedkd.coordinator.synthetic_pool import SyntheticPool
from fedkd.data import load_public_pool
from fedkd.metrics import MetricAverager
from fedkd.models import Side, sides
from fedkd.options import ConfigError, bounded, described, validate_fields


def frequency_weights(counts: Tensor, beta: float = 0.99) -> Tensor:
    """Category-frequency smoothing: w_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum C
    (n_c floored at 1, where an unseen class's weight would be infinite)."""
    w = (1 - beta) / (1 - beta ** counts.clamp_min(1.0))
    return w * len(counts) / w.sum()


class Discriminator(nn.Module):
    """Two strided convolutions, then two heads: a real/fake logit and the teachers' C logits."""

    def __init__(self, channels: int, image_size: Side, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        height, image_width = sides(image_size)
        area = ((height + 1) // 2 + 1) // 2 * (((image_width + 1) // 2 + 1) // 2)  # after two strided convolutions
        self.real = nn.Linear(2 * width * area, 1)
        self.teacher = nn.Linear(2 * width * area, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.real(h).squeeze(1), self.teacher(h)


@dataclass(frozen=True)
class HiDFDOptions:
    """HiDFD's own keys (``hidfd.KEY``)."""

    public_pool: str = field(default="auto", metadata=described(
        "the coordinator's few real public images: auto (a built-in dataset no client holds), a built-in "
        "dataset's name, or a .npz file"))
    public_samples: int = field(default=100, metadata=bounded(
        1, 1_000_000, help="how many public images"))
    real_share: float = field(default=0.5, metadata=bounded(
        0.0, 1.0, help="share of each student batch taken from the public images"))
    weight_gan: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, help="weight of the generator's adversarial (GAN) term"))
    weight_ce: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, help="weight of the cross-entropy on the asked class"))
    weight_reg: float = field(default=0.1, metadata=bounded(
        0.0, 1e6, help="weight of the category-frequency regulariser"))
    weight_regression: float = field(default=0.1, metadata=bounded(
        0.0, 1e6, help="weight of the discriminator's regression of the teachers' logits"))
    beta: float = field(default=0.99, metadata=bounded(
        0.0, 0.9999, open_low=True,
        help="category-frequency smoothing: w_c proportional to (1 - beta) / (1 - beta^n_c)"))
    discriminator_lr: float = field(default=2e-4, metadata=bounded(
        0.0, 10.0, open_low=True, help="discriminator Adam learning rate"))

    def __post_init__(self) -> None:
        validate_fields(self)


class HiDFD(GeneratorMethod[HiDFDOptions]):
    name = "hidfd"

    def __init__(self, context: MethodContext) -> None:
        cfg = context.config
        super().__init__(context, synthesis=replace(cfg.synthesis, conditional=True))
        opts = self.options
        try:
            public = load_public_pool(opts.public_pool, self.spec, opts.public_samples, seed=cfg.seed,
                                      root=cfg.data_root)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"hidfd.public-pool: HiDFD needs a few real images the coordinator owns: {exc}. "
                              "Set hidfd.public-pool to a built-in dataset other than the run's, or to a .npz file "
                              "of the coordinator's images under 'x'") from None
        self.public_source = public.source
        # The teachers answer for the public images once (counted like every query); the answers are cached.
        answers = query_ensemble(self.ensemble, self.spec.normalize(public.images),
                                 batch_size=cfg.teachers.max_query_batch,
                                 state=QueryContext(purpose="distill", method=self.name))
        self.real = SyntheticPool(len(public), self.spec.input_shape, self.spec.num_classes)
        self.real.add(public.images, answers.ensemble)
        self.discriminator = Discriminator(self.spec.channels, self.spec.side, self.spec.num_classes).to(
            self.device)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=opts.discriminator_lr,
                                            betas=(0.5, 0.999))
        self.class_counts = torch.zeros(self.spec.num_classes)

    def discriminator_step(self) -> dict[str, float]:
        opts = self.options
        real, real_answers = self.real.sample(self.config.batch_size)
        real = self.spec.normalize(random_shift(real.to(self.device), self.config.student.shift))
        with torch.no_grad():
            z, y = self.synthesizer.latents_and_targets(paired=False)
            fake = self.spec.normalize(self.synthesizer.generate(z, y))
        real_logit, real_teacher = self.discriminator(real)
        fake_logit, _ = self.discriminator(fake)
        loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
                + opts.weight_regression * F.mse_loss(real_teacher, real_answers.to(self.device)))
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return {"loss_discriminator": float(loss.detach())}

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        opts = self.options

        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            t = self.ensemble(x, state).logits
            fake_logit, _ = self.discriminator(x)
            gan = opts.weight_gan * F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
            ce = opts.weight_ce * F.cross_entropy(t, targets)
            seen = torch.bincount(t.detach().argmax(1).cpu(), minlength=self.spec.num_classes).float()
            self.class_counts = 0.5 * self.class_counts + seen
            w = frequency_weights(self.class_counts, opts.beta).to(t.device)
            pbar = F.softmax(t, dim=1).mean(0)
            reg = opts.weight_reg * (w * pbar * torch.log(pbar.clamp_min(1e-12))).sum()
            loss = gan + ce + reg
            return loss, t, {"loss_generator": loss, "loss_gan": gan, "loss_ce": ce, "loss_reg": reg}

        return loss_fn

    def mixed_batch(self, pool_batch: Callable[[int], tuple[Tensor, Tensor]],
                    draw: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A student batch: ``hidfd.real-share`` of it real public images (drawn with ``draw``), the rest
        ``pool_batch(size)``."""
        b = self.config.batch_size
        n_real = round(self.options.real_share * b)
        parts = [self.real.sample(n_real, generator=draw)] if n_real else []
        if b - n_real and len(self.pool):
            parts.append(pool_batch(b - n_real))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def student_step(self) -> dict[str, float]:
        return self.trainer.step(*self.mixed_batch(self.pool.sample))

    def refit_batch(self, pool_batch: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
                    draw: torch.Generator) -> tuple[Tensor, Tensor]:
        """The refit's batches are made as the student's (a refit on the pool alone lost 10-18 points on digits:
        docs/results.md)."""
        return self.mixed_batch(lambda size: pool_batch(size, draw), draw)

    def refit_extra_samples(self) -> int:
        return len(self.real) if round(self.options.real_share * self.config.batch_size) else 0

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        if self.budget.allows(self.round_cost()):
            metrics.add(self.discriminator_step())
        batch = self.synthesise(self.generator_loss(self.curriculum_state(epoch)), epoch)
        if batch is None:
            return False
        metrics.add(batch.terms)
        self.pool.add(batch.images, batch.answers, batch.targets)
        return True

    def student_round(self, metrics: MetricAverager) -> None:
        """``student-steps`` steps on batches of real public images and pool samples."""
        for _ in range(self.config.student_steps):
            metrics.add(self.student_step())

    def report(self) -> dict[str, Any]:
        return {"public_pool": self.public_source, "public_samples": len(self.real)}

    def extra_state(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                "class_counts": self.class_counts, "real": self.real.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.class_counts = state["class_counts"]
        self.real.load_state_dict(state["real"])
