"""The synthetic pool and the shared synthesizer: stored once, bounded, exact, resumable."""

import pytest
import torch
from torch import nn

from fedkd.augment import random_affine, random_shift
from fedkd.config import config_from_mapping
from fedkd.contract import QueryContext, TeacherDescription
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.flow import check_pool_memory
from fedkd.coordinator.methods import QueryBudget
from fedkd.coordinator.pool import LocalPool
from fedkd.coordinator.settings import SynthesisSettings
from fedkd.coordinator.synthesis import Synthesizer, balanced_targets
from fedkd.coordinator.synthetic_pool import SyntheticPool, pool_bytes, quantise
from fedkd.data import SPECS
from fedkd.institution.host import TeacherHost
from fedkd.options import ConfigError

SPEC = SPECS["digits"]  # 1 x 8 x 8, 10 classes

PLAIN = {"conditional": True, "shift": 0, "diversity": 0.0}  # a conditional generator, unshifted, no diversity term


def _images(n, seed=0):
    return quantise(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))


def test_quantise_is_exact_on_uint8_and_passes_gradients_straight_through():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    q = quantise(x)
    assert torch.equal(torch.round(q * 255), q * 255)
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_pool_stores_exact_images_and_answers_and_is_bounded_first_in_first_out():
    pool = SyntheticPool(10, (1, 8, 8), 10)
    batches = [(_images(4, s), torch.randn(4, 10), torch.arange(4)) for s in range(4)]
    for images, answers, targets in batches[:2]:
        pool.add(images, answers, targets)
    assert len(pool) == 8 and pool.added == 8
    torch.testing.assert_close(pool.images[:4].float() / 255, batches[0][0], rtol=0, atol=0)
    torch.testing.assert_close(pool.answers[4:8], batches[1][1], rtol=0, atol=0)
    for images, answers, targets in batches[2:]:
        pool.add(images, answers, targets)
    # 16 added, 10 kept: the oldest six (batch 0 and half of batch 1) made room
    assert len(pool) == 10 and pool.added == 16 and pool.nbytes == 10 * (64 + 40 + 8)
    kept = {tuple(row.tolist()) for row in pool.answers}
    assert kept == {tuple(r.tolist()) for r in torch.cat([batches[1][1][2:], batches[2][1], batches[3][1]])}
    images, answers = pool.sample(6, torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 8, 8) and answers.shape == (6, 10)
    # every sampled answer is the one stored with its image
    index = {tuple((pool.images[i].float() / 255).flatten().tolist()): pool.answers[i] for i in range(10)}
    for image, answer in zip(images, answers):
        torch.testing.assert_close(index[tuple(image.flatten().tolist())], answer, rtol=0, atol=0)


def test_pool_state_round_trips_bit_exactly_and_checks_capacity():
    pool = SyntheticPool(7, (1, 8, 8), 10)
    for s in range(3):
        pool.add(_images(3, s), torch.randn(3, 10))
    again = SyntheticPool(7, (1, 8, 8), 10)
    again.load_state_dict(pool.state_dict())
    assert (len(again), again.position, again.added) == (len(pool), pool.position, pool.added)
    a = pool.sample(5, torch.Generator().manual_seed(1))
    b = again.sample(5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="up to 7 samples, this run's 8"):
        SyntheticPool(8, (1, 8, 8), 10).load_state_dict(pool.state_dict())
    with pytest.raises(ValueError, match="pool takes images"):
        pool.add(_images(2), torch.randn(3, 10))
    with pytest.raises(RuntimeError, match="empty"):
        SyntheticPool(3, (1, 8, 8), 10).sample(2)


def test_a_pool_larger_than_memory_is_refused_naming_the_size():
    config = config_from_mapping({"pool-size": 1_000_000})
    need = pool_bytes(1_000_000, (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"pool-size: 1,000,000 samples of mnist5k would need 793 MiB, more than"):
        check_pool_memory(config, memory=need)
    check_pool_memory(config, memory=3 * need)


def test_random_shift_moves_whole_pixels_and_keeps_values():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 4] = 200 / 255
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # one pixel, moved by at most 2: never out of frame
    rows, cols = (y[:, 0] > 0).nonzero()[:, 1], (y[:, 0] > 0).nonzero()[:, 2]
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 2 and cols.max() <= 6
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # each image gets its own offset
    assert torch.equal(random_shift(x, 0), x)


def test_random_affine_warps_each_image_its_own_way_within_its_strength():
    x = torch.zeros(32, 1, 16, 16)
    x[:, 0, 7:9, 7:9] = 1.0  # a block at the centre, where rotation and scaling move nothing
    x[:, 0, 2, 2] = 1.0  # and a pixel near a corner, which they do
    y = random_affine(x, 20, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    centre = y[:, 0, 4:12, 4:12]
    rows = (centre.sum(2) * torch.arange(4, 12)).sum(1) / centre.sum((1, 2))
    cols = (centre.sum(1) * torch.arange(4, 12)).sum(1) / centre.sum((1, 2))
    assert float((rows - 7.5).abs().max()) <= 20 / 200 * 16 + 1e-4  # moved by at most strength / 200 of the size
    assert float((cols - 7.5).abs().max()) <= 20 / 200 * 16 + 1e-4
    assert len({tuple(img.flatten().round(decimals=3).tolist()) for img in y}) == 32  # each image its own map
    assert torch.equal(y, random_affine(x, 20, torch.Generator().manual_seed(0)))  # drawn from the generator only
    assert not torch.equal(y, random_affine(x, 20, torch.Generator().manual_seed(1)))
    assert torch.equal(random_affine(x, 0, torch.Generator().manual_seed(0)), x)


def test_balanced_targets_ask_for_every_class_equally():
    t = balanced_targets(128, 10)
    counts = torch.bincount(t, minlength=10)
    assert counts.min() == 12 and counts.max() == 13


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def _ensemble(k=2):
    torch.manual_seed(0)
    hosts = [TeacherHost(_Linear(), TeacherDescription(client=i, model="linear", num_classes=10, input_shape=(1, 8, 8),
                                                       mean=SPEC.mean, std=SPEC.std)) for i in range(k)]
    return Ensemble(LocalPool(hosts), "prob-mean", reliability=False)  # (the counts: no gradient checks)


def test_synthesizer_keeps_the_best_iterate_with_the_answers_to_exactly_its_images():
    ensemble = _ensemble()
    torch.manual_seed(1)
    synth = Synthesizer(SPEC, SynthesisSettings(latent_dim=8, width=4, lr=0.05, steps=4, latent_lr=0.1, **PLAIN),
                        20, torch.device("cpu"))
    seen = []

    def loss_fn(x, targets):
        out = ensemble(x, QueryContext())
        loss = torch.nn.functional.cross_entropy(out.logits, targets)
        seen.append(float(loss.detach()))
        return loss, out.logits, {"loss": loss}

    batch = synth.round(loss_fn)
    assert len(seen) == 4 and batch.terms["loss"] == min(seen)
    assert batch.images.shape == (20, 1, 8, 8) and torch.equal(torch.round(batch.images * 255), batch.images * 255)
    # the stored answers are what the ensemble says about the stored images
    again = ensemble(SPEC.normalize(batch.images), QueryContext()).logits
    torch.testing.assert_close(batch.answers, again)
    assert torch.bincount(batch.targets, minlength=10).tolist() == [2] * 10
    # 4 steps, each a Forward and a Backward of 20 samples to each of the 2 teachers
    assert sum(s.samples for s in ensemble.pool.stats()) == 4 * 2 * 20 * 2 + 20 * 2


def test_generator_reset_rebuilds_the_generator_every_n_rounds():
    ensemble = _ensemble(1)
    synth = Synthesizer(SPEC, SynthesisSettings(latent_dim=8, width=4, lr=0.05, reset_every=2, **PLAIN), 10,
                        torch.device("cpu"))

    def loss_fn(x, targets):
        out = ensemble(x, QueryContext())
        return out.logits.mean(), out.logits, {}

    ids = []
    for _ in range(5):
        synth.round(loss_fn)
        ids.append(id(synth.generator))
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]


def test_query_budget_counts_from_its_opening_and_refuses_a_round_that_would_overrun():
    ensemble = _ensemble(2)
    ensemble(torch.zeros(5, 1, 8, 8), QueryContext())  # before the budget opens: not counted
    budget = QueryBudget(ensemble, limit=100)
    assert budget.spent == 0 and budget.allows(100) and not budget.allows(101)
    before = budget.spent
    ensemble(torch.zeros(20, 1, 8, 8), QueryContext())
    budget.charge(before)
    assert budget.spent == 40 and budget.last_cost == 40
    assert budget.allows(10) and not budget.allows(70)  # the last round's cost is the estimate's floor
    assert QueryBudget(ensemble, limit=0).allows(10**12)


def test_a_drawn_batch_costs_one_forward_and_its_answers_fit_its_images():
    ensemble = _ensemble(2)
    synth = Synthesizer(SPEC, SynthesisSettings(latent_dim=8, width=4, lr=0.05, conditional=True, diversity=0.0,
                                                shift=1), 12, torch.device("cpu"))
    batch = synth.draw(lambda x: ensemble(x, QueryContext()).logits)
    assert [s.forward_calls for s in ensemble.pool.stats()] == [1, 1]
    assert [s.backward_calls for s in ensemble.pool.stats()] == [0, 0]
    assert sum(s.samples for s in ensemble.pool.stats()) == 12 * 2
    torch.testing.assert_close(batch.answers, ensemble(SPEC.normalize(batch.images), QueryContext()).logits)
