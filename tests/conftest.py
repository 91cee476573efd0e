import os
import sys

import mace  # noqa: F401  (before e3nn)
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the device-dependent tests (e.g. cuda, cuda:0); default cpu",
    )


@pytest.fixture
def device(request):
    """The torch device given by ``--device`` (tests are skipped when it is unavailable)."""
    import torch

    name = request.config.getoption("--device")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: CUDA is not available")
    return dev
