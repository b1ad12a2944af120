"""Shared fixtures: every database-backed test runs on SQLite and on PostgreSQL.

PostgreSQL is the database at ``MHR_TEST_DATABASE_URL``, which the run wipes
(give one of your own). Unset, each run creates a database of its own on the
local server (``mhr_test_<pid>_<random>``) and drops it at the end, so that
concurrent runs never collide and no shared database is ever wiped. Without a
server the PostgreSQL tier is skipped, saying why; with ``MHR_REQUIRE_POSTGRES=1``
(CI) a missing server fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from mhr_testkit import PG_SERVER_URL, Service, create_database, drop_database, sync_url, truncate_postgres
from softhsm_kit import (
    HSM_EMPTY_TOKEN,
    HSM_PIN,
    HSM_ROTATE_TOKEN,
    HSM_ROTATION_TOKEN,
    HSM_TOKEN,
    SOFTHSM_MODULES,
    SoftHsm,
    hsm_required,
    init_softhsm_token,
    softhsm_config,
)
from sqlalchemy.engine import make_url

from service.store import migrate

GIVEN_URL = os.environ.get("MHR_TEST_DATABASE_URL")
# A database that belongs to nobody in particular (the server's default for tools): never wiped.
SHARED_NAMES = frozenset({"test", "postgres", "template0", "template1"})


def _postgres_problem(url: str) -> str | None:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        where = "MHR_TEST_DATABASE_URL" if GIVEN_URL else make_url(url).render_as_string()
        return f"PostgreSQL at {where} is not reachable ({type(exc).__name__})"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if GIVEN_URL and make_url(GIVEN_URL).database in SHARED_NAMES:
        pytest.fail(
            f"MHR_TEST_DATABASE_URL names the database {make_url(GIVEN_URL).database!r}, which the tests "
            "would wipe: name one of your own, or leave it unset for a database created for this run"
        )
    problem = _postgres_problem(GIVEN_URL or PG_SERVER_URL)
    if problem:
        if os.environ.get("MHR_REQUIRE_POSTGRES") == "1":
            pytest.fail(problem + " and MHR_REQUIRE_POSTGRES=1")
        pytest.skip(problem)
    if GIVEN_URL:
        url = GIVEN_URL
        engine = sa.create_engine(sync_url(url))
        with engine.begin() as conn:
            # The test database is the caller's: start from an empty schema every session.
            conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
    else:
        url = create_database(PG_SERVER_URL, f"mhr_test_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if not GIVEN_URL:
            drop_database(url)


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


# --- a SoftHSM2 token, for the tests that run against both key providers ---------------


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """SoftHSM2 with a token of its own in a temporary directory, its keys created by the provider.

    SoftHSM2 reads SOFTHSM2_CONF once per process (C_Initialize), so this one configuration
    serves every in-process test of the run.
    """
    problem = None
    module = next((m for m in SOFTHSM_MODULES if m.is_file()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        problem = "SoftHSM2 is not installed (apt-get install softhsm2)"
    elif importlib.util.find_spec("pkcs11") is None:
        problem = "python-pkcs11 is not installed (the `hsm` extra)"
    if problem:
        if hsm_required():
            pytest.fail(problem + ", and CI must run the HSM tests")
        pytest.skip(problem)
    assert module is not None
    config = softhsm_config(tmp_path_factory.mktemp("softhsm"))
    init_softhsm_token(config, HSM_TOKEN)
    init_softhsm_token(config, HSM_EMPTY_TOKEN)
    init_softhsm_token(config, HSM_ROTATION_TOKEN)  # tokens made after C_Initialize are not seen
    init_softhsm_token(config, HSM_ROTATE_TOKEN)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(config)
    try:
        from security.pkcs11_keys import Pkcs11Keys

        Pkcs11Keys.initialise(module, HSM_TOKEN, HSM_PIN)
        Pkcs11Keys.initialise(module, HSM_ROTATE_TOKEN, HSM_PIN)
        yield SoftHsm(module, config)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(params=["keyring", "pkcs11"])
def key_provider_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Settings overrides for each key provider: the keyring file, and a SoftHSM2 token."""
    if request.param == "keyring":
        return {}
    hsm: SoftHsm = request.getfixturevalue("softhsm")
    return hsm.settings()
