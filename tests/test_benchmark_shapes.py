"""The shapes benchmark on its smallest setting: it times synthesis rounds and student steps through the Python
API and writes its table."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import benchmark_shapes  # noqa: E402


def test_the_table_has_a_row_of_positive_times_per_setting_asked(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes.md"
    benchmark_shapes.main(["--only", "1x28x28", "--steps", "1", "--student-steps", "1", "--teachers", "1",
                           "--device", "cpu", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1x28x28")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "1 x lenet5" and cells[2] == "lenet5-half"
    synthesis, step = float(cells[3]), float(cells[4])
    assert 0.0 < synthesis < 60.0 and 0.0 <= step < 60.0
    # the default run's round: one synthesis round and the default's student steps (5), not a fixed 20
    assert benchmark_shapes.DEFAULT_STEPS == 5
    assert f"1 synthesis + {benchmark_shapes.DEFAULT_STEPS} student steps" in out.read_text()
    assert float(cells[5]) == pytest.approx(synthesis + benchmark_shapes.DEFAULT_STEPS * step, abs=0.006)
    assert "3x32x32" not in out.read_text()
    with pytest.raises(SystemExit):
        benchmark_shapes.main(["--only", "5x5x5", "--out", str(out)])
    assert "choose from 1x28x28" in capsys.readouterr().err
