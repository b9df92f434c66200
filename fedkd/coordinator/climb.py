"""Synthetic samples moved onto a client's data before the refit (``student-refit-climb``, issue 28).

Where each client holds a few classes of the task (the pathological splits), the coordinator weighs every answer
by the teachers' densities (``teacher-density=on``, :func:`fedkd.coordinator.aggregation.density_gate`): per
input, the posterior of who knows it. On real images that routing is right (0.83 of Fashion-MNIST's test images
against 0.20 without it); on the synthetic pool it is not, because the pool sits far below every client's density
(a log-density per value of -1.1 against the test images' -0.15 on Fashion-MNIST's seed 0), where the posterior
goes to whichever density falls off slowest, not to the client that knows the class. The student of that pool
learns trousers from samples no trouser-holder would call its own (recall 0.005).

So before the refit a copy of each pool image climbs one teacher's density, the teachers in turn (every client's
data gets as many images), and of that density the part of one class the teacher holds, its classes in turn
(every class gets as many images: the query's ``density_class``, answered by the component the client fitted to
that class alone), along the input gradient of the log-density that teacher returns through Backward (what the
density gate already has it release: ``CurriculumState.log_density``), and the teachers then answer the climbed
images as they answer blends. Climbing a client's whole density instead (stop 74) takes nearly every image to its
broadest class (the component that falls off slowest, far from the data): on Fashion-MNIST's seed 0 the gated
ensemble called 274 of the 25,600 climbed images trousers, and the student recalled 1-15 % of the trousers; one
class at a time, 2,296 and 96-98 % (docs/robustness.md, "Samples that climb a client's density").

The steps need no knowledge of the density: each image's own Barzilai-Borwein step (|s|^2 / s.y, s its last move
and y the fall of its gradient; on a quadratic, the exact line search along the last gradient), the first a small
move of ``FIRST_MOVE`` per input value. On a class's probabilistic-PCA component two steps take an image onto its
principal directions, where the client's real images of the class lie, and keep most of what the generator put
along them; more steps go on towards the mode (a blurred class mean) and, measured, teach the student no more.

A teacher's gradient moves only the samples that climb its own density, and every teacher then answers them
under the gate, the reliability estimate and the density check as any sample; a step is bounded by the image
range (the climbed sample is clamped to [0, 1] and quantised like a pool image), not by the other teachers'
gradients, since no other teacher is asked about that density.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

FIRST_MOVE = 0.01  # the first step's move, root mean square per input value (normalised inputs)


def climb(x: Tensor, gradient: Callable[[Tensor], Tensor | None], steps: int,
          damping: float = 1.0) -> tuple[Tensor, int]:
    """``x`` (B, ...) moved by ``steps`` Barzilai-Borwein steps up the function whose input gradient ``gradient``
    returns (None: no answer, the climb stops where it is), each after the first ``damping`` x the BB step (1: the
    BB step itself). An image whose gradient is not finite, or zero, stays where it was from then on. Returns the
    moved inputs and the steps taken."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    z = x.detach().clone()
    shape = (-1,) + (1,) * (z.dim() - 1)
    alive = torch.ones(len(z), dtype=torch.bool)
    alpha = torch.zeros(len(z), dtype=z.dtype)
    last_z: Tensor | None = None
    last_g: Tensor | None = None
    taken = 0
    for _ in range(steps):
        g = gradient(z)
        if g is None:
            break
        if tuple(g.shape) != tuple(z.shape):
            raise ValueError(f"a gradient of shape {tuple(g.shape)} for inputs of shape {tuple(z.shape)}")
        g = g.detach().to(z.dtype)
        flat = g.flatten(1)
        norm = flat.norm(dim=1)
        alive &= torch.isfinite(flat).all(1) & (norm > 0)
        g = torch.where(alive.view(shape), g, torch.zeros_like(g))
        if last_z is None or last_g is None:
            alpha = FIRST_MOVE * math.sqrt(flat.shape[1]) / norm.clamp_min(1e-30)
        else:
            moved, fell = (z - last_z).flatten(1), (last_g - g).flatten(1)
            curve = (moved * fell).sum(1)
            # a step only where the function curves down along the last move (a climb, not a fall)
            alpha = torch.where(curve > 0, damping * moved.pow(2).sum(1) / curve.clamp_min(1e-30), alpha)
        alpha = torch.where(torch.isfinite(alpha) & alive, alpha, torch.zeros_like(alpha))
        last_z, last_g = z, g
        z = z + alpha.view(shape) * g
        taken += 1
    return z, taken
