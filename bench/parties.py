"""The bench's own database and parties: one clinic and two receiving authorities.

Organizations get stable ids (``authority-a``, ``authority-b``) because the
generated Consents name them by identifier. Each gets one client with a fresh
EC key; tokens are fetched from the running server like any client would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from security.jwk import (
    generate_client_key,
    load_private_key,
    private_key_pem,
    public_jwk,
    sign_client_assertion,
)
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store import migrate
from service.store.database import Database

PG = ("-h", "127.0.0.1", "-U", "postgres")
# Every database the bench makes is named from this prefix: two checkouts benchmarking on one
# PostgreSQL at once (a shared development machine) set different ones and leave each other alone.
DB_PREFIX = os.environ.get("BENCH_DB_PREFIX", "mhr_bench")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PARTIES = (
    ("clinic", "Bench Panel Clinic", "clinic", ()),
    ("authority-a", "Bench Public Health Authority A", "authority", ("PUBHLTH",)),
    ("authority-b", "Bench Public Health Authority B", "authority", ("PUBHLTH",)),
)


def database_url(name: str) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def recreate_database(name: str, template: str | None = None) -> None:
    """A fresh database, or an identical copy of ``template`` (which must have no connections)."""
    if name == "test":
        raise SystemExit("the bench never touches the test database")
    subprocess.run(["dropdb", *PG, "--if-exists", "--force", name], check=True)
    # FILE_COPY: a copy of a 100k-exam database without writing all of it to the WAL first.
    extra = ["-T", template, "--strategy=file_copy"] if template else []
    subprocess.run(["createdb", *PG, *extra, name], check=True)


def psql(name: str, sql: str) -> str:
    done = subprocess.run(
        ["psql", *PG, "-d", name, "-At", "-c", sql], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@dataclass
class Party:
    slug: str
    organization_id: str
    client_id: str
    key_path: Path

    def token(self, base_url: str, scope: str, purpose: str | None = None) -> str:
        token_url = f"{base_url}/auth/token"
        key = load_private_key(self.key_path.read_bytes())
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": sign_client_assertion(key, client_id=self.client_id, token_url=token_url),
            "scope": scope,
        }
        if purpose:
            form["purpose_of_use"] = purpose
        response = httpx.post(token_url, data=form, timeout=30)
        response.raise_for_status()
        return str(response.json()["access_token"])


def setup(
    name: str, workdir: Path, migrate_database: Callable[[str], None] = migrate.upgrade
) -> dict[str, Party]:
    """A fresh database with the bench parties, keys under ``workdir``; at this tree's head
    revision, or at a baseline's (``migrate_database``: see ``bench.baseline.migrate``)."""
    recreate_database(name)
    url = database_url(name)
    migrate_database(url)
    workdir.mkdir(parents=True, exist_ok=True)

    async def register() -> dict[str, Party]:
        database = Database(url)
        parties: dict[str, Party] = {}
        try:
            async with database.transaction() as session:
                repo = IdentityRepository(session)
                for slug, org_name, kind, purposes in PARTIES:
                    org = await add_organization(repo, name=org_name, kind=kind, org_id=slug)
                    key = generate_client_key("EC")
                    client = await add_client(
                        repo,
                        ClientRegistration(
                            organization=org.id,
                            role=kind,
                            jwks={"keys": [public_jwk(key)]},
                            purposes=purposes,
                            description=f"bench {slug}",
                        ),
                    )
                    key_path = workdir / f"{slug}.pem"
                    key_path.write_bytes(private_key_pem(key))
                    key_path.chmod(0o600)
                    parties[slug] = Party(slug, org.id, client.id, key_path)
        finally:
            await database.dispose()
        return parties

    parties = asyncio.run(register())
    save(parties, workdir)
    return parties


def save(parties: dict[str, Party], workdir: Path) -> None:
    data: dict[str, Any] = {
        slug: {"organization_id": p.organization_id, "client_id": p.client_id, "key": str(p.key_path)}
        for slug, p in parties.items()
    }
    (workdir / "parties.json").write_text(json.dumps(data, indent=2))


def load(workdir: Path) -> dict[str, Party]:
    data = json.loads((workdir / "parties.json").read_text())
    return {
        slug: Party(slug, d["organization_id"], d["client_id"], Path(d["key"])) for slug, d in data.items()
    }
