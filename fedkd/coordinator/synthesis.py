"""The shared synthesizer: a generator that turns method losses into pool batches.

One synthesis round (the unit the query budget is spent in):

1. fresh latents z (B, latent_dim) and class-balanced targets y (every class
   B / C times, shuffled), so each batch asks for every class equally;
2. ``steps`` generator updates: x = shift(quantise(G(z, y))), the method's
   loss on normalise(x) (which queries the teachers through the ensemble,
   with a Backward per step), Adam on G (and on z when ``latent-lr`` > 0, as
   DENSE / CMI / Fast-Datafree optimise latents per batch);
3. the iterate with the lowest loss is kept (DENSE / CMI ``best_inputs``):
   its images and the ensemble's answers to exactly those images go to the
   pool, at no extra query.

Diversity within a round: with ``synthesis-diversity`` > 0 the batch is two
halves with the same targets and different latents, and the mode-seeking
term of MSGAN (Mao et al., CVPR 2019; RDSKD's L_ds is the same idea),

    L_div = - mean_i ( mean|x_i - x_i'| / mean|z_i - z_i'| ),

weighted by ``synthesis-diversity``, keeps a class-conditional generator from
answering every latent of a class with one prototype (measured on the main
job: without it, each class collapsed to a single image for the whole run).
It needs no query. Diversity across rounds: fresh latents and targets every round; optionally
the generator is re-initialised every ``generator-reset`` rounds (DENSE and
CMI reset per batch, NAYER every few epochs). Images are quantised to
multiples of 1/255 before the teachers see them (straight-through gradient),
so the pool stores them as uint8 without changing a pixel.

The method supplies the loss as a function of (inputs, targets) that returns
(loss, ensemble logits, named loss terms): the synthesizer does not know
which paper it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedkd.augment import random_shift
from fedkd.coordinator.generator import Generator
from fedkd.coordinator.settings import SynthesisSettings
from fedkd.coordinator.synthetic_pool import quantise
from fedkd.data import DatasetSpec

# (normalised inputs (B, C, H, W), targets (B,)) -> (loss, ensemble logits (B, C), named terms)
SynthesisLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


@dataclass
class SyntheticBatch:
    images: Tensor  # (B, C, H, W) in [0, 1], multiples of 1/255: exactly what the teachers answered
    answers: Tensor  # (B, num_classes) the ensemble's logits for them
    targets: Tensor  # (B,) the class each sample was made for
    terms: dict[str, float]  # the loss terms of the kept iterate


def balanced_targets(batch_size: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """(B,) labels with every class equally often (up to B mod C), in random order."""
    labels = torch.arange(batch_size) % num_classes
    return labels[torch.randperm(batch_size)].to(device)


def mode_seeking(images: Tensor, latents: Tensor) -> Tensor:
    """mean_i mean|x_i - x_i'| / mean|z_i - z_i'| over the pairs (i, i + B/2) of a batch (MSGAN)."""
    half = len(images) // 2
    dx = (images[:half] - images[half:2 * half]).abs().flatten(1).mean(1)  # (B/2,)
    dz = (latents[:half] - latents[half:2 * half]).abs().mean(1)  # (B/2,)
    return (dx / dz.clamp_min(1e-8)).mean()


class Synthesizer:
    def __init__(self, spec: DatasetSpec, settings: SynthesisSettings, batch_size: int, device: torch.device) -> None:
        self.spec, self.settings, self.batch_size, self.device = spec, settings, batch_size, device
        self.num_classes = spec.num_classes
        self.rounds = 0
        self._build()

    def _build(self) -> None:
        s = self.settings
        self.generator = Generator(latent_dim=s.latent_dim, width=s.width, channels=self.spec.channels,
                                   image_size=self.spec.side,
                                   num_classes=self.num_classes if s.conditional else None).to(self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=s.lr, betas=(0.9, 0.99))

    def generate(self, z: Tensor, targets: Tensor) -> Tensor:
        """Quantised images in [0, 1] for latents and targets (gradients pass straight through)."""
        return quantise(self.generator(z, targets if self.settings.conditional else None))

    def latents_and_targets(self, paired: bool) -> tuple[Tensor, Tensor]:
        """Fresh latents (B, latent_dim) and balanced targets (B,); ``paired``: the two halves ask for the
        same classes (the mode-seeking term compares them)."""
        b, c = self.batch_size, self.num_classes
        z = self.generator.sample_latent(b, self.device)
        if not paired:
            return z, balanced_targets(b, c, self.device)
        half = balanced_targets(b // 2, c, self.device)
        return z, torch.cat([half, half, balanced_targets(b % 2, c, self.device)])

    def round(self, loss_fn: SynthesisLoss) -> SyntheticBatch:
        """One synthesis round; returns the best iterate's batch, answered, for the pool."""
        s = self.settings
        if s.reset_every and self.rounds and self.rounds % s.reset_every == 0:
            self._build()
        self.generator.train()
        z, targets = self.latents_and_targets(paired=s.diversity > 0)
        params = list(self.generator.parameters())
        latent_opt = None
        if s.latent_lr > 0:
            z.requires_grad_(True)
            latent_opt = torch.optim.Adam([z], lr=s.latent_lr, betas=(0.5, 0.999))
        best: SyntheticBatch | None = None
        best_loss = float("inf")
        for _ in range(s.steps):
            generated = self.generate(z, targets)  # (B, C, H, W)
            images = random_shift(generated, s.shift)
            loss, answers, terms = loss_fn(self.spec.normalize(images), targets)
            if s.diversity > 0:
                diversity = -s.diversity * mode_seeking(generated, z)
                loss = loss + diversity
                terms = {**terms, "loss_diversity": diversity}
            value = float(loss.detach())
            if best is None or value < best_loss:
                best_loss = value
                best = SyntheticBatch(images.detach(), answers.detach(), targets,
                                      {k: float(v.detach()) for k, v in terms.items()})
            self.optimizer.zero_grad(set_to_none=True)
            if latent_opt is not None:
                latent_opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params + ([z] if latent_opt is not None else []))  # the teachers' Backward calls
            self.optimizer.step()
            if latent_opt is not None:
                latent_opt.step()
        self.rounds += 1
        assert best is not None
        return best

    @torch.no_grad()
    def draw(self, answer: Callable[[Tensor], Tensor]) -> SyntheticBatch:
        """A batch from the generator as it is (no update): answered by one Forward, no Backward.

        Half the query cost of a round's batch: ``synthesis-forward-batches`` adds such batches to
        the pool after each round.
        """
        self.generator.train()  # the same batch statistics the round's batches were made with
        z, targets = self.latents_and_targets(paired=False)
        images = random_shift(self.generate(z, targets), self.settings.shift)
        return SyntheticBatch(images, answer(self.spec.normalize(images)), targets, {})

    @torch.no_grad()
    def samples(self, z: Tensor) -> Tensor:
        """Images for fixed latents, one per class in turn, (N, C, H, W) in [0, 1] (for the sample grid)."""
        self.generator.eval()
        labels = torch.arange(len(z), device=z.device) % self.num_classes
        out = self.generate(z.to(self.device), labels).cpu()
        self.generator.train()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])
