"""Fixtures of the intake tests: one real 3-node NATS JetStream cluster for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from intake.nats_local import LocalNatsCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsCluster]:
    """Debian's nats-server x3 on free localhost ports (a missing binary fails, never skips)."""
    with LocalNatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c
