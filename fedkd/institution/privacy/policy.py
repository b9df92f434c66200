"""The client's release policy: what its teacher host may release, with what noise, within what budget.

The policy is built from the client's own settings (``fedkd teacher`` flags,
the node config of a SuperNode, or, in a one-machine simulation where the
experimenter is every party, the run config) and never from anything the
coordinator sends. The teacher host applies it to every answer; every other
release (label counts, evaluation counts) goes through it too, and one
:class:`~fedkd.institution.privacy.ledger.PrivacyLedger` records them all.

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
- ``pate``: the client's shard teachers answer labels only, by Confident-GNMax
  on their votes (``fedkd.institution.privacy.pate``): record-level, accounted per row
  (threshold check for every row, GNMax for every answered one), with the
  data-dependent bound reported beside it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedkd.contract import QueryError
from fedkd.institution.privacy.dpsgd import default_delta, release_noise_multiplier
from fedkd.institution.privacy.ledger import BudgetExhausted, Entry, PrivacyLedger
from fedkd.institution.privacy.pate import ABSTAIN, confident_gnmax, data_dependent_rdp, rdp_to_epsilon
from fedkd.institution.privacy.settings import LABEL_COUNT_NOISE, MODES, PrivacySettings, settings_keys

logger = logging.getLogger(__name__)
TRAINING = "dp-sgd training"
FEATURE_STATISTICS = "feature statistics"  # DP-released with a DP-SGD teacher (dp-feature-epsilon)
ROW_NAMES = {"logits": "logits", "input gradients": "input-gradient"}  # what a host releases per query row
MEANINGFUL_EPSILON = 10.0  # above it a teacher-level epsilon is a defence, not a guarantee

__all__ = ["LABEL_COUNT_NOISE", "MODES", "PrivacySettings", "ReleasePolicy", "settings_keys"]


class ReleasePolicy:
    """Applies a client's :class:`PrivacySettings` to everything its teacher host releases."""

    def __init__(self, settings: PrivacySettings, *, num_records: int, training: dict[str, Any] | None = None,
                 ledger_path: str | Path | None = None, generator: torch.Generator | None = None) -> None:
        if len(settings.modes) != 1:  # a run's settings for every client: this client's are for_client(k)
            raise ValueError(f"privacy-mode: {settings.mode!r} names one mode per client; a client applies its own "
                             "one")
        if settings.mode == "dp-sgd" and not (training and training.get("mechanism") == "dp-sgd"):
            raise ValueError("privacy-mode: dp-sgd needs a teacher trained with DP-SGD, and this teacher's checkpoint "
                             "records no DP-SGD training; train it with privacy-mode=dp-sgd, or serve it with "
                             "privacy-mode=output-noise")
        trained = (training or {}).get("mechanism")
        if settings.mode == "pate" and trained != "pate":
            raise ValueError("privacy-mode: pate needs shard teachers trained for PATE, and this checkpoint holds one "
                             "teacher; train it with privacy-mode=pate (pate-teachers shards)")
        if trained == "pate" and settings.mode not in ("none", "pate"):
            raise ValueError(f"privacy-mode: {settings.mode} cannot serve PATE shard teachers; serve them with "
                             "privacy-mode=pate")
        self.settings = settings
        self.training = dict(training) if training else None
        delta = settings.delta or (float(training["delta"]) if training and "delta" in training
                                   else default_delta(num_records))
        self.mode = trained if trained in ("dp-sgd", "pate") and settings.mode == "none" else settings.mode
        self.ledger = PrivacyLedger(delta=delta, budget=settings.budget,
                                    accountant="rdp" if self.mode in ("output-noise", "pate") else "prv",
                                    path=ledger_path)
        self.generator = generator
        if self.ledger.fresh and ledger_path is not None and self.mode != "none":
            logger.warning("privacy ledger %s does not exist: this client starts with nothing spent. If it released "
                           "anything before (a deleted or moved ledger), that spend is not counted", ledger_path)
        if self.training and trained == "dp-sgd":
            training_entry = Entry(TRAINING, float(self.training["noise_multiplier"]),
                                   float(self.training["sample_rate"]), int(self.training["steps"]))
            if not any(e.kind == TRAINING for e in self.ledger.entries):  # spent already: recorded whatever the budget
                self.ledger.charge(training_entry, what="DP-SGD training", enforce=False)
                stats = self.training.get("feature_statistics")
                if stats:  # released with the checkpoint: spent already too
                    self.ledger.charge(Entry(FEATURE_STATISTICS, float(stats["noise_multiplier"]), 1.0, 1,
                                             sensitivity=float(stats["sensitivity"])),
                                       what="the feature statistics", enforce=False)
            if self.ledger.budget and self.ledger.spent > self.ledger.budget:
                raise ValueError(f"privacy-budget: {settings.budget:g} is below what training this teacher already "
                                 f"spent, with this client's other releases (epsilon {self.ledger.spent:.4g} at delta "
                                 f"{delta:.2g}, {self.ledger.accountant} accountant); raise the budget or retrain with "
                                 "a smaller dp-epsilon")

    # What the host releases ---------------------------------------------------------------

    @property
    def releases_terms(self) -> bool:
        """Teacher-side terms are released as computed except under output noise and PATE (not accounted there)."""
        return self.mode not in ("output-noise", "pate")

    def _pate_entries(self, rows: int, answered: int) -> list[Entry]:
        """PATE's data-independent cost: the threshold check on every row (L2 sensitivity 1), GNMax on every
        answered row (L2 sensitivity sqrt 2), each a Gaussian step at sample rate 1."""
        s = self.settings
        return [Entry("pate threshold", s.pate_sigma1, 1.0, rows),
                Entry("pate answers", s.pate_sigma2 / math.sqrt(2.0), 1.0, answered, sensitivity=math.sqrt(2.0))]

    def charge_rows(self, kind: str, rows: int) -> None:
        """Check and record the cost of releasing ``rows`` rows of ``kind`` (``logits``, ``labels`` or ``input
        gradients``) before they are computed; past the budget, :class:`BudgetExhausted`. PATE's cost depends on
        how many rows are answered: its worst case (every row answered) is checked here and the actual cost
        recorded by :meth:`release_labels`."""
        if self.mode == "pate":
            if kind != "labels":
                raise QueryError("FAILED_PRECONDITION", f"privacy-mode=pate releases labels only, not {kind}")
            self.ledger.check(self._pate_entries(rows, rows), what=f"{rows} PATE label(s)")
            return
        if kind == "labels":  # labels are the argmax of the logits as released
            kind = "logits"
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

    def release_labels(self, outputs: Tensor) -> Tensor:
        """(B,) int64 labels as released for a model's ``outputs`` (already checked by :meth:`charge_rows`): under
        PATE the Confident-GNMax answer to the vote counts (ABSTAIN where not confident), its cost recorded;
        otherwise the argmax of the logits as released."""
        if self.mode != "pate":
            return self.release("logits", outputs).argmax(-1).cpu()
        s = self.settings
        labels = confident_gnmax(outputs, threshold=s.pate_threshold, sigma1=s.pate_sigma1, sigma2=s.pate_sigma2,
                                 generator=self.generator)
        answered = labels != ABSTAIN
        report = self.ledger.reports.setdefault("pate", {"answered": 0, "abstained": 0, "data_dependent_rdp": None})
        rdp = data_dependent_rdp(outputs, answered, threshold=s.pate_threshold, sigma1=s.pate_sigma1,
                                 sigma2=s.pate_sigma2)
        report["data_dependent_rdp"] = (rdp if report["data_dependent_rdp"] is None
                                        else rdp + np.asarray(report["data_dependent_rdp"])).tolist()
        report["answered"] += int(answered.sum())
        report["abstained"] += int((~answered).sum())
        # Within the worst case checked before; one accountant run and one save for both entries and the report.
        self.ledger.charge(self._pate_entries(len(labels), int(answered.sum())), what="PATE labels", enforce=False)
        return labels

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
        self.ledger.remember("label counts", list(released))
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
        if self.mode == "pate":
            s = self.settings
            report = self.ledger.reports.get("pate") or {"answered": 0, "abstained": 0, "data_dependent_rdp": None}
            rdp = report["data_dependent_rdp"]
            out["pate"] = {
                "teachers": (self.training or {}).get("teachers"), "threshold": s.pate_threshold,
                "sigma1": s.pate_sigma1, "sigma2": s.pate_sigma2, "answered": report["answered"],
                "abstained": report["abstained"],
                "data_dependent_epsilon": rdp_to_epsilon(np.asarray(rdp), self.ledger.delta) if rdp else 0.0,
                "data_dependent_note": "computed from the private votes and not itself private (the paper releases "
                                       "it through smooth sensitivity, not implemented here); the budget and "
                                       "epsilon_spent use the data-independent bound"}
        return out
