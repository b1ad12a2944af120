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
from service.cli.main import main as cli_main
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
    """An attacker who also rewrites the stored leaf hash, node and columns is caught by the signed root."""
    build_log(database_url, signer)
    victim = entry_at(database_url, 7)
    content = bytes(sql(database_url, "SELECT content FROM audit_entries WHERE id = :id", id=victim)[0][0])
    forged = content.replace(b"client-a", b"client-b")
    digest = merkle.leaf_hash(forged)
    sql(
        database_url,
        "UPDATE audit_entries SET content = :c, leaf_hash = :h, client_id = 'client-b' WHERE id = :id",
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


# --- what search and the disclosure report select by (issue 11 item 8) ---------------------


def _disclosure(i: int, patient: str = "pat-1") -> AuditRecord:
    return AuditRecord(
        event_type=EventType.disclosure,
        subtype="read",
        action=Action.read,
        outcome=Outcome.success,
        agent=AuditAgent("client-b", "org-ca", "authority"),
        purpose="PUBHLTH",
        entities=(AuditEntity("Observation", f"obs-{i}", 1, f"{i:064x}"),),
        patient_ids=(patient,),
        decision_rule="consent-permit",
        consent_id="consent-9",
        consent_version=1,
        recipients=("org-ca",),
    )


def add_disclosures(url: str, count: int) -> None:
    async def work(db: Database) -> None:
        for i in range(count):
            async with db.transaction() as session:
                await record_audit(session, _disclosure(i), request_id=f"dis-{i}", source="test")

    run(work, url)


def disclosures_of(url: str, patient: str) -> int:
    async def work(db: Database) -> int:
        async with db.sessions() as session:
            return len(await disclosures_for_patient(session, patient))

    return run(work, url)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        ("UPDATE audit_entries SET event_type = 'rest' WHERE event_type = 'disclosure'", "column event_type"),
        ("UPDATE audit_entries SET outcome = '4' WHERE event_type = 'disclosure'", "column outcome"),
        ("UPDATE audit_entries SET client_id = 'z' WHERE event_type = 'disclosure'", "column client_id"),
        ("DELETE FROM audit_refs WHERE kind = 'patient'", "audit_refs disagree with the content: missing"),
        ("UPDATE audit_refs SET value = 'pat-2' WHERE kind = 'patient'", "audit_refs disagree"),
    ],
    ids=["event_type", "outcome", "client_id", "refs-deleted", "refs-moved"],
)
def test_edited_search_columns_empty_the_disclosure_report_and_verify_names_the_entry(
    database_url: str, signer: NoteSigner, tamper: str, says: str
) -> None:
    add_entries(database_url, 3)
    add_disclosures(database_url, 4)
    assert seal(database_url, signer) is not None
    assert disclosures_of(database_url, "pat-1") == 4
    sql(database_url, tamper)
    if "client_id" not in tamper:  # that one hides them from AuditEvent?agent= instead
        assert disclosures_of(database_url, "pat-1") < 4  # what the migrant is shown changed ...
    report = verify(database_url, signer)  # ... and verify must say where
    assert not report.ok
    assert report.first is not None
    first = 0 if "refs" in tamper else 3  # every entry has a patient ref; only leaves 3.. are disclosures
    assert report.first.subject == f"entry {entry_at(database_url, first)} (leaf {first})"
    assert says in report.first.reason


def test_edited_columns_of_an_unsealed_entry_are_named(database_url: str, signer: NoteSigner) -> None:
    build_log(database_url, signer, (3,))
    add_disclosures(database_url, 2)
    victim = int(sql(database_url, "SELECT max(id) FROM audit_entries")[0][0])
    sql(database_url, "UPDATE audit_entries SET event_type = 'rest' WHERE id = :id", id=victim)
    report = verify(database_url, signer)
    assert report.first is not None and report.first.subject == f"entry {victim} (unsealed)"
    assert "column event_type is 'rest' but the content says 'disclosure'" in report.first.reason


def test_untampered_log_checks_columns_and_says_what_was_not_checked(
    database_url: str, signer: NoteSigner
) -> None:
    build_log(database_url, signer)
    add_disclosures(database_url, 2)  # unsealed, untouched
    report = verify(database_url, signer)
    assert report.ok, report.summary()
    assert report.columns_checked
    assert any("no retained checkpoint" in gap for gap in report.not_checked())
    assert not verify(database_url, signer, trusted=latest_note(database_url)).not_checked()


# --- trust anchors: the key is required, removal needs a retained checkpoint ---------------


def _cli_env(monkeypatch: Any, database_url: str) -> None:
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_ENV", "test")


def test_verify_refuses_a_checkpoint_without_the_key(
    database_url: str, signer: NoteSigner, tmp_path: Path, capsys: Any
) -> None:
    notes = build_log(database_url, signer)
    retained = tmp_path / "retained.txt"
    retained.write_text(notes[-1])
    code = cli_main(["audit", "verify", "--database-url", database_url, "--checkpoint", str(retained)])
    captured = capsys.readouterr()
    assert code == 2
    assert "verified" not in captured.out and "OK" not in captured.out
    assert "--vkey" in captured.err


def test_retained_checkpoint_catches_a_wiped_or_truncated_log(
    database_url: str, signer: NoteSigner, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    _cli_env(monkeypatch, database_url)
    retained = tmp_path / "retained.txt"
    build_log(database_url, signer, (5,))
    keep = ["audit", "checkpoint", "--out", str(retained), "--vkey", signer.vkey()]
    assert cli_main(keep) == 0
    assert "checkpoint of size 5 saved" in capsys.readouterr().out
    add_entries(database_url, 6, 5)
    assert seal(database_url, signer) is not None
    assert cli_main(keep) == 0  # the routine: each run checks the log extends the one kept
    assert "consistent with the one it replaces (size 5)" in capsys.readouterr().out
    assert Checkpoint.parse(signer.verifier().verify(retained.read_text())).size == 11

    # Truncate to 3 entries and re-sign nothing: the key alone cannot tell.
    for leaf in range(3, 11):
        victim = entry_at(database_url, leaf)
        sql(database_url, "DELETE FROM audit_refs WHERE entry_id = :id", id=victim)
        sql(database_url, "DELETE FROM audit_entries WHERE id = :id", id=victim)
    sql(database_url, "DELETE FROM audit_nodes WHERE level = 0 AND node_index >= 3")
    sql(database_url, "DELETE FROM audit_nodes WHERE level > 0")
    sql(database_url, "DELETE FROM audit_checkpoints")
    key_only = ["audit", "verify", "--database-url", database_url, "--vkey", signer.vkey()]
    assert cli_main(key_only) == 1  # leaves 0..2 remain, sealed, but no checkpoint covers them
    assert "outside the signed tree of size 0" in capsys.readouterr().err
    sql(database_url, "DELETE FROM audit_refs")
    sql(database_url, "DELETE FROM audit_nodes")
    sql(database_url, "DELETE FROM audit_entries")  # wiped
    assert cli_main(key_only) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 0 entries")
    assert "NOT CHECKED: no retained checkpoint was given" in out
    assert cli_main([*key_only, "--checkpoint", str(retained)]) == 1
    captured = capsys.readouterr()
    assert "FAILED: trusted checkpoint 11: the log has only 0 sealed entries: entries were removed" in (
        captured.out
    )
    # Nor may the retained checkpoint be replaced by the emptied log's.
    add_entries(database_url, 2, 50)
    assert seal(database_url, signer) is not None
    assert cli_main(keep) == 1
    assert "entries were removed" in capsys.readouterr().err
    assert Checkpoint.parse(signer.verifier().verify(retained.read_text())).size == 11


# --- rows past the signed tree: reported, quarantined, sealing goes on -----------------------


def test_entry_forged_past_the_tree_is_reported_and_does_not_block_sealing(
    database_url: str, signer: NoteSigner
) -> None:
    build_log(database_url, signer)  # tree size 18
    forged = b'{"action":"R","forged":true}'
    sql(
        database_url,
        "INSERT INTO audit_entries (recorded_at, event_type, subtype, action, outcome, client_id, content, "
        "leaf_index, leaf_hash) VALUES (:t, 'disclosure', 'read', 'R', '0', 'client-x', :c, 18, :h)",
        t="2020-01-01 00:00:00",
        c=forged,
        h=merkle.leaf_hash(forged),
    )
    sql(database_url, "INSERT INTO audit_nodes (level, node_index, hash) VALUES (0, 19, :h)", h=b"\x05" * 32)
    forged_id = entry_at(database_url, 18)
    report = verify(database_url, signer)
    assert report.first is not None
    assert report.first.subject == f"entry {forged_id} (leaf 18)"
    assert "outside the signed tree of size 18" in report.first.reason
    assert any(f.subject == "tree node 0/19" for f in report.failures)

    add_entries(database_url, 4, 200)
    checkpoint = seal(database_url, signer)  # main: IntegrityError on every run from here on
    assert checkpoint is not None and checkpoint.size == 18 + 4 + 1  # + the security alert
    quarantined = sql(database_url, "SELECT entry_id, leaf_index, content FROM audit_quarantine")
    assert [(r[0], r[1], bytes(r[2])) for r in quarantined] == [(forged_id, 18, forged)]
    assert sql(database_url, "SELECT count(*) FROM audit_entries WHERE id = :id", id=forged_id)[0][0] == 0
    alerts = [
        json.loads(bytes(r[0]))
        for r in sql(database_url, "SELECT content FROM audit_entries WHERE subtype = 'integrity-quarantine'")
    ]
    assert len(alerts) == 1 and alerts[0]["type"] == "admin" and alerts[0]["outcome"] == "8"
    assert alerts[0]["entities"] == [{"type": "AuditEvent", "id": str(forged_id)}]
    assert "1 entries and 1 tree nodes" in alerts[0]["detail"]
    # The genuine log verifies; the quarantine stays reported until an operator has looked.
    report = verify(database_url, signer)
    assert [f.subject for f in report.failures] == [f"entry {forged_id}"]
    assert "quarantined by the integrator" in report.failures[0].reason
    sql(database_url, "DELETE FROM audit_quarantine")
    assert verify(database_url, signer).ok


@pytest.mark.parametrize(
    ("level", "node_index"),
    [(0, 18), (1, 9), (2, 4), (4, 1), (5, 0), (9, 0), (-1, 0), (1, -3)],
    ids=[
        "leaf-past",
        "level1-past",
        "level2-past",
        "level4-past",
        "top-level",
        "above-top",
        "neg-level",
        "neg-index",
    ],
)
def test_a_node_forged_past_the_tree_at_any_level_is_dropped_by_the_next_seal(
    database_url: str, signer: NoteSigner, level: int, node_index: int
) -> None:
    """The integrator asks the edges of each level, not every node: a forged node anywhere past
    the tree of 18 leaves is found all the same, and no genuine node is taken for one."""
    build_log(database_url, signer)  # tree size 18: genuine nodes (l, i) have i < 18 >> l
    sql(
        database_url,
        "INSERT INTO audit_nodes (level, node_index, hash) VALUES (:l, :i, :h)",
        l=level,
        i=node_index,
        h=b"\x07" * 32,
    )
    genuine = sql(database_url, "SELECT count(*) FROM audit_nodes")[0][0] - 1
    add_entries(database_url, 2, 300)
    checkpoint = seal(database_url, signer)
    assert checkpoint is not None and checkpoint.size == 18 + 2 + 1  # + the security alert
    gone = "SELECT count(*) FROM audit_nodes WHERE level = :l AND node_index = :i AND hash = :h"
    assert sql(database_url, gone, l=level, i=node_index, h=b"\x07" * 32)[0][0] == 0
    alerts = [
        json.loads(bytes(r[0]))
        for r in sql(database_url, "SELECT content FROM audit_entries WHERE subtype = 'integrity-quarantine'")
    ]
    assert len(alerts) == 1 and "0 entries and 1 tree nodes" in alerts[0]["detail"]
    assert sql(database_url, "SELECT count(*) FROM audit_nodes")[0][0] > genuine  # the new leaves' nodes
    assert verify(database_url, signer).ok


def test_a_seal_of_a_genuine_log_raises_no_alert(database_url: str, signer: NoteSigner) -> None:
    build_log(database_url, signer)
    add_entries(database_url, 5, 300)
    assert seal(database_url, signer) is not None
    alerts = sql(database_url, "SELECT count(*) FROM audit_entries WHERE subtype = 'integrity-quarantine'")
    assert alerts[0][0] == 0
    assert verify(database_url, signer).ok


def test_columns_edited_to_say_more_do_not_add_to_the_disclosure_report(
    database_url: str, signer: NoteSigner
) -> None:
    add_entries(database_url, 3)  # reads about pat-1: no disclosures
    add_disclosures(database_url, 1)
    sql(database_url, "UPDATE audit_entries SET event_type = 'disclosure'")
    assert disclosures_of(database_url, "pat-1") == 1  # the report reads the content, not the column
    assert seal(database_url, signer) is not None
    assert verify(database_url, signer).first is not None


def test_checkpoint_forged_past_the_tree_stops_sealing_with_an_integrity_error(
    database_url: str, signer: NoteSigner, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """A checkpoint row the key never signed, past the real tree: nothing can be appended to it
    safely (and discarding it could quarantine genuine entries), so sealing stops and says why."""
    build_log(database_url, signer, (5,))
    sql(
        database_url,
        "INSERT INTO audit_checkpoints (size, root_hash, note, created_at) VALUES (40, :r, :n, :t)",
        r=b"\x07" * 32,
        n="forged\n40\nAAAA\n\n— nobody x\n",
        t="2026-01-01 00:00:00",
    )
    add_entries(database_url, 2, 5)
    _cli_env(monkeypatch, database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    assert cli_main(["audit", "seal"]) == 1
    assert "the tree at the latest checkpoint cannot be rebuilt" in capsys.readouterr().err
    report = verify(database_url, signer)
    assert report.first is not None and report.first.subject == "checkpoint 40"
