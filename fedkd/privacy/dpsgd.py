"""DP-SGD teachers (Opacus), and the Gaussian noise multiplier of one release at sample rate 1.

Threat model (privacy-notes.md): the coordinator picks the query inputs and
sees every answer, input gradients included. The unit is one record of one
client's data. A DP-SGD teacher is (epsilon, delta)-DP with respect to its
client's records, so every later answer (logits, gradients) is
post-processing and costs nothing more. Anything else a client computes on
its private data and sends out (label counts, evaluation counts) is a new
release: the client's release policy (``fedkd.privacy.policy``) makes it with
the Gaussian mechanism and accounts it in the client's ledger.

Without DP (``privacy-mode=none``) the query protocol is a membership and
inversion oracle for the coordinator; the README says so.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.data import DatasetSpec, ImageData
from fedkd.training import check_finite

logger = logging.getLogger(__name__)

MECHANISM = "dp-sgd"


def default_delta(num_records: int) -> float:
    """delta well below 1/n (privacy-notes.md): 1 / (10 n), and at most 1e-5."""
    return min(1e-5, 1.0 / (10 * max(1, num_records)))


def make_private_model(model: nn.Module) -> nn.Module:
    """Replace what DP-SGD cannot train (BatchNorm -> GroupNorm) and check that nothing leaks.

    Opacus's validator only inspects modules with trainable parameters, so a
    frozen or non-affine BatchNorm would slip through and leak its running
    statistics: refuse any BatchNorm and any buffer that remains.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    norms = [n for n, m in fixed.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    buffers = [n for n, _ in fixed.named_buffers()]
    if norms or buffers:
        raise ValueError(f"model still has BatchNorm layers {norms} or buffers {buffers} after Opacus's fix; "
                         "DP-SGD would leak their statistics")
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]}")
    return fixed


@dataclass(frozen=True)
class DPSettings:
    epsilon: float
    delta: float  # 0 = default_delta(n)
    max_grad_norm: float


def train_dp_sgd(model: nn.Module, data: ImageData, spec: DatasetSpec, settings: DPSettings, *, epochs: int,
                 lr: float, batch_size: int, seed: int, label_smoothing: float = 0.0,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (already through :func:`make_private_model`) with DP-SGD to (epsilon, delta).

    Poisson sampling at rate batch_size / n, per-sample clipping at
    ``max_grad_norm``, the noise calibrated by Opacus for ``epochs`` epochs
    with the PRV accountant. Returns the plain module in eval mode (no
    per-sample hooks, so input-gradient queries are cheap) and the privacy
    record: mechanism, target and spent epsilon, delta, noise multiplier,
    sample rate, steps.
    """
    from opacus import PrivacyEngine

    n = len(data)
    if n < 2:
        raise ValueError(f"DP-SGD needs at least 2 records, this client has {n}")
    delta = settings.delta or default_delta(n)
    torch.manual_seed(seed)
    model.to(device).train()
    inputs = spec.normalize(data.images)
    dataset = torch.utils.data.TensorDataset(inputs, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, n),
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode (needs torchcsprng, no torch 2.x wheels)
        engine = PrivacyEngine(accountant="prv")
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=settings.epsilon,
            target_delta=delta, epochs=max(1, epochs), max_grad_norm=settings.max_grad_norm, poisson_sampling=True)
    steps = 0
    with warnings.catch_warnings():
        # The inputs need no gradient; PyTorch warns that the per-sample hooks fire on module outputs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch
                    continue
                loss = F.cross_entropy(private(x.to(device)), y.to(device), label_smoothing=label_smoothing)
                check_finite(loss, "teacher-lr", lr, "DP-SGD training")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
    spent = engine.get_epsilon(delta) if steps else 0.0
    record = {"mechanism": MECHANISM, "epsilon_budget": float(settings.epsilon), "epsilon_spent": float(spent),
              "delta": float(delta), "unit": "record", "noise_multiplier": float(optimizer.noise_multiplier),
              "max_grad_norm": float(settings.max_grad_norm), "sample_rate": float(loader.sample_rate),
              "steps": steps, "accountant": "prv"}
    logger.info("DP-SGD: epsilon %.3f at delta %.2g after %d steps (noise multiplier %.3f)",
                spent, delta, steps, record["noise_multiplier"])
    return private.to_standard_module().eval(), record


# One release outside DP-SGD ----------------------------------------------------------------


def release_noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier for one release at sample rate 1 costing ``epsilon`` at ``delta``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                          accountant="rdp"))


def contract_status(record: dict[str, Any] | None) -> dict[str, float | str] | None:
    """The part of a privacy record that travels in the contract's PrivacyStatus."""
    if not record:
        return None
    return {k: record[k] for k in ("mechanism", "epsilon_budget", "epsilon_spent", "delta", "unit") if k in record}
