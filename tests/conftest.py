import os

import numpy as np
import pytest

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def pytest_collection_modifyitems(config, items):
    slow = os.environ.get("LOWRANK_SLOW") == "1"
    cuda = torch is not None and torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set LOWRANK_SLOW=1 to run"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
