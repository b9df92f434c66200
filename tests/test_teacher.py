import pytest
import torch
from torch import nn

from fedkd.contract import FEATURE_STATISTICS, QueryContext, QueryError, TeacherDescription
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import LocalPool
from fedkd.institution.host import TeacherHost
from fedkd.institution.terms import FeatureStatistics
from fedkd.models import build_model

STATE = QueryContext.of(epoch=2, step=10, lam=1.5, adv_weight=0.5)


def _trained_bn_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("lenet5", num_classes=10, channels=1, image_size=8)
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(5):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def _host(model=None, **kwargs):
    model = model or _trained_bn_model()
    desc = TeacherDescription(client=0, model="lenet5", num_classes=10, input_shape=(1, 8, 8), mean=(0.3,),
                              std=(0.38,), has_feature_statistics=True, **kwargs.pop("desc", {}))
    return TeacherHost(model, desc, **kwargs)


def _reference(model, x):
    """The same computation done directly with autograd, for comparison."""
    stats = FeatureStatistics(model)
    stats.begin()
    logits = model(x)
    return logits, stats.end()


def test_forward_matches_the_model_and_records_the_state():
    model = _trained_bn_model()
    host = _host(model)
    x = torch.randn(6, 1, 8, 8)
    reply = host.forward(x, STATE, terms=(FEATURE_STATISTICS,))
    ref_logits, ref_loss = _reference(_trained_bn_model(), x)
    torch.testing.assert_close(reply.logits, ref_logits.detach())
    torch.testing.assert_close(reply.terms[FEATURE_STATISTICS], ref_loss.detach())
    assert host.last_state == STATE
    assert host.stats.forward_calls == 1 and host.stats.samples == 6


def test_backward_equals_autograd_through_the_same_model():
    host = _host()
    x = torch.randn(5, 1, 8, 8)
    g_logits = torch.randn(5, 10)
    g_bn = 0.7
    host.forward(x, STATE)
    got = host.backward(x, g_logits, STATE, grad_terms={FEATURE_STATISTICS: g_bn})

    ref_model = _trained_bn_model()
    xr = x.clone().requires_grad_(True)
    logits, loss = _reference(ref_model, xr)
    (logits * g_logits).sum().add(g_bn * loss).backward()
    torch.testing.assert_close(got, xr.grad, rtol=1e-5, atol=1e-6)

    only_logits = host.backward(x, g_logits, STATE)
    xr2 = x.clone().requires_grad_(True)
    (ref_model(xr2) * g_logits).sum().backward()
    torch.testing.assert_close(only_logits, xr2.grad, rtol=1e-5, atol=1e-6)


def test_a_queried_teacher_is_a_drop_in_autograd_function():
    host = _host()
    teacher = Ensemble(LocalPool([host]), "logit-mean")
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = teacher(x, STATE, terms=(FEATURE_STATISTICS,))
    logits, loss = out.logits, out.terms[FEATURE_STATISTICS]
    (logits.square().sum() + 2.0 * loss).backward()

    ref_model = _trained_bn_model()
    xr = x.detach().clone().requires_grad_(True)
    ref_logits, ref_loss = _reference(ref_model, xr)
    (ref_logits.square().sum() + 2.0 * ref_loss).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    # the second Forward: the ensemble checked the returned gradient against the teacher's own answers (a step
    # along it, BatchNorm-statistics term included), and the honest teacher passed
    assert host.stats.forward_calls == 2 and host.stats.backward_calls == 1
    (report,) = teacher.report()
    assert report["gradient_checks"] == 1 and 0.5 <= report["gradient_consistency"] <= 2.0
    assert report["gradient_weight"] == 1.0


def test_no_backward_call_without_gradients():
    host = _host()
    out = Ensemble(LocalPool([host]), "logit-mean")(torch.randn(3, 1, 8, 8), STATE)
    assert out.terms == {} and out.logits.shape == (3, 10)
    assert host.stats.backward_calls == 0


@pytest.mark.parametrize("inputs,code,message", [
    (torch.randn(2, 1, 8, 8).double(), "INVALID_ARGUMENT", "float32"),
    (torch.randn(2, 3, 8, 8), "INVALID_ARGUMENT", r"shape \(B, 1, 8, 8\)"),
    (torch.randn(2, 64), "INVALID_ARGUMENT", "shape"),
    (torch.zeros(0, 1, 8, 8), "INVALID_ARGUMENT", "empty batch"),
    (torch.full((2, 1, 8, 8), float("nan")), "INVALID_ARGUMENT", "NaN"),
    (torch.randn(9, 1, 8, 8), "RESOURCE_EXHAUSTED", "exceeds this client's maximum of 8"),
])
def test_bad_queries_are_refused_with_a_code_and_the_host_keeps_serving(inputs, code, message):
    host = _host(max_batch=8)
    with pytest.raises(QueryError, match=message) as info:
        host.forward(inputs, STATE)
    assert info.value.code == code
    assert host.stats.refused == 1
    assert host.forward(torch.randn(2, 1, 8, 8), STATE).logits.shape == (2, 10)


def test_backward_validation():
    host = _host()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(QueryError, match=r"grad_logits must be float32 of shape \(2, 10\)"):
        host.backward(x, torch.randn(3, 10), STATE)
    with pytest.raises(QueryError, match="NaN or infinite"):
        host.backward(x, torch.full((2, 10), float("inf")), STATE)


def test_access_modes_and_missing_statistics_are_failed_preconditions():
    host = _host(desc={"access_modes": ("logits",)})
    with pytest.raises(QueryError) as info:
        host.backward(torch.randn(2, 1, 8, 8), torch.randn(2, 10), STATE)
    assert info.value.code == "FAILED_PRECONDITION"

    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    desc = TeacherDescription(client=1, model="linear", num_classes=10, input_shape=(1, 8, 8), mean=(0.0,),
                              std=(1.0,))
    no_bn = TeacherHost(plain, desc)
    with pytest.raises(QueryError, match=r"does not compute the term 'feature-statistics' \(no BatchNorm") as info:
        no_bn.forward(torch.randn(2, 1, 8, 8), STATE, terms=(FEATURE_STATISTICS,))
    assert info.value.code == "FAILED_PRECONDITION"
    # The coordinator does not ask a teacher without statistics for them.
    out = Ensemble(LocalPool([no_bn]))(torch.randn(2, 1, 8, 8), STATE, terms=(FEATURE_STATISTICS,))
    assert FEATURE_STATISTICS not in out.terms


def test_feature_statistics_loss_is_zero_on_matching_statistics():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    model = nn.Sequential(bn).eval()
    stats = FeatureStatistics(model)
    scale, shift = torch.tensor([2.0, 0.5]).view(1, 2, 1, 1), torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    x = torch.randn(4096, 2, 4, 4) * scale + shift
    stats.begin()
    model(x)
    assert stats.end().item() < 0.1
    stats.begin()
    model(x + 3)
    assert stats.end().item() > 3.0


def test_a_removed_term_takes_its_hooks_off_and_records_nothing_more():
    model = _trained_bn_model()
    hooked = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [len(m._forward_hooks) for m in hooked]
    stats = FeatureStatistics(model)
    assert [len(m._forward_hooks) for m in hooked] == [n + 1 for n in before]
    x = torch.randn(8, 1, 8, 8)
    stats.begin()
    model(x)
    assert stats.end().item() > 0
    stats.remove()
    assert [len(m._forward_hooks) for m in hooked] == before
    stats.begin()
    model(x)
    assert stats.end().item() == 0.0  # nothing hooked: the term saw no layer


def test_backward_only_for_inputs_the_host_answered_a_forward_for():
    host = _host(remember=2)
    x = torch.randn(3, 1, 8, 8)
    g = torch.randn(3, 10)
    with pytest.raises(QueryError, match="has not answered a Forward") as err:
        host.backward(x, g, STATE)
    assert err.value.code == "FAILED_PRECONDITION"
    host.forward(x, STATE)
    assert host.backward(x, g, STATE).shape == x.shape
    # A changed input is a different query; and old inputs are forgotten after `remember` Forwards.
    with pytest.raises(QueryError, match="has not answered"):
        host.backward(x + 1e-3, g, STATE)
    host.forward(torch.randn(3, 1, 8, 8), STATE)
    host.forward(torch.randn(3, 1, 8, 8), STATE)
    with pytest.raises(QueryError, match="keeps the last 2"):
        host.backward(x, g, STATE)


def test_a_backward_naming_its_forward_differentiates_the_kept_graph():
    host = _host()
    x, g = torch.randn(4, *host.description.input_shape), torch.randn(4, host.description.num_classes)
    host.forward(x, QueryContext(), keep="a")
    by_name = host.backward(None, g, QueryContext(), forward_id="a")
    fresh = _host()
    fresh.forward(x, QueryContext())
    torch.testing.assert_close(by_name, fresh.backward(x, g, QueryContext()))
    # the inputs are counted once (with the Forward), not again with the Backward
    assert host.stats.bytes == fresh.stats.bytes - x.nbytes
    with pytest.raises(QueryError, match="FAILED_PRECONDITION: Backward names Forward 'a', which this teacher "
                                         "does not keep"):
        host.backward(None, g, QueryContext(), forward_id="a")  # a graph is differentiated once
    for k in range(6):  # only the last keep_graphs (4) are kept
        host.forward(x, QueryContext(), keep=k)
    with pytest.raises(QueryError, match="does not keep"):
        host.backward(None, g, QueryContext(), forward_id=0)
    assert host.backward(None, g, QueryContext(), forward_id=5).shape == x.shape
