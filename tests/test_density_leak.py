"""simulations/density_leak.py: a coordinator climbing a served log-density through the contract reaches the
client's class means; climbing a closed teacher's logits does not."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "simulations"))

import density_leak  # noqa: E402
from test_density import _saved, _two_kinds  # noqa: E402

from fedkd.institution.density import fit_density  # noqa: E402
from fedkd.institution.host import TeacherHost, describe_checkpoint  # noqa: E402
from fedkd.institution.loading import load_teacher  # noqa: E402


def _host(tmp_path, with_density: bool) -> TeacherHost:
    x, y = _two_kinds()
    _saved(tmp_path, fit_density(x, y, 2, rank=4).to_state() if with_density else None)
    model, ckpt = load_teacher(tmp_path / "t.pt", num_classes=2)
    return TeacherHost(model, describe_checkpoint(ckpt, model, client=0))


def test_climbing_the_density_reaches_a_class_mean_and_counts_every_query(tmp_path):
    x, y = _two_kinds()
    means = density_leak.class_means(x, y, lambda t: t)
    found, spent = density_leak.climb(_host(tmp_path, True), column=2, starts=4, steps=400, lr=0.05, seed=0)
    assert spent == 2 * 4 * 400  # a Forward and a Backward of 4 inputs per step
    for point in found:
        _, cosine, distance = density_leak.nearest(point, means)
        assert cosine > 0.99 and distance < 0.1


def test_climbing_a_closed_teachers_logit_does_not(tmp_path):
    x, y = _two_kinds()
    means = density_leak.class_means(x, y, lambda t: t)
    found, _ = density_leak.climb(_host(tmp_path, False), column=None, starts=4, steps=400, lr=0.05, seed=0)
    assert max(density_leak.nearest(point, means)[2] for point in found) > 0.5


def test_nearest_names_the_mean_of_highest_cosine():
    means = {3: torch.tensor([1.0, 0.0]), 7: torch.tensor([0.0, 2.0])}
    label, cosine, distance = density_leak.nearest(torch.tensor([0.1, 1.0]), means)
    assert label == 7 and abs(cosine - 0.995) < 1e-3 and abs(distance - (0.1 ** 2 + 1.0) ** 0.5 / 2) < 1e-6


def test_the_agent_warns_its_operator_only_when_it_serves_a_density(tmp_path):
    from dataclasses import replace

    from fedkd.client.agent import density_notice

    with_density = _host(tmp_path, True).description
    notice = density_notice(with_density)
    assert notice is not None and "mean image of a class it holds" in notice and "input gradients" in notice
    logits_only = density_notice(replace(with_density, access_modes=("logits",)))
    assert logits_only is not None and "its answers alone" in logits_only
    assert density_notice(_host(tmp_path / "closed", False).description) is None


def test_the_agent_tells_its_operator_how_many_samples_its_density_went_with(tmp_path):
    from fedkd.client.agent import AgentSettings, TeacherAgent

    from fedkd.contract import QueryContext

    host = _host(tmp_path, True)
    agent = TeacherAgent(host, AgentSettings(target="127.0.0.1:1"))
    x = torch.randn(6, *host.description.input_shape)
    host.forward(x, QueryContext(purpose="synthesis"))  # not asked for: not released
    host.forward(x[:4], QueryContext(purpose="synthesis", log_density=True))
    host.forward(x[:3], QueryContext(purpose="synthesis", log_density=True), labels=True)  # a vote: no density
    assert host.stats.density_samples == 4
    assert "(13 samples, 0.0 MB on the wire), its log-density with 4 samples" in agent._answered()
    closed = _host(tmp_path / "closed", False)
    assert "log-density" not in TeacherAgent(closed, AgentSettings(target="127.0.0.1:1"))._answered()
