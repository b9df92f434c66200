"""The membership-inference audit: it separates members on an overfit model and not on a fresh one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.institution.privacy.audit import (
    attack_metrics,
    dp_tpr_bound,
    lira_offline_scores,
    loss_scores,
    scaled_confidence,
)
from fedkd.metrics import predict


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _overfit(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 300) -> nn.Module:
    """Trained to memorise (no regularisation, full batch, many epochs)."""
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def population() -> dict[str, torch.Tensor]:
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    # Labels drawn at random: the only way to fit them is to memorise each record.
    y_random = torch.randint(0, 10, (len(x),), generator=g)
    idx_in, idx_out, idx_shadow = order[:200], order[200:400], order[400:]
    return {"x_in": x[idx_in], "y_in": y_random[idx_in], "x_out": x[idx_out], "y_out": y_random[idx_out],
            "x_shadow": x[idx_shadow], "y_shadow": y_random[idx_shadow]}


def _both_attacks(model: nn.Module, pop: dict[str, torch.Tensor], shadows: list[nn.Module]) -> dict[str, dict]:
    a_in, a_out = predict(model, pop["x_in"]), predict(model, pop["x_out"])
    loss = attack_metrics(loss_scores(a_in, pop["y_in"]), loss_scores(a_out, pop["y_out"]))
    phi_in = [scaled_confidence(predict(s, pop["x_in"]), pop["y_in"]) for s in shadows]
    phi_out = [scaled_confidence(predict(s, pop["x_out"]), pop["y_out"]) for s in shadows]
    lira = attack_metrics(lira_offline_scores(scaled_confidence(a_in, pop["y_in"]), phi_in),
                          lira_offline_scores(scaled_confidence(a_out, pop["y_out"]), phi_out))
    return {"loss": loss, "lira": lira}


@pytest.fixture(scope="module")
def shadows(population: dict[str, torch.Tensor]) -> list[nn.Module]:
    """OUT models: the same recipe on 200 records that are neither members nor non-members."""
    x, y = population["x_shadow"], population["y_shadow"]
    return [_overfit(x[200 * s:200 * (s + 1)], y[200 * s:200 * (s + 1)], seed=100 + s) for s in range(4)]


def test_audit_separates_members_of_an_overfit_model(population, shadows):
    model = _overfit(population["x_in"], population["y_in"], seed=0)
    train_acc = (predict(model, population["x_in"]).argmax(1) == population["y_in"]).float().mean()
    assert train_acc > 0.95  # it did memorise
    result = _both_attacks(model, population, shadows)
    assert result["loss"]["auc"] > 0.9
    assert result["lira"]["auc"] > 0.9
    assert result["lira"]["tpr_at_0.01"] > 0.3


def test_audit_does_not_separate_on_a_fresh_model(population, shadows):
    result = _both_attacks(_mlp(seed=7).eval(), population, shadows)
    # 200 vs 200 records: the AUC of an attack with no signal has a standard deviation of about 0.03.
    for attack in ("loss", "lira"):
        assert 0.38 < result[attack]["auc"] < 0.62, (attack, result[attack])
        assert result[attack]["tpr_at_0.01"] < 0.1


def test_metrics_of_a_perfect_and_a_useless_score():
    perfect = attack_metrics(np.array([2.0, 3.0, 4.0]), np.array([-1.0, 0.0, 1.0]))
    assert perfect["auc"] == 1.0 and perfect["tpr_at_0.001"] == 1.0
    useless = attack_metrics(np.zeros(50), np.zeros(50))
    assert useless["auc"] == 0.5 and useless["tpr_at_0.01"] == 0.0


def test_scaled_confidence_is_the_log_odds_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = logits.softmax(1)[torch.arange(2), labels].double()
    assert np.allclose(scaled_confidence(logits, labels), torch.log(p / (1 - p)).numpy())
    assert np.allclose(loss_scores(logits, labels), torch.log(p).numpy())


def test_dp_bound_on_the_true_positive_rate():
    assert dp_tpr_bound(0.0, 0.0, 0.01) == pytest.approx(0.01)  # epsilon 0: no better than guessing
    assert dp_tpr_bound(1.0, 1e-5, 0.001) == pytest.approx(math.e * 0.001 + 1e-5)
    assert dp_tpr_bound(8.0, 1e-5, 0.01) == pytest.approx(1 - math.exp(-8) * (1 - 1e-5 - 0.01))  # nearly 1
    # The second inequality binds for large FPR: 1 - e^-eps (1 - delta - fpr).
    assert dp_tpr_bound(1.0, 0.0, 0.5) == pytest.approx(1 - math.exp(-1) * 0.5)
    assert dp_tpr_bound(float("inf"), 0.0, 0.001) == 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same N records"):
        loss_scores(torch.zeros(3, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        scaled_confidence(torch.zeros(2, 10), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="at least 2 shadow models"):
        lira_offline_scores(np.zeros(3), [np.zeros(3)])
    with pytest.raises(ValueError, match="differ"):
        lira_offline_scores(np.zeros(3), [np.zeros(4), np.zeros(4)])
    with pytest.raises(ValueError, match="members and non-members"):
        attack_metrics(np.zeros(0), np.zeros(3))
