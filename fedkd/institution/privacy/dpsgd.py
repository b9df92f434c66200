"""DP-SGD teachers (Opacus), and the Gaussian noise multiplier of one release at sample rate 1.

Threat model (docs/privacy.md): the coordinator picks the query inputs and
sees every answer, input gradients included. The unit is one record of one
client's data. A DP-SGD teacher is (epsilon, delta)-DP with respect to its
client's records, so every later answer (logits, gradients) is
post-processing and costs nothing more. Anything else a client computes on
its private data and sends out (label counts, evaluation counts) is a new
release: the client's release policy (``fedkd.institution.privacy.policy``) makes it with
the Gaussian mechanism and accounts it in the client's ledger.

Without DP (``privacy-mode=none``) the query protocol is a membership and
inversion oracle for the coordinator; the README says so.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.data import DatasetSpec, ImageData
from fedkd.imports import load_heavy
from fedkd.options import check_finite

logger = logging.getLogger(__name__)

MECHANISM = "dp-sgd"


def default_delta(num_records: int) -> float:
    """delta well below 1/n (docs/privacy.md): 1 / (10 n), and at most 1e-5."""
    return min(1e-5, 1.0 / (10 * max(1, num_records)))


def make_private_model(model: nn.Module) -> nn.Module:
    """Replace what DP-SGD cannot train (BatchNorm -> GroupNorm) and check that nothing leaks.

    Opacus's validator only inspects modules with trainable parameters, so a
    frozen or non-affine BatchNorm would slip through and leak its running
    statistics: refuse any BatchNorm and any buffer that remains.
    """
    load_heavy("opacus")
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
    load_heavy("opacus")
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


# DP-released feature statistics -------------------------------------------------------------

RELEASED_MEAN, RELEASED_VAR = "released_mean", "released_var"  # buffers on a DP teacher's GroupNorm layers


def statistics_layers(model: nn.Module) -> list[nn.GroupNorm]:
    """The layers a DP teacher's feature statistics describe: its GroupNorm layers (BatchNorm's places)."""
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


def attach_statistics(model: nn.Module, values: list[tuple[Tensor, Tensor]] | None = None) -> None:
    """Give each GroupNorm layer ``released_mean`` / ``released_var`` buffers (zeros, or ``values``)."""
    layers = statistics_layers(model)
    for layer, (mean, var) in zip(layers, values or [(torch.zeros(m.num_channels), torch.ones(m.num_channels))
                                                     for m in layers]):
        layer.register_buffer(RELEASED_MEAN, mean.detach().float().clone())
        layer.register_buffer(RELEASED_VAR, var.detach().float().clone())


@torch.no_grad()
def release_feature_statistics(model: nn.Module, data: ImageData, spec: DatasetSpec, *, epsilon: float,
                               delta: float, clip: float, seed: int,
                               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Release the per-channel mean and variance of the inputs of each GroupNorm layer over the client's records
    with the Gaussian mechanism, and attach them to the model (the BatchNorm-statistics term then works).

    Per record i: v_i = (per-channel spatial means of x and of x^2 at every layer), clipped to L2 norm
    ``clip``, plus a constant ``clip`` counting the record; the sum over records gets Gaussian noise of std
    z x sqrt(2) x clip on every coordinate (one record moves the sum by at most sqrt 2 x clip), z calibrated
    so that this one release costs ``epsilon`` at ``delta``. mean = noisy sum of means / noisy count, var =
    noisy sum of squares / noisy count - mean^2 (at least 1e-5). Returns the record of the release (its
    noise multiplier, sensitivity, clipping norm, epsilon), which the ledger composes with the training.
    """
    layers = statistics_layers(model)
    if not layers:
        raise ValueError("dp-feature-epsilon: this teacher has no normalisation layers to describe")
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].to(torch.float64)
        captured.append(torch.cat([x.mean(dim=(2, 3)), (x * x).mean(dim=(2, 3))], dim=1))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    model.eval().to(device)
    total: Tensor | None = None
    try:
        inputs = spec.normalize(data.images)
        for i in range(0, len(inputs), 256):
            captured.clear()
            model(inputs[i:i + 256].to(device))
            v = torch.cat(captured, dim=1).cpu()
            v = v * (clip / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            v = torch.cat([v, torch.full((len(v), 1), float(clip), dtype=v.dtype)], dim=1)
            total = v.sum(0) if total is None else total + v.sum(0)
    finally:
        for h in handles:
            h.remove()
    assert total is not None
    z = release_noise_multiplier(epsilon, delta)
    sensitivity = math.sqrt(2.0) * clip
    g = torch.Generator().manual_seed(seed)
    noisy = total + torch.randn(total.shape, generator=g, dtype=torch.float64) * z * sensitivity
    count = max(float(noisy[-1]) / clip, 1.0)
    values, at = [], 0
    for layer in layers:
        c = layer.num_channels
        mean = noisy[at:at + c] / count
        var = (noisy[at + c:at + 2 * c] / count - mean * mean).clamp_min(1e-5)
        values.append((mean, var))
        at += 2 * c
    attach_statistics(model, values)
    return {"epsilon": float(epsilon), "noise_multiplier": float(z), "sensitivity": float(sensitivity),
            "clip": float(clip), "layers": len(layers)}


# One release outside DP-SGD ----------------------------------------------------------------


def release_noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier for one release at sample rate 1 costing ``epsilon`` at ``delta``."""
    load_heavy("opacus")
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
