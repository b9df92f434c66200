"""The class-check replay (simulations/class_check.py): its liars, and what each rule makes of them on a real run."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import class_check  # noqa: E402


def test_the_liars_answers_and_claims_are_doctored_and_capped_as_the_coordinator_caps_them():
    logits = torch.randn(5, 64, 10, generator=torch.Generator().manual_seed(0))
    claims = torch.full((5, 10), 100.0)
    narrow, narrow_claims = class_check.doctor(logits, claims, "narrow")
    assert bool((narrow[0].argmax(-1) == 0).all()) and torch.equal(narrow[1:], logits[1:])
    # 10,000 records of class 0 alone, capped at 4x the median client's total (1,000)
    assert narrow_claims[0, 1:].sum() == 0 and float(narrow_claims[0, 0]) == pytest.approx(4_000)
    swapped, same = class_check.doctor(logits, claims, "swap2")
    assert torch.equal(swapped[:2, :, 3], logits[:2, :, 5]) and torch.equal(swapped[2:], logits[2:])
    assert torch.equal(same, claims)
    partial, _ = class_check.doctor(logits, claims, "partial")
    share = float((partial[0] != logits[0]).any(-1).float().mean())
    assert 0.15 < share < 0.45  # about 30 % of the inputs
    fewer, _ = class_check.doctor(logits, claims, "partial15")
    lied = (fewer[0] != logits[0]).any(-1)
    assert 0.05 < float(lied.float().mean()) < share  # about 15 %
    assert bool(((partial[0] != logits[0]).any(-1) | ~lied).all())  # a subset of the partial liar's inputs


def test_the_replay_refuses_a_negative_dissent_bar_before_reading_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        class_check.main([str(tmp_path / "no-such-run"), "--dissent-floor", "-0.1"])
    assert "--dissent-floor and --dissent-ratio must be >= 0" in capsys.readouterr().err


def test_on_a_finished_run_the_narrow_liar_owns_the_ensemble_under_precision_and_not_under_discrimination(tmp_path):
    from fedkd.cli import main

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "dataset=digits", "--set", "num-clients=5", "--set",
                 "partition=iid", "--set", "teacher-epochs=10", "--set", "epochs=1", "--set", "steps-per-epoch=8",
                 "--set", "student-steps=1", "--set", "student-refit=0", "--set", "batch-size=128", "--set",
                 "generator-width=4", "--set", "latent-dim=8"]) == 0
    rows = class_check.replay(run, ["honest", "narrow"], ["precision", "discrimination", "both"], [0.75])
    score = {(r["liar"], r["rule"]): r["ensemble"] for r in rows}
    honest = json.loads((run / "summary.json").read_text())["ensemble"]["test_accuracy"]
    assert score["honest", "discrimination"] == pytest.approx(honest, abs=0.05)
    assert score["narrow", "precision"] < 0.5  # it names 0 everywhere, and its claim on 0 stands
    assert score["narrow", "discrimination"] > score["honest", "discrimination"] - 0.1
    assert score["narrow", "both"] > score["honest", "both"] - 0.1  # discrimination's cut stands with precision's
    # IID teachers of one task: hardly any input has a lone dissenter, and the veto leaves the honest ensemble be
    vetoed = {(r["liar"], r["rule"]): r["vetoed"] for r in rows}
    assert vetoed["honest", "discrimination"] == pytest.approx(score["honest", "discrimination"], abs=0.03)
    # fedkd's own veto flags no honest teacher (their dissent rates are alike), so it changes nothing there
    honest = next(r for r in rows if r["liar"] == "honest" and r["rule"] == "discrimination")
    assert honest["flagged"] == [] and honest["veto"] == honest["ensemble"] and honest["veto_share"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in honest["dissent"]) and len(honest["dissent"]) == 5


def test_the_veto_leaves_out_only_a_sure_lone_dissenter_and_renormalises_each_class():
    sure, unsure = 4.0, 0.1  # one-hot logits at these scales: p(top) about 0.86 and 0.14 over ten classes
    votes = torch.tensor([[3, 3, 7], [3, 3, 7], [3, 3, 7], [5, 3, 2]])  # (K=4, N=3): teacher 3 dissents on input 0
    logits = torch.nn.functional.one_hot(votes, 10).float() * sure
    logits[:3, 2] *= unsure / sure  # on input 2 the rest agree, unsure
    keep = class_check.veto(logits)
    assert keep.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]]  # input 1: no dissent; input 2: not sure
    weights = torch.tensor([[0.25] * 10, [0.25] * 10, [0.25] * 10, [0.25] * 10])
    per_input = class_check.vetoed(weights, keep)
    assert per_input.shape == (4, 3, 10)
    assert torch.allclose(per_input[:3, 0], torch.full((3, 10), 1 / 3)) and float(per_input[3, 0].abs().sum()) == 0
    assert torch.allclose(per_input[:, 1], weights)
    # a class whose every holder is vetoed on an input keeps its weights rather than a column of zeros
    alone = torch.zeros(4, 10)
    alone[3, 5] = 1.0
    alone[:3, :5] = alone[:3, 6:] = 1 / 3
    assert torch.equal(class_check.vetoed(alone, keep)[:, 0, 5], alone[:, 5])
