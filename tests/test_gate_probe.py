"""The gate probe of issue 28 (simulations/gate_probe.py): its ensemble and its unknown-to-all share."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import gate_probe  # noqa: E402


def _logits(known: list[float], unknown: list[float]) -> torch.Tensor:
    """(K=2, B=len, C + 1 = 3): class 0 for teacher 0, class 1 for teacher 1, the unknown logit given."""
    rows = []
    for k, (own, unk) in enumerate(zip(known, unknown)):
        row = torch.full((1, 3), -5.0)
        row[0, k], row[0, 2] = own, unk
        rows.append(row)
    return torch.stack([torch.cat([r] * 2) for r in rows])  # the same two inputs for both teachers


def test_a_gate_of_ones_is_the_plain_ensemble_and_a_gate_picks_a_teacher():
    logits = _logits([4.0, 4.0], [0.0, 0.0])
    weights, has = torch.full((2, 2), 0.5), torch.tensor([True, True])
    plain = gate_probe.combine(logits, weights, has, 2)
    assert torch.allclose(gate_probe.combine(logits, weights, has, 2, torch.ones(2, 2)), plain)
    picked = gate_probe.combine(logits, weights, has, 2, torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    assert picked.argmax(1).tolist() == [1, 1]  # only teacher 1's vote counts


def test_unknown_to_all_counts_the_inputs_no_teacher_calls_its_own():
    nobody = _logits([0.0, 0.0], [6.0, 6.0])
    somebody = _logits([6.0, 0.0], [0.0, 6.0])
    assert gate_probe.unknown_to_all(nobody, 2) == 1.0
    assert gate_probe.unknown_to_all(somebody, 2) == 0.0


@pytest.mark.slow
def test_the_student_ceiling_trains_the_run_s_student_on_real_images_three_ways(tmp_path, capsys):
    """simulations/student_ceiling.py on a finished digits run: its ensemble is the run's, and the three students
    (soft answers, the ensemble's class, the true labels) train with the run's own schedule."""
    import json

    import student_ceiling

    from fedkd.cli import main

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "dataset=digits", "--set", "num-clients=2", "--set",
                 "partition=iid", "--set", "teacher-epochs=10", "--set", "epochs=1", "--set", "steps-per-epoch=4",
                 "--set", "student-steps=1", "--set", "batch-size=32", "--set", "generator-width=4", "--set",
                 "latent-dim=8"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    # 4 x 1 steps would teach nothing: the ceiling takes the run's keys with the student's schedule changed
    out = student_ceiling.ceiling(run, student_ceiling.parse_assignments(["student-steps=50"]))
    assert set(out) == {"ensemble", "ensemble on train", "kd", "hard", "labels"}
    assert abs(out["ensemble"] - summary["ensemble"]["test_accuracy"]) <= 0.02
    assert out["labels"] > 0.5 and out["hard"] > 0.3  # 200 steps of the true labels learn digits; chance is 0.1


@pytest.mark.slow
def test_pool_targets_trains_the_run_s_student_on_its_own_pool_with_each_aggregation(tmp_path):
    """simulations/pool_targets.py on a finished digits run: the final pool read back, the same teachers'
    answers combined each way (class weights raised to 0 are the plain probability mean), a student per way."""
    import json

    import pool_targets

    from fedkd.cli import main

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "dataset=digits", "--set", "num-clients=2", "--set",
                 "partition=iid", "--set", "teacher-epochs=10", "--set", "epochs=1", "--set", "steps-per-epoch=4",
                 "--set", "student-steps=5", "--set", "batch-size=32", "--set", "generator-width=4", "--set",
                 "latent-dim=8", "--set", "reliability=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["targets"]: r for r in pool_targets.pool_targets(run, ["stored", "class-weighted", "pow0", "prob-mean"])}
    assert all(r["pool"] == summary["pool"]["samples"] == 4 * 32 for r in rows.values())
    assert rows["stored"]["ensemble_on_test"] is None
    # the run's own rule, recomputed from the teachers' files, scores what the run reported
    assert rows["class-weighted"]["ensemble_on_test"] == summary["ensemble"]["test_accuracy"]
    assert rows["pow0"]["ensemble_on_test"] == rows["prob-mean"]["ensemble_on_test"]
    assert all(0.0 <= r["student"] <= 1.0 and 0.1 <= r["mean_top_probability_on_pool"] <= 1.0 for r in rows.values())


@pytest.mark.slow
def test_refit_probe_refits_the_run_s_student_on_its_pool_and_on_each_kind_of_extra_samples(tmp_path):
    """simulations/refit_probe.py on a finished digits run: the pool alone (and its weight averages), another
    loss, the pool plus blends answered by the teachers, by refitted students (no query), and plus fresh samples of
    the run's final generator, and plus the pool's mirror images (stored answers, or the teachers'); the refit of
    the pool is the same when asked again."""
    import json

    import refit_probe

    from fedkd.cli import main

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "dataset=digits", "--set", "num-clients=2", "--set",
                 "partition=iid", "--set", "teacher-epochs=10", "--set", "epochs=1", "--set", "steps-per-epoch=4",
                 "--set", "student-steps=5", "--set", "batch-size=32", "--set", "generator-width=4", "--set",
                 "latent-dim=8", "--set", "reliability=false", "--set", "student-refit=2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    pool = summary["pool"]["samples"]
    assert pool == 4 * 32
    rows = {r["variant"]: r for r in refit_probe.refit_probe(run, ["pool", "mse", "kl2", "blends", "surrogate",
                                                                   "fresh", "flips", "flipsq", "jacobian",
                                                                   "jacobian-logits", "ods8", "blends-runner-up"],
                                                             students=2)}
    assert set(rows) == {"pool", "ema", "swa", "mse", "kl2", "blends", "surrogate", "fresh", "flips", "flipsq",
                         "jacobian", "jacobian-logits", "ods8", "blends-runner-up"}
    assert all(r["steps"] == 2 * 4 * 5 for r in rows.values())  # student-refit's share of the run's steps
    assert all(rows[v]["samples"] == pool for v in ("pool", "ema", "swa", "mse", "kl2", "jacobian",
                                                        "jacobian-logits"))
    assert rows["jacobian"]["extra_query_samples"] == 2 * pool * 2  # a Forward and a Backward by both teachers
    assert rows["jacobian-logits"]["extra_query_samples"] == pool * 2  # a Backward by both
    assert rows["ods8"]["samples"] == 2 * pool
    assert rows["ods8"]["extra_query_samples"] == 2 * pool * 2  # a Backward, then a Forward of the moved image
    assert 0.0 < rows["ods8"]["mean_pixel_change"] <= 8 / 255 + 1e-6
    assert 0.0 <= rows["ods8"]["agreement_with_stored"] <= 1.0
    assert all(rows[v]["samples"] == 2 * pool for v in ("blends", "surrogate", "fresh", "flips", "flipsq",
                                                        "blends-runner-up"))
    assert (rows["blends"]["extra_query_samples"] == rows["fresh"]["extra_query_samples"]
            == rows["flipsq"]["extra_query_samples"] == rows["blends-runner-up"]["extra_query_samples"] == 2 * pool)
    assert sum(rows["blends-runner-up"]["classes"]) == pool
    assert rows["surrogate"]["extra_query_samples"] == rows["flips"]["extra_query_samples"] == 0
    assert 0.0 <= rows["flipsq"]["agreement_with_stored"] <= 1.0
    assert rows["surrogate"]["students"][0] == rows["pool"]["student"]  # the surrogate's first student is the pool's
    assert len(rows["surrogate"]["students"]) == 2
    assert 0.0 <= rows["surrogate"]["agreement_with_teachers"] <= 1.0
    assert 0.1 <= rows["fresh"]["mean_top_probability"] <= 1.0
    assert all(0.0 <= r["student"] <= 1.0 for r in rows.values())
    # each row's recall per class, in class order, makes up its accuracy (weighted by the test images per class)
    from fedkd.data import load_dataset
    saved = json.loads((run / "config.json").read_text())
    test = load_dataset("digits", saved.get("data-root") or "data", seed=saved["seed"]).test
    held = torch.bincount(test.labels, minlength=10).float()
    for r in rows.values():
        assert len(r["recall"]) == 10 and all(0.0 <= x <= 1.0 for x in r["recall"])
        assert abs(float(torch.tensor(r["recall"]) @ held / held.sum()) - r["student"]) < 2e-3
    # the pool's thin classes filled with real training images, or with pool images moved towards them
    filled = {r["variant"]: r for r in refit_probe.refit_probe(run, ["fill-real", "fill"])}
    need = refit_probe.thin_classes(torch.load(run / "checkpoint.pt", weights_only=False)["method"]["pool"][
        "answers"].float())
    assert {k: r["filled"] for k, r in filled.items()} == {k: {str(c): n for c, n in need.items()} for k in filled}
    assert filled["fill-real"]["samples"] == filled["fill"]["samples"] == pool + sum(need.values())
    assert filled["fill-real"]["extra_query_samples"] == 2 * sum(need.values())  # one Forward by both teachers
    assert filled["fill"]["extra_query_samples"] == 2 * sum(need.values()) * (1 + 2 * refit_probe.FILL_STEPS)
    again = refit_probe.refit_probe(run, ["pool"])
    assert again[0]["variant"] == "pool" and again[0]["student"] == rows["pool"]["student"]
    # another task's natural images (MNIST-5k's 5,000, resized to digits' 8x8), each answered by both teachers
    proxy = refit_probe.refit_probe(run, ["proxy"])[0]
    assert proxy["variant"] == "proxy" and proxy["samples"] == pool + 5000
    assert proxy["extra_query_samples"] == 5000 * 2 and sum(proxy["proxy_classes"]) == 5000
    assert 0.1 <= proxy["proxy_mean_top_probability"] <= 1.0 and 0.0 <= proxy["student"] <= 1.0


def test_the_refit_probe_s_blends_are_quantised_pool_pairs():
    import refit_probe

    images = torch.rand(64, 1, 8, 8)
    blends = refit_probe.blends_of(images, 0)
    assert blends.shape == images.shape
    assert torch.equal(blends, refit_probe.blends_of(images, 0))
    assert torch.allclose(blends * 255, torch.round(blends * 255))
    assert float(blends.min()) >= 0.0 and float(blends.max()) <= 1.0


def test_the_refit_probe_s_runner_up_blends_join_each_image_to_the_class_its_answer_ranks_second():
    import refit_probe

    # Each pool image is one-hot on the channel of its class, so a blend shows which two classes it joins. Class k's
    # answers rank class k + 1 second; class 5 has no image, so class 4's partners are drawn at random.
    labels = torch.arange(5).repeat(40)
    images = torch.nn.functional.one_hot(labels, 6).float().view(-1, 6, 1, 1)
    stored = 5.0 * torch.nn.functional.one_hot(labels, 6) + 2.0 * torch.nn.functional.one_hot(labels + 1, 6)
    blends = refit_probe.blends_of(images, 0, stored)
    assert blends.shape == images.shape and torch.equal(blends, refit_probe.blends_of(images, 0, stored))
    assert torch.allclose(blends * 255, torch.round(blends * 255))
    mass = blends.flatten(1)  # (N, 6): w on the first image's class, 1 - w on its partner's
    assert torch.allclose(mass.sum(1), torch.ones(len(mass)), atol=1.5 / 255)
    pairs = [frozenset(torch.nonzero(m > 0.5 / 255).flatten().tolist()) for m in mass]
    pairs = [j for j in pairs if len(j) == 2]  # a weight rounding to 0 or 1 shows one class only
    assert len(pairs) > len(mass) // 2
    aimed = {j for j in pairs if 4 not in j}  # random pairs would join 0 and 2, 1 and 3, ...
    assert aimed == {frozenset({0, 1}), frozenset({1, 2}), frozenset({2, 3})}
    assert {j for j in pairs if 4 in j} - {frozenset({3, 4})}  # class 4's runner-up is empty: random partners


def test_the_refit_probe_s_runner_up_partners_are_of_the_runner_up_class_and_random_where_the_pool_has_none():
    import refit_probe

    # Five classes of answers; class k ranks k + 1 second, except class 1, which ranks 3 second; no answer is of 4.
    top = torch.arange(4).repeat(30)
    second = torch.where(top == 1, torch.tensor(3), top + 1)
    answers = 4.0 * torch.nn.functional.one_hot(top, 5) + torch.nn.functional.one_hot(second, 5) \
        + 0.1 * torch.rand(len(top), 5, generator=torch.Generator().manual_seed(1))
    first = torch.randint(0, len(top), (2000,), generator=torch.Generator().manual_seed(2))
    partners = refit_probe.runner_up_partners(first, answers, torch.Generator().manual_seed(3))
    assert torch.equal(partners, refit_probe.runner_up_partners(first, answers, torch.Generator().manual_seed(3)))
    aimed = top[first] != 3  # class 3's runner-up (4) has no sample: its partners are drawn from the whole pool
    assert torch.equal(top[partners][aimed], second[first][aimed])
    drawn = top[partners][~aimed]
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    # every sample of the runner-up class takes its turn: the partners of class 0 cover all 30 samples of class 1
    assert set(partners[top[first] == 0].tolist()) == set((top == 1).nonzero().flatten().tolist())


def test_the_refit_probe_s_output_diversified_step_moves_each_image_by_the_step_up_its_random_direction():
    """ods_of: every pixel moves by at most the step (quantised, within [0, 1]); the same seed gives the same images;
    and the move raises w . (the class-share-weighted centred logits) for each image's own random w."""
    import refit_probe

    from fedkd.data import DatasetSpec

    torch.manual_seed(0)
    spec = DatasetSpec(name="t", num_classes=3, channels=1, image_size=6, mean=(0.5,), std=(0.25,))
    teachers = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3)) for _ in range(2)]
    weights = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]])
    images = torch.round(torch.rand(40, 1, 6, 6) * 200 + 20) / 255  # away from 0 and 1: no pixel clamped
    step = refit_probe.ods_step("ods8")
    assert step == 8 / 255 and refit_probe.ods_step("odsx") is None and refit_probe.ods_step("pool") is None
    moved = refit_probe.ods_of(teachers, weights, spec, images, step, seed=3)
    assert torch.equal(moved, refit_probe.ods_of(teachers, weights, spec, images, step, seed=3))
    assert not torch.equal(moved, refit_probe.ods_of(teachers, weights, spec, images, step, seed=4))
    assert torch.allclose(moved * 255, torch.round(moved * 255))
    assert float((moved - images).abs().max()) <= step + 1e-6
    w = torch.Generator().manual_seed(3)
    directions = torch.rand(40, 3, generator=w) * 2 - 1

    def value(x):
        with torch.no_grad():
            return sum((weights[k][None, :] * directions * refit_probe.centred(t(spec.normalize(x)))).sum(1)
                       for k, t in enumerate(teachers))

    assert float((value(moved) - value(images)).min()) > 0


def test_the_refit_probe_s_ensemble_gradients_are_unit_directions_of_steepest_ascent_of_what_they_are_of():
    """For the ensemble's log p_ens(class | x) and for the class-share-weighted centred logits: each direction has
    unit length, a small step along it raises the quantity, and no random unit direction raises it faster (central
    differences)."""
    import refit_probe
    from gate_probe import combine

    from fedkd.data import DatasetSpec

    torch.manual_seed(0)
    spec = DatasetSpec(name="t", num_classes=3, channels=1, image_size=6, mean=(0.5,), std=(0.25,))
    teachers = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3)).double() for _ in range(2)]
    weights = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]], dtype=torch.float64)
    has_unknown = torch.tensor([False, False])
    images = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 0, 1])
    x = spec.normalize(images)
    step = 1e-4

    def logp(x):
        with torch.no_grad():
            rows = torch.stack([t(x) for t in teachers])
            return combine(rows, weights, has_unknown, 3).gather(1, classes[:, None]).squeeze(1)

    def weighted_logit(x):
        with torch.no_grad():
            rows = refit_probe.centred(torch.stack([t(x) for t in teachers]))  # (K, B, C)
            return (weights[:, classes] * rows.gather(2, classes.view(1, -1, 1).expand(2, -1, 1)).squeeze(-1)).sum(0)

    for of, value in (("log-probability", logp), ("logits", weighted_logit)):
        g = refit_probe.ensemble_gradients(teachers, weights, has_unknown, spec, images, classes, of)
        assert torch.allclose(g.flatten(1).norm(dim=1), torch.ones(5, dtype=torch.float64))
        slope = (value(x + step * g) - value(x - step * g)) / (2 * step)  # along g: the gradient's norm, > 0
        assert bool((slope > 0).all())
        other = refit_probe.unit(torch.randn_like(g))
        assert bool(((value(x + step * other) - value(x - step * other)) / (2 * step) <= slope + 1e-6).all())
    assert not torch.allclose(g, refit_probe.ensemble_gradients(teachers, weights, has_unknown, spec, images,
                                                                classes))  # two different quantities


def test_the_refit_probe_names_an_unknown_variant(tmp_path, capsys):
    import refit_probe

    with pytest.raises(SystemExit) as exit_:
        refit_probe.main([str(tmp_path), "--variants", "pool,ods0"])  # a step of 0 moves nothing: not a variant
    assert exit_.value.code == 2
    assert "unknown variant 'ods0'" in capsys.readouterr().err


def test_the_refit_probe_s_standardised_loss_ignores_the_scale_and_offset_of_either_side_s_logits():
    """``lsT`` (logit standardisation, Sun et al., CVPR 2024): each row z-scored before KL at T, so a teacher
    twice as sure, or shifted, teaches the same; plain KL does not."""
    import refit_probe

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10) * 3
    z = refit_probe.standardised(teacher)
    assert torch.allclose(z.mean(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(z.std(1), torch.ones(6), atol=1e-5)
    ls2, kl2 = refit_probe.loss_of("ls2"), refit_probe.loss_of("kl2")
    base = ls2(student, teacher, "kl", 4.0)
    assert torch.allclose(ls2(student, 2.5 * teacher + 7.0, "kl", 4.0), base, atol=1e-5)
    assert torch.allclose(ls2(3.0 * student - 1.0, teacher, "kl", 4.0), base, atol=1e-5)
    assert not torch.allclose(kl2(student, 2.5 * teacher, "kl", 4.0), kl2(student, teacher, "kl", 4.0))
    assert not torch.allclose(refit_probe.loss_of("ls1")(student, teacher, "kl", 4.0), base)
    assert bool((base > 0).all())
    assert torch.allclose(ls2(teacher, teacher, "kl", 4.0), torch.zeros(6), atol=1e-6)


def test_the_refit_probe_s_balanced_draw_weighs_every_ensemble_class_alike():
    import refit_probe

    answers = torch.zeros(10, 3)
    answers[:6, 0] = 1.0  # six samples of class 0, three of class 1, one of class 2
    answers[6:9, 1] = 1.0
    answers[9, 2] = 1.0
    chance = refit_probe.balanced_chance(answers)
    per_class = torch.zeros(3).index_add_(0, answers.argmax(1), chance)
    assert torch.allclose(per_class, torch.ones(3))
    assert float(chance[9]) == 1.0 and abs(float(chance[0]) - 1 / 6) < 1e-7


def test_the_refit_probe_fills_the_classes_its_pool_barely_holds_up_to_half_a_balanced_share():
    """thin_classes: per class under half of a balanced pool's share (by the answers' argmax), how many more
    bring it there; fill_real takes that many of the task's own training images of each such class."""
    from types import SimpleNamespace

    import refit_probe

    answers = torch.zeros(100, 4)
    answers[:60, 0] = answers[60:95, 1] = answers[95:, 2] = 5.0  # 60, 35, 5 and 0 of 100; half a share is 12
    assert refit_probe.thin_classes(answers) == {2: 7, 3: 12}
    assert refit_probe.thin_classes(answers, share=0.2) == {3: 5}  # class 2's 5 is the floor itself: not thin
    assert refit_probe.thin_classes(answers[:60]) == {1: 7, 2: 7, 3: 7}  # one class alone: every other is thin
    labels = torch.arange(40) % 4
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 4  # each image tells its class
    split = SimpleNamespace(train=SimpleNamespace(images=images, labels=labels))
    filled = refit_probe.fill_real(split, {2: 7, 3: 3}, seed=0)
    assert filled.shape == (10, 1, 2, 2)
    assert torch.equal(filled[:7, 0, 0, 0] * 4, torch.full((7,), 2.0))  # class 2's images, then class 3's
    assert torch.equal(filled[7:, 0, 0, 0] * 4, torch.full((3,), 3.0))
    assert torch.equal(filled, refit_probe.fill_real(split, {2: 7, 3: 3}, seed=0))  # seeded
    assert refit_probe.fill_real(split, {}, seed=0).shape == (0, 1, 2, 2)  # nothing thin, nothing added


def test_the_refit_probe_s_synthetic_fill_moves_the_surest_pool_images_towards_the_thin_class():
    """fill_synthetic starts from the pool images the stored answers give the highest p(k) and moves them by Adam
    steps on the pixels against the ensemble: the ensemble gives k a higher mean probability after; the images
    stay quantised in [0, 1], one per sample asked, and the teachers' BatchNorm hooks are removed after."""
    import refit_probe

    from fedkd.data import DatasetSpec

    torch.manual_seed(0)
    spec = DatasetSpec("toy", 3, 1, 8, (0.5,), (0.5,))
    teachers = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(256, 3)).eval() for _ in range(2)]
    weights, has_unknown = torch.full((2, 3), 0.5), torch.tensor([False, False])
    images = torch.round(torch.rand(40, 1, 8, 8) * 255) / 255
    stored = gate_probe.combine(gate_probe.answers(teachers, spec.normalize(images)), weights, has_unknown, 3)
    k = int(stored.exp().mean(0).argmin())  # the class the ensemble gives least
    start = images[stored[:, k].argsort(descending=True)[:6]]

    def p_k(x: torch.Tensor) -> float:
        logp = gate_probe.combine(gate_probe.answers(teachers, spec.normalize(x)), weights, has_unknown, 3)
        return float(logp[:, k].exp().mean())

    moved = refit_probe.fill_synthetic(teachers, weights, has_unknown, spec, images, stored, {k: 6}, steps=15,
                                       lr=0.05, bn_weight=0.0, batch=4)
    assert moved.shape == (6, 1, 8, 8)
    assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0
    assert torch.allclose(moved * 255, torch.round(moved * 255))
    assert p_k(moved) > p_k(start) + 0.05
    with_bn = refit_probe.fill_synthetic(teachers, weights, has_unknown, spec, images, stored, {k: 6}, steps=15,
                                         lr=0.05, bn_weight=1.0, batch=4)
    assert with_bn.shape == (6, 1, 8, 8) and not torch.equal(with_bn, moved)  # the statistics term pulls too
    assert all(not m._forward_hooks for t in teachers for m in t.modules())


def test_the_refit_probe_s_climbs_raise_each_image_s_log_density_and_each_takes_its_own_teacher_in_turn():
    import refit_probe

    from fedkd.data import SPECS
    from fedkd.institution.density import WithDensity, fit_density

    assert [refit_probe.onto_steps(v) for v in ("onto10", "ontoeach3", "ontobb2", "onto0", "ontox", "pool")] == [
        (10, False, False), (3, True, False), (2, True, True), None, None, None]
    spec = SPECS["digits"]
    g = torch.Generator().manual_seed(0)
    bright = torch.zeros(40, 1, 8, 8)  # client 0: bright on the left half, client 1: on the right
    bright[:20, :, :, :4], bright[20:, :, :, 4:] = 0.9, 0.9
    real = (bright + 0.05 * torch.randn(40, 1, 8, 8, generator=g)).clamp(0, 1)
    teachers = [WithDensity(torch.nn.Flatten(), fit_density(spec.normalize(real[i:i + 20]),
                                                            torch.zeros(20, dtype=torch.long), 10, rank=3))
                for i in (0, 20)]
    images = torch.rand(8, 1, 8, 8, generator=g)
    for each, bb in ((False, False), (True, False), (True, True)):
        moved, before, after = refit_probe.onto_densities(teachers, torch.tensor([20.0, 20.0]), spec, images, 5,
                                                          each=each, bb=bb)
        assert moved.shape == images.shape and torch.allclose(moved * 255, torch.round(moved * 255))
        assert bool((after > before).all()), (each, bb)
        if each:  # image i went to client i mod 2's data: brighter on its own half
            left = moved[..., :4].mean((1, 2, 3)) > moved[..., 4:].mean((1, 2, 3))
            assert left.tolist() == [True, False] * 4, (each, bb)


def test_the_refit_probe_draws_each_teacher_s_classes_in_turn_with_each_class_s_own_spread():
    """``drawn``: image i is a probabilistic-PCA draw of the i-th (teacher, component) pair: near that component's
    mean, spread along its principal direction as its variance says, likelier under it than under the others."""
    import refit_probe

    from fedkd.data import SPECS
    from fedkd.institution.density import WithDensity, fit_density

    spec = SPECS["digits"]
    g = torch.Generator().manual_seed(0)
    real, labels = torch.zeros(400, 1, 8, 8), torch.arange(400) % 2
    base = torch.rand(400, generator=g)  # class 1 varies only along one direction, with a spread of 0.3
    real[labels == 0, :, :4] = 0.8  # client 0, class 0: the top half bright, barely varying
    real[labels == 1, :, :, :4] = 0.2 + 0.6 * base[labels == 1].view(-1, 1, 1, 1)  # class 1: the left half
    real = (real + 0.01 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    density = fit_density(spec.normalize(real), labels, 10, rank=2)
    teachers = [WithDensity(torch.nn.Flatten(), density), WithDensity(torch.nn.Flatten(), density)]
    drawn = refit_probe.drawn_from_densities(teachers, spec, 2000, seed=5)
    assert drawn.shape == (2000, 1, 8, 8) and torch.allclose(drawn * 255, torch.round(drawn * 255))
    assert torch.equal(drawn, refit_probe.drawn_from_densities(teachers, spec, 2000, seed=5))  # deterministic
    pair = torch.arange(2000) % 4  # (teacher 0, class 0), (0, 1), (1, 0), (1, 1)
    for component in (0, 1):
        mine = drawn[pair % 2 == component]
        mean = real[labels == component].mean(0)
        assert float((mine.mean(0) - mean).abs().max()) < 0.05, component
        scores = density.components(spec.normalize(mine))  # (2, N): each draw likelier under its own class
        assert float((scores[component] > scores[1 - component]).float().mean()) > 0.99, component
    left = drawn[pair % 2 == 1][:, :, :, :4].mean((1, 2, 3))  # class 1's own spread along its direction
    truth = real[labels == 1][:, :, :, :4].mean((1, 2, 3))
    assert 0.7 < float(left.std() / truth.std()) < 1.3
    assert float(drawn[pair % 2 == 0][:, :, :4].mean((1, 2, 3)).std()) < 0.05  # class 0 barely varies


def test_the_refit_probe_refits_each_density_at_another_rank_and_climbs_fresh_draws(tmp_path):
    """``--density-rank``: each client's density fitted again on its own share (at the run's rank, the same
    density; at another, another); ``-fresh``: the generator's fresh draws climb in place of the pool's copies, at
    the same queries, with no stored answer to agree with."""
    import json

    import refit_probe

    from fedkd.cli import main
    from fedkd.config import config_from_mapping
    from fedkd.data import load_dataset
    from fedkd.institution.density import DEFAULT_RANK

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "dataset=digits", "--set", "num-clients=2", "--set",
                 "partition=iid", "--set", "teacher-epochs=2", "--set", "epochs=1", "--set", "steps-per-epoch=2",
                 "--set", "student-steps=2", "--set", "batch-size=32", "--set", "generator-width=4", "--set",
                 "latent-dim=8", "--set", "teacher-density=true", "--set", "student-refit=1"]) == 0
    saved = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if v is not None}
    config = config_from_mapping(saved)
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    teachers, _, _ = refit_probe.run_teachers(run, 10)
    x = split.spec.normalize(split.test.images[:50])
    same = refit_probe.with_density_rank(teachers, config, split, DEFAULT_RANK)
    other = refit_probe.with_density_rank(teachers, config, split, 2)
    for mine, again, low in zip(teachers, same, other, strict=True):
        assert again.classifier is mine.classifier
        assert torch.allclose(again.density(x), mine.density(x), atol=1e-4)
        assert not torch.allclose(low.density(x), mine.density(x), atol=1e-2)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        refit_probe.with_density_rank(teachers, config, split, -1)
    pool = json.loads((run / "summary.json").read_text())["pool"]["samples"]
    rows = {r["variant"]: r for r in refit_probe.refit_probe(run, ["ontoclass1", "ontoclass1-fresh", "drawn"],
                                                             density_rank=2)}
    # drawn: as many images drawn from the densities as the pool holds, each answered once by every teacher
    assert rows["drawn"]["samples"] == 2 * pool and rows["drawn"]["extra_query_samples"] == 2 * pool
    assert sum(rows["drawn"]["classes"]) == pool and 0.0 <= rows["drawn"]["student"] <= 1.0
    assert rows["ontoclass1-fresh"]["samples"] == rows["ontoclass1"]["samples"] == 2 * pool
    assert rows["ontoclass1-fresh"]["extra_query_samples"] == rows["ontoclass1"]["extra_query_samples"]
    assert rows["ontoclass1-fresh"]["agreement_with_stored"] is None
    assert 0.0 <= rows["ontoclass1"]["agreement_with_stored"] <= 1.0
    assert rows["ontoclass1-fresh"]["mean_pixel_change"] != rows["ontoclass1"]["mean_pixel_change"]
