"""A client's privacy settings (``fedkd teacher``'s flags, a node's config): what they accept, checked on
construction. Nothing here imports torch, so a command parses and checks them before it loads a model;
what the settings do is :mod:`fedkd.institution.privacy.policy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

MODES = ("none", "dp-sgd", "output-noise", "pate")
LABEL_COUNT_NOISE = ("auto", "none", "gaussian", "laplace")


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
    pate_threshold: float = 7.0  # pate: answer a row only when its noisy top vote reaches this (of pate-teachers)
    pate_sigma1: float = 2.0  # pate: Gaussian noise std on the top vote for the threshold check
    pate_sigma2: float = 1.0  # pate: Gaussian noise std on each vote count for the answer (GNMax)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"privacy-mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.label_count_noise not in LABEL_COUNT_NOISE:
            raise ValueError(f"label-count-noise: {self.label_count_noise!r} is not one of "
                             f"{', '.join(LABEL_COUNT_NOISE)}")
        for name, low, strict in (("budget", 0.0, False), ("delta", 0.0, False), ("output_noise", 0.0, True),
                                  ("output_clip", 0.0, True), ("gradient_clip", 0.0, True),
                                  ("label_count_epsilon", 0.0, True), ("eval_epsilon", 0.0, True),
                                  ("pate_threshold", 0.0, False), ("pate_sigma1", 0.0, True),
                                  ("pate_sigma2", 0.0, True)):
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
