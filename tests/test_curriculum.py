import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.coordinator.curriculum import Curriculum, adversarial_weight, self_paced_weights

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


def _curriculum(regulariser="hard", **kw):
    return Curriculum(epochs=4, steps_per_epoch=25, adv_start=0, adv_step=0, regulariser=regulariser, **kw)


def test_quantile_threshold_admits_the_configured_share_on_a_known_distribution():
    cur = _curriculum(admit_start=0.5, admit_end=1.0, window=1000)
    assert cur.lam(0) == math.inf  # nothing seen yet: everything is admitted
    losses = torch.linspace(0.0, 0.999, 1000)  # uniform on [0, 1): the q-quantile is q
    cur.observe(losses)
    # the admitted share rises linearly from 1/2 to all over the 100 student steps
    assert cur.admitted_share(0) == 0.5 and cur.admitted_share(99) == 1.0
    for step, share in ((0, 0.5), (33, 0.5 + 0.5 * 33 / 99), (99, 1.0)):
        assert cur.lam(step) == pytest.approx(float(torch.quantile(losses, share)), abs=1e-6)
        probe = _curriculum(admit_start=0.5, admit_end=1.0, window=1000)
        probe.observe(losses)
        admitted = float((probe.weights(losses, step) >= 0.5).float().mean())
        assert admitted == pytest.approx(share, abs=0.01)


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-4, 1e4), st.sampled_from(["log", "soft", "hard"]))
def test_quantile_threshold_is_scale_free(scale, regulariser):
    losses = torch.rand(512, generator=torch.Generator().manual_seed(3)).double()
    weights = []
    for s in (1.0, scale):
        cur = _curriculum(regulariser, window=512)
        cur.observe(losses * s)
        weights.append(cur.weights(losses * s, 10))
    torch.testing.assert_close(weights[0].float(), weights[1].float(), atol=1e-4, rtol=0)


def test_log_weights_at_the_quantile_threshold():
    cur = _curriculum("log", window=100)
    cur.observe(torch.linspace(0, 1, 101)[:100])
    lam = cur.lam(0)
    v = cur.weights(torch.tensor([0.0, lam, 2 * lam]), 0)
    assert v[0] == pytest.approx(1.0)
    assert v[1] == pytest.approx((1 + math.exp(-2)) / 2, abs=1e-6)  # the paper's log weight at lam0 = 2
    assert v[2] == pytest.approx((1 + math.exp(-2)) / (1 + math.exp(2)), abs=1e-6)


def test_none_admits_everything_and_window_is_a_ring():
    cur = _curriculum("none", window=4)
    assert cur.weights(torch.tensor([5.0, 1.0]), 0).tolist() == [1.0, 1.0]
    cur.observe(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert sorted(cur.window.tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_absolute_overrides_and_state_round_trip():
    cur = _curriculum("log", lambda_start=2.0, lambda_growth=1e-2)
    assert cur.absolute and cur.lam(0) == 2.0 and cur.lam(100) == pytest.approx(3.0)
    # the paper's formula, unscaled
    torch.testing.assert_close(cur.weights(torch.tensor([1.0]), 0), self_paced_weights(torch.tensor([1.0]), 2.0))
    other = _curriculum("log", window=16)
    other.observe(torch.tensor([1.0, 2.0, 7.0]))
    again = _curriculum("log", window=16)
    again.load_state_dict(other.state_dict())
    assert again.lam(30) == other.lam(30)
    with pytest.raises(ValueError, match="window"):
        _curriculum("log", window=8).load_state_dict(other.state_dict())


def test_the_student_learning_rate_warms_up_then_follows_the_cosine():
    from torch import nn

    from fedkd.coordinator.settings import StudentSettings
    from fedkd.coordinator.student import StudentTrainer
    from fedkd.data import DatasetSpec
    spec = DatasetSpec(name="t", num_classes=2, channels=1, image_size=4, mean=(0.0,), std=(1.0,))

    def rates(warmup: float) -> list[float]:
        settings = StudentSettings(lr=0.1, momentum=0.9, weight_decay=0.0, loss="kl", temperature=1.0, warmup=warmup)
        trainer = StudentTrainer(nn.Linear(16, 2), spec, settings, torch.device("cpu"), total_steps=100)
        out = []
        for _ in range(100):
            out.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.optimizer.step()
            trainer.schedule.step()
        return out

    plain, warm = rates(0.0), rates(0.1)
    assert plain[0] == pytest.approx(0.1) and plain[50] == pytest.approx(0.05)
    assert warm[0] == pytest.approx(0.01)  # (t + 1) / 10 of the rate, times the cosine factor
    assert warm[4] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert warm[9] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert warm[60:] == pytest.approx(plain[60:])  # then the same cosine


def test_the_student_s_step_is_bounded_by_student_clip():
    from torch import nn

    from fedkd.coordinator.settings import StudentSettings
    from fedkd.coordinator.student import StudentTrainer
    from fedkd.data import DatasetSpec
    spec = DatasetSpec(name="t", num_classes=2, channels=1, image_size=4, mean=(0.0,), std=(1.0,))
    images = torch.rand(8, 1, 4, 4)
    answers = torch.tensor([[60.0, -60.0]]).repeat(8, 1)  # near one-hot answers of a large scale

    def moved(clip: float) -> float:
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        with torch.no_grad():
            student[1].weight.mul_(50)  # a student that starts confidently wrong on some inputs: large gradients
        before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
        settings = StudentSettings(lr=0.1, momentum=0.0, weight_decay=0.0, loss="kl", temperature=4.0, clip=clip)
        StudentTrainer(student, spec, settings, torch.device("cpu"), total_steps=10).step(images, answers)
        return float((torch.cat([p.detach().flatten() for p in student.parameters()]) - before).norm())

    assert moved(0.0) > 0.5  # unclipped: the step is lr x a gradient of norm > 5
    assert moved(1.0) == pytest.approx(0.1, rel=1e-3)  # clipped: lr x 1 exactly
