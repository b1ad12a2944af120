"""Everything a running service holds: built once at start-up, shared by all requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from security.access_tokens import AccessTokenCodec
from security.keys import CheckpointSigning, KeyProvider, KeyringError, LocalKeyring
from security.signed_note import NoteSigner
from service.audit.tally import RefusalTally
from service.audit.writer import AuditWriter
from service.core.offload import Offload
from service.core.settings import Settings
from service.fhir_validation import ProfileValidator
from service.identity.client_status import ClientStatusCache
from service.identity.jwks import JwksCache
from service.identity.tokens import TokenPolicy
from service.records.context import RecordServices
from service.records.index_keys import IndexKeys
from service.records.labels import SecurityLabeler
from service.records.subject_keys import SubjectKeys
from service.runtime.capability import load_capability_statement
from service.store.database import Database
from service.store.migrate import head_revision


@dataclass
class Runtime:
    settings: Settings
    database: Database
    keys: KeyProvider
    tokens: AccessTokenCodec
    token_policy: TokenPolicy
    jwks: JwksCache
    client_status: ClientStatusCache
    capability_statement: bytes
    records: RecordServices
    head_revision: str | None
    # Signs audit checkpoints; its name is the deployment name, which is also the checkpoint origin.
    log_signer: NoteSigner
    # Entries of requests without a transaction of their own (reads, refusals), group-committed.
    audit_writer: AuditWriter
    # Refusals of unidentified or throttled callers, counted per key and minute (bounded growth).
    refusal_tally: RefusalTally = field(default_factory=RefusalTally)


async def close_runtime(runtime: Runtime) -> None:
    """Release the database connections (the audit writer's after its last entries)."""
    await runtime.audit_writer.drain()
    await runtime.audit_writer.database.dispose()
    await runtime.database.dispose()
    runtime.keys.close()


def open_keyring(settings: Settings, *, writable: bool = False) -> KeyProvider:
    """The key provider the settings choose (``MHR_KEY_PROVIDER``).

    The keyring file is created on first use in development only, and the keys a
    newer version needs are added to it there. Anywhere else a missing keyring,
    or one lacking a key, is an error: creating one would silently put new keys
    in place of those the data was written under (``mhr keys init`` creates it,
    once; ``mhr keys upgrade`` adds what an older keyring lacks). ``writable`` opens a
    token read-write, for rotating its keys (a keyring file is always writable).
    """
    if settings.key_provider == "pkcs11":
        return open_token(settings, create_missing=settings.is_development, writable=writable)
    if settings.is_development:
        return LocalKeyring.load_or_create(settings.keyring_path, add_missing=True)
    if not settings.keyring_path.exists():
        raise KeyringError(
            f"keyring {settings.keyring_path} does not exist; outside development no keyring is "
            "created implicitly: restore it, or create a new one once with `mhr keys init`"
        )
    return LocalKeyring.load(settings.keyring_path)


def pkcs11_module(settings: Settings) -> Path:
    if settings.pkcs11_module is None:
        raise KeyringError(
            "MHR_KEY_PROVIDER=pkcs11 needs MHR_PKCS11_MODULE, the token's PKCS#11 library "
            "(SoftHSM2 on Debian: /usr/lib/softhsm/libsofthsm2.so)"
        )
    return settings.pkcs11_module


def open_token(settings: Settings, *, create_missing: bool = False, writable: bool = False) -> KeyProvider:
    """The PKCS#11 token the settings name, logged in with its PIN."""
    # python-pkcs11 is the optional `hsm` extra: imported only when a token is used.
    try:
        from security.pkcs11_keys import Pkcs11Keys, read_pin
    except ImportError:
        raise KeyringError(
            "MHR_KEY_PROVIDER=pkcs11 needs python-pkcs11: install mhr with its `hsm` extra"
        ) from None

    pin = read_pin(
        settings.pkcs11_pin.get_secret_value() if settings.pkcs11_pin else None, settings.pkcs11_pin_file
    )
    return Pkcs11Keys.open(
        pkcs11_module(settings),
        settings.pkcs11_token_label,
        pin,
        create_missing=create_missing,
        writable=writable,
    )


def build_runtime(settings: Settings, *, keys: KeyProvider | None = None) -> Runtime:
    keys = keys or open_keyring(settings)
    database = Database(settings.database_url)
    codec = AccessTokenCodec(issuer=settings.base_url, audience=settings.fhir_base_url, keys=keys)
    capability: dict[str, Any] = load_capability_statement(settings.ig_dir, settings)
    return Runtime(
        settings=settings,
        database=database,
        keys=keys,
        tokens=codec,
        token_policy=TokenPolicy(
            token_url=settings.token_url,
            lifetime_seconds=settings.token_lifetime_seconds,
            assertion_max_lifetime_seconds=settings.assertion_max_lifetime_seconds,
        ),
        jwks=JwksCache(
            timeout_seconds=settings.jwks_fetch_timeout_seconds,
            ttl_seconds=settings.jwks_cache_seconds,
        ),
        client_status=ClientStatusCache(database.sessions, ttl_seconds=settings.client_status_cache_seconds),
        capability_statement=orjson.dumps(capability),
        records=RecordServices(
            keys=SubjectKeys(keys),
            index_keys=IndexKeys(keys),
            validator=ProfileValidator.load(settings.ig_dir),
            labeler=SecurityLabeler.load(settings.ig_dir),
            statutory_policies=frozenset(settings.statutory_policies),
            followup_due_days=dict(settings.followup_due_days),
            fhir_base_url=settings.fhir_base_url,
            offload=Offload(settings.body_work_threads),
        ),
        head_revision=head_revision(),
        log_signer=NoteSigner(settings.deployment_name, CheckpointSigning(keys)),
        # Its own connections: reads waiting for their entries hold theirs, and must not be
        # able to leave the writer none.
        audit_writer=AuditWriter(Database(settings.database_url, pool_size=1)),
    )
