"""The synthetic pool: every synthesised batch, kept with the ensemble's answers, for the student.

As in DENSE (``data_pool``), Co-Boosting (``ImagePool``) and Fast-Datafree
(``DataPool``), the student trains over all the samples synthesised so far
instead of seeing each one once; unlike them, the teachers are remote, so the
pool also keeps what the ensemble answered, and a student step costs no query.

Images are stored before normalisation as uint8 (they are quantised to
multiples of 1/255 *before* the teachers see them, so the stored image is
exactly the one the answers are for); answers are the ensemble's logits,
float32. The pool is bounded (``pool-size`` samples): when full, the oldest
samples make room (first in, first out). ``state_dict`` holds everything,
so a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def quantise(images: Tensor) -> Tensor:
    """Round [0, 1] images to multiples of 1/255, with a straight-through gradient (identity)."""
    rounded = torch.round(images.clamp(0, 1) * 255) / 255
    return images + (rounded - images).detach()


def pool_bytes(capacity: int, input_shape: tuple[int, int, int], num_classes: int) -> int:
    """Memory a pool of ``capacity`` samples takes: uint8 images, float32 answers, int64 labels."""
    c, h, w = input_shape
    return capacity * (c * h * w + 4 * num_classes + 8)


class SyntheticPool:
    """A bounded first-in-first-out store of (image, ensemble answer, generation target) triples."""

    def __init__(self, capacity: int, input_shape: tuple[int, int, int], num_classes: int) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.images = torch.zeros((capacity, *input_shape), dtype=torch.uint8)  # (N, C, H, W)
        self.answers = torch.zeros((capacity, num_classes), dtype=torch.float32)  # (N, C) ensemble logits
        self.targets = torch.full((capacity,), -1, dtype=torch.long)  # the class each sample was made for, or -1
        self.size = 0
        self.position = 0  # where the next sample goes
        self.added = 0  # samples ever added (the pool keeps the last ``capacity``)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.answers.nbytes + self.targets.nbytes

    def add(self, images: Tensor, answers: Tensor, targets: Tensor | None = None) -> None:
        """Store a batch: images in [0, 1] (B, C, H, W), already quantised; answers (B, C)."""
        if tuple(images.shape[1:]) != self.input_shape or answers.shape != (len(images), self.num_classes):
            raise ValueError(f"pool takes images (B, {', '.join(map(str, self.input_shape))}) and answers "
                             f"(B, {self.num_classes}), got {tuple(images.shape)} and {tuple(answers.shape)}")
        pixels = torch.round(images.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
        answers = answers.detach().float().cpu()
        labels = targets.detach().cpu().long() if targets is not None else torch.full((len(images),), -1)
        for start in range(0, len(images), self.capacity):  # a batch larger than the pool keeps its tail
            chunk = slice(start, start + self.capacity)
            n = len(pixels[chunk])
            idx = (self.position + torch.arange(n)) % self.capacity
            self.images[idx] = pixels[chunk]
            self.answers[idx] = answers[chunk]
            self.targets[idx] = labels[chunk]
            self.position = int((self.position + n) % self.capacity)
            self.size = min(self.size + n, self.capacity)
        self.added += len(images)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A random batch (with replacement across calls, without within one): images in [0, 1], answers."""
        if self.size == 0:
            raise RuntimeError("the synthetic pool is empty")
        n = min(batch_size, self.size)
        idx = torch.randperm(self.size, generator=generator)[:n]
        return self.images[idx].float() / 255, self.answers[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images[:self.size].clone(), "answers": self.answers[:self.size].clone(),
                "targets": self.targets[:self.size].clone(), "position": self.position, "added": self.added,
                "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the saved pool holds up to {state['capacity']} samples, this run's {self.capacity}")
        n = len(state["images"])
        self.images[:n] = state["images"]
        self.answers[:n] = state["answers"]
        self.targets[:n] = state["targets"]
        self.size, self.position, self.added = n, int(state["position"]), int(state["added"])
