"""Shared fixtures: every database-backed test runs on SQLite and on PostgreSQL.

PostgreSQL is the server at ``MHR_TEST_DATABASE_URL`` (default: the local
server, database ``test``). Without it the PostgreSQL tier is skipped, saying
why; with ``MHR_REQUIRE_POSTGRES=1`` (CI) a missing server fails the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from mhr_testkit import PG_DEFAULT_URL, Service, sync_url, truncate_postgres

from service.store import migrate

PG_URL = os.environ.get("MHR_TEST_DATABASE_URL", PG_DEFAULT_URL)


def _postgres_problem() -> str | None:
    engine = sa.create_engine(sync_url(PG_URL))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL at MHR_TEST_DATABASE_URL is not reachable ({type(exc).__name__})"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    problem = _postgres_problem()
    if problem:
        if os.environ.get("MHR_REQUIRE_POSTGRES") == "1":
            pytest.fail(problem + " and MHR_REQUIRE_POSTGRES=1")
        pytest.skip(problem)
    engine = sa.create_engine(sync_url(PG_URL))
    with engine.begin() as conn:
        # The test database is ours: start from an empty schema every session.
        conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    migrate.upgrade(PG_URL)
    return PG_URL


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = tmp_path / "mhr.sqlite3"
        shutil.copyfile(template, target)
        return f"sqlite+aiosqlite:///{target}"
    url: str = request.getfixturevalue("postgres_url")
    truncate_postgres(url)
    return url


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    """A running app (in-process) on a fresh database and keyring."""
    with Service.start(database_url, tmp_path) as running:
        yield running
