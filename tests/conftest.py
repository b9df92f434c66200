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
