"""Every distillation method: runs on digits with tiny models, its own pieces, and what it refuses at start-up."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkd.config import config_from_mapping
from fedkd.coordinator.experiment import prepare_clients, run_experiment
from fedkd.coordinator.flow import LogObserver, setup
from fedkd.coordinator.methods import METHODS
from fedkd.coordinator.methods.hidfd import frequency_weights
from fedkd.coordinator.methods.rdskd import rdskd_loss
from fedkd.coordinator.methods.tadfkd import select_clean
from fedkd.data import SPECS, load_dataset, load_public_pool
from fedkd.options import ConfigError

BASE = {"dataset": "digits", "num-clients": 3, "partition": "iid", "teacher-model": "lenet5", "teacher-epochs": 30,
        "teacher-lr": 3e-3, "epochs": 4, "steps-per-epoch": 15, "student-steps": 5, "batch-size": 64,
        "latent-dim": 32, "num-threads": 2, "sample-stages": 1, "student-refit": 1}
# Per method, what lets a 60-round run show learning (the papers' schedules are hundreds of times longer).
TUNING = {"dafl": {"dafl.student-steps": 5}, "deepinversion": {"deepinversion.iterations": 5},
          "hidfd": {"hidfd.public-samples": 50}}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two digits teachers, trained once and copied into each method's run."""
    root = tmp_path_factory.mktemp("teachers")
    config = config_from_mapping(BASE)
    prepare_clients(config, load_dataset("digits", seed=config.seed), root, setup(config), LogObserver())
    return root / "clients"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lifts_the_student_well_above_chance(method, teachers, tmp_path):
    config = config_from_mapping({**BASE, "method": method, **TUNING.get(method, {})})
    shutil.copytree(teachers, tmp_path / "clients")
    summary = run_experiment(config, tmp_path)
    assert summary["method"] == method
    assert summary["student"]["test_accuracy"] >= 0.3, summary["student"]  # chance is 0.1
    assert summary["queries"]["distillation_samples"] > 0
    if method == "hidfd":
        assert "mnist5k" in summary["method_report"]["public_pool"]
        assert summary["method_report"]["public_samples"] == 50
        # the refit trains as HiDFD's student does: on the public images beside the pool
        assert summary["student"]["refit"]["samples"] == summary["pool"]["samples"] + 50


class _Interrupted(Exception):
    pass


class _StopAfter(LogObserver):
    """Interrupts the run after ``epochs`` epochs, like a crash would (the checkpoint of the last one written)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def epoch_finished(self, record):
        super().epoch_finished(record)
        if record["epoch"] + 1 == self.epochs:
            raise _Interrupted


def test_a_run_resumed_mid_way_ends_where_an_uninterrupted_one_ends_for_a_baseline(teachers, tmp_path):
    """Every method's state (pool, snapshot, selection count) is in the run checkpoint: a run interrupted after
    its second epoch and resumed ends with the uninterrupted run's student, bit for bit."""
    config = config_from_mapping({**BASE, "method": "rdskd", "epochs": 3, "steps-per-epoch": 3})
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out in (whole, part):
        shutil.copytree(teachers, out / "clients")
    expected = run_experiment(config, whole)
    with pytest.raises(_Interrupted):
        run_experiment(config, part, observer=_StopAfter(2))
    resumed = run_experiment(config, part, resume=True)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["method"]["trainer"]["student"]
    b = torch.load(part / "checkpoint.pt", weights_only=True)["method"]["trainer"]["student"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed["student"]["test_accuracy"] == expected["student"]["test_accuracy"]
    assert resumed["queries"]["samples"] == expected["queries"]["samples"]
    # RDSKD's epoch records carry its own stage (1, 2): they are still the epochs the summary is over
    history = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if h.get("stage") != "refit"]
    assert len(epochs) == 3 and {h["stage"] for h in epochs} <= {1.0, 2.0}
    student = expected["student"]
    assert student["accuracy_mean"] == pytest.approx(sum(h["student_accuracy"] for h in epochs) / 3)
    assert student["refit"]["along_the_way"]["accuracy"] == epochs[-1]["student_accuracy"]


def test_the_mixture_selection_keeps_the_low_loss_component():
    torch.manual_seed(0)
    confident = F.one_hot(torch.randint(0, 10, (40,)), 10).float() * 12  # loss ~ 0
    unsure = torch.randn(24, 10) * 0.05  # loss ~ log 10
    logits = torch.cat([confident, unsure])[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    losses = F.cross_entropy(logits, logits.argmax(1), reduction="none")
    kept = select_clean(logits)
    assert kept.dtype == torch.bool and kept.shape == (64,)
    assert torch.equal(kept, losses < 1.0)  # exactly the confident ones
    assert bool(select_clean(torch.zeros(8, 10)).all())  # nothing to tell apart: all kept


def test_rdskd_penalises_the_increment_against_the_snapshot_exponentially():
    images = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 4.0]])  # halves: rows 0-1 and 2-3
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    p = torch.softmax(logits, 1)
    oh = float(F.cross_entropy(logits, logits.argmax(1)))
    pbar = p.mean(0)
    ie = float((pbar * pbar.log()).sum())
    l_z = math.sqrt(3.0**2 + 4.0**2) / float((p[2:] - p[:2]).norm())
    snapshot = {"onehot": oh - 0.5, "entropy": ie + 0.25}
    loss, terms = rdskd_loss(images, logits, snapshot)
    assert float(loss) == pytest.approx(math.exp(0.5) + math.exp(-0.25) + 1 / l_z, rel=1e-5)
    assert float(terms["loss_onehot"]) == pytest.approx(oh, rel=1e-6)
    first, _ = rdskd_loss(images, logits, None)  # no snapshot yet: both penalties are exp(0)
    assert float(first) == pytest.approx(2 + 1 / l_z, rel=1e-5)


def test_category_frequency_weights_favour_rare_classes_and_sum_to_the_class_count():
    w = frequency_weights(torch.tensor([100.0, 10.0, 1.0, 0.0]), beta=0.99)
    assert float(w.sum()) == pytest.approx(4.0)
    assert w[0] < w[1] < w[2] and float(w[2]) == pytest.approx(float(w[3]))  # unseen floored at one sighting
    raw = [(1 - 0.99) / (1 - 0.99**n) for n in (100, 10, 1, 1)]
    assert [float(v) for v in w] == pytest.approx([4 * r / sum(raw) for r in raw], rel=1e-6)


def test_a_method_that_needs_a_term_a_client_lacks_stops_at_start_up_naming_it(teachers, tmp_path):
    mapping = {**BASE, "method": "dafl", "teacher-access": "labels,gradient,gradient"}
    shutil.copytree(teachers, tmp_path / "clients")
    with pytest.raises(ConfigError, match=r"dafl needs the teacher-side term 'activation'.*client 0.*"
                                          r"dafl.weight-activation=0"):
        run_experiment(config_from_mapping(mapping), tmp_path)
    with pytest.raises(ConfigError, match=r"method=dfad trains its generator through the teachers' input gradients"):
        run_experiment(config_from_mapping({**BASE, "method": "dfad", "teacher-access": "labels"}),
                       tmp_path / "labels")


def test_hidfd_without_a_usable_public_pool_says_how_to_provide_one(teachers, tmp_path):
    cases = (("digits", "cannot be the run's own dataset"), (str(tmp_path / "none.npz"), "neither a built-in"))
    for pool, why in cases:
        out = tmp_path / pool.replace("/", "_")
        shutil.copytree(teachers, out / "clients")
        with pytest.raises(ConfigError, match=rf"hidfd.public-pool: .*{why}.*\.npz file"):
            run_experiment(config_from_mapping({**BASE, "method": "hidfd", "hidfd.public-pool": pool}), out)


def test_a_public_pool_file_is_read_resized_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "public.npz"
    np.savez(path, x=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    pool = load_public_pool(str(path), SPECS["digits"], 12, seed=0)
    assert pool.images.shape == (12, 1, 8, 8) and 0 <= float(pool.images.min()) <= float(pool.images.max()) <= 1
    assert "public.npz" in pool.source and "12 images" in pool.source
    with pytest.raises(ValueError, match="holds 30 images, 40 were asked for"):
        load_public_pool(str(path), SPECS["digits"], 40, seed=0)
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="the images go under 'x'"):
        load_public_pool(str(tmp_path / "bad.npz"), SPECS["digits"], 2, seed=0)
    np.savez(tmp_path / "float.npz", x=np.full((3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        load_public_pool(str(tmp_path / "float.npz"), SPECS["digits"], 2, seed=0)
    color = load_public_pool(str(path), SPECS["cifar10"], 4, seed=0)
    assert color.images.shape == (4, 3, 32, 32)


def test_a_wrong_method_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="method: 'cmi' is not one of cudfkd, tadfkd, rdskd, hidfd, dafl, dfad, "
                                          "deepinversion"):
        config_from_mapping({"method": "cmi"})


def test_every_query_carries_why_it_is_asked_which_method_asks_and_its_schedule(teachers, tmp_path, monkeypatch):
    """The query context: evaluation queries say so; CuDFKD's synthesis queries carry its curriculum (lambda and
    the adversarial weight) as named numbers; answers the student trains on say distill."""
    from fedkd.institution.host import TeacherHost

    seen = []
    original = TeacherHost.forward

    def recording(self, inputs, state, **kwargs):
        seen.append(state)
        return original(self, inputs, state, **kwargs)

    monkeypatch.setattr(TeacherHost, "forward", recording)
    shutil.copytree(teachers, tmp_path / "clients")
    run_experiment(config_from_mapping({**BASE, "epochs": 2, "steps-per-epoch": 2, "synthesis-forward-batches": 1,
                                        "cudfkd.adv-start": 0.5}), tmp_path)
    purposes = {s.purpose for s in seen}
    assert purposes == {"evaluate", "synthesis", "distill"}
    synthesis = [s for s in seen if s.purpose == "synthesis"]
    assert {s.method for s in synthesis} == {"cudfkd"} and {s.epoch for s in synthesis} == {0, 1}
    assert all(dict(s.schedule).keys() == {"lambda", "adv_weight"} for s in synthesis)
    assert max(s.adv_weight for s in synthesis) >= 0.5
    assert all(s.method == "" and s.schedule == () for s in seen if s.purpose == "evaluate")
