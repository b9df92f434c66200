from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Torch's first calls can be slow on a loaded 2-core machine: no per-example deadline.
settings.register_profile("fedkd", deadline=None)
settings.load_profile("fedkd")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh node cache (where simulated Flower nodes keep their teachers) for the test."""
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# The default suite stays a few minutes on a 2-core machine: tests marked `slow` (end-to-end runs of several
# processes, or of Flower's runtime, each 7-90 s) are left out unless `--runslow` is given, a `-m` expression picks
# them, or the command names their file or the test itself. Run `pytest --runslow` (the whole suite) before landing.
SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (the whole suite: about 20 minutes on 2 cores)")


def _named(config: pytest.Config, item: pytest.Item) -> bool:
    """Whether the command line named the item's file or the item itself (not only a folder above it)."""
    for arg in config.args:
        path, _, rest = arg.partition("::")
        target = Path(path).resolve()
        if target == item.path and (not rest or item.nodeid.split("::", 1)[1].startswith(rest)):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or config.option.markexpr:
        return
    left_out = [item for item in items if item.get_closest_marker("slow") and not _named(config, item)]
    if left_out:
        chosen = set(map(id, left_out))
        items[:] = [item for item in items if id(item) not in chosen]
        config.hook.pytest_deselected(items=left_out)
    config.stash[SLOW_LEFT_OUT] = len(left_out)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left_out = config.stash.get(SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} slow end-to-end tests left out: `pytest --runslow` runs them too")
