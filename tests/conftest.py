import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import set_seed  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    set_seed(0)
    yield
