"""The comparison harness: runs, caches per (method, setting, seed), writes the table and the plots."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import compare  # noqa: E402


@pytest.mark.slow
def test_a_rerun_only_computes_what_changed(tmp_path, monkeypatch, capsys):
    args = ["--preset", "smoke", "--methods", "dafl,cudfkd", "--settings", "single", "--seeds", "0",
            "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    ran = []
    real = compare.run_one
    monkeypatch.setattr(compare, "run_one", lambda mapping, runs, cache: ran.append(mapping["method"])
                        or real(mapping, runs, cache))
    assert compare.main(args) == 0
    assert ran == ["dafl", "cudfkd"]
    table = (tmp_path / "results" / "compare-smoke.md").read_text()
    assert "**digits, single**" in table and "| dafl" in table and "| cudfkd" in table
    assert (tmp_path / "results" / "compare-smoke-digits-single.png").stat().st_size > 0
    # Every run of a setting distils from the same teachers, trained once.
    assert len(list((tmp_path / "runs" / "teachers").glob("teachers-*"))) == 1

    ran.clear()
    assert compare.main(args) == 0  # nothing changed: everything from the cache
    assert ran == []
    assert compare.main([*args, "--cached"]) == 0 and ran == []
    assert compare.main([*args[:3], "dafl,dfad", *args[4:]]) == 0  # one new method: only it runs
    assert ran == ["dfad"]

    # a record made under other defaults (here: before student-refit) is not reused, though its --set matches
    (record,) = (tmp_path / "results" / "runs").glob("dafl-*.json")
    stale = json.loads(record.read_text())
    stale["resolved"]["student-refit"] = 0.0
    record.write_text(json.dumps(stale))
    ran.clear()
    # --cached runs nothing: the stale run's method is left out of the table and named under it
    capsys.readouterr()
    assert compare.main([*args, "--cached"]) == 1
    assert ran == []
    err = capsys.readouterr().err
    assert "1 runs are not cached" in err and "digits single dafl seed 0" in err
    assert "digits single cudfkd seed 0" not in err.split("\n[")[0]  # named: the missing run only
    table = (tmp_path / "results" / "compare-smoke.md").read_text()
    assert "| cudfkd" in table and "| dafl" not in table
    assert "Left out (not in the cache under today's settings" in table and "digits single dafl seed 0" in table
    assert compare.main(args) == 0
    assert ran == ["dafl"] and json.loads(record.read_text())["resolved"]["student-refit"] == 8.0


def test_every_method_of_a_setting_gets_the_same_query_budget():
    budgets = {compare.run_config("quick", "digits", "dirichlet-0.5", m, 0)["query-budget"]
               for m in compare.METHODS}
    assert budgets == {10 * 20 * 128 * 2 * 5}  # rounds x batch x (Forward + Backward) x clients


def test_set_changes_every_run_and_never_overwrites_the_presets_table(tmp_path, monkeypatch):
    args = ["--preset", "smoke", "--methods", "dafl", "--settings", "single", "--seeds", "0",
            "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    seen = []
    real = compare.run_one
    monkeypatch.setattr(compare, "run_one", lambda mapping, runs, cache: seen.append(mapping)
                        or real(mapping, runs, cache))
    assert compare.main([*args, "--set", "query-budget=0", "--set", "dafl.student-steps=2"]) == 0
    assert seen[0]["query-budget"] == 0 and seen[0]["dafl.student-steps"] == 2
    made = sorted(p.name for p in (tmp_path / "results").glob("compare-*.md"))
    assert len(made) == 1 and made[0].startswith("compare-smoke-set-")
    assert "--set query-budget=0" in (tmp_path / "results" / made[0]).read_text()
    # the same change typed differently is the same cached run
    assert compare.main([*args, "--set", "dafl.student-steps=2", "--set", "query-budget=0"]) == 0
    assert len(seen) == 1


def test_set_with_a_bad_key_stops_before_anything_runs(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        compare.main(["--preset", "smoke", "--set", "epochz=3", "--results", str(tmp_path / "r"),
                      "--runs", str(tmp_path / "runs")])
    assert "unknown config key 'epochz'; did you mean 'epochs'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_privacy_utility_set_with_a_bad_key_stops_before_anything_runs(tmp_path, capsys):
    import privacy_utility
    import pytest

    with pytest.raises(SystemExit):
        privacy_utility.main(["--set", "student-refitt=0", "--results", str(tmp_path / "r"),
                              "--runs", str(tmp_path / "runs")])
    assert "unknown config key 'student-refitt'; did you mean 'student-refit'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()


def test_a_record_that_predates_a_key_is_reused_only_while_the_key_is_at_its_default():
    from fedkd.config import config_from_mapping

    now = config_from_mapping({"dataset": "digits"}).to_dict()
    older = {k: v for k, v in now.items() if k != "density-gate"}  # made before density-gate existed
    assert compare.same_settings(now, now) and compare.same_settings(older, now)
    assert not compare.same_settings(older, {**now, "density-gate": "on"})  # the key set otherwise: rerun
    assert not compare.same_settings({**older, "student-refit": 0.0}, now)  # a changed default: rerun
    assert not compare.same_settings({**now, "gone-key": 1}, now)  # a key since removed: rerun
