"""Shared fixtures: the real data directory and small synthetic shops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start a Triton server are slow too: ``-m "not slow"`` (``make test-fast``)
    leaves them out, so the fast loop never needs ``.venv-triton``."""
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets (ECOMREC_DATA_DIR, default ../shared/data).

    In CI the directory always exists; its absence there is a failure, not a skip.
    """
    d = Path(os.environ.get("ECOMREC_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not d.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"data directory {d} missing in CI")
        pytest.skip(f"data directory {d} not present")
    return d


@pytest.fixture(scope="session")
def shop():
    """The default synthetic shop (planted tastes, chains, lapsing customers)."""
    from intake.synthetic import make_shop

    return make_shop()
