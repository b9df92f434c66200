"""DP-released feature statistics: a DP-SGD teacher's BatchNorm-statistics term, accounted with its training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedkd.checkpoint import save_teacher
from fedkd.config import config_from_mapping
from fedkd.contract import FEATURE_STATISTICS, QueryContext
from fedkd.data import load_dataset
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.institution.privacy import PrivacySettings, ReleasePolicy, recompute_epsilon
from fedkd.institution.privacy.dpsgd import release_feature_statistics, statistics_layers
from fedkd.institution.training import train_teacher


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "data", seed=0)


def _dp_teacher(digits, feature_epsilon: float):
    config = config_from_mapping({"dataset": "digits", "teacher-epochs": 2, "dp-epsilon": 8.0,
                                  "dp-feature-epsilon": feature_epsilon, "num-threads": 2})
    data = digits.train.subset(torch.arange(600))
    return train_teacher("lenet5", data, digits.spec, config, init_seed=0, order_seed=0, dp=True), data


def _exact_statistics(model: nn.Module, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    hooks = [layer.register_forward_hook(lambda m, i, o: out.append((i[0].mean((0, 2, 3)),
                                                                      i[0].var((0, 2, 3), unbiased=False))))
             for layer in statistics_layers(model)]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    return out


def test_released_statistics_match_the_data_up_to_the_noise_and_clipping(digits):
    (model, record), data = _dp_teacher(digits, feature_epsilon=0.0)
    exact = _exact_statistics(model, digits.spec.normalize(data.images))
    # A clip above every record's norm and a large epsilon: the release is the data's statistics almost exactly.
    release = release_feature_statistics(model, data, digits.spec, epsilon=1000.0, delta=1e-5, clip=20.0, seed=0)
    for layer, (mean, var) in zip(statistics_layers(model), exact):
        assert torch.allclose(layer.released_mean.double(), mean.double(), atol=0.05)
        assert torch.allclose(layer.released_var.double(), var.double(), rtol=0.1, atol=0.05)
    assert release["layers"] == 2 and release["clip"] == 20.0
    # At a real epsilon the noise on each mean is about z * sqrt 2 * clip / n.
    noisy = release_feature_statistics(model, data, digits.spec, epsilon=0.5, delta=1e-5, clip=5.0, seed=1)
    scale = noisy["noise_multiplier"] * noisy["sensitivity"] / len(data)
    errors = torch.cat([layer.released_mean.double() - mean.double()
                        for layer, (mean, _) in zip(statistics_layers(model), exact)])
    assert errors.abs().mean() < 5 * scale + 0.1  # noise plus the clipping's bias, bounded


@pytest.mark.slow
def test_a_dp_teacher_with_released_statistics_serves_the_term_and_the_ledger_counts_it(digits, tmp_path):
    (model, record), data = _dp_teacher(digits, feature_epsilon=0.5)
    assert record["feature_statistics"]["epsilon"] == 0.5
    spec = digits.spec
    save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=10, input_shape=spec.input_shape,
                 num_samples=len(data), label_counts=data.label_counts(10), mean=spec.mean, std=spec.std,
                 privacy=record)
    loaded, ckpt = load_teacher(tmp_path / "t.pt")
    for a, b in zip(statistics_layers(loaded), statistics_layers(model)):
        assert torch.equal(a.released_mean, b.released_mean) and torch.equal(a.released_var, b.released_var)
    policy = ReleasePolicy(PrivacySettings(mode="dp-sgd", share_label_counts=False), num_records=len(data),
                           training=ckpt["privacy"])
    host = TeacherHost(loaded, describe_checkpoint(ckpt, loaded, client=0, policy=policy), policy=policy)
    assert FEATURE_STATISTICS in host.describe().available_terms
    x = spec.normalize(data.images[:32])
    reply = host.forward(x, QueryContext(), terms=[FEATURE_STATISTICS])
    expected = sum(torch.norm(m - layer.released_mean) + torch.norm(v - layer.released_var)
                   for layer, (m, v) in zip(statistics_layers(loaded), _exact_statistics(loaded, x)))
    assert reply.terms[FEATURE_STATISTICS].item() == pytest.approx(float(expected), rel=1e-5)
    out = policy.record()
    kinds = [e["kind"] for e in out["entries"]]
    assert kinds == ["dp-sgd training", "feature statistics"]
    assert out["epsilon_spent"] > record["epsilon_spent"]  # the release costs something on top of training
    assert recompute_epsilon(json.loads(json.dumps(out))) == pytest.approx(out["epsilon_spent"], rel=1e-9)


def test_a_dp_teacher_without_released_statistics_does_not_offer_the_term(digits):
    (model, record), data = _dp_teacher(digits, feature_epsilon=0.0)
    assert "feature_statistics" not in record
    policy = ReleasePolicy(PrivacySettings(mode="dp-sgd"), num_records=len(data), training=record)
    ckpt = {"model": "lenet5", "num_classes": 10, "input_shape": list(digits.spec.input_shape),
            "mean": list(digits.spec.mean), "std": list(digits.spec.std), "num_samples": len(data),
            "label_counts": data.label_counts(10), "privacy": record}
    assert FEATURE_STATISTICS not in describe_checkpoint(ckpt, model, client=0, policy=policy).available_terms
