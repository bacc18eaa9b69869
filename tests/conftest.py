import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from helpers import set_seed  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    set_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and oversubscribed cores make them 10-50x slower."""
    import torch

    torch.set_num_threads(1)
    yield
