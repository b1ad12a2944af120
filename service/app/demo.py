"""The demo set seeded by ``make run``: one clinic, two authorities, an auditor and an operator.

Each gets a client whose private key is written under ``var/demo/`` (git
ignores ``var/``), so a person can try the API straight away. Seeding happens
once: a second start finds the organizations and leaves them alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from security.jwk import generate_client_key, private_key_pem, public_jwk
from security.roles import Role
from service.audit.recorder import record_audit
from service.core.request_context import SOURCE
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.records.context import Actor
from service.records.intake import Intake
from service.records.repository import RecordRepository
from service.runtime.providers import Runtime
from service.store.database import Database


@dataclass(frozen=True)
class DemoParty:
    slug: str
    name: str
    kind: Role
    jurisdiction: str | None
    purposes: tuple[str, ...] = ()


DEMO_PARTIES = (
    DemoParty("clinic", "Demo Panel Clinic Amman", Role.clinic, "JO"),
    DemoParty("authority-a", "Demo Public Health Authority A", Role.authority, "CA-ON", ("PUBHLTH", "TREAT")),
    DemoParty("authority-b", "Demo Public Health Authority B", Role.authority, "US-NY", ("PUBHLTH",)),
    DemoParty("auditor", "Demo Audit Office", Role.auditor, None),
    DemoParty("admin", "mhr Operations", Role.admin, None),
)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


async def seed_demo(database: Database, demo_dir: Path) -> dict[str, dict[str, str]] | None:
    """Create the demo parties once; returns what was created, or None when already seeded."""
    demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    async with database.transaction() as session:
        repo = IdentityRepository(session)
        if await repo.organization_by_id_or_name(DEMO_PARTIES[0].name) is not None:
            return None
        created: dict[str, dict[str, str]] = {}
        for party in DEMO_PARTIES:
            # Stable ids: the example Consents name "authority-a" as their recipient.
            org = await add_organization(
                repo, name=party.name, kind=party.kind, jurisdiction=party.jurisdiction, org_id=party.slug
            )
            key = generate_client_key("EC")
            client = await add_client(
                repo,
                ClientRegistration(
                    organization=org.id,
                    role=party.kind,
                    jwks={"keys": [public_jwk(key)]},
                    purposes=party.purposes,
                    description=f"demo {party.slug} client",
                ),
            )
            key_path = demo_dir / f"{party.slug}.pem"
            _write_private(key_path, private_key_pem(key))
            created[party.slug] = {
                "organization_id": org.id,
                "client_id": client.id,
                "key": str(key_path),
                "scopes": client.scopes,
            }
        _write_private(demo_dir / "clients.json", json.dumps(created, indent=2).encode())
    return created


def load_demo_clients(demo_dir: Path) -> dict[str, dict[str, str]]:
    path = demo_dir / "clients.json"
    if not path.exists():
        return {}
    loaded: dict[str, dict[str, str]] = json.loads(path.read_text())
    return loaded


# The README's "Try it" submits this one itself (with its consent for authority A): seeding it
# too would make that step a second copy of the same exam.
LEFT_FOR_THE_README = "exam-refugee-vaccinations.json"


async def seed_demo_exams(runtime: Runtime, examples_dir: Path, clinic: dict[str, str]) -> int:
    """Submit the implementation guide's example exams as the demo clinic; returns how many."""
    actor = Actor(clinic["client_id"], clinic["organization_id"], Role.clinic, person="demo-seed")
    count = 0
    for path in sorted(examples_dir.glob("exam-*.json")):
        if path.name == LEFT_FOR_THE_README:
            continue
        bundle = orjson.loads(path.read_bytes())
        async with runtime.database.transaction() as session:
            intake = Intake(runtime.records, RecordRepository(session), IdentityRepository(session))
            result = await intake.transaction(bundle, actor)
            await record_audit(
                session,
                result.transaction_record(actor, detail="demo-seed"),
                request_id="demo-seed",
                source=SOURCE,
            )
        count += 1
    return count
