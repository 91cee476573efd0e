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


@pytest.fixture
def restore_root_logger():
    """mace's run_train configures the root logger (level, file handlers); undo it."""
    import logging

    root = logging.getLogger()
    level, handlers, filters = root.level, list(root.handlers), list(root.filters)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.filters[:] = filters
    root.setLevel(level)
