"""Evaluation that needs nothing but a model and labels: accuracy, a model's predictions, running means.

Fidelity to the ensemble (agreement, loyalty) is the coordinator's: ``fedkd.coordinator.evaluation``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def mean_and_variance(values: list[float]) -> tuple[float, float]:
    """Mean and (population) variance, in the units given (the paper reports % and %^2)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.var(unbiased=False)) if len(values) > 1 else 0.0


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, *, batch_size: int = 512,
            device: torch.device | str = "cpu") -> Tensor:
    """Logits of a local model over normalised inputs, in batches, in eval mode, without autograd."""
    was_training = model.training
    model.eval()
    out = [model(inputs[i:i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)]
    model.train(was_training)
    return torch.cat(out)


class MetricAverager:
    """Running means of named scalars over an epoch (each key averaged over the records that have it)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, record: dict[str, float]) -> None:
        for key, value in record.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.totals[k] / self.counts[k] for k in self.totals}
