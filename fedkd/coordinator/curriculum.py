"""CuDFKD's easy-to-hard curriculum, owned by the server (docs/methods.md, CuDFKD).

Two schedules:

- the adversarial weight a_adv(e): ``adv_start`` until epoch floor(0.25 E),
  then rising by ``adv_step`` per epoch until floor(0.75 E), then constant;
- the self-paced threshold lam_t, scale-free: the q(t)-quantile of the
  student's recent per-sample losses (a window of the last ``window``
  losses), where the admitted share q(t) rises linearly from ``admit_start``
  (0.5: the easier half) to ``admit_end`` (1.0: everything) over training. The
  paper's absolute schedule lam_t = lam0 + growth * t (CIFAR-10: 2.0, 1e-4)
  does not transfer across losses and temperatures: on the main job the
  per-sample KL losses are 0.02-0.2, below any lam the paper uses, so every
  sample was admitted from the first epoch on. ``lambda_start`` (and
  ``lambda_growth``) restore the absolute schedule.

and the self-paced sample weights v(l; lam) that turn a per-sample loss into a
curriculum. With the quantile threshold the ``log`` regulariser is applied to
losses in units of lam, scaled so that lam sits at the paper's lam0 = 2
(v = (1 + e^-2) / (1 + e^(2 l / lam - 2))): the weights then fall from 1 at
l = 0 through 0.57 at l = lam to 0.13 at 2 lam, whatever the loss's units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

REGULARISERS = ("log", "soft", "hard", "none")


def self_paced_weights(losses: Tensor, lam: float, kind: str = "log") -> Tensor:
    """Per-sample weights v_i in [0, 1] (no gradient).

    - log:  v = (1 + e^-lam) / (1 + e^(l - lam))   (1 at l = 0, ~0.5 at l = lam, -> 0 as l grows)
    - soft: v = [l < lam] (1 - l / lam)
    - hard: v = [l < lam]
    - none: v = 1
    """
    losses = losses.detach()
    if kind == "log":
        # (1 + e^-lam) / (1 + e^(l-lam)) == sigmoid(lam - l) / sigmoid(lam), computed stably.
        lam_t = torch.as_tensor(lam, dtype=losses.dtype, device=losses.device)
        return torch.exp(torch.nn.functional.logsigmoid(lam_t - losses) - torch.nn.functional.logsigmoid(lam_t))
    if kind == "soft":
        if lam <= 0:
            return torch.zeros_like(losses)
        return torch.where(losses < lam, 1.0 - losses / lam, torch.zeros_like(losses))
    if kind == "hard":
        return (losses < lam).to(losses.dtype)
    if kind == "none":
        return torch.ones_like(losses)
    raise KeyError(f"unknown self-paced regulariser {kind!r}; valid: {', '.join(REGULARISERS)}")


def adversarial_weight(epoch: int, epochs: int, start: float, step: float) -> float:
    """a_adv(e): constant, then a linear ramp between 25 % and 75 % of training, then constant."""
    begin, end = math.floor(0.25 * epochs), math.floor(0.75 * epochs)
    return start + step * min(max(epoch - begin, 0), end - begin)


# The paper's lam0 (CIFAR-10 scripts): the scale at which the quantile threshold applies the log regulariser.
LOG_SCALE = 2.0


class Curriculum:
    """The server's curriculum state; every teacher query carries its current values."""

    def __init__(
        self,
        *,
        epochs: int,
        steps_per_epoch: int,
        adv_start: float,
        adv_step: float,
        regulariser: str = "log",
        admit_start: float = 0.5,
        admit_end: float = 1.0,
        window: int = 4096,
        lambda_start: float | None = None,
        lambda_growth: float | None = None,
    ) -> None:
        if regulariser not in REGULARISERS:
            raise KeyError(f"unknown self-paced regulariser {regulariser!r}; valid: {', '.join(REGULARISERS)}")
        if not 0.0 < admit_start <= 1.0 or not 0.0 < admit_end <= 1.0:
            raise ValueError(f"admitted shares must be in (0, 1], got {admit_start} and {admit_end}")
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch  # student steps per epoch
        self.adv_start, self.adv_step = adv_start, adv_step
        self.regulariser = regulariser
        self.admit_start, self.admit_end = admit_start, admit_end
        self.lambda_start = lambda_start
        self.lambda_growth = lambda_growth or 0.0
        self.window = torch.zeros(window)  # the last ``window`` per-sample losses (a ring)
        self.seen = 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def absolute(self) -> bool:
        """True when lam follows the paper's absolute schedule (``lambda-start`` given)."""
        return self.lambda_start is not None

    def adv_weight(self, epoch: int) -> float:
        return adversarial_weight(epoch, self.epochs, self.adv_start, self.adv_step)

    def admitted_share(self, step: int) -> float:
        """q(t): the share of recent losses below the threshold at student step ``step``."""
        progress = min(max(step, 0) / max(self.total_steps - 1, 1), 1.0)
        return self.admit_start + (self.admit_end - self.admit_start) * progress

    def lam(self, step: int) -> float:
        """lam_t for global student step ``step`` (0-based); inf before any loss was seen."""
        if self.lambda_start is not None:
            return self.lambda_start + self.lambda_growth * step
        n = min(self.seen, len(self.window))
        if n == 0:
            return math.inf
        return float(torch.quantile(self.window[:n], self.admitted_share(step)))

    def weights(self, losses: Tensor, step: int) -> Tensor:
        """Per-sample weights v_i for a batch of losses at ``step``; the losses then join the window."""
        losses = losses.detach().float()
        lam = self.lam(step)
        if self.regulariser == "none" or math.isinf(lam):
            v = torch.ones_like(losses)
        elif self.regulariser == "log" and not self.absolute:
            v = self_paced_weights(losses * (LOG_SCALE / max(lam, 1e-12)), LOG_SCALE, "log")
        else:
            v = self_paced_weights(losses, lam, self.regulariser)
        self.observe(losses)
        return v

    def observe(self, losses: Tensor) -> None:
        flat = losses.detach().float().cpu().flatten()[-len(self.window):]
        idx = (self.seen + torch.arange(len(flat))) % len(self.window)
        self.window[idx] = flat
        self.seen += len(flat)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["window"]) != len(self.window):
            raise ValueError(f"saved curriculum window holds {len(state['window'])} losses, this run's "
                             f"{len(self.window)}")
        self.window = state["window"].clone()
        self.seen = int(state["seen"])
