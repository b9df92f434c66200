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


def test_an_interrupted_benchmark_keeps_the_experiments_it_finished(tmp_path, monkeypatch):
    import json

    import pytest

    results = tmp_path / "benchmark.json"
    results.write_text(json.dumps({"experiments": {"swap-2": {"runs": [_run(0, 0.5, None)], "targets": []}}}))

    def distil(name, seed, out_root):
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
