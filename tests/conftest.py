import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedtie  # noqa: E402, F401  (builds or loads the extension once, before any test)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
