"""Fixtures for the resilience tests: a PostgreSQL-only database and a restartable real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mhr_testkit import Service, truncate_postgres
from resilience_kit import ServerProcess


@pytest.fixture
def pg_database(postgres_url: str) -> str:
    """The PostgreSQL test database, migrated and empty (these tests need a real server database)."""
    truncate_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def registry(pg_database: str, tmp_path: Path) -> Iterator[Service]:
    """An in-process app on the same database and keyring, for registering parties."""
    with Service.start(pg_database, tmp_path) as running:
        yield running


@pytest.fixture
def server(pg_database: str, tmp_path: Path, registry: Service) -> Iterator[ServerProcess]:
    """A real server (``mhr serve``, uvicorn) sharing the registry's database and keyring."""
    process = ServerProcess(pg_database, tmp_path, extra_env={"MHR_RATE_LIMIT_ENABLED": "false"})
    try:
        yield process
    finally:
        process.stop()
