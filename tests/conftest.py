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
