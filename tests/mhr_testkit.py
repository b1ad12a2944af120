"""Test helpers: start the app on a database, register parties, get tokens."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient

from security.jwk import PrivateKey, generate_client_key, public_jwk, sign_client_assertion
from security.keys import KeyProvider
from service.app.factory import asgi_app, create_app
from service.core.settings import Environment, Settings
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store.database import Database

# The local server; without MHR_TEST_DATABASE_URL each run creates a database of its own there.
PG_SERVER_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
BASE_URL = "http://testserver"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def sync_url(url: str) -> str:
    """The same database through a synchronous driver, for tests that look under the service."""
    return url.replace("+asyncpg", "+psycopg").replace("+aiosqlite", "")


@dataclass
class Party:
    organization_id: str
    client_id: str
    role: str
    key: PrivateKey
    scopes: str


@dataclass
class Service:
    client: TestClient
    settings: Settings
    tmp_path: Path
    parties: dict[str, Party] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def start(
        cls, database_url: str, tmp_path: Path, *, keys: KeyProvider | None = None, **overrides: Any
    ) -> Iterator[Service]:
        settings = Settings(
            env=Environment.test,
            database_url=database_url,
            public_base_url=BASE_URL,
            keyring_path=tmp_path / "keyring.json",
            client_status_cache_seconds=0,
            **overrides,
        )
        app = create_app(settings, keys=keys)
        with TestClient(asgi_app(app, settings), base_url=BASE_URL) as client:
            service = cls(client, settings, tmp_path)
            service.fastapi = app  # type: ignore[attr-defined]
            yield service

    @property
    def token_url(self) -> str:
        return f"{BASE_URL}/auth/token"

    def _run(self, coro: Any) -> Any:
        async def wrapped() -> Any:
            database = Database(self.settings.database_url)
            try:
                return await coro(database)
            finally:
                await database.dispose()

        return asyncio.run(wrapped())

    def register(
        self,
        name: str,
        kind: str,
        *,
        scopes: str | None = None,
        purposes: tuple[str, ...] = (),
        key_kind: str = "EC",
        jurisdiction: str | None = None,
        jwks_url: str | None = None,
        org_id: str | None = None,
    ) -> Party:
        """An organization of ``kind`` with one client holding a fresh key.

        With ``jwks_url`` the client is registered by URL instead of by JWKS:
        the caller serves the party's public key there.
        """
        key = generate_client_key(key_kind)

        async def work(db: Database) -> Party:
            async with db.transaction() as session:
                repo = IdentityRepository(session)
                org = await add_organization(
                    repo,
                    name=f"{name} {uuid.uuid4().hex[:6]}",
                    kind=kind,
                    jurisdiction=jurisdiction,
                    org_id=org_id,
                )
                client = await add_client(
                    repo,
                    ClientRegistration(
                        organization=org.id,
                        role=kind,
                        jwks=None if jwks_url else {"keys": [public_jwk(key)]},
                        jwks_url=jwks_url,
                        scopes=scopes,
                        purposes=purposes,
                    ),
                )
                return Party(org.id, client.id, kind, key, client.scopes)

        party: Party = self._run(work)
        self.parties[name] = party
        return party

    def assertion(self, party: Party, **kwargs: Any) -> str:
        return sign_client_assertion(party.key, client_id=party.client_id, token_url=self.token_url, **kwargs)

    def request_token(self, party: Party, scope: str | None = None, **form: str) -> Any:
        data = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": self.assertion(party),
            "scope": scope or party.scopes,
            **form,
        }
        return self.client.post("/auth/token", data=data)

    def token(self, party: Party, scope: str | None = None, **form: str) -> str:
        response = self.request_token(party, scope, **form)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def headers(self, party: Party, scope: str | None = None, **form: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(party, scope, **form)}"}


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "fhir" / "examples").glob("exam-*.json"))
FHIR_HEADERS = {"Content-Type": "application/fhir+json"}


def load_example(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def submit(service: Service, party: Party, bundle: dict[str, Any]) -> Any:
    return service.client.post(
        "/fhir", content=json.dumps(bundle), headers={**FHIR_HEADERS, **service.headers(party)}
    )


def create_database(server_url: str, name: str) -> str:
    """A new, empty database on the server of ``server_url``; returns its URL."""
    admin = sa.create_engine(
        make_url(sync_url(server_url)).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    name = make_url(url).database
    admin = sa.create_engine(make_url(sync_url(url)).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def scratch_database(server_url: str, purpose: str) -> Iterator[str]:
    """A throwaway database named for this use alone, so that concurrent runs never share one."""
    url = create_database(server_url, f"mhr_{purpose}_{uuid.uuid4().hex[:12]}")
    try:
        yield url
    finally:
        drop_database(url)


def truncate_postgres(url: str) -> None:
    """Empty every table but Alembic's, keeping the migrated schema."""
    engine = sa.create_engine(sync_url(url))
    with engine.begin() as conn:
        tables = conn.execute(
            sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
        ).scalars()
        names = ", ".join(f'"{t}"' for t in tables)
        if names:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


def live_token(base_url: str, party: Party, scope: str | None = None, purpose: str | None = None) -> str:
    """An access token from a running server's token endpoint, over HTTP."""
    token_url = f"{base_url}/auth/token"
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": sign_client_assertion(party.key, client_id=party.client_id, token_url=token_url),
        "scope": scope or party.scopes,
    }
    if purpose:
        form["purpose_of_use"] = purpose
    response = httpx.post(token_url, data=form, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def wait_for(predicate: Any, seconds: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``seconds``, naming ``what``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
