"""KEK rotation as an operator runs it: rotate, rewrap online, status, retire; on both providers.

Runs against the keyring file and a SoftHSM2 token of its own (its KEKs are rotated and
destroyed here only), on SQLite and PostgreSQL, through `mhr keys ...` and a running service.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, Party, Service, load_example, scratch_database, submit, sync_url
from softhsm_kit import SoftHsm

from security.envelope import IntegrityError, new_data_key
from security.keys import KekLifecycle, KekRetired, KeyProvider, KeyringError, LocalKeyring
from service.cli.main import main as cli_main
from service.core.metrics import REGISTRY
from service.keys.keyring_match import check_and_record
from service.keys.progress import Progress, describe
from service.keys.status import refresh_subject_key_metric
from service.store import migrate
from service.store.database import Database

AAD = b"mhr.subject-key.v1\x00patient-9"


@pytest.fixture(params=["keyring", "pkcs11"])
def provider_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    if request.param == "keyring":
        return {}
    hsm: SoftHsm = request.getfixturevalue("softhsm")
    return hsm.settings(hsm.rotate_token)


def _open(settings: dict[str, object], tmp_path: Path) -> KeyProvider:
    if not settings:
        path = tmp_path / "keyring.json"
        return LocalKeyring.load(path) if path.exists() else LocalKeyring.create(path)
    from security.pkcs11_keys import Pkcs11Keys

    return Pkcs11Keys.open(
        Path(str(settings["pkcs11_module"])), str(settings["pkcs11_token_label"]), str(settings["pkcs11_pin"])
    )


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path, provider_settings: dict[str, object]
) -> None:
    monkeypatch.setenv("MHR_ENV", "test")
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    for name, value in provider_settings.items():
        monkeypatch.setenv(f"MHR_{name.upper()}", str(value))


def _exam(n: int) -> dict[str, Any]:
    """A whole exam for a migrant of its own: an example with the migrant's identifiers made unique."""
    bundle = copy.deepcopy(load_example(EXAMPLES[n % len(EXAMPLES)]))
    if "identifier" in bundle:  # a submission's own identifier (retry-safe writes): one per exam
        bundle["identifier"]["value"] = f"{bundle['identifier']['value']}R{n}"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            for identifier in resource.get("identifier", []):
                identifier["value"] = f"{identifier['value']}R{n}"
    return bundle


def _patient_id(reply: Any) -> str:
    assert reply.status_code == 200, reply.text
    for entry in reply.json()["entry"]:
        rtype, rid, *_ = entry["response"]["location"].split("/")
        if rtype == "Patient":
            return str(rid)
    raise AssertionError("no Patient written")


def _status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["keys", "status"]) == 0
    found: dict[str, Any] = json.loads(capsys.readouterr().out)
    return found


class Traffic:
    """Reads and writes against the service from another thread, every answer kept."""

    def __init__(self, service: Service, clinic: Party, patients: list[str]) -> None:
        self.service, self.clinic, self.patients = service, clinic, patients
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.reads = self.writes = 0
        self.written: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.headers = self.service.headers(self.clinic)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 1000
        while not self.stop.is_set():
            for patient in self.patients:
                reply = self.service.client.get(f"/fhir/Patient/{patient}/$everything", headers=self.headers)
                self.reads += 1
                if reply.status_code != 200:
                    self.failures.append(f"read {reply.status_code}")
            reply = submit(self.service, self.clinic, _exam(n))
            n += 1
            self.writes += 1
            if reply.status_code != 200:
                self.failures.append(f"write {reply.status_code}")
            else:
                self.written.append(_patient_id(reply))


@pytest.mark.usefixtures("cli_env")
def test_rotate_then_rewrap_online_moves_every_subject_key_and_retire_keeps_data_readable(
    database_url: str,
    tmp_path: Path,
    provider_settings: dict[str, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Service.start(database_url, tmp_path, **provider_settings) as service:  # type: ignore[arg-type]
        clinic = service.register("clinic", "clinic")
        patients = [_patient_id(submit(service, clinic, _exam(n))) for n in range(6)]
        before = _status(capsys)
        old = before["current_kek_version"]
        assert before["subject_keys_per_kek_version"] == {str(old): 6}
        assert before["to_rewrap"] == 0

        assert cli_main(["keys", "rotate"]) == 0
        rotated = _status(capsys)
        new = rotated["current_kek_version"]
        assert new == old + 1 and rotated["to_rewrap"] == 6

        with Traffic(service, clinic, patients) as traffic:
            # One subject key per job: the run is many batches, each its own job and transaction.
            assert cli_main(["keys", "rewrap", "--wait", "--batch-size", "1"]) == 0
        out = capsys.readouterr().out
        assert "subject keys to re-wrap" in out and "100%" in out and "ETA" in out
        assert traffic.failures == [] and traffic.reads > 0 and traffic.writes > 0

        after = _status(capsys)
        # Migrants written during the rewrap got their keys under the new version already.
        assert after["subject_keys_per_kek_version"] == {str(new): 6 + len(traffic.written)}
        assert after["to_rewrap"] == 0

        assert cli_main(["keys", "retire", "--below", str(new)]) == 0
        retired = _status(capsys)
        assert retired["min_decrypt_version"] == new
        assert retired["held_kek_versions"] == [new]
        assert retired["under_retired_versions"] == 0
        headers = service.headers(clinic)
        for patient in patients + traffic.written:
            assert service.client.get(f"/fhir/Patient/{patient}", headers=headers).status_code == 200

    async def restart_check() -> None:
        database = Database(database_url)
        keys = _open(provider_settings, tmp_path)
        try:
            # A restart is not refused for lacking the KEK version retired on purpose.
            await check_and_record(database, keys)
        finally:
            keys.close()
            await database.dispose()

    asyncio.run(restart_check())

    async def count_for_metrics() -> None:
        database = Database(database_url)
        try:
            async with database.reading() as session:
                await refresh_subject_key_metric(session)
        finally:
            await database.dispose()

    asyncio.run(count_for_metrics())
    assert REGISTRY.get_sample_value("mhr_subject_keys", {"kek_version": str(new)}) == 6 + len(
        traffic.written
    )
    assert REGISTRY.get_sample_value("mhr_subject_keys", {"kek_version": str(old)}) in (None, 0)


def test_progress_shows_a_bar_rate_and_eta_on_a_terminal_and_plain_lines_otherwise() -> None:
    line = describe(500, 1000, 2.0)
    assert line.startswith("[" + "#" * 15 + "-" * 15 + "]") and "50%" in line
    assert "500/1000 subject keys" in line and "250/s" in line and "ETA 0:00:02" in line
    assert describe(0, 0, 0.0).count("#") == 30  # nothing to do is done

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Terminal(), io.StringIO()
    for out in (tty, plain):
        progress = Progress(out, 10)
        for done in range(10):
            progress.update(done)
        progress.update(10, final=True)
    assert tty.getvalue().count("\r") == 11 and tty.getvalue().endswith("\n")
    # Not a terminal: no carriage returns, the first line and the last one (a log stays short).
    assert "\r" not in plain.getvalue() and plain.getvalue().count("\n") == 2
    assert "100%" in plain.getvalue().splitlines()[-1]


@pytest.mark.usefixtures("cli_env")
def test_retire_refuses_while_keys_remain_and_a_forced_retire_is_reported_not_a_500(
    database_url: str,
    tmp_path: Path,
    provider_settings: dict[str, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Service.start(database_url, tmp_path, **provider_settings) as service:  # type: ignore[arg-type]
        clinic = service.register("clinic", "clinic")
        stranded = _patient_id(submit(service, clinic, _exam(0)))
        assert service.client.get("/readyz").json()["reports"] == {
            "subject_keys_under_retired_kek_versions": 0
        }
        assert cli_main(["keys", "rotate"]) == 0
        new = _status(capsys)["current_kek_version"]
        moved = _patient_id(submit(service, clinic, _exam(1)))  # written under the new version

        capsys.readouterr()
        assert cli_main(["keys", "retire", "--below", str(new)]) == 2
        refusal = capsys.readouterr().err
        assert "1 live subject keys are still wrapped" in refusal and "mhr keys rewrap" in refusal
        assert cli_main(["keys", "retire", "--below", str(new + 1)]) == 2  # never the current version

        assert cli_main(["keys", "retire", "--below", str(new), "--force"]) == 0
        assert "1 live subject keys are under retired versions" in capsys.readouterr().out
        found = _status(capsys)
        assert found["under_retired_versions"] == 1 and found["to_rewrap"] == 1

        headers = service.headers(clinic)
        reply = service.client.get(f"/fhir/Patient/{stranded}", headers=headers)
        assert reply.status_code == 503
        # /readyz reports the stranded key (the server has taken up the retirement) and stays ready:
        # every other migrant is served.
        ready = service.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["reports"] == {"subject_keys_under_retired_kek_versions": 1}
        assert service.client.get(f"/fhir/Patient/{moved}", headers=headers).status_code == 200
        outcome = reply.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "retired key-encryption key" in outcome["issue"][0]["diagnostics"]
        assert "Traceback" not in reply.text
        assert service.client.get(f"/fhir/Patient/{moved}", headers=headers).status_code == 200
        # A write to that migrant is refused the same way, and nothing of it is stored.
        sent = next(e["resource"] for e in _exam(0)["entry"] if e["resource"]["resourceType"] == "Patient")
        update = service.client.put(
            f"/fhir/Patient/{stranded}",
            json={**sent, "id": stranded},
            headers={**headers, "Content-Type": "application/fhir+json"},
        )
        assert update.status_code == 503, update.text
        assert update.json()["resourceType"] == "OperationOutcome"

        # A rewrap cannot move what no held key unwraps: it reports it and finishes.
        capsys.readouterr()
        assert cli_main(["keys", "rewrap", "--wait"]) == 0
        assert "1 subject keys are under retired KEK versions" in capsys.readouterr().out


_OPERATOR = """
import json, sys
from pathlib import Path
settings, path, action, arg = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if settings:
    from security.pkcs11_keys import Pkcs11Keys
    module, label, pin = settings["pkcs11_module"], settings["pkcs11_token_label"], settings["pkcs11_pin"]
    keys = Pkcs11Keys.open(Path(module), label, pin, writable=True)
else:
    from security.keys import LocalKeyring
    keys = LocalKeyring.load(path)
result = keys.rotate_kek().version if action == "rotate" else list(keys.retire_kek_below(arg))
keys.close()
print(json.dumps(result))
"""


def _operator(settings: dict[str, object], tmp_path: Path, action: str, arg: int = 0) -> Any:
    """`mhr keys rotate` / `retire` as another process does it, on the same keyring or token."""
    reply = subprocess.run(
        [
            sys.executable,
            "-c",
            _OPERATOR,
            json.dumps({k: str(v) for k, v in settings.items()}),
            str(tmp_path / "keyring.json"),
            action,
            str(arg),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert reply.returncode == 0, reply.stderr[-2000:]
    return json.loads(reply.stdout)


def test_a_rotation_in_another_process_is_taken_up_and_a_retirement_refuses_old_blobs(
    provider_settings: dict[str, object], tmp_path: Path
) -> None:
    serving = _open(provider_settings, tmp_path)  # the server's provider
    try:
        assert isinstance(serving, KekLifecycle)
        old_blob = serving.wrap_key(key := new_data_key(), AAD)
        old = serving.current_kek().version
        new = _operator(provider_settings, tmp_path, "rotate")
        assert new == old + 1
        # The server wraps new keys under the new version without a restart.
        new_blob = serving.wrap_key(key, AAD)
        assert serving.current_kek().version == new
        assert serving.unwrap_key(new_blob, AAD) == key == serving.unwrap_key(old_blob, AAD)

        with pytest.raises(KeyringError):
            serving.retire_kek_below(new + 1)  # the current version is never destroyed
        held_before = serving.kek_versions()
        assert _operator(provider_settings, tmp_path, "retire", new) == [v for v in held_before if v < new]
        # The server refuses the retired version at its next unwrap, as retired, not as tampering.
        with pytest.raises(KekRetired):
            serving.unwrap_key(old_blob, AAD)
        assert serving.unwrap_key(new_blob, AAD) == key
        assert serving.min_decrypt_version() == new
        assert serving.kek_versions() == (new,)
        # Tampering stays tampering.
        edited = bytearray(new_blob)
        edited[-1] ^= 1
        with pytest.raises(IntegrityError) as caught:
            serving.unwrap_key(bytes(edited), AAD)
        assert not isinstance(caught.value, KekRetired)
    finally:
        serving.close()


def test_keyring_retirement_leaves_no_retired_key_in_the_file(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    first = json.loads((tmp_path / "keyring.json").read_text())["kek"]["versions"]["1"]
    keyring.rotate_kek()
    keyring.retire_kek_below(2)
    text = (tmp_path / "keyring.json").read_text()
    assert first not in text
    assert json.loads(text)["kek"]["retired_below"] == 2
    # A reload keeps the minimum; a keyring claiming to hold a retired version is refused.
    assert LocalKeyring.load(tmp_path / "keyring.json").min_decrypt_version() == 2
    doc = json.loads(text)
    doc["kek"]["versions"]["1"] = first
    (tmp_path / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="retired_below"):
        LocalKeyring.load(tmp_path / "keyring.json")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def unmigrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    with scratch_database(request.getfixturevalue("postgres_url"), "kek_version_fill") as url:
        yield url


def test_the_migration_records_each_subject_keys_kek_version_from_its_header(
    unmigrated: str, tmp_path: Path
) -> None:
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    under_v1 = keyring.wrap_key(new_data_key(), AAD)
    keyring.rotate_kek()
    keyring.rotate_kek()
    under_v3 = keyring.wrap_key(new_data_key(), AAD)
    migrate.upgrade(unmigrated, "0009_h_rotate-1")  # the revision before this one
    engine = sa.create_engine(sync_url(unmigrated))
    try:
        with engine.begin() as conn:
            for subject_id, blob in (("a", under_v1), ("b", under_v3), ("erased", None)):
                conn.execute(
                    sa.text(
                        "INSERT INTO subjects (id, wrapped_key, key_version, created_at) "
                        "VALUES (:i, :w, 1, :t)"
                    ),
                    {"i": subject_id, "w": blob, "t": datetime.now(UTC)},
                )
        migrate.upgrade(unmigrated)
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT id, kek_version FROM subjects")).all())
        assert rows == {"a": 1, "b": 3, "erased": None}
    finally:
        engine.dispose()


# --- KEK epochs: an erasure reaches the backups taken before it (issue 14 item 5) ------------


@contextmanager
def _backup_of(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A backup of the database restored into a database of its own (SQLite backup, or pg_dump)."""
    if database_url.startswith("sqlite"):
        target = tmp_path / "backup.sqlite3"
        # SQLite's online backup, as `sqlite3 mhr.sqlite3 .backup` takes it (a plain file copy
        # would miss what is still in the write-ahead log).
        source = sqlite3.connect(database_url.split("///", 1)[1])
        copy_to = sqlite3.connect(target)
        try:
            source.backup(copy_to)
        finally:
            copy_to.close()
            source.close()
        yield f"sqlite+aiosqlite:///{target}"
        return
    with scratch_database(database_url, "backup_restore") as url:
        dump = subprocess.run(
            ["pg_dump", "--no-owner", "--no-privileges", sync_url(database_url).replace("+psycopg", "")],
            capture_output=True,
            check=True,
            timeout=120,
        )
        subprocess.run(
            ["psql", "--quiet", "--set", "ON_ERROR_STOP=1", sync_url(url).replace("+psycopg", "")],
            input=dump.stdout,
            capture_output=True,
            check=True,
            timeout=120,
        )
        yield url


def _erase_subject_key(database_url: str, subject_id: str) -> None:
    # h-erase's erasure (issue 14 item 4) is not on main yet: destroy the wrapped key directly,
    # which is the step of erasure that this test is about.
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE subjects SET wrapped_key = NULL, kek_version = NULL, erased_at = :t WHERE id = :i"
                ),
                {"t": datetime.now(UTC), "i": subject_id},
            )
    finally:
        engine.dispose()


def _wrapped_keys(database_url: str) -> dict[str, bytes | None]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            return {
                i: (bytes(w) if w is not None else None)
                for i, w in conn.execute(sa.text("SELECT id, wrapped_key FROM subjects"))
            }
    finally:
        engine.dispose()


@pytest.mark.usefixtures("cli_env")
def test_an_erasure_reaches_a_backup_taken_before_it_once_the_kek_epoch_completes(
    database_url: str,
    tmp_path: Path,
    provider_settings: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Service.start(database_url, tmp_path, **provider_settings) as service:  # type: ignore[arg-type]
        clinic = service.register("clinic", "clinic")
        exams = {n: _exam(n) for n in range(3)}
        patients = {n: _patient_id(submit(service, clinic, exam)) for n, exam in exams.items()}
        headers = service.headers(clinic)
        expected = {
            n: service.client.get(f"/fhir/Patient/{p}/$everything", headers=headers).json()
            for n, p in patients.items()
        }
        erased = patients[0]
        with _backup_of(database_url, tmp_path) as backup_url:
            # After the backup: the migrant is erased, then the epoch completes.
            _erase_subject_key(database_url, erased)
            assert cli_main(["keys", "rotate"]) == 0
            epoch = _status(capsys)["current_kek_version"]
            assert cli_main(["keys", "rewrap", "--wait"]) == 0
            assert cli_main(["keys", "retire", "--below", str(epoch)]) == 0
            assert _status(capsys)["under_retired_versions"] == 0

            # The backup still holds the erased migrant's wrapped key, but under a destroyed KEK.
            keys = _open(provider_settings, tmp_path)
            try:
                held = _wrapped_keys(backup_url)[erased]
                assert held is not None
                with pytest.raises(KekRetired):
                    keys.unwrap_key(held, b"mhr.subject-key.v1\x00" + erased.encode())
            finally:
                keys.close()

            # Restored next to the current keys, the backup takes its subject keys from the live
            # database: every other migrant reads as before; nothing of the erased one does.
            monkeypatch.setenv("MHR_DATABASE_URL", backup_url)
            capsys.readouterr()
            assert cli_main(["keys", "adopt", "--from", database_url]) == 0
            assert "2 subject keys taken from the live database; 1 migrants erased" in capsys.readouterr().out
            assert _wrapped_keys(backup_url)[erased] is None
            # The adoption is in the restored copy's audit trail, naming no database URL.
            adoptions = _audit_contents(backup_url, "key-adopt")
            assert len(adoptions) == 1 and b"subject-keys/adopted-from-live" in adoptions[0]
            assert (
                database_url.encode() not in adoptions[0] and _audit_contents(database_url, "key-adopt") == []
            )
            with Service.start(backup_url, tmp_path, **provider_settings) as restored:  # type: ignore[arg-type]
                restored_headers = restored.headers(clinic)
                for n, patient in patients.items():
                    reply = restored.client.get(
                        f"/fhir/Patient/{patient}/$everything", headers=restored_headers
                    )
                    if patient == erased:
                        assert reply.status_code == 410, reply.text  # Gone, to the clinic that sent it
                        assert not any(value in reply.text for value in _identifiers(exams[n]))
                    else:
                        assert reply.status_code == 200, reply.text
                        assert reply.json()["entry"] == expected[n]["entry"]


def _audit_contents(database_url: str, subtype: str) -> list[bytes]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT content FROM audit_entries WHERE subtype = :s"), {"s": subtype}
            )
            return [bytes(content) for (content,) in rows]
    finally:
        engine.dispose()


def _identifiers(bundle: dict[str, Any]) -> list[str]:
    return [
        identifier["value"]
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == "Patient"
        for identifier in entry["resource"].get("identifier", [])
    ]
