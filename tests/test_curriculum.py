import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.curriculum import Curriculum, adversarial_weight, self_paced_weights

losses_st = st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=1, max_size=30)
lam_st = st.floats(0.01, 30.0)


@given(losses_st, lam_st)
def test_log_weights_are_in_unit_interval_and_decrease_with_loss(losses, lam):
    loss = torch.tensor(sorted(losses), dtype=torch.float64)
    v = self_paced_weights(loss, lam, "log")
    assert torch.all(v >= 0) and torch.all(v <= 1 + 1e-12)
    assert torch.all(v[1:] <= v[:-1] + 1e-12)


@given(lam_st)
def test_log_weight_is_one_at_zero_loss_and_about_half_at_lambda(lam):
    v = self_paced_weights(torch.tensor([0.0, lam], dtype=torch.float64), lam, "log")
    assert v[0].item() == pytest.approx(1.0)
    # (1 + e^-lam) / 2: 0.5 for large lam.
    assert v[1].item() == pytest.approx((1 + math.exp(-lam)) / 2)


@given(losses_st, lam_st, st.floats(0.0, 10.0))
def test_larger_lambda_admits_more(losses, lam, extra):
    loss = torch.tensor(losses, dtype=torch.float64)
    for kind in ("log", "soft", "hard"):
        assert torch.all(self_paced_weights(loss, lam + extra, kind) >= self_paced_weights(loss, lam, kind) - 1e-12)


def test_hard_soft_none_hand_computed():
    loss = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert self_paced_weights(loss, 2.0, "hard").tolist() == [1.0, 1.0, 0.0, 0.0]
    assert self_paced_weights(loss, 2.0, "soft").tolist() == [1.0, 0.5, 0.0, 0.0]
    assert self_paced_weights(loss, 2.0, "none").tolist() == [1.0] * 4
    with pytest.raises(KeyError, match="valid: log, soft, hard, none"):
        self_paced_weights(loss, 1.0, "linear")


def test_log_weights_do_not_overflow():
    v = self_paced_weights(torch.tensor([0.0, 1e4]), 1e3, "log")
    assert torch.isfinite(v).all() and v[0] == 1.0 and v[1] == 0.0


def test_adversarial_ramp_matches_the_paper_schedule():
    # E = 20: constant until floor(5), ramp of 0.5 per epoch until floor(15), then constant.
    weights = [adversarial_weight(e, 20, 0.0, 0.5) for e in range(20)]
    assert weights[:6] == [0.0] * 6
    assert weights[6] == 0.5 and weights[10] == 2.5
    assert weights[15:] == [5.0] * 5
    assert adversarial_weight(0, 4, 1.0, 2.0) == 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.floats(0.5, 0.99))
def test_derived_lambda_starts_at_median_and_ends_at_quantile(epochs, steps, q):
    cur = Curriculum(epochs=epochs, steps_per_epoch=steps, adv_start=0, adv_step=0, end_quantile=q)
    first_epoch = torch.linspace(0, 1, 101)
    assert cur.calibrating and cur.lam(0) == math.inf
    for chunk in first_epoch.chunk(steps):
        cur.observe(chunk)
    assert cur.lam(steps - 1) == pytest.approx(float(first_epoch.median()))
    cur.end_epoch(0)
    assert not cur.calibrating
    assert cur.lam(steps) == pytest.approx(float(first_epoch.median()))
    assert cur.lam(epochs * steps) == pytest.approx(float(torch.quantile(first_epoch, q)), abs=1e-6)


def test_absolute_overrides_and_state_round_trip():
    cur = Curriculum(epochs=3, steps_per_epoch=10, adv_start=0, adv_step=0, lambda_start=2.0, lambda_growth=1e-2)
    assert not cur.calibrating
    assert cur.lam(0) == 2.0 and cur.lam(100) == pytest.approx(3.0)
    other = Curriculum(epochs=3, steps_per_epoch=10, adv_start=0, adv_step=0)
    other.observe(torch.tensor([1.0, 2.0]))
    state = other.state_dict()
    again = Curriculum(epochs=3, steps_per_epoch=10, adv_start=0, adv_step=0)
    again.load_state_dict(state)
    assert again.lam(3) == other.lam(3)
