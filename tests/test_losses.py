import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from fedkd.coordinator.evaluation import agreement, loyalty
from fedkd.coordinator.losses import (
    adversarial_loss,
    class_balance_entropy,
    js_distance,
    kl_per_sample,
    l1_per_sample,
    onehot_loss,
)


def test_entropy_of_balanced_and_collapsed_batches():
    # Two very confident samples of different classes -> mean prob (0.5, 0.5, 0) -> H = log 2.
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    assert class_balance_entropy(logits).item() == pytest.approx(math.log(2), abs=1e-5)
    # Uniform logits -> H = log C, the maximum.
    assert class_balance_entropy(torch.zeros(4, 5)).item() == pytest.approx(math.log(5), abs=1e-6)
    # All samples of one class -> H near 0.
    assert class_balance_entropy(torch.tensor([[50.0, 0.0]] * 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_onehot_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = 0.5 * (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (math.e + 1)))
    assert onehot_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_kl_per_sample_hand_computed_with_temperature():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    tau = 2.0
    p = torch.softmax(t / tau, 1)[0]
    expected = tau**2 * float((p * torch.log(p / 0.5)).sum())
    assert kl_per_sample(s, t, tau).item() == pytest.approx(expected, rel=1e-6)
    assert kl_per_sample(t, t, 3.0).abs().max().item() < 1e-6
    assert adversarial_loss(s, t, tau).item() == pytest.approx(-expected, rel=1e-6)


def test_l1_per_sample_is_mean_absolute_logit_difference():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 6.0], [1.0, 1.0, 1.0]])
    assert l1_per_sample(s, t).tolist() == pytest.approx([5.0 / 3, 1.0])


def test_js_distance_matches_scipy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=20)
    q = rng.dirichlet(np.ones(6) * 0.3, size=20)
    q[0] = p[0]
    q[1] = np.eye(6)[2]
    expected = np.array([jensenshannon(a, b) for a, b in zip(p, q)])
    got = js_distance(torch.tensor(p), torch.tensor(q)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_loyalty_and_agreement():
    t = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    assert loyalty(t, t) == pytest.approx(1.0)
    assert agreement(t, t) == 1.0
    flipped = t.flip(1)
    assert agreement(flipped, t) == 0.0
    p = torch.softmax(t.double(), 1).numpy()
    q = torch.softmax(flipped.double(), 1).numpy()
    expected = np.mean([1 - math.sqrt(jensenshannon(a, b)) for a, b in zip(q, p)])
    assert loyalty(flipped, t) == pytest.approx(expected, abs=1e-7)
