"""Open-set teachers (teacher-recipe=open-set): the recipe, the contract's unknown output, and the ensemble's
per-input weights."""

import pytest
import torch
import torch.nn.functional as F
from test_ensemble import Fixed  # logits that are a fixed row, whatever the input
from torch import nn

from fedkd.checkpoint import save_teacher
from fedkd.codec import decode_description, decode_forward_reply, encode_description, encode_forward_reply
from fedkd.config import RunConfig, config_from_mapping
from fedkd.contract import ForwardReply, QueryContext, QueryError, TeacherDescription
from fedkd.coordinator.aggregation import competence
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import LocalPool
from fedkd.data import load_dataset
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.institution.open_set import CORRUPTIONS, corrupt, open_set_loss
from fedkd.institution.privacy.settings import PrivacySettings
from fedkd.institution.training import train_teacher
from fedkd.options import ConfigError

STATE = QueryContext(purpose="distill")


def _host(row, *, unknown, client=0, access=("gradient", "logits")):
    classes = len(row) - int(unknown)
    desc = TeacherDescription(client=client, model="fixed", num_classes=classes, input_shape=(1, 4, 4), mean=(0.0,),
                              std=(1.0,), access_modes=access, unknown_output=unknown)
    return TeacherHost(Fixed(row), desc)


# The recipe ------------------------------------------------------------------------------------------------


def test_every_corruption_changes_every_image_and_keeps_the_shape():
    x = torch.rand(6, 1, 28, 28)
    rng = torch.Generator().manual_seed(0)
    for fn in set(CORRUPTIONS):
        out = fn(x, rng)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        assert bool(((out - x).flatten(1).abs().amax(1) > 1e-3).all()), fn.__name__
    mixed = corrupt(x, rng)
    assert mixed.shape == x.shape and bool(((mixed - x).flatten(1).abs().amax(1) > 1e-3).all())


def test_the_loss_needs_the_extra_output():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="needs 4 outputs"):
        open_set_loss(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), torch.Generator(), num_classes=3,
                      label_smoothing=0.0, hardening_step=0.01)


@pytest.mark.slow
def test_an_open_set_teacher_says_unknown_on_classes_it_never_saw():
    split = load_dataset("digits")
    spec = split.spec
    mine = (split.train.labels < 5).nonzero().flatten()
    config = config_from_mapping({"dataset": "digits", "teacher-epochs": 30, "teacher-recipe": "open-set"})
    model, privacy = train_teacher("lenet5", split.train.subset(mine.numpy()), spec, config, init_seed=0, order_seed=0,
                                   open_set=True)
    assert privacy is None
    with torch.no_grad():
        p = F.softmax(model(spec.normalize(split.test.images)), -1)
    assert p.shape[1] == spec.num_classes + 1
    own = split.test.labels < 5
    unknown = p[:, spec.num_classes]
    # "not mine" ranks the five classes it never saw above its own (AUROC; 0.84 measured, 0.5 is chance)
    auroc = float((unknown[~own].unsqueeze(1) > unknown[own].unsqueeze(0)).float().mean())
    assert auroc > 0.75
    # and it still knows its own classes (0.90 measured)
    assert float((p[own, :5].argmax(1) == split.test.labels[own]).float().mean()) > 0.8


def test_open_set_is_refused_with_dp_sgd_and_pate():
    with pytest.raises(ConfigError, match="teacher-recipe=open-set.*dp-sgd"):
        config_from_mapping({"teacher-recipe": "open-set", "privacy-mode": "dp-sgd"})
    with pytest.raises(ConfigError, match="teacher-recipe=open-set.*pate"):
        config_from_mapping({"teacher-recipe": "open-set", "privacy-mode": "none,pate,none,none,none"})
    with pytest.raises(ConfigError, match="teacher-recipe"):
        config_from_mapping({"teacher-recipe": "open"})


# The contract: the checkpoint, the description, the host, the wire ---------------------------------------------


def test_checkpoint_description_and_host_carry_the_unknown_output(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 11))
    ckpt = save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=10, input_shape=(1, 8, 8),
                        num_samples=5, label_counts=[1] * 5 + [0] * 5, mean=(0.5,), std=(0.5,), unknown_output=True)
    desc = describe_checkpoint(ckpt, model, client=0)
    assert desc.unknown_output and desc.outputs == 11
    host = TeacherHost(model, desc)
    x = torch.rand(3, 1, 8, 8)
    assert host.forward(x, STATE).logits.shape == (3, 11)
    grad = host.backward(x, torch.ones(3, 11), STATE)
    assert grad.shape == x.shape
    with pytest.raises(QueryError, match=r"grad_logits must be float32 of shape \(3, 11\)"):
        host.backward(x, torch.ones(3, 10), STATE)


def test_a_registry_teacher_with_an_unknown_output_reloads_as_it_was_trained(tmp_path):
    split = load_dataset("digits")
    config = config_from_mapping({"dataset": "digits", "teacher-epochs": 1, "teacher-recipe": "open-set"})
    model, _ = train_teacher("lenet5", split.train.subset(range(64)), split.spec, config, init_seed=0, order_seed=0,
                             open_set=True)
    save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=10, input_shape=(1, 8, 8),
                 num_samples=64, label_counts=[0] * 10, mean=split.spec.mean, std=split.spec.std, unknown_output=True)
    again, ckpt = load_teacher(tmp_path / "t.pt", num_classes=10)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(again(x), model(x))
    assert ckpt["unknown_output"] is True


def test_a_run_directory_with_teachers_of_the_other_recipe_is_refused_naming_the_key(tmp_path):
    from fedkd.checkpoint import CheckpointError
    from fedkd.institution.training import load_or_train_teacher
    from fedkd.models import build_classifier

    split = load_dataset("digits")
    spec = split.spec
    save_teacher(tmp_path / "t.pt", build_classifier("lenet5", num_classes=10, channels=1, image_size=8),
                 model_name="lenet5", num_classes=10, input_shape=(1, 8, 8), num_samples=0, label_counts=[0] * 10,
                 mean=spec.mean, std=spec.std)  # a closed teacher
    with pytest.raises(CheckpointError, match="holds a teacher of teacher-recipe=closed, but the config asks for "
                                              "teacher-recipe=open-set"):
        load_or_train_teacher(tmp_path / "t.pt", "lenet5", split.train, spec,
                              config_from_mapping({"dataset": "digits", "teacher-recipe": "open-set"}), client=0,
                              device="cpu", expected_model="lenet5", stage=lambda message: None)


def test_a_labels_answer_abstains_where_unknown_is_on_top():
    host = _host([0.0, 1.0, 5.0], unknown=True, access=("labels",))
    reply = host.forward(torch.rand(2, 1, 4, 4), STATE, labels=True)
    assert reply.labels.tolist() == [-1, -1]
    assert reply.logits.shape == (2, 2)
    host = _host([3.0, 1.0, 0.0], unknown=True, access=("labels",))
    assert host.forward(torch.rand(2, 1, 4, 4), STATE, labels=True).labels.tolist() == [0, 0]


def test_the_wire_carries_the_flag_and_checks_the_width():
    desc = TeacherDescription(client=1, model="m", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
                              unknown_output=True)
    assert decode_description(encode_description(desc)).unknown_output
    assert not decode_description(encode_description(TeacherDescription(
        client=1, model="m", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,)))).unknown_output
    msg = encode_forward_reply(ForwardReply(torch.zeros(4, 11)))
    assert decode_forward_reply(msg, 4, 10, outputs=11).logits.shape == (4, 11)
    with pytest.raises(QueryError, match=r"more than the limit of 160"):
        decode_forward_reply(msg, 4, 10)  # a closed teacher answering 11 columns is refused


def test_an_institution_serves_its_own_open_set_model_with_the_flag():
    from fedkd.client.cli import host_from_module

    from fedkd.institution.classifier import ModelError
    from fedkd.task import Task

    task = Task(tuple("abc"), (1, 4, 4), (0.5,), (0.5,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))  # three classes and "unknown"
    host = host_from_module(model, task, name="mine", unknown_output=True)
    assert host.description.unknown_output and host.forward(torch.rand(2, 1, 4, 4), STATE).logits.shape == (2, 4)
    with pytest.raises(ModelError, match=r"answers \(2, 4\) for a batch of 2; the task has 3 classes, so logits "
                                         r"must be \(2, 3\)"):
        host_from_module(model, task, name="mine")
    with pytest.raises(ModelError, match=r"3 classes and 'unknown' \(--unknown-output\), so logits must be \(2, 4\)"):
        host_from_module(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), task, name="mine", unknown_output=True)


# The ensemble -------------------------------------------------------------------------------------------------


def test_competence_is_one_minus_the_unknown_probability_and_one_without_that_output():
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]])  # (K'=2, B=1, C+1=3)
    gate = competence(logits, 2, torch.tensor([True, False]))
    torch.testing.assert_close(gate[0], 1 - F.softmax(logits[0], -1)[:, 2])
    torch.testing.assert_close(gate[1], torch.ones(1))


def test_the_teacher_that_says_unknown_loses_its_vote():
    # Teacher 0 is sure of class 0 but says "not mine" (p(unknown) ~ 0.98); teacher 1 knows it: class 1.
    sure_but_foreign = [4.0, 0.0, 0.0, 8.0]
    knows_it = [0.0, 2.0, 0.0, -4.0]
    pool = LocalPool([_host(sure_but_foreign, unknown=True, client=0), _host(knows_it, unknown=True, client=1)])
    out = Ensemble(pool, "prob-mean", reliability=False)(torch.rand(2, 1, 4, 4), STATE)
    assert out.logits.shape == (2, 3) and out.logits.argmax(1).tolist() == [1, 1]
    # by hand: sum_k (1 - p_k(unknown)) q_k(c), normalised over the classes
    rows = torch.tensor([sure_but_foreign, knows_it])
    p = F.softmax(rows, -1)
    expected = (p[:, :3] * 0.5).sum(0)
    torch.testing.assert_close(out.logits.softmax(1)[0], expected / expected.sum())
    assert [m.shape for m in out.member_logits] == [(2, 3), (2, 3)]  # the classes only, for the reports
    # the plain mean over the classes alone would follow the confident foreigner
    closed = LocalPool([_host(sure_but_foreign[:3], unknown=False), _host(knows_it[:3], unknown=False, client=1)])
    assert Ensemble(closed, "prob-mean", reliability=False)(torch.rand(2, 1, 4, 4), STATE).logits.argmax(1).tolist() \
        == [0, 0]


def test_gradients_reach_open_and_closed_teachers_at_their_own_widths():
    calls = {}

    class Recording(TeacherHost):
        def backward(self, inputs, grad_logits, state, **kw):
            calls[self.description.client] = tuple(grad_logits.shape)
            return super().backward(inputs, grad_logits, state, **kw)

    def host(row, unknown, client):
        desc = TeacherDescription(client=client, model="fixed", num_classes=3, input_shape=(1, 4, 4), mean=(0.0,),
                                  std=(1.0,), unknown_output=unknown)
        return Recording(Fixed(row), desc)

    pool = LocalPool([host([1.0, 0.0, 0.0, -1.0], True, 0), host([0.0, 1.0, 0.0], False, 1)])
    ensemble = Ensemble(pool, "prob-mean", reliability=False)
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    out = ensemble(x, STATE)
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    assert calls == {0: (2, 4), 1: (2, 3)}
    assert x.grad is not None and x.grad.shape == x.shape


def test_a_flower_node_serves_its_own_open_set_model_with_the_node_config_key(tmp_path):
    from fedkd.client.node import NodeConfigError, node_privacy, own_model, own_model_host

    card = tmp_path / "task.toml"
    card.write_text('classes = ["a", "b", "c"]\ninput-shape = [1, 4, 4]\nmean = [0.5]\nstd = [0.5]\n')
    torch.save(four_outputs().state_dict(), tmp_path / "w.pt")
    own = own_model({"model": "tests.test_open_set:four_outputs", "weights": str(tmp_path / "w.pt"),
                     "task": str(card), "unknown-output": True})
    assert own is not None and own.unknown_output
    host = own_model_host(own, RunConfig(num_clients=1), PrivacySettings(), 0)
    assert host.description.unknown_output and host.description.outputs == 4
    with pytest.raises(NodeConfigError, match="unknown-output is 'maybe'; give true or false"):
        own_model({"model": "x", "task": str(card), "unknown-output": "maybe"})
    # a quoted "true" is refused as every boolean key refuses it (share-label-counts = "true" in a node config)
    with pytest.raises(NodeConfigError, match="unknown-output is 'true'; give true or false; write it without quotes"):
        own_model({"model": "x", "task": str(card), "unknown-output": "true"})
    with pytest.raises(NodeConfigError, match="share-label-counts: 'true' is a string"):
        node_privacy(RunConfig(), {"share-label-counts": "true"}, 0)


def four_outputs():
    """Three classes and "unknown" (a node's own model, named as PACKAGE.MODULE:CALLABLE)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


def test_the_outliers_leave_the_batchnorm_running_statistics_to_the_teachers_own_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 4))
    twin = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 4))
    twin.load_state_dict(model.state_dict())
    x, y = torch.rand(8, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    open_set_loss(model.train(), x, y, torch.Generator().manual_seed(0), num_classes=3, label_smoothing=0.0,
                  hardening_step=0.01)
    twin.train()(x)  # the own images alone, once
    bn, own = model[1], twin[1]
    assert torch.allclose(bn.running_mean, own.running_mean) and torch.allclose(bn.running_var, own.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_the_known_term_rewards_samples_some_teacher_calls_its_own():
    from fedkd.coordinator.losses import known_loss

    nobody = torch.tensor([[0.1, 0.05], [0.1, 0.02]])  # (K'=2, B=2): neither teacher claims either sample
    somebody = torch.tensor([[0.9, 0.05], [0.1, 0.8]])
    assert known_loss(somebody) < 0.25 < 2.0 < known_loss(nobody)
    assert float(known_loss(torch.ones(3, 4))) == 0.0  # closed teachers (g = 1): no pull at all
    g = torch.tensor([[0.2], [0.4]], requires_grad=True)
    known_loss(g).backward()
    assert g.grad is not None and float(g.grad[0, 0]) == 0.0 and float(g.grad[1, 0]) < 0  # the best teacher's g up
