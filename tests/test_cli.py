"""The ``mhr`` command an operator uses to migrate, register organizations and clients, and get a token."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from mhr_testkit import sync_url
from starlette.testclient import TestClient

from security.jwk import generate_client_key
from service.app.factory import asgi_app, create_app
from service.cli import main as cli
from service.core.settings import DEVELOPMENT_ENV_FILE, Settings, load_settings, write_development_env
from service.store import migrate


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Mhr = Callable[..., Result]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``mhr`` configures the root logger for its process; give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def database_file(tmp_path: Path) -> Path:
    return tmp_path / "mhr.sqlite3"


@pytest.fixture
def mhr(
    tmp_path: Path, database_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Mhr:
    for name in list(os.environ):
        if name.startswith("MHR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MHR_ENV", "development")
    monkeypatch.setenv("MHR_DATABASE_URL", f"sqlite+aiosqlite:///{database_file}")
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def migrated(mhr: Mhr) -> Mhr:
    assert mhr("migrate").code == 0
    return mhr


def _revision(database_file: Path) -> str | None:
    engine = sa.create_engine(sync_url(f"sqlite+aiosqlite:///{database_file}"))
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            if "alembic_version" not in tables:
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    finally:
        engine.dispose()


def test_migrate_up_and_down(mhr: Mhr, database_file: Path) -> None:
    result = mhr("migrate")
    assert result.code == 0
    assert "database at revision head" in result.out
    assert _revision(database_file) == migrate.head_revision()

    assert mhr("migrate", "--downgrade", "base").code == 0
    assert _revision(database_file) is None

    assert mhr("migrate").code == 0
    assert _revision(database_file) == migrate.head_revision()


def test_orgs_add_and_list(migrated: Mhr) -> None:
    added = migrated(
        "orgs", "add", "--name", "Nairobi Panel Clinic", "--kind", "clinic", "--jurisdiction", "KE"
    )
    assert added.code == 0, added.err
    org = added.json()
    assert org["name"] == "Nairobi Panel Clinic"
    assert org["kind"] == "clinic"
    assert org["id"]

    listed = migrated("orgs", "list")
    assert listed.code == 0
    resources = listed.json()
    assert [r["resourceType"] for r in resources] == ["Organization"]
    assert resources[0]["id"] == org["id"]
    assert resources[0]["name"] == "Nairobi Panel Clinic"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jurisdiction", "Kenya"], "ISO 3166"),
        (["--name", "   "], "1-200 characters"),
    ],
)
def test_orgs_add_rejects_bad_input(migrated: Mhr, args: list[str], message: str) -> None:
    base = {"--name": "Clinic", "--kind": "clinic"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = migrated("orgs", "add", *[part for pair in base.items() for part in pair])
    assert result.code == 2
    assert message in result.err
    assert migrated("orgs", "list").json() == []


def test_orgs_add_rejects_a_duplicate_name(migrated: Mhr) -> None:
    assert migrated("orgs", "add", "--name", "Clinic", "--kind", "clinic").code == 0
    again = migrated("orgs", "add", "--name", "Clinic", "--kind", "authority")
    assert again.code == 2
    assert "exists" in again.err


def test_unknown_org_kind_is_a_usage_error(migrated: Mhr) -> None:
    with pytest.raises(SystemExit) as caught:
        migrated("orgs", "add", "--name", "X", "--kind", "hospital")
    assert caught.value.code == 2


@pytest.fixture
def keypair(mhr: Mhr, tmp_path: Path) -> tuple[Path, Path]:
    key, jwks = tmp_path / "client-key.pem", tmp_path / "client-jwks.json"
    result = mhr("clients", "keygen", "--out-key", str(key), "--out-jwks", str(jwks))
    assert result.code == 0, result.err
    assert result.json()["kid"] == json.loads(jwks.read_text())["keys"][0]["kid"]
    return key, jwks


def test_keygen_writes_a_private_key_only_the_owner_reads(keypair: tuple[Path, Path]) -> None:
    key, jwks = keypair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    public = json.loads(jwks.read_text())["keys"][0]
    assert "d" not in public
    assert public["alg"] == "ES384"


def test_clients_add_list_disable(migrated: Mhr, keypair: tuple[Path, Path]) -> None:
    _key, jwks = keypair
    assert migrated("orgs", "add", "--name", "Health Canada", "--kind", "authority").code == 0

    added = migrated(
        "clients", "add", "--org", "Health Canada", "--role", "authority", "--jwks", str(jwks),
        "--scopes", "system/Patient.rs", "system/Observation.rs", "--purposes", "PUBHLTH",
    )  # fmt: skip
    assert added.code == 0, added.err
    client = added.json()
    assert client["client_id"].startswith("authority-")
    assert client["role"] == "authority"
    assert client["scopes"] == "system/Observation.rs system/Patient.rs"
    assert client["purposes"] == "PUBHLTH"

    listed = migrated("clients", "list").json()
    assert [(c["client_id"], c["active"]) for c in listed] == [(client["client_id"], True)]

    disabled = migrated("clients", "disable", client["client_id"])
    assert disabled.code == 0
    assert disabled.json() == {"client_id": client["client_id"], "active": False}
    assert [c["active"] for c in migrated("clients", "list").json()] == [False]

    again = migrated("clients", "disable", client["client_id"])
    assert again.code == 2
    assert "no such active client" in again.err


def test_client_without_scopes_gets_its_role_ceiling(migrated: Mhr, keypair: tuple[Path, Path]) -> None:
    assert migrated("orgs", "add", "--name", "Auditors", "--kind", "auditor").code == 0
    added = migrated("clients", "add", "--org", "Auditors", "--role", "auditor", "--jwks", str(keypair[1]))
    assert added.json()["scopes"] == "system/AuditEvent.rs system/Organization.rs"


def _add_org(mhr: Mhr, name: str, kind: str) -> None:
    assert mhr("orgs", "add", "--name", name, "--kind", kind).code == 0


def _add_clinic_client(mhr: Mhr, jwks: Path) -> str:
    result = mhr("clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks", str(jwks))
    assert result.code == 0, result.err
    client_id: str = result.json()["client_id"]
    return client_id


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "authority"], "a clinic organization's clients have role clinic"),
        (["--role", "admin"], "a clinic organization's clients have role clinic"),
        (["--role", "clinic", "--purposes", "MARKETING"], "unknown purpose of use"),
        (["--role", "clinic", "--scopes", "patient/*.rs"], "scopes"),
    ],
)
def test_clients_add_rejects_bad_registrations(
    migrated: Mhr, keypair: tuple[Path, Path], extra: list[str], message: str
) -> None:
    _add_org(migrated, "Clinic", "clinic")
    result = migrated("clients", "add", "--org", "Clinic", "--jwks", str(keypair[1]), *extra)
    assert result.code == 2
    assert message in result.err
    assert migrated("clients", "list").json() == []


def test_scopes_beyond_the_role_are_rejected(migrated: Mhr, keypair: tuple[Path, Path]) -> None:
    _add_org(migrated, "Authority", "authority")
    result = migrated(
        "clients", "add", "--org", "Authority", "--role", "authority", "--jwks", str(keypair[1]),
        "--scopes", "system/Patient.cruds",
    )  # fmt: skip
    assert result.code == 2
    assert "exceed what role authority may hold" in result.err


def test_private_key_jwks_is_rejected(migrated: Mhr, tmp_path: Path) -> None:
    _add_org(migrated, "Clinic", "clinic")
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(generate_client_key("EC")))
    private["kid"] = "k1"
    path = tmp_path / "oops.json"
    path.write_text(json.dumps({"keys": [private]}))
    result = migrated("clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks", str(path))
    assert result.code == 2
    assert "private key material" in result.err
    assert '"d"' not in result.err and private["d"] not in result.err
    assert migrated("clients", "list").json() == []


@pytest.mark.parametrize(
    "content", ["not json", '{"keys": []}', '{"keys": [{"kty": "oct", "kid": "a", "k": "AA"}]}']
)
def test_unusable_jwks_file_is_rejected(migrated: Mhr, tmp_path: Path, content: str) -> None:
    _add_org(migrated, "Clinic", "clinic")
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = migrated("clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks", str(path))
    assert result.code == 2
    assert result.err.startswith("mhr: ")


def test_missing_jwks_file_is_rejected(migrated: Mhr, tmp_path: Path) -> None:
    _add_org(migrated, "Clinic", "clinic")
    result = migrated(
        "clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks", str(tmp_path / "nope")
    )
    assert result.code == 2
    assert "cannot read JWKS" in result.err


def test_plain_http_jwks_url_is_rejected(migrated: Mhr) -> None:
    _add_org(migrated, "Clinic", "clinic")
    result = migrated(
        "clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks-url", "http://keys.example/j"
    )
    assert result.code == 2
    assert "https" in result.err


def test_client_for_unknown_org_is_rejected(migrated: Mhr, keypair: tuple[Path, Path]) -> None:
    result = migrated("clients", "add", "--org", "Nobody", "--role", "clinic", "--jwks", str(keypair[1]))
    assert result.code == 2
    assert "no such organization" in result.err


@pytest.fixture
def app_client(migrated: Mhr, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The service on the CLI's database and keyring, reached by ``mhr token`` through its HTTP call."""
    settings = Settings()
    with TestClient(asgi_app(create_app(settings), settings), base_url=settings.base_url) as client:

        def post(url: str, *, data: dict[str, str], timeout: float) -> Any:
            assert url == settings.token_url
            return client.post(url, data=data)

        monkeypatch.setattr(cli.httpx, "post", post)
        yield client


def test_token_command_prints_a_working_access_token(
    migrated: Mhr, keypair: tuple[Path, Path], app_client: TestClient
) -> None:
    key, jwks = keypair
    _add_org(migrated, "Clinic", "clinic")
    client_id = _add_clinic_client(migrated, str(jwks))

    result = migrated(
        "token", "--client-id", client_id, "--key", str(key), "--scope", "system/Organization.rs"
    )

    assert result.code == 0, result.err
    token = result.out.strip()
    response = app_client.get("/fhir/Organization", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200

    as_json = migrated(
        "token", "--client-id", client_id, "--key", str(key), "--json", "--scope", "system/*.read"
    )
    assert as_json.json()["scope"] == "system/*.rs"

    assert migrated("clients", "disable", client_id).code == 0
    refused = migrated("token", "--client-id", client_id, "--key", str(key))
    assert refused.code == 1
    assert "invalid_client" in refused.err


def test_token_command_with_the_wrong_key_is_refused(
    migrated: Mhr, keypair: tuple[Path, Path], app_client: TestClient, tmp_path: Path
) -> None:
    _add_org(migrated, "Clinic", "clinic")
    client_id = migrated(
        "clients", "add", "--org", "Clinic", "--role", "clinic", "--jwks", str(keypair[1])
    ).json()["client_id"]
    other_key, other_jwks = tmp_path / "other.pem", tmp_path / "other.json"
    assert migrated("clients", "keygen", "--out-key", str(other_key), "--out-jwks", str(other_jwks)).code == 0
    result = migrated("token", "--client-id", client_id, "--key", str(other_key))
    assert result.code == 1
    assert "token refused (401): invalid_client" in result.err


def test_token_command_prints_the_servers_reason(
    migrated: Mhr, keypair: tuple[Path, Path], app_client: TestClient
) -> None:
    _add_org(migrated, "Clinic", "clinic")
    client_id = _add_clinic_client(migrated, str(keypair[1]))
    result = migrated(
        "token", "--client-id", client_id, "--key", str(keypair[0]), "--scope", "launch/patient"
    )
    assert result.code == 1
    assert "token refused (400): invalid_scope: none of the requested scopes may be granted" in result.err


def test_token_command_reports_an_unreachable_server(migrated: Mhr, keypair: tuple[Path, Path]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = migrated(
        "token", "--client-id", "x", "--key", str(keypair[0]), "--url", f"http://127.0.0.1:{port}"
    )
    assert result.code == 2
    assert "unreachable" in result.err


def test_token_command_reports_an_unreadable_key(migrated: Mhr, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    result = migrated("token", "--client-id", "x", "--key", str(tmp_path / "junk.pem"))
    assert result.code == 2
    assert "cannot load private key" in result.err


# --- as a newcomer runs it: no MHR_* variable exported ------------------------------------------


@pytest.fixture
def bare_mhr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Mhr:
    """``mhr`` in a directory of its own, from a shell with no ``MHR_*`` variable at all."""
    for name in list(os.environ):
        if name.startswith("MHR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(code, captured.out, captured.err)

    return run


def _one_line(result: Result) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mhr: ")
    return lines[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _development_env(tmp_path: Path, **values: Any) -> Path:
    fields: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'dev.sqlite3'}",
        "keyring_path": tmp_path / "dev-keyring.json",
        **values,
    }
    write_development_env(Settings(env="development", **fields), tmp_path / DEVELOPMENT_ENV_FILE)
    return tmp_path / DEVELOPMENT_ENV_FILE


def test_token_without_any_settings_says_what_is_missing(bare_mhr: Mhr, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert (
        bare_mhr("clients", "keygen", "--out-key", str(key), "--out-jwks", str(tmp_path / "k.json")).code == 0
    )

    result = bare_mhr("token", "--client-id", "x", "--key", str(key))

    assert result.code == 2
    line = _one_line(result)
    assert "no service address" in line and "--url" in line and "MHR_PUBLIC_BASE_URL" in line


def test_token_finds_the_development_server_through_var_dev_env(bare_mhr: Mhr, tmp_path: Path) -> None:
    port = _free_port()
    _development_env(tmp_path, port=port)
    key = tmp_path / "k.pem"
    assert (
        bare_mhr("clients", "keygen", "--out-key", str(key), "--out-jwks", str(tmp_path / "k.json")).code == 0
    )

    result = bare_mhr("token", "--client-id", "x", "--key", str(key))

    # Nothing listens there: the point is that it asked the development server's address.
    assert result.code == 2
    assert f"unreachable at http://127.0.0.1:{port}/auth/token" in _one_line(result)


def test_development_env_file_round_trips_awkward_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MHR_"):
            monkeypatch.delenv(name)
    url = 'postgresql+asyncpg://mhr:p#ss"w\\rd@127.0.0.1:5432/mhr dev'
    path = _development_env(tmp_path, database_url=url, port=8123)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a database password may be in it
    monkeypatch.chdir(tmp_path)

    settings = load_settings(development_file=True)

    assert settings.env.value == "development"
    assert settings.database_url == url
    assert settings.base_url == "http://127.0.0.1:8123"


def test_an_explicit_mhr_env_never_reads_the_development_file(
    bare_mhr: Mhr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _development_env(tmp_path, port=_free_port())
    monkeypatch.setenv("MHR_ENV", "production")
    key = tmp_path / "k.pem"
    assert (
        bare_mhr("clients", "keygen", "--out-key", str(key), "--out-jwks", str(tmp_path / "k.json")).code == 0
    )

    result = bare_mhr("token", "--client-id", "x", "--key", str(key))

    assert result.code == 2
    assert "no service address" in _one_line(result)


def test_a_server_never_reads_the_development_file(bare_mhr: Mhr, tmp_path: Path) -> None:
    """Production cannot pick up development settings: `mhr serve` takes its environment alone."""
    _development_env(tmp_path, port=_free_port())

    result = bare_mhr("serve")

    assert result.code == 2
    assert "refusing to start" in result.err and "MHR_PUBLIC_BASE_URL" in result.err
    assert not (tmp_path / "dev.sqlite3").exists()


def test_a_development_file_that_says_production_is_refused(bare_mhr: Mhr, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / DEVELOPMENT_ENV_FILE).write_text(
        "MHR_ENV=production\nMHR_PUBLIC_BASE_URL=https://x.example\n"
    )

    result = bare_mhr("orgs", "list")

    assert result.code == 2
    assert "holds development settings only" in _one_line(result)


def test_an_invalid_setting_is_one_line_naming_it(bare_mhr: Mhr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHR_PORT", "eighty")

    result = bare_mhr("orgs", "list")

    assert result.code == 2
    assert "MHR_PORT" in _one_line(result)


def test_an_unmigrated_database_is_one_line(
    bare_mhr: Mhr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MHR_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}")

    result = bare_mhr("orgs", "list")

    assert result.code == 2
    assert "database error" in _one_line(result)


def test_an_unreadable_keyring_is_one_line(
    bare_mhr: Mhr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keyring.json").write_text("{not json")
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))

    result = bare_mhr("audit", "key")

    assert result.code == 2
    assert "keyring" in _one_line(result)


def test_records_relabel_on_an_empty_store(migrated: Mhr) -> None:
    # The relabelling itself is covered end to end in tests/api/test_sensitive_labels.py.
    result = migrated("records", "relabel")
    assert result.code == 0, result.err
    assert result.json() == {"migrants": 0, "resources": 0, "labels_changed": 0, "grants": 0}
