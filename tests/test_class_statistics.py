"""The class-feature-statistics term (teacher-class-statistics=on): each institution's per-class BatchNorm
statistics of its own images, fitted, checked, kept in the checkpoint, served by the host (value and gradient),
and weighed by CuDFKD beside the global statistics."""

import pytest
import torch
from torch import nn

from fedkd.checkpoint import CheckpointError, save_teacher
from fedkd.codec import decode_description, encode_description
from fedkd.config import config_from_mapping
from fedkd.contract import CLASS_FEATURE_STATISTICS, FEATURE_STATISTICS, QueryContext
from fedkd.data import ImageData
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.institution.terms import (
    MIN_CLASS_IMAGES,
    TermSet,
    attach_class_statistics,
    available_terms,
    check_class_statistics,
    fit_class_statistics,
)
from fedkd.options import ConfigError

STATE = QueryContext(purpose="distill")


def _model(seed=0):
    """Two classes on 2 x 4 x 4 inputs: a BatchNorm over the input itself (so its statistics are the images'), a
    convolution and a second BatchNorm, then a linear head; running statistics that are not the identity."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(48, 2))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 2, 4, 4) * 1.5 + 0.5)
    return model.eval()


def _images(n=120, seed=0):
    """Class 0: mean +1, spread 1; class 1: mean -1, spread 2 (n images, alternating)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, 4, 4, generator=g)
    x[y == 0] = x[y == 0] + 1.0
    x[y == 1] = 2.0 * x[y == 1] - 1.0
    return x, y


def _hand_fit(model, x, y, layer_index):
    """Per-class channel mean and (population) variance of a layer's input, computed directly."""
    seen = []
    handle = model[layer_index].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    inputs = seen[0]
    mean = torch.stack([inputs[y == k].transpose(0, 1).reshape(inputs.shape[1], -1).mean(1) for k in (0, 1)])
    var = torch.stack([inputs[y == k].transpose(0, 1).reshape(inputs.shape[1], -1).var(1, unbiased=False)
                       for k in (0, 1)])
    return mean, var


def _hand_term(model, x):
    """The term as its definition reads: softmax-weighted per-class moments of each BN input, against the
    reference of each class with enough images (else the running statistics), weighted by the class's mass."""
    seen = []
    layers = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0]))) for m in layers]
    logits = model(x)
    for h in handles:
        h.remove()
    p = torch.softmax(logits, -1)
    total = torch.zeros(())
    for module, inputs in seen:
        first, second = inputs.mean((2, 3)), inputs.pow(2).mean((2, 3))
        for k in range(2):
            m = p[:, k].sum()
            w = p[:, k] / m
            mu = (w[:, None] * first).sum(0)
            var = (w[:, None] * second).sum(0) - mu.pow(2)
            enough = int(module.class_count[k]) >= MIN_CLASS_IMAGES
            ref_mu = module.class_mean[k] if enough else module.running_mean
            ref_var = module.class_var[k] if enough else module.running_var
            total = total + m / len(x) * ((mu - ref_mu).norm() + (var - ref_var).norm())
    return logits, total


# The statistics -----------------------------------------------------------------------------------------------


def test_the_fit_is_each_class_s_mean_and_variance_of_every_batchnorm_input_in_eval_mode():
    model = _model()
    x, y = _images()
    stats = fit_class_statistics(model, x, y, 2, batch_size=32)  # batches that split the classes unevenly
    assert set(stats) == {"0", "2"}
    for index in (0, 2):
        mean, var = _hand_fit(model, x, y, index)
        torch.testing.assert_close(stats[str(index)]["mean"], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[str(index)]["var"], var, rtol=1e-5, atol=1e-5)
        assert stats[str(index)]["count"].tolist() == [60, 60]
    # the first layer sees the images: class 0 near mean 1 and variance 1, class 1 near -1 and 4
    assert stats["0"]["mean"][0].tolist() == pytest.approx([1.0, 1.0], abs=0.15)
    assert stats["0"]["var"][1].tolist() == pytest.approx([4.0, 4.0], rel=0.2)
    assert not model.training
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        fit_class_statistics(nn.Sequential(nn.Flatten(), nn.Linear(32, 2)), x, y, 2)
    with pytest.raises(ValueError, match="need labelled images: 120 images, 3 labels"):
        fit_class_statistics(model, x, y[:3], 2)


def test_the_term_is_the_softmax_weighted_distance_to_each_class_s_own_statistics():
    model = _model()
    x, y = _images()
    attach_class_statistics(model, fit_class_statistics(model, x, y, 2), 2)
    assert CLASS_FEATURE_STATISTICS in available_terms(model)
    terms = TermSet(model)
    batch = _images(48, seed=1)[0]
    logits, values = terms.run(model, batch, (CLASS_FEATURE_STATISTICS, FEATURE_STATISTICS))
    expected_logits, expected = _hand_term(model, batch)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(values[CLASS_FEATURE_STATISTICS], expected, rtol=1e-4, atol=1e-5)
    assert float(values[CLASS_FEATURE_STATISTICS].detach()) > 0


def test_the_term_is_smooth_where_a_class_holds_less_than_one_sample_of_the_batch():
    """A class the teacher gives a fraction of one sample still takes part (by its mass), so the term's slope is
    the one its gradient claims as that mass crosses one: the coordinator checks an honest gradient that way."""
    model = _model()
    x, y = _images()
    attach_class_statistics(model, fit_class_statistics(model, x, y, 2), 2)
    terms = TermSet(model)
    batch = _images(48, seed=3)[0]

    def term_and_mass(shift: torch.Tensor) -> tuple[torch.Tensor, float]:
        handle = model[5].register_forward_hook(lambda m, args, out: out + torch.stack([torch.zeros(()), shift]))
        logits, values = terms.run(model, batch, (CLASS_FEATURE_STATISTICS,))
        handle.remove()
        return values[CLASS_FEATURE_STATISTICS], float(torch.softmax(logits.detach(), -1)[:, 1].sum())

    low, high = -30.0, 30.0  # the class-1 logit shift at which class 1 holds exactly one sample of the batch
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if term_and_mass(torch.tensor(mid))[1] < 1.0 else (low, mid)
    at = torch.tensor(high, requires_grad=True)
    value, mass = term_and_mass(at)
    assert mass == pytest.approx(1.0, abs=1e-3)
    claimed = float(torch.autograd.grad(value, at)[0])
    step = 1e-3
    below, above = (float(term_and_mass(torch.tensor(high + d))[0].detach()) for d in (-step, step))
    assert (above - below) / (2 * step) == pytest.approx(claimed, rel=0.05, abs=1e-4)
    _, tiny = terms.run(model, batch, (CLASS_FEATURE_STATISTICS,))  # unshifted: compare with the definition
    torch.testing.assert_close(tiny[CLASS_FEATURE_STATISTICS], _hand_term(model, batch)[1], rtol=1e-4, atol=1e-5)


def test_a_class_with_too_few_images_is_compared_with_the_running_statistics():
    model = _model()
    x, y = _images()
    keep = torch.cat([(y == 0).nonzero().flatten(), (y == 1).nonzero().flatten()[:MIN_CLASS_IMAGES - 1]])
    stats = fit_class_statistics(model, x[keep], y[keep], 2)
    assert stats["0"]["count"].tolist() == [60, MIN_CLASS_IMAGES - 1]
    attach_class_statistics(model, stats, 2)
    batch = _images(48, seed=2)[0]
    _, values = TermSet(model).run(model, batch, (CLASS_FEATURE_STATISTICS,))
    torch.testing.assert_close(values[CLASS_FEATURE_STATISTICS], _hand_term(model, batch)[1], rtol=1e-4, atol=1e-5)
    # the same value as a model whose class-1 statistics ARE its running statistics
    other = _model()
    for name, layer in other.named_children():
        if isinstance(layer, nn.BatchNorm2d):
            entry = stats[name]
            entry["mean"][1], entry["var"][1] = layer.running_mean, layer.running_var
    stats["0"]["count"][1] = stats["2"]["count"][1] = 60
    attach_class_statistics(other, stats, 2)
    _, same = TermSet(other).run(other, batch, (CLASS_FEATURE_STATISTICS,))
    torch.testing.assert_close(same[CLASS_FEATURE_STATISTICS], values[CLASS_FEATURE_STATISTICS])


def test_the_term_falls_to_zero_where_the_batch_has_the_teacher_s_class_statistics():
    """One class, and a batch the teacher calls that class: distance to its own class statistics only."""
    bn = nn.BatchNorm2d(2).eval()
    model = nn.Sequential(bn, nn.Flatten(), nn.Linear(32, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([20.0, 0.0]))  # every input is class 0, certainly
    scale, shift = torch.tensor([2.0, 0.5]).view(1, 2, 1, 1), torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    own = torch.randn(4096, 2, 4, 4) * scale + shift
    stats = fit_class_statistics(model, own, torch.zeros(4096, dtype=torch.long), 2)
    attach_class_statistics(model, stats, 2)
    terms = TermSet(model)
    _, near = terms.run(model, torch.randn(4096, 2, 4, 4) * scale + shift, (CLASS_FEATURE_STATISTICS,))
    _, far = terms.run(model, torch.randn(4096, 2, 4, 4) * scale + shift + 3, (CLASS_FEATURE_STATISTICS,))
    assert float(near[CLASS_FEATURE_STATISTICS].detach()) < 0.1 < 3.0 < float(far[CLASS_FEATURE_STATISTICS].detach())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"9": s["0"]}), "layer '9', which is not a BatchNorm layer"),
    (lambda s: s["0"].pop("var"), "layer '0' are not the tensors mean, var, count"),
    (lambda s: s["0"].update(mean=torch.zeros(3, 2)), r"mean of layer '0' have shape \(3, 2\), not \(2, 2\)"),
    (lambda s: s["2"]["mean"].__setitem__((0, 0), float("nan")), "mean of layer '2' hold a value that is not finite"),
    (lambda s: s["2"]["var"].__setitem__((1, 2), -1.0), "var of layer '2' hold a negative variance"),
    (lambda s: s["0"].update(count=torch.tensor([1.5, 2.0])), "count of layer '0' is not 2 non-negative integers"),
])
def test_statistics_that_do_not_fit_the_model_are_refused_naming_the_layer(change, message):
    model = _model()
    stats = fit_class_statistics(model, *_images(), 2)
    check_class_statistics(model, stats, 2)
    change(stats)
    with pytest.raises(ValueError, match=message):
        check_class_statistics(model, stats, 2)
    with pytest.raises(ValueError, match=message):
        attach_class_statistics(model, stats, 2)
    assert CLASS_FEATURE_STATISTICS not in available_terms(model)  # nothing attached


# The checkpoint, the host and the wire ------------------------------------------------------------------------


def _saved(tmp_path, **kwargs):
    """A registry teacher of 10 classes on 8 x 8 images (BatchNorm layers), saved; its images and labels."""
    from fedkd.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("lenet5", num_classes=10, channels=1, image_size=8).eval()
    x = torch.randn(300, 1, 8, 8)
    y = torch.arange(300) % 10
    save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=10, input_shape=(1, 8, 8),
                 num_samples=300, label_counts=[30] * 10, mean=(0.0,), std=(1.0,), **kwargs)
    return model, x, y


def test_a_checkpoint_releases_its_class_statistics_only_when_its_host_is_told_to(tmp_path):
    model, x, y = _saved(tmp_path)
    _saved(tmp_path, class_statistics=fit_class_statistics(model, x, y, 10))
    plain, ckpt = load_teacher(tmp_path / "t.pt")
    assert CLASS_FEATURE_STATISTICS not in describe_checkpoint(ckpt, plain, client=0).available_terms
    served, ckpt = load_teacher(tmp_path / "t.pt", class_statistics=True)
    desc = describe_checkpoint(ckpt, served, client=0)
    assert desc.available_terms == (FEATURE_STATISTICS, CLASS_FEATURE_STATISTICS, "activation")
    assert decode_description(encode_description(desc)).available_terms == desc.available_terms
    assert "class_mean" not in served.state_dict() and "1.class_mean" not in served.state_dict()
    host = TeacherHost(served, desc)
    batch = torch.randn(6, 1, 8, 8)
    reply = host.forward(batch, STATE, terms=(CLASS_FEATURE_STATISTICS,))
    expected = TermSet(served).run(served, batch, (CLASS_FEATURE_STATISTICS,))[1][CLASS_FEATURE_STATISTICS]
    torch.testing.assert_close(reply.terms[CLASS_FEATURE_STATISTICS], expected.detach())
    # the Backward is autograd's gradient of logits . g + 0.4 * term
    g = torch.randn(6, 10)
    got = host.backward(batch, g, STATE, grad_terms={CLASS_FEATURE_STATISTICS: 0.4})
    again, _ = load_teacher(tmp_path / "t.pt", class_statistics=True)
    probe = batch.clone().requires_grad_(True)
    logits, values = TermSet(again).run(again, probe, (CLASS_FEATURE_STATISTICS,))
    ((logits * g).sum() + 0.4 * values[CLASS_FEATURE_STATISTICS]).backward()
    torch.testing.assert_close(got, probe.grad, rtol=1e-4, atol=1e-6)


def test_the_agent_warns_its_operator_when_it_releases_the_class_term(tmp_path):
    from fedkd.client.agent import class_statistics_notice

    model, x, y = _saved(tmp_path)
    _saved(tmp_path, class_statistics=fit_class_statistics(model, x, y, 10))
    for on in (False, True):
        served, ckpt = load_teacher(tmp_path / "t.pt", class_statistics=on)
        notice = class_statistics_notice(describe_checkpoint(ckpt, served, client=0))
        assert (notice is not None and "each class's images" in notice) if on else notice is None


def test_a_checkpoint_without_or_with_broken_class_statistics_is_refused_naming_the_field(tmp_path):
    model, x, y = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="field 'class_statistics' is missing: this teacher's institution "
                                              "computed no per-class statistics"):
        load_teacher(tmp_path / "t.pt", class_statistics=True)
    stats = fit_class_statistics(model, x, y, 10)
    stats[next(iter(stats))]["var"][0, 0] = -2.0
    _saved(tmp_path, class_statistics=stats)
    load_teacher(tmp_path / "t.pt")  # unused, it stays in the file unchecked
    with pytest.raises(CheckpointError, match="field 'class_statistics'.*negative variance"):
        load_teacher(tmp_path / "t.pt", class_statistics=True)
    _saved(tmp_path, class_statistics={})
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    ckpt["class_statistics"] = [1, 2]
    torch.save(ckpt, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="field 'class_statistics' is a list, not a table of BatchNorm layers"):
        load_teacher(tmp_path / "t.pt")


def test_a_run_adds_the_statistics_to_an_existing_teacher_without_changing_its_weights(tmp_path):
    from fedkd.data import load_dataset
    from fedkd.institution.training import load_or_train_teacher
    from fedkd.models import build_classifier

    split = load_dataset("digits")
    spec = split.spec
    model = build_classifier("lenet5", num_classes=10, channels=1, image_size=8).eval()
    save_teacher(tmp_path / "t.pt", model, model_name="lenet5", num_classes=10, input_shape=(1, 8, 8),
                 num_samples=len(split.train), label_counts=split.train.label_counts(10), mean=spec.mean,
                 std=spec.std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = []
    config = config_from_mapping({"dataset": "digits", "teacher-class-statistics": True})
    loaded, ckpt, trained = load_or_train_teacher(tmp_path / "t.pt", "lenet5", split.train, spec, config, client=0,
                                                  device="cpu", expected_model="lenet5", stage=stages.append)
    assert not trained and any("per-class BatchNorm statistics" in s for s in stages)
    assert CLASS_FEATURE_STATISTICS in available_terms(loaded)
    on_disk = torch.load(tmp_path / "t.pt", weights_only=True)
    for key, value in before.items():
        torch.testing.assert_close(on_disk["state_dict"][key], value)
    expected = fit_class_statistics(model, spec.normalize(split.train.images), split.train.labels, 10)
    torch.testing.assert_close(on_disk["class_statistics"], expected)
    stages.clear()  # the next run reads them from the checkpoint
    load_or_train_teacher(tmp_path / "t.pt", "lenet5", split.train, spec, config, client=0, device="cpu",
                          expected_model="lenet5", stage=stages.append)
    assert not any("per-class" in s for s in stages)


def test_the_statistics_are_refused_where_a_privacy_mode_would_not_release_them():
    for mode in ("dp-sgd", "pate", "output-noise", "none,none,pate,none,none"):
        with pytest.raises(ConfigError, match="teacher-class-statistics=on: clients with privacy-mode"):
            config_from_mapping({"teacher-class-statistics": True, "privacy-mode": mode})
    assert config_from_mapping({"teacher-class-statistics": True}).teachers.class_statistics


# Institutions' own models and the command line ----------------------------------------------------------------


def test_an_institution_computes_the_statistics_of_its_own_images_for_its_own_model():
    from fedkd.client.cli import host_from_module

    from fedkd.institution.classifier import ModelError
    from fedkd.task import Task

    task = Task(("a", "b"), (2, 4, 4), (0.5, 0.5), (0.5, 0.5))
    x, y = _images()
    own = ImageData((x * 0.5 + 0.5).clamp(0, 1), y)
    model = _model()
    host = host_from_module(model, task, name="mine", class_statistics_data=own)
    assert CLASS_FEATURE_STATISTICS in host.description.available_terms
    expected = fit_class_statistics(_model(), task.spec.normalize(own.images), own.labels, 2)
    torch.testing.assert_close(model[2].class_mean, expected["2"]["mean"])
    batch = task.spec.normalize(own.images[:8])
    assert float(host.forward(batch, STATE, terms=(CLASS_FEATURE_STATISTICS,)).terms[CLASS_FEATURE_STATISTICS]) > 0
    with pytest.raises(ModelError, match="--class-statistics-data: the model has no BatchNorm layer"):
        host_from_module(nn.Sequential(nn.Flatten(), nn.Linear(32, 2)), task, name="mine", class_statistics_data=own)


def test_train_teacher_saves_them_and_the_teacher_command_serves_them_only_when_asked(tmp_path, capsys):
    from fedkd.client.cli import _host, host_from_checkpoint
    from fedkd.client.flags import teacher_parser
    from test_own_models import image_folder_task

    from fedkd.cli import main
    from fedkd.institution.privacy.policy import PrivacySettings

    card = image_folder_task(tmp_path)
    out = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--task", str(card), "--data", str(tmp_path / "train"), "--model", "lenet5",
                 "--set", "teacher-epochs=1", "--set", "teacher-class-statistics=on", "--out", str(out)]) == 0
    capsys.readouterr()
    stats = torch.load(out, weights_only=True)["class_statistics"]
    assert stats and all(entry["count"].tolist() == [6, 7, 8] for entry in stats.values())
    assert CLASS_FEATURE_STATISTICS not in host_from_checkpoint(out).description.available_terms
    assert CLASS_FEATURE_STATISTICS in host_from_checkpoint(out, class_statistics=True).description.available_terms

    def host(*flags, privacy=None):
        return _host(teacher_parser().parse_args([*flags, "--connect", "127.0.0.1:1", "--insecure"]), privacy)

    assert CLASS_FEATURE_STATISTICS in host("--checkpoint", str(out), "--class-statistics").description.available_terms
    with pytest.raises(ValueError, match="--class-statistics-data goes with --model"):
        host("--checkpoint", str(out), "--class-statistics-data", str(tmp_path / "train"))
    with pytest.raises(ValueError, match="--class-statistics goes with --checkpoint"):
        host("--model", "lenet5", "--task", str(card), "--class-statistics")
    with pytest.raises(ValueError, match="--class-statistics: privacy-mode output-noise releases no teacher-side "
                                         "term"):
        host("--checkpoint", str(out), "--class-statistics", privacy=PrivacySettings(mode="output-noise"))


def test_a_flower_node_serves_its_own_model_with_the_statistics_from_the_node_config(tmp_path):
    from fedkd.client.node import NodeConfigError, own_model, own_model_host
    from test_own_models import image_folder_task

    from fedkd.config import RunConfig
    from fedkd.institution.privacy.settings import PrivacySettings

    card = image_folder_task(tmp_path)
    torch.save(bn_classifier().state_dict(), tmp_path / "w.pt")
    own = own_model({"model": "tests.test_class_statistics:bn_classifier", "weights": str(tmp_path / "w.pt"),
                     "task": str(card), "class-statistics-data": str(tmp_path / "train")})
    assert own is not None and own.class_statistics_data == str(tmp_path / "train")
    host = own_model_host(own, RunConfig(num_clients=1), PrivacySettings(), 0)
    assert CLASS_FEATURE_STATISTICS in host.description.available_terms
    with pytest.raises(NodeConfigError, match="class-statistics-data goes with model"):
        own_model({"class-statistics-data": str(tmp_path / "train")})


def bn_classifier():
    """Three classes of 8 x 8 grey images with a BatchNorm layer (a node's own model, as PACKAGE.MODULE:CALLABLE)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 3))


# The coordinator -----------------------------------------------------------------------------------------------


def test_each_teacher_s_class_term_takes_its_share_of_that_teacher_s_statistics_term():
    from fedkd.coordinator.methods.cudfkd import mixed_statistics

    fs = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([True, True, True, False])  # the last computes neither
    cs = torch.tensor([10.0, 0.0, 30.0, 0.0]), torch.tensor([True, False, True, False])  # the second: global only
    terms = {FEATURE_STATISTICS: fs, CLASS_FEATURE_STATISTICS: cs}
    assert float(mixed_statistics(terms, 1.0)) == pytest.approx((10 + 2 + 30) / 3)
    assert float(mixed_statistics(terms, 0.5)) == pytest.approx((5.5 + 2 + 16.5) / 3)
    assert float(mixed_statistics(terms, 0.0)) == pytest.approx(2.0)
    assert float(mixed_statistics({FEATURE_STATISTICS: fs}, 1.0)) == pytest.approx(2.0)
    assert mixed_statistics({FEATURE_STATISTICS: (torch.zeros(2), torch.zeros(2, dtype=torch.bool))}, 1.0) is None
    values = torch.tensor([1.0, 2.0, 3.0, 0.0], requires_grad=True)  # the gradient reaches each member's value
    mixed_statistics({FEATURE_STATISTICS: (values, fs[1]), CLASS_FEATURE_STATISTICS: cs}, 0.25).backward()
    assert values.grad.tolist() == pytest.approx([0.75 / 3, 1 / 3, 0.75 / 3, 0.0])


# A run ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_over_grpc_with_class_statistics_uses_them_beside_the_global_ones(tmp_path):
    """Teacher agents as processes on 127.0.0.1 (fedkd run's transport=grpc): the run computes the statistics, each
    agent is told to release them, and the term's values and gradients cross the wire."""
    from fedkd.server.loopback import grpc_transport

    from fedkd.coordinator.experiment import run_experiment

    config = config_from_mapping({"dataset": "digits", "num-clients": 2, "teacher-epochs": 2, "epochs": 1,
                                  "student-refit": 0, "query-budget": 4_000, "num-threads": 1,
                                  "teacher-class-statistics": True, "transport": "grpc"})
    out = run_experiment(config, tmp_path / "run", transport=grpc_transport)
    assert out["transport"] == "grpc"
    for k in (0, 1):
        stored = torch.load(tmp_path / "run" / "clients" / f"client_{k:02d}" / "teacher.pt", weights_only=True)
        assert stored["class_statistics"]
    report = out["method_report"]
    assert report["class_feature_statistics"] == (
        "used, from client(s) 0, 1 (share 1; by the label counts 5% of the teachers never saw a class)")
    assert report["feature_statistics"] == "used, from client(s) 0, 1"
    # the teachers' Backward (logits and both terms) passed the coordinator's gradient checks
    for teacher in out["ensemble"]["teachers"]:
        assert teacher["gradient_checks"] > 0 and teacher["gradient_weight"] == 1.0
    assert all(client["backward_calls"] > 0 for client in out["queries"]["per_client"])



@pytest.mark.parametrize("unseen, used", [(0.15, False), (1.0, True)])
def test_under_strong_label_skew_the_coordinator_weighs_the_global_statistics_alone(tmp_path, unseen, used):
    """Two clients of two classes each (half of the (teacher, class) pairs over the classes held are unseen): the
    per-class term is not asked for unless cudfkd.class-statistics-unseen allows that skew."""
    from fedkd.coordinator.experiment import run_experiment

    config = config_from_mapping({"dataset": "digits", "num-clients": 2, "partition": "pathological",
                                  "classes-per-client": 2, "teacher-epochs": 1, "epochs": 1, "student-refit": 0,
                                  "query-budget": 2_000, "num-threads": 1, "teacher-class-statistics": True,
                                  "cudfkd.class-statistics-unseen": unseen})
    report = run_experiment(config, tmp_path / "run")["method_report"]
    if used:
        assert report["class_feature_statistics"] == (
            "used, from client(s) 0, 1 (share 1; by the label counts 50% of the teachers never saw a class)")
    else:
        assert report["class_feature_statistics"] == (
            "not used (by the label counts 50% of the teachers never saw a class; they are weighed below 15%: "
            "cudfkd.class-statistics-unseen)")
    assert report["feature_statistics"] == "used, from client(s) 0, 1"
