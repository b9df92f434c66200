"""The default suite leaves the slow tests out, says so, and runs them when asked (tests/conftest.py)."""

from pathlib import Path

pytest_plugins = ["pytester"]

TIERS = """
import pytest

def test_quick():
    assert 1 + 1 == 2

@pytest.mark.slow
def test_long():
    assert sum(range(4)) == 6
"""


def test_slow_tests_are_left_out_by_default_and_run_with_runslow_or_when_named(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_tiers=TIERS)
    default = pytester.runpytest("-p", "no:cacheprovider")
    default.assert_outcomes(passed=1, deselected=1)
    default.stdout.fnmatch_lines(["1 slow end-to-end tests left out: `pytest --runslow` runs them too"])
    pytester.runpytest("-p", "no:cacheprovider", "--runslow").assert_outcomes(passed=2)
    named = pytester.runpytest("-p", "no:cacheprovider", "test_tiers.py::test_long")
    named.assert_outcomes(passed=1)
    assert "left out" not in named.stdout.str()
    pytester.runpytest("-p", "no:cacheprovider", "-m", "slow").assert_outcomes(passed=1, deselected=1)
