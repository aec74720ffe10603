import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedtie  # noqa: E402, F401  (builds or loads the extension once, before any test)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on a CUDA device (op_cases.needs_cuda); scripts/gpu_check.sh selects -m cuda"
    )


def pytest_collection_modifyitems(config, items):
    """Every test or parameter skipped by op_cases.needs_cuda also carries the "cuda" marker, so the
    GPU check selects the CUDA tests wherever they live (-m cuda) and the rest of the suite apart."""
    from op_cases import needs_cuda

    for item in items:
        if any(mark == needs_cuda.mark for mark in item.iter_markers(name="skipif")):
            item.add_marker(pytest.mark.cuda)
