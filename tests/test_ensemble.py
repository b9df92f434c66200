import pytest
import torch
from torch import nn

from fedkd.contract import QueryContext, TeacherDescription
from fedkd.coordinator.aggregation import AGGREGATORS, class_weights, resolve_aggregator
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import LocalPool
from fedkd.institution.host import TeacherHost


class Fixed(nn.Module):
    """A teacher whose logits are a fixed row, whatever the input."""

    def __init__(self, row):
        super().__init__()
        self.row = nn.Parameter(torch.tensor(row))

    def forward(self, x):
        return self.row.expand(len(x), -1) + 0 * x.flatten(1)[:, :1]


def _teacher(row, counts=None, client=0):
    desc = TeacherDescription(client=client, model="fixed", num_classes=len(row), input_shape=(1, 2, 2),
                              mean=(0.0,), std=(1.0,), label_counts=counts)
    return TeacherHost(Fixed(row), desc)


def test_mean_of_logits():
    ens = Ensemble(LocalPool([_teacher([1.0, 0.0, 0.0]), _teacher([0.0, 3.0, 0.0])]), "logit-mean")
    out = ens(torch.zeros(2, 1, 2, 2), QueryContext())
    torch.testing.assert_close(out.logits, torch.tensor([[0.5, 1.5, 0.0]] * 2))
    assert out.terms == {} and len(out.member_logits) == 2 and out.members == [0, 1]


def test_class_weights_follow_label_counts_and_decliners_count_as_uniform():
    w = class_weights([[10, 0], [10, 30], None], 2, [10, 40, 60])
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    # teacher 0 saw no class-1 samples, so it gets no say on class 1
    assert w[0, 1] == 0
    # counts: teacher0 (10, 0), teacher1 (10, 30), the decliner's 60 samples spread evenly (30, 30)
    torch.testing.assert_close(w[:, 0], torch.tensor([10.0, 10.0, 30.0]) / 50)
    # a class nobody saw: everybody speaks for it equally
    torch.testing.assert_close(class_weights([[5, 0], [5, 0]], 2)[:, 1], torch.tensor([0.5, 0.5]))


def test_class_weighted_probabilities_and_logits():
    teachers = [_teacher([4.0, 4.0], [10, 0]), _teacher([0.0, 2.0], [0, 10])]
    out = Ensemble(LocalPool(teachers), "class-weighted-logits")(torch.zeros(1, 1, 2, 2), QueryContext())
    torch.testing.assert_close(out.logits, torch.tensor([[4.0, 2.0]]))
    out = Ensemble(LocalPool(teachers), "class-weighted")(torch.zeros(1, 1, 2, 2), QueryContext())
    # p(c) ~ w[0, c] p_0(c) + w[1, c] p_1(c) = (0.5, softmax([0, 2])[1])
    p1 = torch.softmax(torch.tensor([0.0, 2.0]), 0)[1]
    expected = torch.tensor([0.5, float(p1)])
    torch.testing.assert_close(out.logits.softmax(1), (expected / expected.sum()).unsqueeze(0))


def test_a_teacher_that_saw_two_classes_does_not_dominate_the_class_weighted_answer():
    # Ten classes; teacher 0 saw only classes 0 and 1 and answers every input with a confident "0".
    # Teachers 1 and 2 saw everything and agree the input is a 7.
    confident_zero = [12.0] + [0.0] * 9
    seven = [0.0] * 7 + [6.0] + [0.0] * 2
    teachers = [_teacher(confident_zero, [50, 50] + [0] * 8, 0),
                _teacher(seven, [50] * 10, 1), _teacher(seven, [50] * 10, 2)]
    x = torch.zeros(1, 1, 2, 2)
    assert Ensemble(LocalPool(teachers), "logit-mean")(x, QueryContext()).logits.argmax(1).item() == 0
    for name in ("class-weighted", "class-weighted-logits"):
        assert Ensemble(LocalPool(teachers), name)(x, QueryContext()).logits.argmax(1).item() == 7, name


def test_confidence_weighting_prefers_the_sure_teacher_per_sample():
    sure, unsure = _teacher([0.0, 8.0, 0.0]), _teacher([0.4, 0.0, 0.5])
    out = Ensemble(LocalPool([sure, unsure]), "confidence")(torch.zeros(3, 1, 2, 2), QueryContext())
    assert out.logits.argmax(1).tolist() == [1, 1, 1]
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(3))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_gradients_flow_through_every_aggregator_to_every_teacher(name):
    torch.manual_seed(0)
    hosts = [TeacherHost(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), TeacherDescription(
        client=k, model="linear", num_classes=3, input_shape=(1, 2, 2), mean=(0.0,), std=(1.0,),
        label_counts=(5, 3, 1 + k))) for k in range(2)]
    ens = Ensemble(LocalPool(hosts), name)
    x = torch.randn(4, 1, 2, 2, requires_grad=True)
    out = ens(x, QueryContext())
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0]))
    (grad,) = torch.autograd.grad(loss, x)
    # the same loss through local copies of the teachers: the fan-out's gradient is exact
    x_local = x.detach().requires_grad_(True)
    local = torch.stack([h.model(x_local) for h in hosts])
    expected_loss = torch.nn.functional.cross_entropy(ens.combine(local, [0, 1]), torch.tensor([0, 1, 2, 0]))
    (expected,) = torch.autograd.grad(expected_loss, x_local)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0
    assert all(h.stats.backward_calls == 1 for h in hosts)


def test_auto_resolves_by_what_clients_share_and_counts_aggregators_need_counts():
    assert resolve_aggregator("auto", [[1, 2], None]).name == "class-weighted"
    assert resolve_aggregator("auto", [None, None]).name == "prob-mean"
    with pytest.raises(ValueError, match=r"ensemble=class-weighted needs the label counts.*clients 3, 5 declined"):
        resolve_aggregator("class-weighted", [None, None], [3, 5])
    assert resolve_aggregator("logit-mean", [None]).name == "logit-mean"


def test_ensemble_validation():
    with pytest.raises(ValueError, match="at least one teacher"):
        LocalPool([])
    with pytest.raises(KeyError, match="valid: logit-mean, prob-mean, class-weighted"):
        Ensemble(LocalPool([_teacher([0.0, 1.0])]), "mode")
    with pytest.raises(ValueError, match="disagree"):
        Ensemble(LocalPool([_teacher([0.0, 1.0]), _teacher([0.0, 1.0, 2.0])]))
