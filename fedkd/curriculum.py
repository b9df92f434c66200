"""CuDFKD's easy-to-hard curriculum, owned by the server (methods.md section 1).

Two schedules:

- the adversarial weight a_adv(e): ``adv_start`` until epoch floor(0.25 E),
  then rising by ``adv_step`` per epoch until floor(0.75 E), then constant;
- the self-paced threshold lam_t = lam0 + growth * t over student steps t. With
  no overrides, lam0 and growth come from the loss distribution of the first
  epoch (lam0 = its median, reaching its ``end_quantile`` at the last step);
  during that first epoch lam is the running median of the losses seen so far.

and the self-paced sample weights v(l; lam) that turn a per-sample loss into
a curriculum.
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
        lambda_start: float | None = None,
        lambda_growth: float | None = None,
        end_quantile: float = 0.95,
    ) -> None:
        if regulariser not in REGULARISERS:
            raise KeyError(f"unknown self-paced regulariser {regulariser!r}; valid: {', '.join(REGULARISERS)}")
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch  # student steps per epoch
        self.adv_start, self.adv_step = adv_start, adv_step
        self.regulariser = regulariser
        self.end_quantile = end_quantile
        self.lambda_growth_override = lambda_growth
        self.lam0: float | None = lambda_start
        self.growth: float | None = None if lambda_start is None else (lambda_growth or 0.0)
        self._seen: list[Tensor] = []
        self._derived = False  # lam0 came from the first epoch, so lam_t counts from its end

    @property
    def calibrating(self) -> bool:
        """True while lam0 is still being derived from the first epoch's losses."""
        return self.lam0 is None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def adv_weight(self, epoch: int) -> float:
        return adversarial_weight(epoch, self.epochs, self.adv_start, self.adv_step)

    def lam(self, step: int) -> float:
        """lam_t for global student step ``step`` (0-based)."""
        if self.calibrating:
            if not self._seen:
                return math.inf
            return float(torch.cat(self._seen).median())
        assert self.lam0 is not None and self.growth is not None
        offset = self.steps_per_epoch if self._derived else 0
        return self.lam0 + self.growth * max(step - offset, 0)

    def observe(self, losses: Tensor) -> None:
        """Record per-sample losses while calibrating (first epoch only)."""
        if self.calibrating:
            self._seen.append(losses.detach().float().cpu().flatten())

    def end_epoch(self, epoch: int) -> None:
        """After the first epoch, fix lam0 and the growth from the losses seen in it."""
        if not self.calibrating or not self._seen:
            return
        seen = torch.cat(self._seen)
        self.lam0 = float(seen.median())
        if self.lambda_growth_override is not None:
            self.growth = self.lambda_growth_override
        else:
            lam_end = float(torch.quantile(seen[:1_000_000], self.end_quantile))
            remaining = max(self.total_steps - self.steps_per_epoch, 1)
            self.growth = (lam_end - self.lam0) / remaining
        self._derived = True
        self._seen = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam0": self.lam0, "growth": self.growth, "derived": self._derived,
            "seen": torch.cat(self._seen) if self._seen else torch.zeros(0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam0 = state["lam0"]
        self.growth = state["growth"]
        self._derived = bool(state["derived"])
        seen = state["seen"]
        self._seen = [seen] if len(seen) else []
