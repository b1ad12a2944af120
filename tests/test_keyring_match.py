"""The keyring can never be silently replaced.

Outside development no keyring is created implicitly (``mhr keys init`` creates
one, once); the database records which keys its data needs, and a service given
any other keyring refuses to start, saying so in one line; ``/readyz`` checks the same.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, Service, load_example, submit, sync_url

from security.keys import LocalKeyring
from service.cli import main as cli
from service.keys.keyring_match import KeyringMismatch

REFUGEE = next(p for p in EXAMPLES if p.stem == "exam-refugee-vaccinations")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``mhr`` configures the root logger for its process; give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    for name in list(os.environ):
        if name.startswith("MHR_"):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(f"MHR_{name.upper()}", value)
    monkeypatch.chdir(tmp_path)


def _production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, keyring: Path) -> None:
    _environment(
        monkeypatch,
        tmp_path,
        env="production",
        database_url=database_url,
        keyring_path=str(keyring),
        public_base_url="https://mhr.example.org",
        deployment_name="mhr.example.org/test",
    )


def _serve(capsys: pytest.CaptureFixture[str], command: str = "serve") -> tuple[int, list[str]]:
    """``mhr serve`` (or ``mhr worker``) as an operator runs it; (exit code, the lines ``mhr``
    itself said on stderr)."""
    capsys.readouterr()
    code = cli.main([command])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("mhr: ")]


def _written_with(database_url: str, tmp_path: Path) -> Path:
    """A database holding one exam, written by a service whose keyring is returned."""
    home = tmp_path / "first"
    home.mkdir()
    with Service.start(database_url, home) as running:
        clinic = running.register("clinic", "clinic")
        assert submit(running, clinic, load_example(REFUGEE)).status_code == 200
    return home / "keyring.json"


def test_missing_keyring_in_production_refuses_to_start(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring = tmp_path / "var" / "keyring.json"
    _production(monkeypatch, tmp_path, database_url, keyring)

    code, said = _serve(capsys)

    assert code == 2
    assert len(said) == 1
    assert f"keyring {keyring} does not exist" in said[0]
    assert "mhr keys init" in said[0]
    assert not keyring.exists(), "no keyring may be created outside development"


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_different_keyring_is_refused(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    _written_with(database_url, tmp_path)
    other = tmp_path / "other-keyring.json"
    LocalKeyring.create(other)
    _production(monkeypatch, tmp_path, database_url, other)

    code, said = _serve(capsys, command)

    assert code == 2
    assert len(said) == 1
    assert said[0].startswith(
        f"mhr: refusing to start: keyring {other}: the keyring does not hold the kek key"
    )
    assert "restore the keyring this database was used with" in said[0]


def test_the_right_keyring_starts_and_the_wrong_one_does_not_in_process(
    database_url: str, tmp_path: Path
) -> None:
    """The app factory's start-up (every uvicorn worker) checks too, not only ``mhr serve``."""
    keyring = _written_with(database_url, tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    (again / "keyring.json").write_bytes(keyring.read_bytes())
    (again / "keyring.json").chmod(0o600)
    with Service.start(database_url, again) as running:
        ready = running.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["keyring"] is True

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with (
        pytest.raises(KeyringMismatch, match="does not hold the kek key"),
        Service.start(database_url, elsewhere),
    ):
        pass


def test_development_creates_a_keyring_on_first_start_only(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring = _written_with(database_url, tmp_path)
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600, "created by the first start, owner-only"

    # The keyring is lost: development makes a new one, which the database refuses.
    keyring.unlink()
    _environment(
        monkeypatch, tmp_path, env="development", database_url=database_url, keyring_path=str(keyring)
    )
    code, said = _serve(capsys)
    assert code == 2
    assert len(said) == 1
    assert "refusing to start" in said[0] and "does not hold the kek key" in said[0]


def test_data_from_before_key_checks_needs_its_own_keyring(database_url: str, tmp_path: Path) -> None:
    """A database written before it recorded its keys: a keyring that cannot unwrap its data is refused."""
    _written_with(database_url, tmp_path)
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM key_checks"))
    engine.dispose()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    unreadable = "subject keys do not unwrap under this keyring"
    with pytest.raises(KeyringMismatch, match=unreadable), Service.start(database_url, elsewhere):
        pass


def test_readyz_reports_a_keyring_that_does_not_match(service: Service) -> None:
    assert service.client.get("/readyz").json()["checks"]["keyring"] is True
    # The database now says its data needs a key this keyring does not hold.
    engine = sa.create_engine(sync_url(service.settings.database_url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO key_checks (purpose, key_id, check_value, recorded_at) "
                "VALUES ('kek', 'local-0000000000000000/v1', '00', CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()

    ready = service.client.get("/readyz")

    assert ready.status_code == 503
    assert ready.json()["checks"]["keyring"] is False
    assert ready.headers["Retry-After"]


def test_the_database_records_ids_and_check_values_only(service: Service) -> None:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT purpose, key_id, check_value FROM key_checks")).all()
    engine.dispose()
    keyring_text = service.settings.keyring_path.read_text()
    assert {row.purpose for row in rows} == {"kek", "token-hmac", "blind-index", "audit-log"}
    for row in rows:
        assert len(row.check_value) == 16
        assert row.check_value not in keyring_text


def test_keys_init_creates_a_keyring_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring = tmp_path / "var" / "keyring.json"
    _environment(monkeypatch, tmp_path, env="production", keyring_path=str(keyring))

    assert cli.main(["keys", "init"]) == 0
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    first = keyring.read_bytes()
    capsys.readouterr()

    assert cli.main(["keys", "init"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "refusing to overwrite" in err
    assert keyring.read_bytes() == first
