"""8 concurrent clients against a live server: N audited requests give exactly N entries, dense, verified."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from mhr_testkit import JWT_BEARER, sync_url

from security.jwk import generate_client_key, public_jwk, sign_client_assertion
from security.keys import CheckpointSigning, LocalKeyring
from security.signed_note import NoteSigner
from service.audit import log as audit_log
from service.audit.verify import verify_database, verify_service
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store.database import Database

CLIENTS = 8
PER_CLIENT = 10
ORIGIN = "mhr.test/concurrency"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MHR_ENV": "test",
        "MHR_DATABASE_URL": database_url,
        "MHR_PUBLIC_BASE_URL": base,
        "MHR_KEYRING_PATH": str(tmp_path / "keyring.json"),
        "MHR_DEPLOYMENT_NAME": ORIGIN,
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app.factory:create_asgi_app",
            "--factory",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/fhir/metadata", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
        yield base, tmp_path / "keyring.json"
    finally:
        server.terminate()
        server.wait(timeout=20)


def _register(url: str, kind: str) -> tuple[str, object]:
    key = generate_client_key("EC")

    async def work() -> str:
        database = Database(url)
        try:
            async with database.transaction() as session:
                repo = IdentityRepository(session)
                org = await add_organization(repo, name=f"{kind} {os.urandom(3).hex()}", kind=kind)
                client = await add_client(
                    repo, ClientRegistration(organization=org.id, role=kind, jwks={"keys": [public_jwk(key)]})
                )
                return client.id
        finally:
            await database.dispose()

    return asyncio.run(work()), key


def _token(base: str, client_id: str, key: object, scope: str) -> httpx.Response:
    assertion = sign_client_assertion(key, client_id=client_id, token_url=f"{base}/auth/token")  # type: ignore[arg-type]
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
        "scope": scope,
    }
    return httpx.post(f"{base}/auth/token", data=form, timeout=30)


def _count(url: str, where: str = "") -> int:
    engine = sa.create_engine(sync_url(url))
    with engine.connect() as conn:
        total = int(conn.execute(sa.text(f"SELECT count(*) FROM audit_entries {where}")).scalar_one())
    engine.dispose()
    return total


@pytest.mark.slow
def test_concurrent_clients_produce_exactly_n_dense_entries(
    database_url: str, live: tuple[str, Path]
) -> None:
    base, keyring_path = live
    clients = [_register(database_url, "clinic") for _ in range(CLIENTS)]

    def work(client: tuple[str, object]) -> list[int]:
        return [_token(base, client[0], client[1], "system/*.rs").status_code for _ in range(PER_CLIENT)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = [s for batch in pool.map(work, clients) for s in batch]
    n = CLIENTS * PER_CLIENT
    assert statuses == [200] * n
    assert _count(database_url) == n

    signer = NoteSigner(ORIGIN, CheckpointSigning(LocalKeyring.load(keyring_path)))

    async def seal_all() -> int:
        database = Database(database_url)
        try:
            return await audit_log.seal_all(database, signer, ORIGIN)
        finally:
            await database.dispose()

    # The server's own integrator may have sealed some already; one more run seals the rest.
    assert asyncio.run(seal_all()) == n
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        leaves = [
            r[0] for r in conn.execute(sa.text("SELECT leaf_index FROM audit_entries ORDER BY leaf_index"))
        ]
    engine.dispose()
    assert leaves == list(range(n))

    report = asyncio.run(verify_database(database_url, verifier=signer.verifier(), trusted_note=None))
    assert report.ok, report.summary()
    assert report.leaves == n

    # The same check over the auditor API of the running service.
    auditor_id, auditor_key = _register(database_url, "auditor")
    token = _token(base, auditor_id, auditor_key, "system/AuditEvent.rs").json()["access_token"]
    vkey = httpx.get(f"{base}/audit/key", headers={"Authorization": f"Bearer {token}"}).text.strip()
    assert vkey == signer.vkey()
    remote = asyncio.run(verify_service(base, token, verifier=signer.verifier(), trusted_note=None))
    assert remote.ok, remote.summary()
    assert remote.leaves >= n
