"""The audit log in the database: sealing, proofs, and tampering that `mhr audit verify` must catch.

Every tamper test changes rows directly (as someone with database access
would) and expects the verifier to name the entry or checkpoint at fault.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mhr_testkit import sync_url

from security import merkle
from security.signed_note import Checkpoint, NoteSigner
from service.audit import log as audit_log
from service.audit.disclosures import disclosures_for_patient
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.audit.verify import Report, verify_database
from service.cli import main as cli_main
from service.store.database import Database

ORIGIN = "mhr.test/audit"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.generate())


def _record(i: int, patient: str = "pat-1") -> AuditRecord:
    return AuditRecord(
        event_type=EventType.rest,
        subtype="read",
        action=Action.read,
        outcome=Outcome.success,
        agent=AuditAgent("client-a", "org-a", "authority", "person-7"),
        purpose="PUBHLTH",
        entities=(AuditEntity("Observation", f"obs-{i}", 1, f"{i:064x}"),),
        patient_ids=(patient,),
    )


def run(coro_fn: Any, url: str) -> Any:
    async def go() -> Any:
        database = Database(url)
        try:
            return await coro_fn(database)
        finally:
            await database.dispose()

    return asyncio.run(go())


def add_entries(url: str, count: int, start: int = 0) -> None:
    async def work(db: Database) -> None:
        for i in range(start, start + count):
            async with db.transaction() as session:
                await record_audit(session, _record(i), request_id=f"req-{i}", source="test")

    run(work, url)


def seal(url: str, signer: NoteSigner) -> Checkpoint | None:
    return run(lambda db: audit_log.seal(db, signer, ORIGIN, wait=True), url)  # type: ignore[no-any-return]


def build_log(url: str, signer: NoteSigner, batches: tuple[int, ...] = (5, 6, 7)) -> list[str]:
    """Entries sealed in several batches; returns each checkpoint note."""
    notes = []
    done = 0
    for size in batches:
        add_entries(url, size, done)
        done += size
        assert seal(url, signer) is not None
        notes.append(latest_note(url))
    return notes


def latest_note(url: str) -> str:
    async def work(db: Database) -> str:
        async with db.sessions() as session:
            found = await audit_log.latest_checkpoint(session)
            assert found is not None
            return found.note

    return run(work, url)  # type: ignore[no-any-return]


def verify(url: str, signer: NoteSigner, trusted: str | None = None) -> Report:
    return asyncio.run(verify_database(url, verifier=signer.verifier(), trusted_note=trusted))


def sql(url: str, statement: str, **params: Any) -> Any:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def entry_at(url: str, leaf: int) -> int:
    return int(sql(url, "SELECT id FROM audit_entries WHERE leaf_index = :i", i=leaf)[0][0])


# --- the log itself -------------------------------------------------------------


def test_seal_assigns_dense_leaves_and_checkpoints_verify(database_url: str, signer: NoteSigner) -> None:
    notes = build_log(database_url, signer)
    rows = sql(database_url, "SELECT leaf_index FROM audit_entries ORDER BY leaf_index")
    assert [r[0] for r in rows] == list(range(18))
    assert [Checkpoint.parse(signer.verifier().verify(n)).size for n in notes] == [5, 11, 18]
    report = verify(database_url, signer, trusted=notes[0])
    assert report.ok, report.summary()
    assert report.leaves == 18 and report.checkpoints == 3
    assert seal(database_url, signer) is None  # nothing new: no empty checkpoint


def test_proofs_from_stored_nodes_verify(database_url: str, signer: NoteSigner) -> None:
    notes = build_log(database_url, signer)
    old = Checkpoint.parse(signer.verifier().verify(notes[0]))
    new = Checkpoint.parse(signer.verifier().verify(notes[2]))

    async def work(db: Database) -> tuple[list[bytes], list[bytes], bytes]:
        async with db.sessions() as session:
            consistency = await audit_log.consistency_proof(session, old.size, new.size)
            inclusion = await audit_log.inclusion_proof(session, 7, new.size)
        content = sql(database_url, "SELECT content FROM audit_entries WHERE leaf_index = 7")[0][0]
        return consistency, inclusion, bytes(content)

    consistency, inclusion, content = run(work, database_url)
    merkle.verify_consistency(old.size, new.size, consistency, old.root_hash, new.root_hash)
    merkle.verify_inclusion(7, new.size, merkle.leaf_hash(content), inclusion, new.root_hash)


def test_late_committing_lower_id_is_appended_later(database_url: str, signer: NoteSigner) -> None:
    """Leaf order is append order: an entry whose id is lower but that commits late goes at the end."""
    add_entries(database_url, 3)
    # Simulate the late commit: an entry with a lower id than every sealed one, committed after sealing.
    assert seal(database_url, signer) is not None
    first = entry_at(database_url, 0)
    sql(database_url, "UPDATE audit_entries SET leaf_index = NULL, leaf_hash = NULL WHERE id = :id", id=first)
    sql(database_url, "DELETE FROM audit_nodes")
    sql(database_url, "DELETE FROM audit_checkpoints")
    sql(database_url, "UPDATE audit_entries SET leaf_index = leaf_index - 1, leaf_hash = NULL")
    sql(database_url, "UPDATE audit_entries SET leaf_index = NULL")
    add_entries(database_url, 2, 3)
    assert seal(database_url, signer) is not None
    order = [r[0] for r in sql(database_url, "SELECT id FROM audit_entries ORDER BY leaf_index")]
    assert order == sorted(order)  # all unsealed: id order
    assert verify(database_url, signer).ok


def test_entries_hold_no_free_text(database_url: str, signer: NoteSigner) -> None:
    add_entries(database_url, 1)
    content = bytes(sql(database_url, "SELECT content FROM audit_entries")[0][0])
    assert content.startswith(b'{"action":"R","agent":{"client":"client-a"')  # sorted keys, compact
    assert b"obs-0" in content and b"pat-1" in content and b" " not in content


# --- tampering --------------------------------------------------------------------


def test_changed_content_names_the_entry(database_url: str, signer: NoteSigner) -> None:
    build_log(database_url, signer)
    victim = entry_at(database_url, 7)
    content = bytes(sql(database_url, "SELECT content FROM audit_entries WHERE id = :id", id=victim)[0][0])
    sql(
        database_url,
        "UPDATE audit_entries SET content = :c WHERE id = :id",
        c=content.replace(b"client-a", b"client-b"),
        id=victim,
    )
    report = verify(database_url, signer)
    assert not report.ok
    assert report.first is not None
    assert report.first.subject == f"entry {victim} (leaf 7)"
    # The checkpoints after it fail too; the first failure is the entry.
    assert any(f.subject == "checkpoint 11" for f in report.failures)


def test_changed_content_with_rewritten_hashes_names_the_checkpoint(
    database_url: str, signer: NoteSigner
) -> None:
    """An attacker who also rewrites the stored leaf hash and node is caught by the signed root."""
    build_log(database_url, signer)
    victim = entry_at(database_url, 7)
    forged = b'{"forged":true}'
    digest = merkle.leaf_hash(forged)
    sql(
        database_url,
        "UPDATE audit_entries SET content = :c, leaf_hash = :h WHERE id = :id",
        c=forged,
        h=digest,
        id=victim,
    )
    sql(database_url, "UPDATE audit_nodes SET hash = :h WHERE level = 0 AND node_index = 7", h=digest)
    report = verify(database_url, signer)
    # The stored parent of leaves 6..7 no longer matches: the change is localised to that pair.
    assert report.first is not None and report.first.subject == "tree node 1/3"
    assert "leaves 6..7" in report.first.reason
    assert any(f.subject == "checkpoint 11" for f in report.failures)


def test_deleted_entry_is_a_gap(database_url: str, signer: NoteSigner) -> None:
    build_log(database_url, signer)
    victim = entry_at(database_url, 4)
    sql(database_url, "DELETE FROM audit_refs WHERE entry_id = :id", id=victim)
    sql(database_url, "DELETE FROM audit_entries WHERE id = :id", id=victim)
    report = verify(database_url, signer)
    assert report.first is not None
    assert report.first.subject == "leaf 4"
    assert "not dense" in report.first.reason


def test_last_entries_deleted_and_resealed(database_url: str, signer: NoteSigner) -> None:
    notes = build_log(database_url, signer)
    trusted = notes[-1]  # size 18, kept by the auditor
    # Remove the last 7 entries and every trace of them in the tree, then let the log grow again.
    for leaf in range(11, 18):
        victim = entry_at(database_url, leaf)
        sql(database_url, "DELETE FROM audit_refs WHERE entry_id = :id", id=victim)
        sql(database_url, "DELETE FROM audit_entries WHERE id = :id", id=victim)
    sql(database_url, "DELETE FROM audit_nodes WHERE (node_index + 1) * power(2, level) > 11")
    sql(database_url, "DELETE FROM audit_checkpoints WHERE size > 11")
    add_entries(database_url, 6, 100)
    assert seal(database_url, signer) is not None  # the rewritten log is internally consistent ...
    assert verify(database_url, signer).ok
    report = verify(database_url, signer, trusted=trusted)  # ... but not with what the auditor kept
    assert report.first is not None
    assert report.first.subject == "trusted checkpoint 18"


def test_last_entries_deleted_without_regrowth(database_url: str, signer: NoteSigner) -> None:
    notes = build_log(database_url, signer)
    for leaf in range(15, 18):
        victim = entry_at(database_url, leaf)
        sql(database_url, "DELETE FROM audit_refs WHERE entry_id = :id", id=victim)
        sql(database_url, "DELETE FROM audit_entries WHERE id = :id", id=victim)
    sql(database_url, "DELETE FROM audit_checkpoints WHERE size > 11")
    report = verify(database_url, signer, trusted=notes[-1])
    assert report.first is not None and report.first.subject == "trusted checkpoint 18"
    assert "only 15 sealed entries" in report.first.reason


def test_entry_inserted_out_of_order(database_url: str, signer: NoteSigner) -> None:
    """A backdated entry slipped in at leaf 6, shifting the later ones up by one."""
    build_log(database_url, signer)
    for leaf in range(17, 5, -1):  # top down: leaf_index is unique
        sql(
            database_url, "UPDATE audit_entries SET leaf_index = :n WHERE leaf_index = :o", n=leaf + 1, o=leaf
        )
    forged = b'{"action":"R","forged":true}'
    sql(
        database_url,
        "INSERT INTO audit_entries (recorded_at, event_type, subtype, action, outcome, client_id, content, "
        "leaf_index, leaf_hash) VALUES (:t, 'rest', 'read', 'R', '0', 'client-x', :c, 6, :h)",
        t="2020-01-01 00:00:00",
        c=forged,
        h=merkle.leaf_hash(forged),
    )
    inserted = entry_at(database_url, 6)
    report = verify(database_url, signer)
    assert report.first is not None
    assert report.first.subject == f"entry {inserted} (leaf 6)"


def test_checkpoint_signed_by_another_key(database_url: str, signer: NoteSigner) -> None:
    build_log(database_url, signer)
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    forged = other.sign(Checkpoint(ORIGIN, 11, b"\x01" * 32).body())
    sql(
        database_url,
        "UPDATE audit_checkpoints SET note = :n, root_hash = :r WHERE size = 11",
        n=forged,
        r=b"\x01" * 32,
    )
    report = verify(database_url, signer)
    assert report.first is not None and report.first.subject == "checkpoint 11"
    assert "signature" in report.first.reason


def test_checkpoint_validly_signed_over_a_forged_root(database_url: str, signer: NoteSigner) -> None:
    """Even the log key cannot make a different root at a size stand: recomputation catches it."""
    build_log(database_url, signer)
    forged = signer.sign(Checkpoint(ORIGIN, 11, b"\x02" * 32).body())
    sql(
        database_url,
        "UPDATE audit_checkpoints SET note = :n, root_hash = :r WHERE size = 11",
        n=forged,
        r=b"\x02" * 32,
    )
    report = verify(database_url, signer)
    assert report.first is not None and report.first.subject == "checkpoint 11"
    assert "recomputed" in report.first.reason


def test_tampered_interior_node_breaks_proofs_and_is_named(database_url: str, signer: NoteSigner) -> None:
    notes = build_log(database_url, signer)
    # Node 1/3 (leaves 6..7) is on the consistency path from size 5 to 18.
    sql(database_url, "UPDATE audit_nodes SET hash = :h WHERE level = 1 AND node_index = 3", h=b"\x03" * 32)
    report = verify(database_url, signer, trusted=notes[0])
    subjects = {f.subject for f in report.failures}
    assert "tree node 1/3" in subjects
    assert any(s.startswith("consistency 5 -> 18") for s in subjects)


def test_cli_verify_exit_codes(database_url: str, signer: NoteSigner, tmp_path: Path, capsys: Any) -> None:
    notes = build_log(database_url, signer)
    trusted = tmp_path / "checkpoint.txt"
    trusted.write_text(notes[1])
    args = [
        "audit",
        "verify",
        "--database-url",
        database_url,
        "--vkey",
        signer.vkey(),
        "--checkpoint",
        str(trusted),
    ]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.startswith("OK: 18 entries, 3 checkpoints")
    sql(database_url, "UPDATE audit_entries SET content = :c WHERE leaf_index = 2", c=b"{}")
    assert cli_main(args) == 1
    captured = capsys.readouterr()
    assert "(leaf 2): content does not match" in captured.err
    assert captured.out.startswith("FAILED: entry ")


def test_disclosure_report_for_one_migrant(database_url: str, capsys: Any, monkeypatch: Any) -> None:
    def disclosure(patient: str, org: str, types: tuple[str, ...], outcome: Outcome) -> AuditRecord:
        return AuditRecord(
            event_type=EventType.disclosure,
            subtype="search-type",
            action=Action.execute,
            outcome=outcome,
            agent=AuditAgent("client-b", org, "authority"),
            purpose="PUBHLTH",
            entities=tuple(AuditEntity(t, f"{t.lower()}-1", 1, "00" * 32) for t in types),
            patient_ids=(patient,),
            decision_rule="consent-permit",
            consent_id="consent-9",
            consent_version=2,
            recipients=(org,),
        )

    async def work(db: Database) -> None:
        for record in (
            disclosure("pat-1", "org-ca", ("Observation", "Patient"), Outcome.success),
            disclosure("pat-2", "org-us", ("Observation",), Outcome.success),
            disclosure("pat-1", "org-us", ("Immunization",), Outcome.minor_failure),  # refused: not disclosed
            _record(1),  # a read that is no disclosure
        ):
            async with db.transaction() as session:
                await record_audit(session, record, request_id="req", source="test")

    run(work, database_url)

    async def report(db: Database) -> list[Any]:
        async with db.sessions() as session:
            return await disclosures_for_patient(session, "pat-1")

    found = run(report, database_url)
    assert [(d.organizations, d.purpose, d.resource_types, d.consent) for d in found] == [
        (("org-ca",), "PUBHLTH", ("Observation", "Patient"), "Consent/consent-9/_history/2")
    ]
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_ENV", "test")
    assert cli_main(["audit", "disclosures", "--patient", "pat-1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["organizations"] for d in listed] == [["org-ca"]]
