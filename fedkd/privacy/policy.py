"""The client's release policy: what its teacher host may release, with what noise, within what budget.

The policy is built from the client's own settings (``fedkd teacher`` flags,
the node config of a SuperNode, or, in a one-machine simulation where the
experimenter is every party, the run config) and never from anything the
coordinator sends. The teacher host applies it to every answer; every other
release (label counts, evaluation counts) goes through it too, and one
:class:`~fedkd.privacy.ledger.PrivacyLedger` records them all.

Modes (``privacy-mode``):

- ``none``: answers are released as computed. No guarantee: the query
  protocol is a membership and inversion oracle for the coordinator.
- ``dp-sgd``: the teacher was trained with DP-SGD (record-level
  (epsilon, delta)-DP); every answer is post-processing and costs nothing.
  Other releases (noisy label counts, evaluation counts) are accounted with
  the training in one ledger.
- ``output-noise``: each released logits row is clipped to L2 norm
  ``output_clip`` and gets Gaussian noise of std ``output_noise * 2 *
  output_clip``; each input-gradient row likewise with ``gradient_clip``.
  The only provable sensitivity of a row is the clipping ball's diameter
  (any other teacher could answer anywhere in it), so the guarantee is
  teacher-level, accounted at sample rate 1.0 with one Gaussian step per
  released row: epsilon grows with the number of query samples. Above
  epsilon 10 it is reported as a defence, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedkd.privacy.dpsgd import default_delta, release_noise_multiplier
from fedkd.privacy.ledger import BudgetExhausted, Entry, PrivacyLedger

MODES = ("none", "dp-sgd", "output-noise")
LABEL_COUNT_NOISE = ("auto", "none", "gaussian", "laplace")
TRAINING = "dp-sgd training"
ROW_NAMES = {"logits": "logits", "input gradients": "input-gradient"}  # what a host releases per query row
MEANINGFUL_EPSILON = 10.0  # above it a teacher-level epsilon is a defence, not a guarantee


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """A client's privacy settings, validated on construction (each error names the parameter)."""

    mode: str = "none"
    budget: float = 0.0  # total epsilon the client allows (training included); 0 = unlimited, spend reported
    delta: float = 0.0  # of every guarantee; 0 = 1 / (10 n), at most 1e-5
    output_noise: float = 1.0  # output-noise: Gaussian std / L2 sensitivity (2 x clip) per released row
    output_clip: float = 10.0  # output-noise: L2 norm each logits row is clipped to
    gradient_clip: float = 1.0  # output-noise: L2 norm each input-gradient row is clipped to
    share_label_counts: bool = True
    label_count_noise: str = "auto"  # auto: none without a mechanism, gaussian with one
    label_count_epsilon: float = 0.5  # cost of one noisy label histogram
    eval_epsilon: float = 1.0  # cost of one noisy (correct, total) evaluation release

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"privacy-mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.label_count_noise not in LABEL_COUNT_NOISE:
            raise ValueError(f"label-count-noise: {self.label_count_noise!r} is not one of "
                             f"{', '.join(LABEL_COUNT_NOISE)}")
        for name, low, strict in (("budget", 0.0, False), ("delta", 0.0, False), ("output_noise", 0.0, True),
                                  ("output_clip", 0.0, True), ("gradient_clip", 0.0, True),
                                  ("label_count_epsilon", 0.0, True), ("eval_epsilon", 0.0, True)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
                    strict and value == low):
                raise ValueError(f"{_key(name)}: {value!r} must be a finite number {'>' if strict else '>='} {low:g}")
        if self.delta >= 1:
            raise ValueError(f"{_key('delta')}: {self.delta!r} must lie in (0, 1) (0 = 1 / (10 n))")

    @property
    def noisy_label_counts(self) -> str:
        """How label counts are released: none (exact), gaussian or laplace."""
        if self.label_count_noise != "auto":
            return self.label_count_noise
        return "none" if self.mode == "none" else "gaussian"


_KEYS = {"mode": "privacy-mode", "budget": "privacy-budget", "delta": "dp-delta"}


def _key(name: str) -> str:
    """A settings field as the client's configuration names it."""
    return _KEYS.get(name, name.replace("_", "-"))


def settings_keys() -> dict[str, str]:
    """Configuration key -> settings field."""
    return {_key(f.name): f.name for f in fields(PrivacySettings)}


class ReleasePolicy:
    """Applies a client's :class:`PrivacySettings` to everything its teacher host releases."""

    def __init__(self, settings: PrivacySettings, *, num_records: int, training: dict[str, Any] | None = None,
                 ledger_path: str | Path | None = None, generator: torch.Generator | None = None) -> None:
        if settings.mode == "dp-sgd" and not (training and training.get("mechanism") == "dp-sgd"):
            raise ValueError("privacy-mode: dp-sgd needs a teacher trained with DP-SGD, and this teacher's checkpoint "
                             "records no DP-SGD training; train it with privacy-mode=dp-sgd, or serve it with "
                             "privacy-mode=output-noise")
        self.settings = settings
        self.training = dict(training) if training else None
        delta = settings.delta or (float(training["delta"]) if training else default_delta(num_records))
        self.ledger = PrivacyLedger(delta=delta, budget=settings.budget,
                                    accountant="rdp" if settings.mode == "output-noise" else "prv", path=ledger_path)
        self.generator = generator
        self.mode = "dp-sgd" if self.training and settings.mode == "none" else settings.mode
        if self.training:
            trained = Entry(TRAINING, float(self.training["noise_multiplier"]), float(self.training["sample_rate"]),
                            int(self.training["steps"]))
            if not any(e.kind == TRAINING for e in self.ledger.entries):  # spent already: recorded whatever the budget
                self.ledger.charge(trained, what="DP-SGD training", enforce=False)
            if self.ledger.budget and self.ledger.spent > self.ledger.budget:
                raise ValueError(f"privacy-budget: {settings.budget:g} is below what training this teacher already "
                                 f"spent, with this client's other releases (epsilon {self.ledger.spent:.4g} at delta "
                                 f"{delta:.2g}, {self.ledger.accountant} accountant); raise the budget or retrain with "
                                 "a smaller dp-epsilon")

    # What the host releases ---------------------------------------------------------------

    @property
    def releases_terms(self) -> bool:
        """Teacher-side terms are released as computed except under output noise (not accounted there)."""
        return self.mode != "output-noise"

    def charge_rows(self, kind: str, rows: int) -> None:
        """Check and record the cost of releasing ``rows`` rows of ``kind`` (``logits`` or ``input gradients``)
        before they are computed; past the budget, :class:`BudgetExhausted`."""
        if self.mode == "output-noise":
            clip, name = self._clip(kind), ROW_NAMES[kind]
            self.ledger.charge(Entry(kind, self.settings.output_noise, 1.0, rows, sensitivity=2 * clip),
                               what=f"{rows} {name} row(s)")

    def _clip(self, kind: str) -> float:
        return self.settings.output_clip if kind == "logits" else self.settings.gradient_clip

    def noise(self, rows: Tensor, clip: float) -> Tensor:
        """Clip each row to L2 norm ``clip`` and add Gaussian noise of std output_noise x 2 x clip."""
        flat = rows.reshape(len(rows), -1).to(torch.float64)
        norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        clipped = flat * (clip / norms).clamp(max=1.0)
        std = self.settings.output_noise * 2 * clip
        noise = torch.randn(clipped.shape, generator=self.generator, dtype=torch.float64) * std
        return (clipped + noise).to(rows.dtype).reshape(rows.shape)

    def release(self, kind: str, rows: Tensor) -> Tensor:
        """Rows of ``kind`` as released (already charged by :meth:`charge_rows`): noised under output noise."""
        return self.noise(rows, self._clip(kind)) if self.mode == "output-noise" else rows

    # Other releases -------------------------------------------------------------------------

    def label_counts(self, counts: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """The label histogram as released (noisy and accounted under a mechanism), or None when declined or when
        the budget does not allow it."""
        if counts is None or not self.settings.share_label_counts:
            return None
        noise = self.settings.noisy_label_counts
        if noise == "none":
            if self.mode != "none":
                raise ValueError("label-count-noise: none would release exact label counts outside the privacy "
                                 f"guarantee of privacy-mode={self.mode}; use gaussian or laplace, or decline with "
                                 "share-label-counts=false")
            return counts
        if "label counts" in self.ledger.released:  # released before: repeating it is post-processing
            return tuple(int(c) for c in self.ledger.released["label counts"])
        eps, delta = self.settings.label_count_epsilon, self.ledger.delta
        values = torch.tensor(counts, dtype=torch.float64)
        try:
            if noise == "gaussian":  # one record moves one count by 1: L2 sensitivity 1
                z = release_noise_multiplier(eps, delta)
                self.ledger.charge(Entry("label counts", z, 1.0, 1), what="the label histogram")
                values = values + torch.randn(values.shape, generator=self.generator, dtype=torch.float64) * z
            else:  # Laplace, L1 sensitivity 1: scale 1 / epsilon, pure epsilon-DP
                self.ledger.charge(Entry("label counts", 0.0, 1.0, 1, laplace_epsilon=eps), what="the label histogram")
                laplace = torch.distributions.Laplace(0.0, 1.0 / eps)
                values = values + laplace.sample(values.shape).to(torch.float64)
        except BudgetExhausted:
            return None
        released = tuple(int(v) for v in values.round().clamp_min(0))
        self.ledger.released["label counts"] = list(released)
        self.ledger.save()
        return released

    def evaluation_counts(self, correct: int, total: int) -> tuple[float, float]:
        """(correct, total) of an evaluation on private data as released: exact without a mechanism, else the
        Gaussian mechanism (L2 sensitivity sqrt 2) accounted in the ledger; raises BudgetExhausted past the budget."""
        if self.mode == "none":
            return float(correct), float(total)
        z = release_noise_multiplier(self.settings.eval_epsilon, self.ledger.delta)
        self.ledger.charge(Entry("evaluation counts", z, 1.0, 1, sensitivity=math.sqrt(2.0)),
                           what="one evaluation's counts")
        noise = torch.randn(2, generator=self.generator, dtype=torch.float64) * z * math.sqrt(2.0)
        noisy_total = max(1.0, total + float(noise[1]))
        return min(max(0.0, correct + float(noise[0])), noisy_total), noisy_total

    # Reporting -------------------------------------------------------------------------------

    @property
    def unit(self) -> str:
        if self.mode == "none":
            return "none"
        return "teacher" if self.mode == "output-noise" and not self.training else "record"

    def guarantee(self) -> str:
        spent = self.ledger.spent
        if self.mode == "none":
            return "none: the query protocol is a membership and inversion oracle for the coordinator"
        if self.unit == "teacher":
            text = f"teacher-level ({spent:.3g}, {self.ledger.delta:.2g})-DP"
            return text + ("; a defence, not a meaningful guarantee (epsilon above 10)"
                           if spent > MEANINGFUL_EPSILON else "")
        return f"record-level ({spent:.3g}, {self.ledger.delta:.2g})-DP"

    def status(self) -> dict[str, float | str] | None:
        """What travels in the contract's PrivacyStatus (Describe and the end-of-session report)."""
        if self.mode == "none":
            return None
        return {"mechanism": self.mode, "epsilon_budget": self.ledger.budget, "epsilon_spent": self.ledger.spent,
                "delta": self.ledger.delta, "unit": self.unit}

    def record(self) -> dict[str, Any]:
        """Everything that determines the epsilon, for summary.json (recomputable with recompute_epsilon)."""
        out: dict[str, Any] = {"mode": self.mode, "unit": self.unit, "guarantee": self.guarantee(),
                               "settings": asdict(self.settings), **self.ledger.record()}
        if self.training:
            out["training"] = self.training
        return out
