"""Alembic owns the schema: migrations run up, down and up again, and agree with the ORM models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from mhr_testkit import scratch_database, sync_url

from service.store import migrate
from service.store.tables import Base


@pytest.fixture
def fresh_sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'fresh.sqlite3'}"


@pytest.fixture
def fresh_postgres(postgres_url: str) -> Iterator[str]:
    """A throwaway database on the test server, created empty for this test and dropped afterwards."""
    with scratch_database(postgres_url, "migration_check") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"fresh_{request.param}")
    return url


def _inspect(url: str) -> tuple[set[str], str | None, list[Any]]:
    """Tables, the stamped revision and the differences between the models and the database."""
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            context = MigrationContext.configure(
                conn,
                opts={"compare_type": True, "compare_server_default": True, "target_metadata": Base.metadata},
            )
            revision = context.get_current_revision()
            diff = compare_metadata(context, Base.metadata) if tables - {"alembic_version"} else []
    finally:
        engine.dispose()
    return tables, revision, diff


def test_upgrade_downgrade_upgrade_and_models_agree(empty_database: str) -> None:
    model_tables = set(Base.metadata.tables)
    head = migrate.head_revision()
    assert head is not None

    migrate.upgrade(empty_database)
    tables, revision, diff = _inspect(empty_database)
    assert revision == head
    assert model_tables <= tables

    migrate.downgrade(empty_database, "base")
    tables, revision, _ = _inspect(empty_database)
    assert revision is None
    assert tables <= {"alembic_version"}, "downgrade to base must remove every table"

    migrate.upgrade(empty_database)
    tables, revision, diff = _inspect(empty_database)
    assert revision == head
    assert tables == model_tables | {"alembic_version"}
    assert diff == [], f"models and migrations disagree: {diff}"


def test_every_revision_steps_down_and_up(empty_database: str) -> None:
    """Each migration's downgrade undoes exactly its upgrade, one step at a time."""
    script = ScriptDirectory(str(migrate.MIGRATIONS_DIR))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions, "no migrations found"
    seen: list[set[str]] = []
    for revision in revisions:
        migrate.upgrade(empty_database, revision)
        tables, current, _ = _inspect(empty_database)
        assert current == revision
        seen.append(tables)
    for index in range(len(revisions) - 1, 0, -1):
        migrate.downgrade(empty_database, "-1")
        tables, current, _ = _inspect(empty_database)
        assert current == revisions[index - 1]
        assert tables == seen[index - 1]


def test_one_linear_history() -> None:
    script = ScriptDirectory(str(migrate.MIGRATIONS_DIR))
    assert len(script.get_heads()) == 1, "migrations have branched: merge them"
    assert len(script.get_bases()) == 1
