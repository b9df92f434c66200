"""Teachers that answer each input's log-density under their own images (teacher-density=on): the density, the
checkpoint and the contract that carry it, and the ensemble's posterior over who knows the input."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_ensemble import Fixed  # logits that are a fixed row, whatever the input
from torch import nn

from fedkd.checkpoint import CheckpointError, save_teacher
from fedkd.codec import decode_description, encode_description
from fedkd.config import config_from_mapping
from fedkd.contract import QueryContext, QueryError, TeacherDescription
from fedkd.coordinator.aggregation import competence, density_gate
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import LocalPool
from fedkd.data import load_dataset
from fedkd.institution.density import WithDensity, check_density, fit_density
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.options import ConfigError

STATE = QueryContext(purpose="distill")
ASK = QueryContext(purpose="distill", log_density=True)  # a query that weighs by the densities


def _two_kinds(n=200, seed=0):
    """Images (n, 1, 4, 4) of two kinds: bright on the left half (class 0) or on the right half (class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 4, 4, generator=g)
    y = torch.arange(n) % 2
    x[y == 0, :, :, :2] += 2.0
    x[y == 1, :, :, 2:] += 2.0
    return x, y


# The density --------------------------------------------------------------------------------------------------


def test_a_standard_normal_fitted_gives_its_entropy_per_value():
    x = torch.randn(4000, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    density = fit_density(x, torch.zeros(4000, dtype=torch.long), 2, rank=3)
    fresh = torch.randn(2000, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    # the mean log-density per value of N(0, 1) samples is -(1/2) log(2 pi e) = -1.419
    assert abs(float(density(fresh).mean()) + 0.5 * math.log(2 * math.pi * math.e)) < 0.03


def test_own_images_are_likelier_than_anothers_and_the_fit_is_deterministic():
    x, y = _two_kinds()
    density = fit_density(x[y == 0], y[y == 0], 2, rank=4)
    fresh, fy = _two_kinds(seed=1)
    own, other = density(fresh[fy == 0]), density(fresh[fy == 1])
    assert float(own.min()) > float(other.max())  # every own image above every foreign one
    again = fit_density(x[y == 0], y[y == 0], 2, rank=4)
    torch.testing.assert_close(again(fresh), density(fresh))


def test_a_class_with_fewer_images_than_the_rank_keeps_a_proper_density():
    x, y = _two_kinds()
    keep = torch.cat([(y == 0).nonzero().flatten(), (y == 1).nonzero().flatten()[:6]])  # 6 images of class 1
    density = fit_density(x[keep], y[keep], 2, rank=10)
    assert density.bases.shape == (2, 16, 10)
    assert int((density.bases[1].abs().sum(0) > 0).sum()) == 4  # 6 images: 4 directions, the rest isotropic
    assert bool(torch.isfinite(density(x)).all())
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_density(x[:1], y[:1], 2)


def test_the_log_density_is_differentiable_for_the_teacher_side_gradients():
    x, y = _two_kinds()
    model = WithDensity(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), fit_density(x, y, 2, rank=4))
    probe = x[:3].clone().requires_grad_(True)
    out = model(probe)
    assert out.shape == (3, 3)
    out[:, 2].sum().backward()
    assert probe.grad is not None and bool(torch.isfinite(probe.grad).all()) and float(probe.grad.abs().sum()) > 0


def test_a_density_that_does_not_hold_together_is_refused_naming_the_field():
    x, y = _two_kinds()
    state = fit_density(x, y, 2, rank=4).to_state()
    check_density(state)
    for field, value, match in (("variances", -state["variances"], "above 0"),
                                ("noise", state["noise"] * float("nan"), "noise holds a value that is not finite"),
                                ("bases", state["bases"][:, :, :0].repeat(1, 2, 1), "density bases have shape"),
                                ("log_prior", state["log_prior"][:1], "do not match")):
        with pytest.raises(ValueError, match=match):
            check_density({**state, field: value})
    with pytest.raises(ValueError, match="not a table of the tensors"):
        check_density({k: v for k, v in state.items() if k != "means"})
    for classes, match in ((torch.tensor([0, 0]), "distinct"), (torch.tensor([0, -2]), "distinct"),
                           (torch.tensor([0.0, 1.0]), "integer tensor"), (torch.tensor([0, 1, 2]), r"shape \(2,\)")):
        with pytest.raises(ValueError, match=match):
            check_density({**state, "classes": classes})


def test_each_class_has_its_own_component_which_a_query_can_ask_for_alone():
    x, y = _two_kinds()
    y = y * 3  # the classes 0 and 3 of four
    density = fit_density(x, y, 4, rank=4)
    assert density.classes.tolist() == [0, 3]  # the class each component models
    fresh, fy = _two_kinds(seed=1)
    per = density.components(fresh)  # (2, B): each alone, the prior left out
    # the mixture of the two halves: log(1/2 p_0 + 1/2 p_3), per value
    torch.testing.assert_close(density(fresh), torch.logsumexp(per * 16 + math.log(0.5), 0) / 16)
    torch.testing.assert_close(density.of_class(fresh, 3), per[1])
    # an image of class 0 is likelier under class 0's component than under class 3's, and the other way round
    assert bool((density.of_class(fresh[fy == 0], 0) > density.of_class(fresh[fy == 0], 3)).all())
    assert bool((density.of_class(fresh[fy == 1], 3) > density.of_class(fresh[fy == 1], 0)).all())
    # a class it models with no component of its own (here, none of its images): its whole density
    torch.testing.assert_close(density.of_class(fresh, 1), density(fresh))
    few = fit_density(x[:3], y[:3], 4, rank=4)  # too few images of every class: one component of all
    assert few.classes.tolist() == [-1]
    torch.testing.assert_close(few.of_class(fresh, 0), few(fresh))


def test_a_density_saved_before_its_classes_were_recorded_takes_them_from_the_label_counts(tmp_path):
    x, y = _two_kinds()
    state = fit_density(x, y, 2, rank=4).to_state()
    _saved(tmp_path, {k: v for k, v in state.items() if k != "classes"})  # label counts [100, 100]
    model, _ = load_teacher(tmp_path / "t.pt", num_classes=2)
    assert model.density.classes.tolist() == [0, 1]
    from fedkd.institution.density import classes_from_counts
    assert classes_from_counts([0, 40, 3, 9], 2).tolist() == [1, 3]  # classes of MIN_CLASS_IMAGES images or more
    assert classes_from_counts([0, 40, 3, 9], 3) is None  # fitted otherwise: not known
    assert classes_from_counts(None, 2) is None


# The checkpoint, the host and the wire ------------------------------------------------------------------------


def _saved(tmp_path, density):
    """A registry teacher of two classes on 4 x 4 images, saved with ``density``."""
    from fedkd.models import build_classifier

    model = build_classifier("lenet5", num_classes=2, channels=1, image_size=4)
    return model, save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=2, input_shape=(1, 4, 4),
                               num_samples=200, label_counts=[100, 100], mean=(0.0,), std=(1.0,), density=density)


def test_a_teacher_with_a_density_reloads_answering_it_and_the_host_says_so(tmp_path):
    x, y = _two_kinds()
    density = fit_density(x, y, 2, rank=4)
    model, ckpt = _saved(tmp_path, density.to_state())
    again, loaded = load_teacher(tmp_path / "t.pt", num_classes=2)
    assert isinstance(again, WithDensity)
    with torch.no_grad():
        out = again(x[:5])
        torch.testing.assert_close(out[:, :2], model.eval()(x[:5]))
        torch.testing.assert_close(out[:, 2], density(x[:5]))
    desc = describe_checkpoint(loaded, again, client=0)
    assert desc.log_density_output and not desc.unknown_output and desc.outputs == 3
    host = TeacherHost(again, desc)
    assert host.forward(x[:4], ASK).logits.shape == (4, 3)
    assert host.backward(x[:4], torch.ones(4, 3), ASK).shape == (4, 1, 4, 4)


def _served(tmp_path, policy=None):
    """A two-class teacher with the density of ``_two_kinds`` images, saved, loaded and hosted: (images, density,
    host)."""
    x, y = _two_kinds()
    density = fit_density(x, y, 2, rank=4)
    tmp_path.mkdir(parents=True, exist_ok=True)
    _saved(tmp_path, density.to_state())
    model, loaded = load_teacher(tmp_path / "t.pt", num_classes=2)
    return x, density, TeacherHost(model, describe_checkpoint(loaded, model, client=0), policy=policy)


def test_a_teacher_releases_its_density_only_to_a_query_that_asks_for_it(tmp_path):
    x, density, host = _served(tmp_path)
    asked, unasked = host.forward(x[:4], ASK).logits, host.forward(x[:4], STATE).logits
    torch.testing.assert_close(asked[:, 2], density(x[:4]))
    assert unasked.shape == (4, 3) and bool((unasked[:, 2] == 0).all())
    torch.testing.assert_close(unasked[:, :2], asked[:, :2])
    # nor its gradient: a Backward through the density column of an unasked query is the classifier's alone
    only_density = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    assert float(host.backward(x[:4], only_density, STATE).abs().max()) == 0.0
    assert float(host.backward(x[:4], only_density, ASK).abs().max()) > 0.0
    reply = host.forward(x[:4], STATE, keep="f1")  # a kept graph is the one released
    assert bool((reply.logits[:, 2] == 0).all())
    assert float(host.backward(None, only_density, STATE, forward_id="f1").abs().max()) == 0.0


def test_a_query_for_one_class_gets_that_classs_part_of_the_density_and_a_class_out_of_range_is_refused(tmp_path):
    from fedkd.institution.privacy.policy import ReleasePolicy
    from fedkd.institution.privacy.settings import PrivacySettings

    x, density, host = _served(tmp_path)
    one = dataclasses.replace(ASK, density_class=1)
    asked = host.forward(x[:4], one).logits
    torch.testing.assert_close(asked[:, 2], density.of_class(x[:4], 1))
    torch.testing.assert_close(asked[:, :2], host.forward(x[:4], ASK).logits[:, :2])  # the classes as ever
    # its gradient is that component's alone
    only_density = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    z = x[:4].clone().requires_grad_(True)
    expected, = torch.autograd.grad(density.of_class(z, 1).sum(), z)
    torch.testing.assert_close(host.backward(x[:4], only_density, one), expected)
    # not released to a query that does not weigh by densities, whatever class it names
    assert bool((host.forward(x[:4], dataclasses.replace(STATE, density_class=1)).logits[:, 2] == 0).all())
    assert host.backward(x[:4], only_density, dataclasses.replace(STATE, density_class=1)).abs().max() == 0
    policy = ReleasePolicy(PrivacySettings(mode="output-noise"), num_records=200)
    charged = _served(tmp_path / "charged", policy)[2]
    charged.forward(x[:4], one)
    spent = policy.ledger.spent
    assert spent > 0
    for bad in (2, -1):
        for ask in (lambda s: charged.forward(x[:4], s), lambda s: charged.backward(x[:4], only_density, s)):
            with pytest.raises(QueryError, match=f"density_class {bad} is not one of the 2 classes"):
                ask(dataclasses.replace(ASK, density_class=bad))
    assert policy.ledger.spent == spent and charged.stats.forward_calls == 1  # refused before anything was charged


def test_the_wire_carries_the_class_a_query_asks_the_density_of():
    from fedkd.codec import decode_state, encode_state

    for label in (None, 0, 7):
        state = dataclasses.replace(ASK, density_class=label)
        assert decode_state(encode_state(state)) == state
    msg = encode_state(ASK)
    msg.density_class = -3
    with pytest.raises(QueryError, match="density_class -3 is not a class index"):
        decode_state(msg)


def test_a_labels_answer_names_a_class_never_the_density_column():
    desc = TeacherDescription(client=0, model="fixed", num_classes=2, input_shape=(1, 4, 4), mean=(0.0,),
                              std=(1.0,), access_modes=("labels",), log_density_output=True)
    reply = TeacherHost(Fixed([0.0, 1.0, 5.0]), desc).forward(torch.rand(3, 1, 4, 4), STATE, labels=True)
    assert reply.labels.tolist() == [1, 1, 1] and reply.logits.shape == (3, 2)


def test_a_checkpoint_whose_density_is_broken_or_for_other_inputs_is_refused(tmp_path):
    x, y = _two_kinds()
    state = fit_density(x, y, 2, rank=4).to_state()
    _saved(tmp_path, {**state, "noise": -state["noise"]})
    with pytest.raises(CheckpointError, match="field 'density'.*above 0|density.*above 0"):
        load_teacher(tmp_path / "t.pt")
    wide = fit_density(torch.randn(50, 1, 5, 5), torch.zeros(50, dtype=torch.long), 2, rank=3).to_state()
    _saved(tmp_path, wide)
    with pytest.raises(CheckpointError, match="fitted to inputs of 25 values, the teacher takes 16"):
        load_teacher(tmp_path / "t.pt")


def test_a_run_directory_with_teachers_without_a_density_is_refused_naming_the_key(tmp_path):
    from fedkd.institution.training import load_or_train_teacher
    from fedkd.models import build_classifier

    split = load_dataset("digits")
    spec = split.spec
    save_teacher(tmp_path / "t.pt", build_classifier("lenet5", num_classes=10, channels=1, image_size=8),
                 model_name="lenet5", num_classes=10, input_shape=(1, 8, 8), num_samples=0, label_counts=[0] * 10,
                 mean=spec.mean, std=spec.std)  # a teacher without a density
    with pytest.raises(CheckpointError, match="holds a teacher of teacher-density=off, but the config asks for "
                                              "teacher-density=on"):
        load_or_train_teacher(tmp_path / "t.pt", "lenet5", split.train, split.spec,
                              config_from_mapping({"dataset": "digits", "teacher-density": True}), client=0,
                              device="cpu", expected_model="lenet5", stage=lambda message: None)


def test_the_wire_carries_the_flag_and_refuses_both_extra_outputs():
    desc = TeacherDescription(client=1, model="m", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
                              log_density_output=True)
    back = decode_description(encode_description(desc))
    assert back.log_density_output and not back.unknown_output and back.outputs == 11
    both = encode_description(desc)
    both.unknown_output = True
    with pytest.raises(QueryError, match="unknown_output and log_density_output both"):
        decode_description(both)


def test_the_density_is_refused_where_its_release_would_not_be_covered():
    with pytest.raises(ConfigError, match="teacher-density=on: clients with privacy-mode dp-sgd"):
        config_from_mapping({"teacher-density": True, "privacy-mode": "dp-sgd"})
    with pytest.raises(ConfigError, match="teacher-density=on: clients with privacy-mode pate"):
        config_from_mapping({"teacher-density": True, "privacy-mode": "none,pate,none,none,none"})
    with pytest.raises(ConfigError, match="teacher-density=on and teacher-recipe=open-set"):
        config_from_mapping({"teacher-density": True, "teacher-recipe": "open-set"})
    assert config_from_mapping({"teacher-density": True, "privacy-mode": "output-noise"}).teachers.density


# The ensemble -------------------------------------------------------------------------------------------------


def test_the_gate_is_the_tempered_posterior_and_a_teacher_left_out_takes_no_share():
    log_density = torch.tensor([[0.5, -2.0], [-1.0, -2.0], [-3.0, -2.0]])  # (M=3, B=2)
    gate = density_gate(log_density, sharpness=2.0)
    torch.testing.assert_close(gate, 3 * F.softmax(2.0 * log_density, 0))
    torch.testing.assert_close(gate.mean(0), torch.ones(2))
    left = density_gate(log_density, sharpness=2.0, kept=torch.tensor([False, True, True]))
    assert float(left[0].abs().max()) == 0.0 and float(left[1, 0]) > float(left[2, 0])
    # every teacher left out: equal shares instead of nothing
    torch.testing.assert_close(density_gate(log_density, kept=torch.zeros(3, dtype=torch.bool)), torch.ones(3, 2))
    # a density teacher among open-set and plain ones: each gets its own kind of weight
    logits = torch.tensor([[[1.0, 0.0, 0.5]], [[1.0, 0.0, 3.0]], [[1.0, 0.0, -1.0]]])  # (K'=3, B=1, C+1=3)
    gate = competence(logits, 2, torch.tensor([False, True, False]), torch.tensor([True, False, True]),
                      sharpness=1.0)
    torch.testing.assert_close(gate[1], 1 - F.softmax(logits[1], -1)[:, 2])
    torch.testing.assert_close(gate[[0, 2]], 2 * F.softmax(torch.tensor([[0.5], [-1.0]]), 0))


class _StandardNormal(nn.Module):
    """A fixed row, then the log-density per value of N(0, I): a proper density."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, x):
        flat = x.flatten(1)
        per_value = -0.5 * flat.pow(2).mean(1) - 0.5 * math.log(2 * math.pi)
        return torch.cat([self.row.expand(len(x), -1), per_value.unsqueeze(1)], 1)


def _density_host(row, log_density, client):
    """A teacher answering ``row`` and a constant log-density per value (None: N(0, I)'s)."""
    desc = TeacherDescription(client=client, model="fixed", num_classes=len(row), input_shape=(1, 4, 4),
                              mean=(0.0,), std=(1.0,), log_density_output=True)
    return TeacherHost(_StandardNormal(row) if log_density is None else Fixed([*row, log_density]), desc)


def test_the_teacher_whose_data_the_input_resembles_wins_it_and_a_distrusted_one_cannot():
    # Teacher 0 is sure of class 0 on every input but the input is nothing like its data (log-density -3 per
    # value); teacher 1's data looks like it (-0.5) and it says class 1.
    foreign, owner = _density_host([4.0, 0.0], -3.0, 0), _density_host([0.0, 2.0], -0.5, 1)
    x = torch.rand(2, 1, 4, 4)
    out = Ensemble(LocalPool([foreign, owner]), "prob-mean", reliability=False, density_sharpness=4.0)(x, STATE)
    assert out.logits.argmax(1).tolist() == [1, 1]
    p = F.softmax(torch.tensor([[4.0, 0.0], [0.0, 2.0]]), -1)
    w = F.softmax(torch.tensor([-12.0, -2.0]), 0)
    torch.testing.assert_close(out.logits.softmax(1)[0], (w[:, None] * p).sum(0))
    assert [m.shape for m in out.member_logits] == [(2, 2), (2, 2)]  # the classes only, for the reports
    # the same answers without densities follow the surer foreigner
    plain = LocalPool([TeacherHost(Fixed([4.0, 0.0]), TeacherDescription(
        client=0, model="fixed", num_classes=2, input_shape=(1, 4, 4), mean=(0.0,), std=(1.0,))),
        TeacherHost(Fixed([0.0, 2.0]), TeacherDescription(
            client=1, model="fixed", num_classes=2, input_shape=(1, 4, 4), mean=(0.0,), std=(1.0,)))])
    assert Ensemble(plain, "prob-mean", reliability=False)(x, STATE).logits.argmax(1).tolist() == [0, 0]
    # a teacher the reliability estimate leaves out claims every input in vain (the density check passes it: its
    # density is a proper one, N(0, I), only far above the owner's here)
    liar = _density_host([4.0, 0.0], None, 0)
    ensemble = Ensemble(LocalPool([liar, owner]), "prob-mean", reliability=True)
    ensemble.density_check.pending = []  # (the owner's constant -0.5 per value is no density; checked below)
    ensemble.reliability.weights = lambda: torch.tensor([0.0, 1.0])  # as if judged hostile
    assert ensemble(x, STATE).logits.argmax(1).tolist() == [1, 1]


class _Counting(TeacherHost):
    """A host that keeps every density column it released."""

    released: list

    def forward(self, inputs, state, **kw):
        reply = super().forward(inputs, state, **kw)
        self.released.append(reply.logits[:, -1].clone())
        return reply


def _counted_density_hosts(parts, labels):
    """Ten-class teachers with N(0, I) densities (a proper density, passing the check), each describing the label
    counts of its part of ``labels``."""
    hosts = []
    for k, part in enumerate(parts):
        counts = torch.bincount(labels[torch.as_tensor(part)], minlength=10).tolist()
        desc = TeacherDescription(client=k, model="fixed", num_classes=10, input_shape=(1, 4, 4), mean=(0.0,),
                                  std=(1.0,), log_density_output=True, label_counts=counts, num_samples=sum(counts))
        host = _Counting(_StandardNormal([float(k == c) for c in range(10)]), desc)
        host.released = []
        hosts.append(host)
    return hosts


def test_auto_weighs_by_densities_only_where_each_class_has_few_owners_and_then_only_do_teachers_release_them():
    from fedkd.coordinator.aggregation import unseen_share
    from fedkd.coordinator.ensemble import DENSITY_GATE_UNSEEN
    from fedkd.data import partition_indices

    labels = torch.arange(2000) % 10
    splits = {"pathological": partition_indices(labels, 5, "pathological", classes_per_client=2, seed=0),
              "dirichlet-0.1": partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0),
              "iid": partition_indices(labels, 5, "iid", seed=0)}
    x = torch.randn(6, 1, 4, 4)
    used = {}
    for name, parts in splits.items():
        hosts = _counted_density_hosts(parts, labels)
        pool = LocalPool(hosts)
        ensemble = Ensemble(pool, "auto", reliability=True)
        ensemble(x, STATE)
        used[name] = ensemble.density_gate.used
        released = torch.cat([r for h in hosts for r in h.released])
        # the gate asks every teacher for its density (the check's probes and the query); without it none leaves
        assert bool((released != 0).any()) == used[name], name
        # and each side counts the samples that carried one: the teacher what it released, the pool what it got
        probes = ensemble.density_check.probes
        assert [h.stats.density_samples for h in hosts] == [(probes + len(x)) * used[name]] * 5
        assert [s.density_samples for s in pool.stats()] == [h.stats.density_samples for h in hosts]
    assert used == {"pathological": True, "dirichlet-0.1": False, "iid": False}
    # the statistic behind it: the share of (teacher, class) pairs where the teacher holds none of the class
    claimed = {name: torch.stack([torch.bincount(labels[torch.as_tensor(p)], minlength=10) for p in parts])
               for name, parts in splits.items()}
    assert unseen_share(claimed["pathological"]) == pytest.approx(0.8) and unseen_share(claimed["iid"]) == 0.0
    assert 0.0 < unseen_share(claimed["dirichlet-0.1"]) < DENSITY_GATE_UNSEEN == 0.75
    assert unseen_share(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])) == pytest.approx(0.5)  # class 1, 2: nobody's
    # on and off override the counts; a density teacher that shares no counts leaves auto nothing to judge: on
    iid = splits["iid"]
    assert Ensemble(LocalPool(_counted_density_hosts(iid, labels)), density_gate="on").density_gate.used
    hosts = _counted_density_hosts(splits["pathological"], labels)
    off = Ensemble(LocalPool(hosts), density_gate="off")
    off(x, STATE)
    assert not off.density_gate.used and all(bool((torch.cat(h.released) == 0).all()) for h in hosts)
    silent = _counted_density_hosts(iid, labels)
    silent[3].description = dataclasses.replace(silent[3].description, label_counts=None)
    gate = Ensemble(LocalPool(silent)).density_gate
    assert gate.used and "client(s) 3" in gate.reason
    with pytest.raises(ValueError, match="density-gate 'sometimes' is not one of auto, on, off"):
        Ensemble(LocalPool(silent), density_gate="sometimes")


class _Honest(nn.Module):
    """A classifier answering a fixed row, then a real density's log-density per value (``WithDensity``'s layout)."""

    def __init__(self, row, density):
        super().__init__()
        self.row, self.density = torch.tensor(row), density

    def forward(self, x):
        return torch.cat([self.row.expand(len(x), -1), self.density(x).unsqueeze(1)], 1)


def _honest_raised_honest(privacy=None):
    """Images of two kinds and three teachers fitted to them: two honest ones that say class 1, between them one
    that says class 0 and whose density is raised by 10 nats per value (``privacy``: what it declares)."""
    x, y = _two_kinds()
    honest = fit_density(x, y, 2, rank=4)
    raised = fit_density(x, y, 2, rank=4)
    raised.log_prior += 10.0 * 16
    desc = {"model": "fixed", "num_classes": 2, "input_shape": (1, 4, 4), "mean": (0.0,), "std": (1.0,),
            "log_density_output": True}
    return x, [TeacherHost(_Honest([0.0, 3.0], honest), TeacherDescription(client=0, **desc)),
               TeacherHost(_Honest([3.0, 0.0], raised), TeacherDescription(client=1, privacy=privacy, **desc)),
               TeacherHost(_Honest([0.0, 3.0], honest), TeacherDescription(client=2, **desc))]


def test_a_density_that_claims_more_mass_than_one_is_refuted_and_takes_no_share_of_the_gate():
    """Markov's inequality on probes the coordinator draws: a fitted density passes, the same density raised by 10
    nats per value (a claim on every input) is refuted and out of the gate; the check is one counted Forward."""
    x, hosts = _honest_raised_honest()
    pool = LocalPool(hosts)
    ensemble = Ensemble(pool, "prob-mean")
    out = ensemble(x[:8], STATE)
    check = ensemble.density_check
    assert check.refuted == {1} and not check.due
    assert check.log_mass[0] < math.log(1e6) < check.log_mass[1]
    assert out.competence[1].abs().max() == 0 and out.logits.argmax(1).tolist() == [1] * 8
    assert [s.samples for s in pool.stats()] == [8 + 128] * 3  # the probes, counted, asked once
    ensemble(x[:8], STATE)
    assert [s.samples for s in pool.stats()] == [16 + 128] * 3
    report = ensemble.report()
    assert [r["density_refuted"] for r in report] == [False, True, False]
    assert report[1]["density_log_mass"] > 13.8
    # a resumed run keeps the verdicts and asks no probe again
    again = Ensemble(LocalPool(hosts), "prob-mean")
    again.load_state_dict(ensemble.state_dict())
    assert again.density_check.refuted == {1} and not again.density_check.due
    # reliability=off: no check (the defences are off), the raised density wins the gate
    trusting = Ensemble(LocalPool(hosts), "prob-mean", reliability=False)
    assert trusting(x[:8], STATE).logits.argmax(1).tolist() == [0] * 8 and not trusting.density_check.due


def test_a_teacher_declaring_output_noise_answers_ungated_whatever_density_it_claims():
    """Its column is noised by design (it would route at random) and cannot be checked: it is ignored, so a liar
    declaring noise without adding any claims nothing."""
    x, hosts = _honest_raised_honest(
        privacy={"mechanism": "output-noise", "epsilon_budget": 8.0, "epsilon_spent": 0.0})
    ensemble = Ensemble(LocalPool(hosts), "prob-mean")
    assert ensemble.has_density.tolist() == [True, False, True] and ensemble.density_check.pending == [0, 2]
    out = ensemble(x[:8], STATE)
    assert out.competence[1].tolist() == [1.0] * 8  # ungated: its say is a closed teacher's
    assert out.logits.argmax(1).tolist() == [1] * 8 and not ensemble.density_check.refuted


def test_the_density_checks_bound_holds_for_an_exact_density():
    """For N(0, I) itself (the log-density exactly that of a density integrating to one) the check's statistic,
    the log of an unbiased estimate of its mass on the probes' support, stays near 0: far from refuting."""
    from fedkd.coordinator.robustness import DensityCheck

    check = DensityCheck([0], (1, 6, 6), seed=3)
    probes, log_q = check.draw()
    flat = probes.flatten(1).double()
    exact = (-0.5 * flat.pow(2).sum(1) - 18 * math.log(2 * math.pi)) / 36
    check.judge({0: exact.float()}, log_q)
    assert abs(check.log_mass[0]) < 3 and not check.refuted
    check2 = DensityCheck([0], (1, 6, 6), seed=3)
    check2.judge({0: torch.full((128,), float("nan"))}, log_q)  # an answer that is no number refutes
    assert check2.refuted == {0}
    # a teacher that never answers the probes is asked again, then refuted on the third miss
    check3 = DensityCheck([0, 1], (1, 6, 6), seed=3)
    for _ in range(2):
        check3.judge({1: exact.float()}, log_q)
        assert check3.pending == [0] and not check3.refuted
    check3.judge({}, log_q)
    assert check3.refuted == {0} and not check3.due and 1 not in check3.refuted


@pytest.mark.slow
def test_a_pathological_run_with_densities_beats_the_same_teachers_without(tmp_path):
    """digits, 5 clients of 2 classes: the ensemble of closed teachers is far below the one gated by the
    teachers' densities (measured 0.35 and 0.95 with these settings)."""
    from fedkd.coordinator.experiment import run_experiment

    base = {"dataset": "digits", "partition": "pathological", "classes-per-client": 2, "teacher-epochs": 10,
            "epochs": 1, "student-refit": 0, "query-budget": 20_000, "num-threads": 1}
    results = {}
    for density in (False, True):
        config = config_from_mapping({**base, "teacher-density": density})
        out = run_experiment(config, tmp_path / f"d{int(density)}")
        results[density] = out["ensemble"]["test_accuracy"]
        # density-gate=auto: by the label counts four teachers in five never saw each class, so it weighs
        assert out["ensemble"]["density_gate"]["used"] == density
        assert out["ensemble"]["density_gate"]["unseen_share"] == (pytest.approx(0.8) if density else None)
    assert results[True] > results[False] + 0.2, results


def test_an_institution_adds_a_density_of_its_own_images_to_its_own_model(tmp_path):
    from fedkd.client.cli import host_from_module

    from fedkd.data import ImageData
    from fedkd.institution.classifier import ModelError
    from fedkd.task import Task

    task = Task(("a", "b"), (1, 4, 4), (0.5,), (0.5,))
    x, y = _two_kinds()
    own = ImageData(((x * 0.5 + 0.5).clamp(0, 1)), y)  # images in [0, 1], as the task's loader gives them
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    host = host_from_module(model, task, name="mine", density_data=own)
    assert host.description.log_density_output and host.description.outputs == 3
    inputs = task.spec.normalize(own.images[:4])
    answer = host.forward(inputs, ASK).logits
    expected = fit_density(task.spec.normalize(own.images), own.labels, 2)(inputs)
    torch.testing.assert_close(answer[:, 2], expected)
    with pytest.raises(ModelError, match="--density-data and --unknown-output both"):
        host_from_module(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), task, name="mine", density_data=own,
                         unknown_output=True)
    with pytest.raises(ModelError, match="--density-data: a density needs at least 2 images"):
        host_from_module(model, task, name="mine", density_data=ImageData(own.images[:1], own.labels[:1]))


def test_a_flower_node_keeps_teachers_with_and_without_a_density_apart():
    from fedkd.client.node import teacher_path

    from fedkd.config import RunConfig

    node = {"partition-id": 0, "num-partitions": 5}
    plain = teacher_path(RunConfig(), node, 0)
    assert teacher_path(config_from_mapping({"teacher-density": True}), node, 0) != plain
    assert teacher_path(config_from_mapping({"teacher-density": False}), node, 0) == plain  # unchanged without


def test_a_flower_node_serves_its_own_model_with_a_density_from_the_node_config(tmp_path):
    from fedkd.client.node import NodeConfigError, own_model, own_model_host

    from fedkd.config import RunConfig
    from fedkd.institution.privacy.settings import PrivacySettings
    from fedkd.task import Task

    card = tmp_path / "task.toml"
    card.write_text('classes = ["a", "b"]\ninput-shape = [1, 4, 4]\nmean = [0.5]\nstd = [0.5]\n')
    task = Task.from_toml(card)
    x, y = _two_kinds()
    images = (x * 0.5 + 0.5).clamp(0, 1)
    for c, name in enumerate(task.classes):  # an ImageFolder of the task
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:20].tolist():
            from torchvision.utils import save_image
            save_image(images[i], tmp_path / "train" / name / f"{i}.png")
    torch.save(two_outputs().state_dict(), tmp_path / "w.pt")
    own = own_model({"model": "tests.test_density:two_outputs", "weights": str(tmp_path / "w.pt"),
                     "task": str(card), "density-data": str(tmp_path / "train")})
    assert own is not None and own.density_data == str(tmp_path / "train")
    host = own_model_host(own, RunConfig(num_clients=1), PrivacySettings(), 0)
    assert host.description.log_density_output and host.description.outputs == 3
    with pytest.raises(NodeConfigError, match="density-data goes with model"):
        own_model({"density-data": str(tmp_path / "train")})


def two_outputs():
    """Two classes (a node's own model, named as PACKAGE.MODULE:CALLABLE)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_train_teacher_saves_a_density_that_its_checkpoint_serves_and_a_checkpoint_takes_no_density_flag(
        tmp_path, capsys):
    from fedkd.client.cli import _host, host_from_checkpoint
    from fedkd.client.flags import teacher_parser
    from test_own_models import image_folder_task

    from fedkd.cli import main

    card = image_folder_task(tmp_path)
    out = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--task", str(card), "--data", str(tmp_path / "train"), "--model", "lenet5",
                 "--set", "teacher-epochs=1", "--set", "teacher-density=on", "--out", str(out)]) == 0
    capsys.readouterr()
    host = host_from_checkpoint(out)
    assert host.description.log_density_output and host.description.outputs == 4
    assert host.forward(torch.zeros(2, 1, 8, 8), STATE).logits.shape == (2, 4)
    args = teacher_parser().parse_args(["--checkpoint", str(out), "--density-data", str(tmp_path / "train"),
                                        "--connect", "127.0.0.1:1", "--insecure"])
    with pytest.raises(ValueError, match="--density-data goes with --model; a checkpoint carries its own"):
        _host(args, None)


def test_a_draw_is_of_the_class_asked_with_its_spread_and_the_host_refuses_what_it_cannot_draw(tmp_path):
    """A teacher with a density draws from its component of a class (student-refit-draw): near that class's mean,
    likelier under it than under the other; seeded; counted. Refused without a density, under a privacy mode that
    noises what leaves, for a class out of range, beyond its batch limit, and for a class it does not model."""
    from fedkd.institution.privacy.policy import ReleasePolicy
    from fedkd.institution.privacy.settings import PrivacySettings

    x, y = _two_kinds()
    x, density, host = _served(tmp_path)
    assert host.description.draws_density and host.describe().draws_density
    drawn = host.draw(400, 1, ASK, seed=3)
    assert drawn.shape == (400, 1, 4, 4) and drawn.dtype == torch.float32
    torch.testing.assert_close(drawn, host.draw(400, 1, ASK, seed=3))  # the coordinator's seed: the same draw
    assert not torch.equal(drawn, host.draw(400, 1, ASK, seed=4))
    scores = density.components(drawn)
    assert float((scores[1] > scores[0]).float().mean()) > 0.95
    assert float((drawn.mean(0) - x[y == 1].mean(0)).abs().max()) < 0.25 * float(x[y == 1].std())
    assert 0.7 < float(drawn.std(0).mean() / x[y == 1].std(0).mean()) < 1.3  # the class's own spread
    assert (host.stats.draw_calls, host.stats.drawn_samples, host.stats.samples) == (3, 1200, 1200)
    for count, label, text in ((0, 1, "at least one image"), (2000, 1, "exceeds this client's maximum batch"),
                               (4, 2, "density_class 2 is not one of the 2 classes"), (4, -1, "density_class -1")):
        with pytest.raises(QueryError, match=text):
            host.draw(count, label, ASK, seed=0)
    assert host.stats.refused == 4 and host.stats.draw_calls == 3
    # a class the density does not model alone (too few images of it: left out of the mixture)
    few = torch.cat([torch.zeros(len(y) - 3, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    lone = TeacherHost(WithDensity(host.model.classifier, fit_density(x, few, 2, rank=4)),
                       dataclasses.replace(host.description, client=1))
    with pytest.raises(QueryError, match="models no class 1"):
        lone.draw(4, 1, ASK, seed=0)
    assert lone.draw(4, 0, ASK, seed=0).shape == (4, 1, 4, 4)
    # under output noise the density leaves noised, and a draw cannot be: the teacher says it draws nothing
    noised = _served(tmp_path / "noised", ReleasePolicy(PrivacySettings(mode="output-noise"), num_records=200))[2]
    assert noised.description.log_density_output and not noised.description.draws_density
    with pytest.raises(QueryError, match="draws no images"):
        noised.draw(4, 1, ASK, seed=0)
    closed = TeacherHost(Fixed([0.0, 1.0]), TeacherDescription(client=2, model="m", num_classes=2,
                                                               input_shape=(1, 4, 4), mean=(0.0,), std=(1.0,)))
    with pytest.raises(QueryError, match="draws no images"):
        closed.draw(4, 1, ASK, seed=0)
    # the flag travels, and a teacher that says it draws from no density is refused
    wire = encode_description(host.description)
    assert decode_description(wire).draws_density
    wire.log_density_output = False
    with pytest.raises(QueryError, match="draws_density without log_density_output"):
        decode_description(wire)
