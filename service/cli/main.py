"""The ``mhr`` command: serve, migrate, register organizations and clients, get a token."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy.exc import SQLAlchemyError

from security.jwk import (
    generate_client_key,
    load_private_key,
    private_key_pem,
    public_jwk,
    sign_client_assertion,
)
from security.keys import CheckpointSigning, KeyProvider, KeyringError, LocalKeyring
from security.roles import Role
from service.app.logging_setup import configure_logging
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.core.settings import (
    DEVELOPMENT_ENV_FILE,
    Settings,
    SettingsError,
    load_settings,
    write_development_env,
)
from service.identity.registry import (
    ClientRegistration,
    RegistrationError,
    add_client,
    add_organization,
)
from service.identity.repository import IdentityRepository
from service.store import migrate
from service.store.database import Database

T = TypeVar("T")
DEMO_DIR = Path("var/demo")
log = logging.getLogger("mhr.cli")


class CommandError(Exception):
    """A command cannot go on; the message (one line) says why and what to do."""


def _emit(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _fail(message: str, code: int = 2) -> int:
    print(f"mhr: {message}", file=sys.stderr)
    return code


def _with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def run() -> T:
        database = Database(settings.database_url)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(run())


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.downgrade:
        migrate.downgrade(settings.database_url, args.downgrade)
    else:
        migrate.upgrade(settings.database_url, args.to)
    print(f"database at revision {args.downgrade or args.to}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.app.demo import load_demo_clients, seed_demo
    from service.app.http_server import serve_in_process
    from service.app.supervisor import serve_workers
    from service.runtime.providers import open_keyring

    # The worker processes read their settings from the environment: pass the overrides on.
    if args.host or args.port:
        if args.host:
            os.environ["MHR_HOST"] = args.host
        if args.port:
            os.environ["MHR_PORT"] = str(args.port)
        settings = load_settings()
    settings.check_safe_to_start()
    if args.demo and not settings.is_development:
        return _fail("--demo seeds known demo clients and is refused outside MHR_ENV=development")
    migrate.upgrade(settings.database_url)
    keys = open_keyring(settings)  # created with 0600 on first start, in development only
    _check_keyring(settings, keys)
    if args.demo:
        write_development_env(settings)
        created = _with_db(settings, lambda db: seed_demo(db, DEMO_DIR))
        if created is not None:
            _seed_demo_exams(settings, created["clinic"])
        _print_next_steps(settings, load_demo_clients(DEMO_DIR))
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if args.workers > 1:
        return serve_workers(settings, workers=args.workers)
    return serve_in_process(settings)


def _check_keyring(settings: Settings, keys: KeyProvider) -> None:
    """Refuse a keyring that is not the one the database's data was written under."""
    from service.keys.keyring_match import KeyringMismatch, check_and_record

    try:
        _with_db(settings, lambda db: check_and_record(db, keys))
    except KeyringMismatch as exc:
        raise CommandError(f"refusing to start: {settings.key_store}: {exc}") from None


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """``mhr keys init``: the one way keys come to exist outside development;
    ``mhr keys upgrade``: add what an older keyring lacks, keeping every key it holds;
    ``rotate``, ``rewrap``, ``status``, ``retire``: the KEK's lifecycle (service.keys);
    ``rotate-index``, ``reindex``, ``retire-index``: the blind-index key's."""
    from service.keys import commands as key_commands

    if args.action in key_commands.ACTIONS:
        return key_commands.run(
            args,
            settings,
            lambda session, subtype, entity: _audit_admin(session, subtype, Action.update, entity),
        )
    provider = args.provider or settings.key_provider
    if provider == "pkcs11":
        return _init_token(settings)
    if args.action == "upgrade":
        try:
            keyring, added = LocalKeyring.upgrade(settings.keyring_path)
        except KeyringError as exc:
            return _fail(str(exc))
        what = ", ".join(added) if added else "nothing (it holds every key this version needs)"
        print(f"keyring {keyring.path}: added {what}")
        return 0
    try:
        keyring = LocalKeyring.create(settings.keyring_path)
    except KeyringError as exc:
        return _fail(f"{exc}; refusing to overwrite it (the data written under it needs those keys)")
    print(f"created keyring {keyring.path} (mode 0600); back it up apart from the database")
    return 0


def _init_token(settings: Settings) -> int:
    """Create in the PKCS#11 token the keys it lacks (init and upgrade alike; never replaces one)."""
    from service.runtime.providers import pkcs11_module

    try:
        from security.pkcs11_keys import Pkcs11Keys, read_pin
    except ImportError:
        return _fail("python-pkcs11 is not installed: install mhr with its `hsm` extra")
    try:
        pin = read_pin(
            settings.pkcs11_pin.get_secret_value() if settings.pkcs11_pin else None, settings.pkcs11_pin_file
        )
        created = Pkcs11Keys.initialise(pkcs11_module(settings), settings.pkcs11_token_label, pin)
    except KeyringError as exc:
        return _fail(str(exc))
    label = settings.pkcs11_token_label
    if created:
        print(f"PKCS#11 token {label!r}: created {', '.join(created)} (non-extractable; they never leave it)")
    else:
        print(f"PKCS#11 token {label!r}: holds every key this version needs; nothing created")
    return 0


def _seed_demo_exams(settings: Settings, clinic: dict[str, str]) -> None:
    from service.app.demo import seed_demo_exams
    from service.runtime.providers import build_runtime, close_runtime

    async def run() -> int:
        runtime = build_runtime(settings)
        try:
            return await seed_demo_exams(runtime, settings.ig_dir / "examples", clinic)
        finally:
            await close_runtime(runtime)

    count = asyncio.run(run())
    print(f"seeded {count} demo exams from {settings.ig_dir / 'examples'}", file=sys.stderr)


def _print_next_steps(settings: Settings, clients: dict[str, dict[str, str]]) -> None:
    base = settings.base_url
    lines = [
        "",
        f"mhr is starting on {base}",
        f"  API docs:            {base}/docs",
        f"  CapabilityStatement: {base}/fhir/metadata",
    ]
    if "clinic" in clients:
        clinic = clients["clinic"]
        lines += [
            "  Get a token for the demo clinic and list organizations:",
            f"    TOKEN=$(.venv/bin/mhr token --client-id {clinic['client_id']} --key {clinic['key']} "
            "--scope 'system/*.cruds')",
            f'    curl -H "Authorization: Bearer $TOKEN" {base}/fhir/Organization',
            f"  All demo clients and their keys: {DEMO_DIR / 'clients.json'}",
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def cmd_orgs(args: argparse.Namespace, settings: Settings) -> int:
    from service.identity.organizations import organization_resource

    async def work(db: Database) -> Any:
        async with db.transaction() as session:
            repo = IdentityRepository(session)
            if args.action == "add":
                org = await add_organization(
                    repo, name=args.name, kind=args.kind, jurisdiction=args.jurisdiction, org_id=args.org_id
                )
                await _audit_admin(session, "organization-add", Action.create, ("Organization", org.id))
                return {"id": org.id, "name": org.name, "kind": org.kind}
            return [organization_resource(o) for o in await repo.organizations(limit=10_000)]

    try:
        _emit(_with_db(settings, work))
    except RegistrationError as exc:
        return _fail(str(exc))
    return 0


def cmd_clients(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "keygen":
        key = generate_client_key(args.kind)
        fd = os.open(args.out_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_pem(key))
        Path(args.out_jwks).write_text(json.dumps({"keys": [public_jwk(key)]}, indent=2))
        _emit({"private_key": args.out_key, "jwks": args.out_jwks, "kid": public_jwk(key)["kid"]})
        return 0

    try:
        jwks = json.loads(Path(args.jwks).read_text()) if getattr(args, "jwks", None) else None
    except (json.JSONDecodeError, OSError) as exc:
        return _fail(f"cannot read JWKS: {type(exc).__name__}")

    async def work(db: Database) -> Any:
        async with db.transaction() as session:
            repo = IdentityRepository(session)
            if args.action == "add":
                client = await add_client(
                    repo,
                    ClientRegistration(
                        organization=args.org,
                        role=Role(args.role),
                        jwks=jwks,
                        jwks_url=args.jwks_url,
                        scopes=" ".join(args.scopes) if args.scopes else None,
                        purposes=tuple(args.purposes or ()),
                        description=args.description,
                        default_purpose=args.default_purpose,
                    ),
                )
                await _audit_admin(session, "client-add", Action.create, ("Client", client.id))
                return {
                    "client_id": client.id,
                    "organization_id": client.organization_id,
                    "role": client.role,
                    "scopes": client.scopes,
                    "purposes": client.purposes,
                    "default_purpose": client.default_purpose,
                }
            if args.action == "disable":
                if not await repo.disable_client(args.client_id, _now()):
                    raise RegistrationError("no such active client")
                await _audit_admin(session, "client-disable", Action.update, ("Client", args.client_id))
                return {"client_id": args.client_id, "active": False}
            return [
                {
                    "client_id": c.id,
                    "organization_id": c.organization_id,
                    "role": c.role,
                    "scopes": c.scopes,
                    "purposes": c.purposes,
                    "default_purpose": c.default_purpose,
                    "active": c.active,
                    "jwks_url": c.jwks_url,
                    "created_at": c.created_at,
                }
                for c in await repo.clients()
            ]

    try:
        _emit(_with_db(settings, work))
    except (RegistrationError, json.JSONDecodeError, OSError) as exc:
        return _fail(
            str(exc) if isinstance(exc, RegistrationError) else f"cannot read JWKS: {type(exc).__name__}"
        )
    return 0


async def _audit_admin(session: Any, subtype: str, action: Action, entity: tuple[str, str]) -> None:
    """An admin action's audit entry, in the action's own transaction.

    The operator is named by the OS account running the command (staff, not a migrant).
    """
    import getpass

    from service.core.request_context import SOURCE

    record = AuditRecord(
        event_type=EventType.admin,
        subtype=subtype,
        action=action,
        outcome=Outcome.success,
        agent=AuditAgent("mhr-cli", None, Role.admin, getpass.getuser()),
        entities=(AuditEntity(*entity),),
    )
    await record_audit(session, record, request_id=f"cli-{uuid.uuid4().hex}", source=SOURCE)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.url or settings.public_base_url):
        return _fail(
            "no service address: give --url, or set MHR_PUBLIC_BASE_URL (`make run` writes "
            f"{DEVELOPMENT_ENV_FILE} with it, which `mhr` reads in this directory while MHR_ENV is unset)"
        )
    base = (args.url or settings.base_url).rstrip("/")
    token_url = f"{base}/auth/token"
    try:
        key = load_private_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as exc:
        return _fail(f"cannot load private key: {type(exc).__name__}")
    # The purpose goes the standard way: the HL7 B2B extension of the assertion.
    assertion = sign_client_assertion(
        key,
        client_id=args.client_id,
        token_url=token_url,
        person=args.person,
        kid=args.kid,
        purposes=(args.purpose,) if args.purpose else (),
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "scope": args.scope,
    }
    try:
        response = httpx.post(token_url, data=form, timeout=10)
    except httpx.HTTPError as exc:
        return _fail(f"token endpoint unreachable at {token_url}: {type(exc).__name__}")
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200:
        # The server's own words say what to change; control characters are not printed.
        reason = ": ".join(
            "".join(ch for ch in str(part) if ch.isprintable())
            for part in (body.get("error", "error"), body.get("error_description"))
            if part
        )
        return _fail(f"token refused ({response.status_code}): {reason}", 1)
    if args.json:
        _emit(body)
    else:
        print(body["access_token"])
    return 0


def _read_vkey(value: str) -> str:
    path = Path(value)
    return path.read_text().strip() if "+" not in value and path.is_file() else value.strip()


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from security.signed_note import NoteError, NoteSigner, NoteVerifier
    from service.audit import log as audit_log
    from service.audit.disclosures import disclosures_for_patient
    from service.audit.log_keys import LogKeys
    from service.audit.verify import verify_database, verify_service
    from service.runtime.providers import open_keyring

    if args.action == "verify":
        try:
            verifier: NoteVerifier | LogKeys | None = (
                LogKeys.from_json(Path(args.keys).read_text())
                if args.keys
                else NoteVerifier.from_vkey(_read_vkey(args.vkey))
                if args.vkey
                else None
            )
            trusted = Path(args.checkpoint).read_text() if args.checkpoint else None
        except (OSError, NoteError) as exc:
            return _fail(f"cannot read the trust anchor: {exc}")
        if verifier is None:
            # Without the key not one checkpoint signature can be checked: refuse rather than
            # report a verification that did not happen.
            return _fail(
                "give --vkey (the log's public key, `mhr audit key`) or --keys (`mhr audit keys`): "
                "checkpoint signatures need it"
            )
        if args.url:
            if not args.token:
                return _fail("--url needs --token (an auditor access token)")
            report = asyncio.run(
                verify_service(
                    args.url, args.token, verifier=verifier, trusted_note=trusted, origin=args.origin
                )
            )
        else:
            url = args.database_url or settings.database_url
            report = asyncio.run(
                verify_database(url, verifier=verifier, trusted_note=trusted, origin=args.origin)
            )
        for failure in sorted(report.failures)[: args.show]:
            print(f"FAIL {failure}", file=sys.stderr)
        print(report.summary())
        for gap in report.not_checked():
            print(f"NOT CHECKED: {gap}")
        return 0 if report.ok else 1

    if args.action == "disclosures":

        async def listing(db: Database) -> Any:
            async with db.sessions() as session:
                return [d.as_json() for d in await disclosures_for_patient(session, args.patient)]

        _emit(_with_db(settings, listing))
        return 0

    if args.action == "key":
        keys = open_keyring(settings)
        print(NoteSigner(settings.deployment_name, CheckpointSigning(keys)).vkey())
        return 0

    if args.action == "checkpoint":

        async def latest(db: Database) -> str | None:
            async with db.sessions() as session:
                found = await audit_log.latest_checkpoint(session)
                return None if found is None else found.note

        note = _with_db(settings, latest)
        if note is None:
            return _fail("the audit log has no checkpoint yet", 1)
        if args.out is None:
            sys.stdout.write(note)
            return 0
        try:
            verifier = (
                NoteVerifier.from_vkey(_read_vkey(args.vkey))
                if args.vkey
                else NoteVerifier(settings.deployment_name, open_keyring(settings).checkpoint_public_key())
            )
        except (OSError, NoteError) as exc:
            return _fail(f"cannot read the log key: {exc}")
        return _retain_checkpoint(settings, Path(args.out), note, verifier)

    # seal
    keys = open_keyring(settings)
    _check_keyring(settings, keys)
    signer = NoteSigner(settings.deployment_name, CheckpointSigning(keys))
    from security.merkle import MissingNodeError

    try:
        size = _with_db(settings, lambda db: audit_log.seal_all(db, signer, settings.deployment_name))
    except MissingNodeError:
        return _fail(
            "audit log integrity: the tree at the latest checkpoint cannot be rebuilt from its stored "
            "nodes (a checkpoint or nodes were forged or removed); nothing sealed: run `mhr audit verify`",
            1,
        )
    print(f"audit log sealed: tree size {size}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """``mhr worker``: the audit integrator and job workers, without the HTTP server, until SIGTERM."""
    from service.app.background_process import run_background
    from service.keys.keyring_match import KeyringMismatch
    from service.runtime.providers import open_keyring

    settings.check_safe_to_start()
    workers = args.workers if args.workers is not None else max(1, settings.job_workers)
    if workers < 1:
        return _fail("--workers must be at least 1")
    keys = open_keyring(settings)
    try:  # the background process checks the keyring against the database before any work
        run_background(settings, keys, job_workers=workers)
    except KeyringMismatch as exc:
        raise CommandError(f"refusing to start: {settings.key_store}: {exc}") from None
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``mhr jobs list`` and ``mhr jobs retry ID``: background jobs for operators."""
    from service.jobs import queue

    if args.action == "list":

        async def listing(db: Database) -> Any:
            async with db.reading() as session:
                jobs = await queue.list_jobs(session, state=args.state, kind=args.kind, limit=args.limit)
                return [job.as_json() for job in jobs]

        _emit(_with_db(settings, listing))
        return 0

    async def retry(db: Database) -> Any:
        async with db.transaction() as session:
            job = await queue.retry_dead(session, args.job_id)
            await _audit_admin(session, "job-retry", Action.update, ("Job", str(job.id)))
            return job.as_json()

    try:
        _emit(_with_db(settings, retry))
    except queue.NotRetryable as exc:
        return _fail(str(exc), 1)
    return 0


def cmd_records(args: argparse.Namespace, settings: Settings) -> int:
    from service.records.relabel import relabel
    from service.runtime.providers import build_runtime, close_runtime

    if args.background:
        from service.records.relabel_job import enqueue_relabel

        run_id = args.run_id or uuid.uuid4().hex
        count = _with_db(settings, lambda db: enqueue_relabel(db, run_id))
        _emit({"run_id": run_id, "jobs": count, "kind": "records.relabel"})
        return 0

    async def run() -> Any:
        runtime = build_runtime(settings)
        try:
            return await relabel(runtime.database, runtime.records)
        finally:
            await close_runtime(runtime)

    counts = asyncio.run(run())
    _emit(
        {
            "migrants": counts.migrants,
            "resources": counts.resources,
            "labels_changed": counts.changed,
            "grants": counts.grants,
        }
    )
    return 0


def _retain_checkpoint(settings: Settings, out: Path, note: str, verifier: Any) -> int:
    """Save the latest signed checkpoint to ``out``, outside the database, for later verifies.

    The file it replaces is the previous retained checkpoint: the new one is written only if
    the log proves consistent with it (same root at equal size, else a consistency proof
    from the stored tree), so that a truncated or rewritten log can never replace the
    evidence against it.
    """
    from security import merkle
    from security.signed_note import Checkpoint, NoteError
    from service.audit import log as audit_log

    try:
        new = Checkpoint.parse(verifier.verify(note))
    except NoteError as exc:
        return _fail(f"the latest checkpoint does not verify under the log key: {exc}", 1)
    old: Checkpoint | None = None
    if out.exists():
        try:
            old = Checkpoint.parse(verifier.verify(out.read_text()))
        except (OSError, NoteError) as exc:
            return _fail(f"{out} holds no checkpoint signed by this log's key ({exc}); not replaced", 1)
        if old.origin != new.origin:
            return _fail(f"{out} is a checkpoint of {old.origin!r}, not {new.origin!r}; not replaced", 1)
        if old.size > new.size:
            return _fail(
                f"the log has shrunk from the retained size {old.size} to {new.size}: entries were "
                f"removed; {out} not replaced (run `mhr audit verify --checkpoint {out}`)",
                1,
            )
        if old.size == new.size and old.root_hash != new.root_hash:
            return _fail(f"the log was rewritten: a different root at size {old.size}; {out} not replaced", 1)
        if 0 < old.size < new.size:

            async def proof(db: Database) -> list[bytes]:
                async with db.sessions() as session:
                    return await audit_log.consistency_proof(session, old.size, new.size)

            try:
                merkle.verify_consistency(
                    old.size, new.size, _with_db(settings, proof), old.root_hash, new.root_hash
                )
            except (merkle.ProofError, merkle.MissingNodeError, ValueError) as exc:
                return _fail(
                    f"the log is not consistent with the retained checkpoint {old.size} ({exc}); "
                    f"{out} not replaced",
                    1,
                )
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(note)
    temporary.replace(out)  # atomic: a crash leaves the old checkpoint or the new, never half
    extends = "" if old is None else f", consistent with the one it replaces (size {old.size})"
    print(f"checkpoint of size {new.size} saved to {out}{extends}")
    return 0


def _run_id(value: str) -> str:
    if not (0 < len(value) <= 100) or not value.isascii() or not value.isprintable():
        raise argparse.ArgumentTypeError("a run id is 1 to 100 printable ASCII characters")
    return value


def cmd_erasure(args: argparse.Namespace, settings: Settings) -> int:
    """``mhr erasure request|approve|status``: the admin API's erasure, for operators at a shell.

    The operator is the OS account (client ``mhr-cli:<account>``): the two-person rule then
    needs another account, or an admin client over the API, to approve."""
    import getpass

    from service.core.request_context import SOURCE
    from service.domain.errors import DomainError
    from service.erasure.repository import ErasureRepository
    from service.erasure.requests import Admin, approve_erasure, request_erasure
    from service.http.errors import fhir_error
    from service.runtime.providers import build_runtime, close_runtime

    account = getpass.getuser()
    admin = Admin(f"mhr-cli:{account}", account)

    def entry(subtype: str, action: Action, patient_id: str, ok: bool, detail: str) -> AuditRecord:
        return AuditRecord(
            event_type=EventType.admin,
            subtype=subtype,
            action=action,
            outcome=Outcome.success if ok else Outcome.minor_failure,
            agent=AuditAgent(admin.client_id, None, "admin", account),
            entities=(AuditEntity("Patient", patient_id),),
            patient_ids=(patient_id,),
            detail=detail,
        )

    async def run() -> Any:
        runtime = build_runtime(settings)
        request_id = f"cli-{uuid.uuid4().hex}"
        try:
            if args.action == "status":
                async with runtime.database.reading() as session:
                    found = await ErasureRepository(session).request(args.request_id)
                    if found is None:
                        raise CommandError("erasure request not found")
                    return {
                        "id": found.id,
                        "patient": f"Patient/{found.subject_id}",
                        "state": found.state,
                        "reason": found.reason,
                        "receipt": found.receipt,
                    }
            subtype = "erasure-request" if args.action == "request" else "erasure-approve"
            action = Action.create if args.action == "request" else Action.delete
            patient_id = args.patient if args.action == "request" else ""
            try:
                async with runtime.database.transaction() as session:
                    if args.action == "request":
                        made = await request_erasure(session, admin, args.patient, args.reason, _now())
                    else:
                        pending = await ErasureRepository(session).request(args.request_id)
                        patient_id = pending.subject_id if pending is not None else ""
                        made = await approve_erasure(
                            session, admin, args.request_id, runtime.log_signer, _now()
                        )
                    await record_audit(
                        session,
                        entry(subtype, action, made.subject_id, True, made.state),
                        request_id=request_id,
                        source=SOURCE,
                    )
                    return {
                        "id": made.id,
                        "patient": f"Patient/{made.subject_id}",
                        "state": made.state,
                        "receipt": made.receipt,
                    }
            except DomainError as refused:
                exc = fhir_error(refused)
                if patient_id:
                    async with runtime.database.transaction() as session:
                        await record_audit(
                            session,
                            entry(subtype, action, patient_id, False, f"status-{exc.status}"),
                            request_id=request_id,
                            source=SOURCE,
                        )
                raise CommandError(exc.issues[0].diagnostics) from None
        finally:
            await close_runtime(runtime)

    _emit(asyncio.run(run()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="apply migrations and serve the API")
    serve.add_argument("--demo", action="store_true", help="seed the demo parties once (development only)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers", type=int, default=1, help="server processes (SIGTERM drains them: see README)"
    )
    serve.set_defaults(handler=cmd_serve)

    mig = sub.add_parser("migrate", help="apply (or roll back) database migrations")
    mig.add_argument("--to", default="head", help="revision to upgrade to (default head)")
    mig.add_argument("--downgrade", metavar="REV", help="roll back to this revision instead")
    mig.set_defaults(handler=cmd_migrate)

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(dest="action", required=True)
    add_org = orgs.add_parser("add")
    add_org.add_argument("--name", required=True)
    add_org.add_argument("--kind", required=True, choices=[role.value for role in Role])
    add_org.add_argument("--jurisdiction", help="ISO 3166 code, e.g. CA or US-NY")
    add_org.add_argument("--id", dest="org_id", help="stable id (consents name it); default a UUID")
    orgs.add_parser("list")
    for p in orgs.choices.values():
        p.set_defaults(handler=cmd_orgs)

    clients = sub.add_parser("clients", help="machine clients").add_subparsers(dest="action", required=True)
    add = clients.add_parser("add")
    add.add_argument("--org", required=True, help="organization id or exact name")
    add.add_argument("--role", required=True, choices=[role.value for role in Role])
    keys = add.add_mutually_exclusive_group(required=True)
    keys.add_argument("--jwks", help="file with the client's public JWKS")
    keys.add_argument("--jwks-url", help="https URL of the client's JWKS")
    add.add_argument("--scopes", nargs="+", help="SMART system scopes (default: the role's ceiling)")
    add.add_argument("--purposes", nargs="+", help="purposes of use (v3-ActReason), e.g. PUBHLTH TREAT")
    add.add_argument(
        "--default-purpose",
        help="the purpose a token carries when the client names none (for stock clients)",
    )
    add.add_argument("--description")
    clients.add_parser("list")
    disable = clients.add_parser("disable")
    disable.add_argument("client_id")
    keygen = clients.add_parser("keygen", help="make a client key pair: private PEM and public JWKS")
    keygen.add_argument("--out-key", required=True)
    keygen.add_argument("--out-jwks", required=True)
    keygen.add_argument("--kind", choices=["EC", "RSA"], default="EC")
    for p in clients.choices.values():
        p.set_defaults(handler=cmd_clients)

    keys_parser = sub.add_parser("keys", help="the keyring").add_subparsers(dest="action", required=True)
    keys_parser.add_parser("init", help="create the keyring (MHR_KEYRING_PATH) once; never overwrites one")
    keys_parser.add_parser("upgrade", help="add the keys this version needs to an older keyring, keeping all")
    for p in keys_parser.choices.values():  # init and upgrade
        p.add_argument(
            "--provider",
            choices=("keyring", "pkcs11"),
            help="where the keys live (default MHR_KEY_PROVIDER); pkcs11 creates them in the token",
        )
        p.set_defaults(handler=cmd_keys)
    from service.cli.key_rotation import add_key_rotation_commands, add_log_key_commands

    add_key_rotation_commands(keys_parser)
    from service.keys.commands import add_arguments as add_key_lifecycle_arguments

    add_key_lifecycle_arguments(keys_parser)
    from service.keys.commands import ACTIONS as KEY_LIFECYCLE_ACTIONS

    for action in KEY_LIFECYCLE_ACTIONS:
        keys_parser.choices[action].set_defaults(handler=cmd_keys)

    token = sub.add_parser("token", help="sign a client assertion and print an access token")
    token.add_argument("--client-id", required=True)
    token.add_argument("--key", required=True, help="the client's private key (PEM)")
    token.add_argument("--scope", default="system/*.rs")
    token.add_argument("--purpose", help="purpose of use, e.g. PUBHLTH")
    token.add_argument("--person", help="pseudonymous id of the person acting through the client")
    token.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    token.add_argument("--url", help="service base URL (default MHR_PUBLIC_BASE_URL)")
    token.add_argument("--json", action="store_true", help="print the whole token response")
    token.set_defaults(handler=cmd_token)
    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="action", required=True
    )
    audit.add_parser("seal", help="append unsealed entries to the Merkle log and sign a checkpoint")
    checkpoint = audit.add_parser(
        "checkpoint", help="print the latest signed checkpoint, or retain it in a file (--out)"
    )
    checkpoint.add_argument(
        "--out",
        help="save it to this file (kept outside the database) after checking that the log is "
        "consistent with the checkpoint already there; verify later with --checkpoint FILE",
    )
    checkpoint.add_argument(
        "--vkey", help="the log's verifier key or a file holding it (default: the keyring)"
    )
    audit.add_parser("key", help="print the log's verifier key (vkey)")
    verify = audit.add_parser("verify", help="verify the log; exit 1 naming the first failure")
    source = verify.add_mutually_exclusive_group()
    source.add_argument("--database-url", help="read the database directly (default MHR_DATABASE_URL)")
    source.add_argument("--url", help="base URL of a running service (with --token)")
    verify.add_argument("--token", help="an auditor access token for --url")
    verify.add_argument("--vkey", help="the log's verifier key, or a file holding it (or give --keys)")
    verify.add_argument(
        "--keys",
        help="a file with the log's keys over time (GET /audit/keys, `mhr audit keys`): needed "
        "once the log key has been rotated",
    )
    verify.add_argument(
        "--checkpoint",
        help="a checkpoint retained outside the database (`mhr audit checkpoint --out FILE`): "
        "without one, removed entries cannot be detected",
    )
    verify.add_argument("--origin", help="expected checkpoint origin (default: the key name)")
    verify.add_argument("--show", type=int, default=10, help="how many failures to print")
    disclosures = audit.add_parser("disclosures", help="every disclosure of one migrant's data")
    disclosures.add_argument("--patient", required=True, help="the Patient id (pseudonym)")
    for p in audit.choices.values():
        p.set_defaults(handler=cmd_audit)
    add_log_key_commands(audit)

    records = sub.add_parser("records", help="stored records").add_subparsers(dest="action", required=True)
    relabel = records.add_parser(
        "relabel",
        help="recompute every resource's label token and every migrant's grants under the current rules",
    )
    relabel.add_argument(
        "--background", action="store_true", help="enqueue one job per migrant for the workers instead"
    )
    relabel.add_argument(
        "--run-id", type=_run_id, help="with --background: names the run; the same run enqueues once"
    )
    relabel.set_defaults(handler=cmd_records)

    worker = sub.add_parser("worker", help="run the background workers and the audit integrator alone")
    worker.add_argument("--workers", type=int, help="job workers in this process (default MHR_JOB_WORKERS)")
    worker.set_defaults(handler=cmd_worker)

    jobs = sub.add_parser("jobs", help="background jobs").add_subparsers(dest="action", required=True)
    jobs_list = jobs.add_parser("list", help="jobs, newest first")
    jobs_list.add_argument("--state", choices=["queued", "running", "done", "dead"])
    jobs_list.add_argument("--kind", help="e.g. records.relabel")
    jobs_list.add_argument("--limit", type=int, default=100)
    jobs_retry = jobs.add_parser("retry", help="queue a dead job again, its attempts reset")
    jobs_retry.add_argument("job_id", type=int)
    for p in jobs.choices.values():
        p.set_defaults(handler=cmd_jobs)

    erasure = sub.add_parser("erasure", help="erase a migrant (two admins)").add_subparsers(
        dest="action", required=True
    )
    erase_request = erasure.add_parser("request", help="request an erasure (GDPR Art. 17)")
    erase_request.add_argument("--patient", required=True, help="the pseudonymous Patient id")
    erase_request.add_argument("--reason", required=True, help="gdpr-art17-1a ... gdpr-art17-1e")
    for name, text in (
        ("approve", "approve another admin's request: erases at once"),
        ("status", "status and receipt"),
    ):
        one = erasure.add_parser(name, help=text)
        one.add_argument("request_id")
    for p in erasure.choices.values():
        p.set_defaults(handler=cmd_erasure)
    from service.figures.cli import register as register_figures
    from service.tasks.cli import register as register_tasks

    register_figures(sub)
    register_tasks(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Every failure ends in one line on stderr and a nonzero exit, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        # A server takes its settings from its environment alone, never from var/dev.env.
        settings = load_settings(development_file=args.handler not in (cmd_serve, cmd_worker))
        configure_logging(settings.log_level)
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        return handler(args, settings)
    except (SettingsError, KeyringError, CommandError) as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        # The statement and its parameters stay out of the message: they may carry identifiers.
        log.debug("database error", exc_info=True)
        return _fail(f"database error ({type(exc).__name__}): is MHR_DATABASE_URL right, and migrated?")
    except OSError as exc:
        return _fail(f"{exc.strerror or type(exc).__name__}{f': {exc.filename}' if exc.filename else ''}")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected error ({type(exc).__name__}); MHR_LOG_LEVEL=DEBUG logs the details", 1)


if __name__ == "__main__":
    sys.exit(main())
