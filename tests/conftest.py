"""A missing data directory is one clear error before collection, not an error inside every test module."""
import pytest

from lab_helpers import DATA_ROOT


def pytest_configure(config):
    if not (DATA_ROOT / "tinyshakespeare" / "input.txt").is_file():
        raise pytest.UsageError(
            f"the tests read the shared data sets (../shared/data/README.md) from {DATA_ROOT}, which does not hold "
            "them: clone the repository beside shared/ or set ARCH_LAB_DATA_ROOT to the data directory")
