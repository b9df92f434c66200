import pytest
import torch
from torch import nn

from fedkd.ensemble import Ensemble, class_weights
from fedkd.pool import LocalPool
from fedkd.teacher import CurriculumState, TeacherDescription, TeacherHost


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
    ens = Ensemble(LocalPool([_teacher([1.0, 0.0, 0.0]), _teacher([0.0, 3.0, 0.0])]))
    out = ens(torch.zeros(2, 1, 2, 2), CurriculumState())
    torch.testing.assert_close(out.logits, torch.tensor([[0.5, 1.5, 0.0]] * 2))
    assert out.bn_loss is None and len(out.member_logits) == 2 and out.members == [0, 1]


def test_class_weights_follow_label_counts_and_decliners_count_as_uniform():
    w = class_weights([[10, 0], [10, 30], None], 2)
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    # teacher 0 saw no class-1 samples, so it gets no say on class 1
    assert w[0, 1] == 0
    # shares: teacher0 (1, 0), teacher1 (0.25, 0.75), decliner (0.5, 0.5)
    torch.testing.assert_close(w[:, 0], torch.tensor([1.0, 0.25, 0.5]) / 1.75)


def test_class_weighted_ensemble():
    ens = Ensemble(LocalPool([_teacher([4.0, 4.0], [10, 0]), _teacher([0.0, 2.0], [0, 10])]), "class-weighted")
    out = ens(torch.zeros(1, 1, 2, 2), CurriculumState())
    torch.testing.assert_close(out.logits, torch.tensor([[4.0, 2.0]]))


def test_ensemble_validation():
    with pytest.raises(ValueError, match="at least one teacher"):
        LocalPool([])
    with pytest.raises(KeyError, match="valid: mean, class-weighted"):
        Ensemble(LocalPool([_teacher([0.0, 1.0])]), "median")
    with pytest.raises(ValueError, match="disagree"):
        Ensemble(LocalPool([_teacher([0.0, 1.0]), _teacher([0.0, 1.0, 2.0])]))
