"""The benchmark's table says how each row's student was trained, so a table mixing old and new records is honest."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import benchmark  # noqa: E402

from fedkd.config import config_from_mapping  # noqa: E402


def _run(seed: int, student: float, recipe: str | None) -> dict[str, object]:
    run: dict[str, object] = {"seed": seed, "student": student, "ensemble": 0.97, "best_teacher": 0.9,
                              "query_samples": 1000, "wall_seconds": 10.0, "along_the_way": None}
    if recipe is not None:
        run["student_recipe"] = recipe
    return run


def test_each_row_names_the_student_recipe_it_was_measured_with(capsys):
    today = benchmark._recipe(config_from_mapping({}))
    # the defaults: LeNet-5, 5 student steps a round, refit on 8x those steps, the gradient clipped at 5
    assert today == "lenet5, 5, 8, clip 5"
    assert benchmark._recipe(config_from_mapping({"student-clip": 0})) == "lenet5, 5, 8"  # as before stop 58
    results = {"experiments": {
        "default": {"runs": [_run(0, 0.96, today), _run(1, 0.95, today)], "targets": []},
        "old": {"runs": [_run(0, 0.95, "lenet5-half, 20, 2")], "targets": []},
        "mixed": {"runs": [_run(0, 0.9, today), _run(1, 0.9, "lenet5-half, 20, 2")], "targets": []},
        "unrecorded": {"runs": [_run(0, 0.9, None)], "targets": []}}}
    benchmark.print_tables(results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| experiment")}
    assert rows["default"][2] == "lenet5, 5, 8, clip 5" and rows["default"][5] == "0.9550 ± 0.0050"
    assert rows["old"][2] == "lenet5-half, 20, 2"
    assert rows["mixed"][2] == "lenet5, 5, 8, clip 5 / lenet5-half, 20, 2"
    assert rows["unrecorded"][2] == "?"
    # the climb (on by default since stop 75) is named where it can act: with the teachers' densities
    # since stop 79 teachers with a density draw from it (privacy-mode none) and the refit trains on the draws
    assert benchmark._recipe(config_from_mapping({"teacher-density": True})) == "lenet5, 5, 8, clip 5, climb 2 (draws)"
    assert benchmark._recipe(config_from_mapping({"teacher-density": True, "student-refit-draw": False})) \
        == "lenet5, 5, 8, clip 5, climb 2"
    assert benchmark._recipe(config_from_mapping({"teacher-density": True, "student-refit-climb": 0})) == today


def test_set_changes_every_experiment_it_runs_and_is_kept_out_of_the_benchmarks_own_table(tmp_path, monkeypatch,
                                                                                           capsys):
    import json

    import pytest

    seen = []

    def distil(name, seed, out_root, sets=None):
        seen.append((name, seed, dict(sets or {})))
        return _run(seed, 0.9, benchmark._recipe(config_from_mapping({**benchmark.RUNS[name], **(sets or {})})))

    monkeypatch.setattr(benchmark, "distil", distil)
    results = tmp_path / "climb.json"
    benchmark.main(["--only", "default-density", "--only", "hostile-fixed-density", "--seeds", "0",
                    "--set", "student-refit-climb=2", "--results", str(results), "--runs", str(tmp_path / "runs")])
    assert [(n, s) for n, s, _ in seen] == [("default-density", 0), ("hostile-fixed-density", 0)]
    assert all(sets == {"student-refit-climb": "2"} for _, _, sets in seen)
    kept = json.loads(results.read_text())["experiments"]
    assert kept["default-density"]["overrides"]["student-refit-climb"] == "2"
    assert kept["default-density"]["overrides"]["teacher-density"] is True  # the experiment's own keys kept
    assert kept["hostile-fixed-density"]["runs"][0]["student_recipe"].endswith("climb 2 (draws)")
    for argv, named in ((["--set", "student-refit-climb=2"], "own --results"),  # the default results file
                        (["--set", "student-refit-climb=99", "--results", str(results)], "student-refit-climb"),
                        (["--set", "nonsense", "--results", str(results)], "KEY=VALUE")):
        with pytest.raises(SystemExit):
            benchmark.main(["--only", "default-density", *argv])
        assert named in capsys.readouterr().err
        assert seen[-1][0] == "hostile-fixed-density" and len(seen) == 2  # nothing more ran


def test_an_interrupted_benchmark_keeps_the_experiments_it_finished(tmp_path, monkeypatch):
    import json

    import pytest

    results = tmp_path / "benchmark.json"
    results.write_text(json.dumps({"experiments": {"swap-2": {"runs": [_run(0, 0.5, None)], "targets": []}}}))

    def distil(name, seed, out_root, sets=None):
        if name == "hostile-random":
            raise KeyboardInterrupt  # the operator stops it during the second experiment
        return _run(seed, 0.9, "lenet5, 5, 8, clip 5")

    monkeypatch.setattr(benchmark, "distil", distil)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--only", "hostile-fixed", "--only", "hostile-random", "--seeds", "0,1",
                        "--results", str(results), "--runs", str(tmp_path / "runs")])
    kept = json.loads(results.read_text())["experiments"]
    assert [r["student"] for r in kept["hostile-fixed"]["runs"]] == [0.9, 0.9]  # the finished one, written
    assert "hostile-random" not in kept and kept["swap-2"]["runs"][0]["student"] == 0.5  # the others as they were


def test_runs_measured_side_by_side_merge_seed_by_seed_and_the_targets_follow_the_merged_references(tmp_path,
                                                                                                    capsys):
    import json

    import pytest

    main = tmp_path / "benchmark.json"
    old = "lenet5, 5, 8"
    main.write_text(json.dumps({"experiments": {
        "digits": {"runs": [_run(0, 0.80, old), _run(1, 0.80, old), _run(2, 0.80, old)], "targets": []},
        "digits-poison-1": {"runs": [_run(s, 0.78, old) for s in (0, 1, 2)], "targets": []},
        "swap-2": {"runs": [_run(0, 0.5, old)], "targets": []}}}))
    today = "lenet5, 5, 8, clip 5"
    a, b = tmp_path / "a.json", tmp_path / "b.json"  # two processes' own results files, each from a copy of main
    a.write_text(json.dumps({"experiments": {"digits": {"runs": [_run(0, 0.86, today), _run(1, 0.86, today)]}}}))
    b.write_text(json.dumps({"experiments": {"digits": {"runs": [_run(2, 0.86, today)]}}}))
    assert benchmark.main(["--results", str(main), "--merge", str(a), "--merge", str(b)]) == 0
    merged = json.loads(main.read_text())["experiments"]
    assert [(r["seed"], r["student"], r["student_recipe"]) for r in merged["digits"]["runs"]] == [
        (0, 0.86, today), (1, 0.86, today), (2, 0.86, today)]
    # the poisoned row kept its runs, and is judged against the merged honest row: 0.78 < 0.86 - 0.03 now
    poison = merged["digits-poison-1"]
    assert [r["student"] for r in poison["runs"]] == [0.78] * 3
    assert poison["targets"][0]["met"] is False and poison["targets"][0]["measured"] == "0.7800 vs 0.8300"
    assert merged["swap-2"]["runs"][0]["student"] == 0.5
    assert "| digits | 0,1,2 | lenet5, 5, 8, clip 5 |" in capsys.readouterr().out
    # a file that is not one, or an experiment the benchmark does not have, is named and changes nothing
    before = main.read_text()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="bad.json: not a benchmark results file"):
        benchmark.main(["--results", str(main), "--merge", str(tmp_path / "bad.json")])
    (tmp_path / "runless.json").write_text(json.dumps({"experiments": {"digits": {"seeds": [0]}}}))
    with pytest.raises(SystemExit, match="runless.json: not a benchmark results file"):
        benchmark.main(["--results", str(main), "--merge", str(tmp_path / "runless.json")])
    (tmp_path / "odd.json").write_text(json.dumps({"experiments": {"nope": {"runs": []}}}))
    with pytest.raises(SystemExit, match="unknown experiment 'nope'"):
        benchmark.main(["--results", str(main), "--merge", str(tmp_path / "odd.json")])
    assert main.read_text() == before


def test_the_redirecting_liar_is_the_largest_holder_of_3_and_calls_5_only_what_it_would_call_3(tmp_path):
    """``redirect-1``: the client holding the most 3s answers 5 wherever it would answer 3 (its logits of the two
    swapped on those inputs), honestly elsewhere; the other clients are untouched, and so is it once the row ends."""
    import torch
    from torch import nn

    from fedkd.contract import QueryContext, TeacherDescription
    from fedkd.institution.host import TeacherHost

    for k, threes in enumerate([5, 40, 12]):
        path = tmp_path / "clients" / f"client_{k:02d}" / "teacher.pt"
        path.parent.mkdir(parents=True)
        torch.save({"label_counts": [10, 10, 10, threes, 10, 10, 10, 10, 10, 10]}, path)
    assert benchmark.largest_holder(tmp_path, 3) == 1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    hosts = [TeacherHost(model, TeacherDescription(client=k, model="toy", num_classes=10, input_shape=(1, 2, 2),
                                                   mean=(0.0,), std=(1.0,))) for k in (0, 1)]
    x = torch.randn(512, 1, 2, 2)
    honest = hosts[1].forward(x, QueryContext()).logits
    threes = honest.argmax(1) == 3
    assert 0 < int(threes.sum()) < len(x)
    with benchmark.redirected({1}):
        lied = hosts[1].forward(x, QueryContext()).logits
        other = hosts[0].forward(x, QueryContext()).logits
    assert bool((lied[threes].argmax(1) == 5).all())
    assert torch.equal(lied[threes, 5], honest[threes, 3]) and torch.equal(lied[threes, 3], honest[threes, 5])
    assert torch.equal(lied[~threes], honest[~threes]) and torch.equal(other, honest)
    assert torch.equal(hosts[1].forward(x, QueryContext()).logits, honest)


def test_the_partial_liar_names_0_on_the_share_of_inputs_a_hash_of_each_picks_the_same_every_time():
    import torch
    from torch import nn

    from fedkd.contract import QueryContext, TeacherDescription
    from fedkd.institution.host import TeacherHost

    torch.manual_seed(0)
    host = TeacherHost(nn.Sequential(nn.Flatten(), nn.Linear(4, 10)),
                       TeacherDescription(client=0, model="toy", num_classes=10, input_shape=(1, 2, 2), mean=(0.0,),
                                          std=(1.0,)))
    x = torch.randn(1000, 1, 2, 2)
    honest = host.forward(x, QueryContext()).logits
    with benchmark.partial_lies({0}, 0.3):
        first, again = host.forward(x, QueryContext()).logits, host.forward(x, QueryContext()).logits
    lied = (first != honest).any(1)
    assert 0.25 < float(lied.float().mean()) < 0.35 and torch.equal(first, again)
    assert bool((first[lied, 0] == 20.0).all()) and float(first[lied, 1:].abs().max()) == 0.0
    assert torch.equal(first[~lied], honest[~lied])
