"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the checkout (or $WORKBENCH_SHARED_DATA), where the Casper files live."""
    env = os.environ.get("WORKBENCH_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    """`shared_data_dir()` as a fixture (test modules cannot import this conftest: tests/browser has its own)."""
    return shared_data_dir()


@pytest.fixture(scope="session")
def casper_dir() -> Path:
    """The Casper challenge files (weights, labels, MNIST). Missing data fails in CI and skips elsewhere."""
    base = shared_data_dir()
    path = base / "casper" if base else None
    if path is None or not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail("the Casper data (../shared/data/casper) is missing on this CI machine")
        pytest.skip("the Casper data (../shared/data/casper) is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    """The LIB authors' checkpoints (../shared/data/lib). Missing data fails in CI and skips elsewhere."""
    base = shared_data_dir()
    path = base / "lib" if base else None
    if path is None or not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail("the LIB checkpoints (../shared/data/lib) are missing on this CI machine")
        pytest.skip("the LIB checkpoints (../shared/data/lib) are not beside this checkout")
    return path
