"""Pool samples that climb a client's density before the refit (student-refit-climb): the steps, and the run that
asks for them through the query contract."""

import json
import math

import pytest
import torch
from test_experiment import Interrupt, StageLog, StopAtStage

from fedkd.config import config_from_mapping
from fedkd.coordinator.climb import FIRST_MOVE, climb
from fedkd.coordinator.experiment import run_experiment
from fedkd.coordinator.rundir import QUERY_LEDGER, read_query_ledger
from fedkd.data import SPECS
from fedkd.institution.loading import load_teacher
from fedkd.options import ConfigError


def gaussian(mean, variances):
    """The input gradient of log N(mean, diag(variances)), per sample."""
    return lambda z: -(z - mean) / variances


def test_two_steps_reach_the_mean_of_an_isotropic_gaussian_whatever_its_scale():
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mean = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for variance in (1e-3, 1.0, 50.0):  # the step needs no knowledge of it
        moved, taken = climb(x, gaussian(mean, torch.full((1, 1, 4, 4), variance)), 2)
        assert taken == 2
        torch.testing.assert_close(moved, mean.expand_as(x), atol=1e-4 * max(1.0, variance), rtol=0)


def test_the_first_step_is_a_small_move_and_two_steps_take_the_narrow_directions_not_the_wide_ones():
    # a density that is wide along 2 of 16 values and narrow along the rest (a client's principal directions
    # and the variance off them): the climb removes what lies off, and keeps most of what lies along
    variances = torch.full((1, 1, 4, 4), 0.01)
    variances.view(-1)[:2] = 4.0
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    one, _ = climb(x, gaussian(0.0, variances), 1)
    rms = float((one - x).flatten(1).pow(2).mean(1).sqrt().mean())
    assert rms == pytest.approx(FIRST_MOVE, rel=1e-4)
    two, _ = climb(x, gaussian(0.0, variances), 2)
    off, along = two.flatten(1)[:, 2:], two.flatten(1)[:, :2]
    assert float(off.abs().max()) < 0.05 * float(x.flatten(1)[:, 2:].abs().max())
    kept = along.norm(dim=1) / x.flatten(1)[:, :2].norm(dim=1)
    assert float(kept.min()) > 0.95


def test_an_image_with_a_gradient_that_is_not_finite_stays_where_it_was_and_no_answer_stops_the_climb():
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def broken(z):
        g = -z.clone()
        g[1] = float("nan")
        return g

    moved, taken = climb(x, broken, 3)
    assert taken == 3 and torch.equal(moved[1], x[1]) and bool(torch.isfinite(moved).all())
    assert float(moved[0].norm()) < float(x[0].norm())  # the others climbed
    calls = []

    def silent_after_one(z):
        calls.append(1)
        return -z if len(calls) == 1 else None

    moved, taken = climb(x, silent_after_one, 5)
    assert taken == 1 and len(calls) == 2
    with pytest.raises(ValueError, match=r"gradient of shape \(3, 4\) for inputs of shape \(3, 1, 2, 2\)"):
        climb(x, lambda z: torch.zeros(3, 4), 1)


def test_the_climb_is_on_by_default_and_needs_the_refit_it_makes_samples_for():
    assert config_from_mapping({}).student.refit_climb == 2  # acting only where teachers answer densities
    assert config_from_mapping({"student-refit": 0}).student.refit_climb == 2  # no refit: nothing to climb for
    with pytest.raises(ConfigError, match="student-refit-climb"):
        config_from_mapping({"student-refit-climb": 21})


PATHOLOGICAL = {"dataset": "digits", "partition": "pathological", "classes-per-client": 2, "teacher-epochs": 10,
                "epochs": 1, "steps-per-epoch": 10, "student-refit": 1, "num-threads": 1, "teacher-density": True}


def _stopped_after_the_climb_and_resumed(settings, out):
    """A run stopped once the climb's samples are answered and checkpointed (before the refit), then resumed:
    (summary, the epochs' metrics, the refit's record, the resumed run's log); every pool sample was answered."""
    with pytest.raises(Interrupt):
        run_experiment(config_from_mapping(settings), out, observer=StopAtStage("student-refit-climb"))
    log = StageLog()
    summary = run_experiment(config_from_mapping(settings), out, resume=True, observer=log)
    *runs, record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["refit_climbs"] == summary["pool"]["samples"] == summary["student"]["refit"]["climbs"]
    return summary, runs, record, log


def test_the_pool_climbs_each_teachers_density_in_turn_counted_asked_once_and_answered(tmp_path):
    out = tmp_path / "climb"  # the climb, not draws
    summary, runs, record, log = _stopped_after_the_climb_and_resumed(
        {**PATHOLOGICAL, "student-refit-climb": 2, "student-refit-draw": False}, out)
    pool = summary["pool"]["samples"]
    assert record["refit_samples"] == 2 * pool
    # each sample: 2 steps of a Forward and a Backward of one teacher, then a Forward of each of the 5 teachers;
    # counted once (the resume asked nothing again)
    assert summary["queries"]["samples"] == record["query_samples"] == runs[-1]["query_samples"] + pool * (4 + 5)
    assert any("pool samples climbed a teacher's density" in m and "kept from before the restart" in m
               for m in log.messages)
    # sample i climbed teacher k = i mod 5's density, the part of it of the (i div 5) mod 2-th of its two classes:
    # under that class's component, every climbed sample is likelier than where it began, and so under the density
    method = torch.load(out / "checkpoint.pt", weights_only=False)["method"]
    start, climbed = (method[k]["images"][:pool].float() / 255 for k in ("pool", "climbs"))
    loaded = [load_teacher(out / "clients" / f"client_{k:02d}" / "teacher.pt") for k in range(5)]
    spec = SPECS["digits"]  # the teachers take normalised inputs
    intended = torch.zeros(pool, dtype=torch.long)
    with torch.no_grad():
        for k, (teacher, ckpt) in enumerate(loaded):
            held = [c for c, n in enumerate(ckpt["label_counts"]) if n > 0]
            assert len(held) == 2 and teacher.density.classes.tolist() == held  # the density records its classes
            for turn, label in enumerate(held):
                mine = (torch.arange(pool) % 5 == k) & ((torch.arange(pool) // 5) % 2 == turn)
                intended[mine] = label
                before, after = (teacher.density.of_class(spec.normalize(x[mine]), label) for x in (start, climbed))
                assert float((after > before).float().mean()) > 0.95, (k, label)
                whole = [teacher.density(spec.normalize(x[mine])) for x in (start, climbed)]
                assert float((whole[1] > whole[0]).float().mean()) > 0.95, (k, label)
    answered = method["climbs"]["answers"].argmax(1)
    assert not torch.equal(method["climbs"]["answers"], method["pool"]["answers"][:pool])
    # every class of the task gets its tenth of the climbs, and the ensemble calls most of them that class
    assert torch.bincount(intended, minlength=10).tolist() == [pool // 10] * 10
    print("climbs the ensemble calls the class they climbed:", float((answered == intended).float().mean()),
          torch.bincount(answered, minlength=10).tolist())
    assert float((answered == intended).float().mean()) > 0.5


def test_teachers_that_draw_give_their_share_as_draws_of_each_class_counted_once_and_answered(tmp_path):
    """student-refit-draw (on by default): where the teachers draw (a density, privacy-mode none), sample i of the
    climb's is instead a draw of teacher i mod 5's density, of its classes in turn: one Draw sample and a Forward
    of each teacher a sample, kept across a restart, most of them called the class they were drawn of."""
    out = tmp_path / "draw"
    summary, runs, record, log = _stopped_after_the_climb_and_resumed(PATHOLOGICAL, out)
    pool = summary["pool"]["samples"]
    assert summary["queries"]["samples"] == record["query_samples"] == runs[-1]["query_samples"] + pool * (1 + 5)
    assert any(f"{pool:,} samples drawn from a teacher's density and 0 pool samples climbed" in m
               and "kept from before the restart" in m for m in log.messages), log.messages
    ledger = read_query_ledger(out / QUERY_LEDGER, 5)
    assert [c["drawn_samples"] for c in ledger] == [pool // 5] * 5
    method = torch.load(out / "checkpoint.pt", weights_only=False)["method"]
    drawn = method["climbs"]["images"][:pool].float() / 255
    loaded = [load_teacher(out / "clients" / f"client_{k:02d}" / "teacher.pt") for k in range(5)]
    spec = SPECS["digits"]
    intended = torch.zeros(pool, dtype=torch.long)
    with torch.no_grad():
        for k, (teacher, ckpt) in enumerate(loaded):
            held = [c for c, n in enumerate(ckpt["label_counts"]) if n > 0]
            for turn, label in enumerate(held):
                mine = (torch.arange(pool) % 5 == k) & ((torch.arange(pool) // 5) % 2 == turn)
                intended[mine] = label
                own, other = (teacher.density.of_class(spec.normalize(drawn[mine]), c) for c in (label, held[1 - turn]))
                assert float((own > other).float().mean()) > 0.95, (k, label)
    answered = method["climbs"]["answers"].argmax(1)
    print("draws the ensemble calls the class they were drawn of:", float((answered == intended).float().mean()))
    assert float((answered == intended).float().mean()) > 0.6


def test_with_the_gate_off_the_pool_still_climbs_and_no_answer_but_the_climbs_own_carries_a_density(tmp_path):
    log = StageLog()
    summary = run_experiment(config_from_mapping({**PATHOLOGICAL, "density-gate": "off", "student-refit-draw": False}),
                             tmp_path / "off", observer=log)
    pool = summary["pool"]["samples"]
    assert summary["student"]["refit"]["climbs"] == pool
    assert any(m.startswith(f"student-refit-climb: {pool:,} pool samples climbed") for m in log.messages), log.messages
    # a density leaves a client only in the climb's own Forwards (2 steps of one teacher a sample): the pool's
    # answers and the climbed samples' are asked without it, as the gate off has them
    ledger = read_query_ledger(tmp_path / "off" / QUERY_LEDGER, 5)
    assert sum(c["density_samples"] for c in ledger) == 2 * pool
    assert all(c["density_samples"] > 0 for c in ledger)  # every client climbed
    assert math.isfinite(summary["student"]["test_accuracy"])
    # teachers without densities (most runs): the default climb neither asks nor says anything
    log = StageLog()
    summary = run_experiment(config_from_mapping({**PATHOLOGICAL, "teacher-density": False}), tmp_path / "closed",
                             observer=log)
    assert summary["student"]["refit"]["climbs"] == 0 and not any("climb" in m for m in log.messages)
    refit = [json.loads(line) for line in (tmp_path / "closed" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "refit_climbs" not in refit
    # the refit's steps grow with the climbed samples: twice the closed run's, each sample drawn as often
    climbed = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()][-1]
    assert climbed["refit_samples"] == 2 * refit["refit_samples"]
    assert climbed["refit_steps"] == 2 * refit["refit_steps"] == summary["student"]["refit"]["steps"] * 2


def test_a_damped_climb_halves_the_distance_to_an_isotropic_mean_each_step_after_the_first():
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    first, _ = climb(x, gaussian(0.0, torch.full((1, 1, 4, 4), 2.0)), 1, damping=0.5)
    three, _ = climb(x, gaussian(0.0, torch.full((1, 1, 4, 4), 2.0)), 3, damping=0.5)
    torch.testing.assert_close(three, 0.25 * first, rtol=1e-4, atol=1e-6)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="damping must be in"):
            climb(x, gaussian(0.0, torch.ones(1)), 1, damping=bad)
