"""A missing data directory is one clear error before collection, not an error inside every test module."""
import os

import pytest
import torch

from lab_helpers import DATA_ROOT

# Without a GPU, Triton kernels run only in Triton's interpreter, and the flag must be set before triton is first
# imported (triton.language's own helpers are decorated then): the CPU tests of the Triton scan run that way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if not (DATA_ROOT / "tinyshakespeare" / "input.txt").is_file():
        raise pytest.UsageError(
            f"the tests read the shared data sets (../shared/data/README.md) from {DATA_ROOT}, which does not hold "
            "them: clone the repository beside shared/ or set ARCH_LAB_DATA_ROOT to the data directory")
