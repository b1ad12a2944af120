"""Rotating the access-token key and the audit log key, on both key providers.

A token issued before a rotation verifies after it, until its key is retired
(refused while a token under it may be unexpired); a forged kid is refused. The
audit log verifies across a log key rotation with the key list, each checkpoint
by the key that signed it and only within that key's range of tree sizes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.utils import base64url_decode, base64url_encode
from mhr_testkit import sync_url
from softhsm_kit import SoftHsm
from test_audit_log import add_entries

from security.access_tokens import AccessTokenCodec, TokenInvalid
from security.keys import CheckpointSigning, KeyProvider, KeyringError, LocalKeyring
from security.signed_note import NoteError, NoteSigner, NoteVerifier
from service.audit import log as audit_log
from service.audit.log_keys import LogKeys, LogKeySuperseded, log_keys
from service.audit.verify import verify_database
from service.keys.keyring_match import check_and_record, recorded_checks
from service.keys.log_key_rotation import rotate_log_key
from service.keys.secret_rotation import RotationRefused, retire_token_key, rotate_token_key
from service.store.database import Database

ORIGIN = "mhr.test/rotation"
LIFETIME = 300


@pytest.fixture(params=["keyring", "pkcs11"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    """A writable provider whose keys the test may rotate (a token shared by the rotation tests)."""
    if request.param == "keyring":
        yield LocalKeyring.create(tmp_path / "keyring.json")
        return
    hsm: SoftHsm = request.getfixturevalue("softhsm")
    from security.pkcs11_keys import Pkcs11Keys

    opened = Pkcs11Keys.open(hsm.module, hsm.rotation_token, hsm.pin, create_missing=True, writable=True)
    try:
        yield opened
    finally:
        opened.close()


def _codec(keys: KeyProvider) -> AccessTokenCodec:
    return AccessTokenCodec(issuer="https://mhr.test", audience="https://mhr.test/fhir", keys=keys)


def _issue(codec: AccessTokenCodec, now: datetime) -> str:
    token, _claims = codec.issue(
        client_id="clinic-1",
        organization_id="org-1",
        role="clinic",
        scope="system/*.rs",
        purpose=None,
        person=None,
        now=now,
        lifetime_seconds=LIFETIME,
    )
    return token


def _header_kid(token: str) -> str:
    return str(json.loads(base64url_decode(token.split(".")[0]))["kid"])


def _with_kid(token: str, kid: str) -> str:
    header = json.loads(base64url_decode(token.split(".")[0]))
    header["kid"] = kid
    rest = token.split(".", 1)[1]
    return base64url_encode(json.dumps(header, separators=(",", ":")).encode()).decode() + "." + rest


def run(url: str, work: Any) -> Any:
    async def go() -> Any:
        database = Database(url)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(go())


# --- access-token key -----------------------------------------------------------


def test_a_token_issued_before_rotation_verifies_after_it_until_retired(provider: KeyProvider) -> None:
    now = datetime.now(UTC)
    old_token = _issue(_codec(provider), now)
    old_kid = _header_kid(old_token)

    new_kid = provider.rotate_secret("token-hmac")
    assert new_kid != old_kid and provider.token_key_id() == new_kid
    assert _codec(provider).verify(old_token, now=now).client_id == "clinic-1"
    new_token = _issue(_codec(provider), now)
    assert _header_kid(new_token) == new_kid

    with pytest.raises(KeyringError, match="current"):
        provider.retire_secret("token-hmac", new_kid)
    provider.retire_secret("token-hmac", old_kid)
    with pytest.raises(TokenInvalid):
        _codec(provider).verify(old_token, now=now)
    assert _codec(provider).verify(new_token, now=now).client_id == "clinic-1"


def test_a_forged_kid_is_refused(provider: KeyProvider) -> None:
    now = datetime.now(UTC)
    token = _issue(_codec(provider), now)
    old_kid = _header_kid(token)
    new_kid = provider.rotate_secret("token-hmac")
    # A kid the provider never held, and a held kid that did not sign this token: both refused.
    for kid in ("deadbeef", new_kid, "", "../" + old_kid):
        with pytest.raises(TokenInvalid):
            _codec(provider).verify(_with_kid(token, kid), now=now)


def test_retiring_waits_out_the_token_lifetime_and_the_keyring_check_follows(
    database_url: str, provider: KeyProvider
) -> None:
    rotated_at = datetime.now(UTC)
    run(database_url, lambda db: check_and_record(db, provider))
    old_token = _issue(_codec(provider), rotated_at)
    old_kid = _header_kid(old_token)
    done = run(
        database_url,
        lambda db: rotate_token_key(db, provider, token_lifetime_seconds=LIFETIME, now=rotated_at),
    )
    assert done.previous == old_kid and provider.token_key_id() == done.current

    def retire(kid: str, at: datetime) -> None:
        run(
            database_url,
            lambda db: retire_token_key(db, provider, kid, token_lifetime_seconds=LIFETIME, now=at),
        )

    # While a token under the old key may be unexpired, it stays.
    with pytest.raises(RotationRefused, match="may be valid until"):
        retire(old_kid, rotated_at + timedelta(seconds=LIFETIME))
    assert _codec(provider).verify(old_token, now=rotated_at + timedelta(seconds=LIFETIME - 1))
    with pytest.raises(RotationRefused, match="current"):
        retire(done.current, rotated_at + timedelta(days=1))
    with pytest.raises(RotationRefused, match="no rotation"):
        retire("cafef00d", rotated_at + timedelta(days=1))

    retire(old_kid, rotated_at + timedelta(seconds=LIFETIME + 61))
    assert not provider.holds_token_key(old_kid)
    with pytest.raises(TokenInvalid):
        _codec(provider).verify(old_token, now=rotated_at)
    # The database no longer expects the retired key: the next start accepts this keyring.
    recorded = run(database_url, recorded_checks)
    assert ("token-hmac", old_kid) not in recorded
    run(database_url, lambda db: check_and_record(db, provider))
    assert ("token-hmac", done.current) in run(database_url, recorded_checks)


# --- audit log key --------------------------------------------------------------


def _signer(keys: KeyProvider) -> NoteSigner:
    return NoteSigner(ORIGIN, CheckpointSigning(keys))


def _seal(url: str, signer: NoteSigner) -> None:
    run(url, lambda db: audit_log.seal(db, signer, ORIGIN, wait=True))


def _listed(url: str, keys: KeyProvider) -> LogKeys:
    async def work(db: Database) -> LogKeys:
        async with db.reading() as session:
            return await log_keys(session, _signer(keys).verifier())

    return LogKeys.from_json(json.dumps(run(url, work).as_json()))  # through its published form


def _verify(url: str, keys: LogKeys | Any) -> Any:
    return asyncio.run(verify_database(url, verifier=keys, trusted_note=None, origin=ORIGIN))


def test_verify_passes_across_a_log_key_rotation(database_url: str, provider: KeyProvider) -> None:
    run(database_url, lambda db: check_and_record(db, provider))
    before = _signer(provider)
    add_entries(database_url, 4)
    _seal(database_url, before)
    add_entries(database_url, 3, 4)
    _seal(database_url, before)
    before_vkey = before.vkey()

    done = run(database_url, lambda db: rotate_log_key(db, provider, ORIGIN, now=datetime.now(UTC)))
    assert done.previous_vkey == before_vkey and done.first_size == 8
    after = _signer(provider)
    assert after.vkey() == done.current_vkey != before_vkey

    # A signer made before the rotation (a server started earlier) does not seal; a new one does.
    add_entries(database_url, 5, 7)
    with pytest.raises(LogKeySuperseded):
        _seal(database_url, before)
    _seal(database_url, after)

    listed = _listed(database_url, provider)
    assert [(k.first_size, k.last_size) for k in sorted(listed.keys, key=lambda k: k.first_size)] == [
        (0, 7),
        (8, None),
    ]
    report = _verify(database_url, listed)
    assert report.ok, report.failures
    assert report.checkpoints == 3
    # The old key alone no longer verifies the log: the checkpoint after the rotation fails.
    assert not _verify(database_url, NoteVerifier.from_vkey(before_vkey)).ok
    # The keyring check recorded for the log key follows the rotation: the next start accepts it.
    run(database_url, lambda db: check_and_record(db, provider))


def _resign(url: str, size: int, signer: NoteSigner) -> None:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.begin() as conn:
            note = conn.execute(
                sa.text("SELECT note FROM audit_checkpoints WHERE size = :s"), {"s": size}
            ).scalar_one()
            body = note[: note.rfind("\n\n") + 1]
            conn.execute(
                sa.text("UPDATE audit_checkpoints SET note = :n WHERE size = :s"),
                {"n": signer.sign(body), "s": size},
            )
    finally:
        engine.dispose()


def test_a_checkpoint_signed_by_a_key_not_listed_fails_naming_it(
    database_url: str, provider: KeyProvider
) -> None:
    add_entries(database_url, 3)
    _seal(database_url, _signer(provider))
    run(database_url, lambda db: rotate_log_key(db, provider, ORIGIN, now=datetime.now(UTC)))
    add_entries(database_url, 2, 3)
    _seal(database_url, _signer(provider))
    stranger = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    _resign(database_url, 5, stranger)

    report = _verify(database_url, _listed(database_url, provider))
    assert not report.ok
    text = " ".join(str(f) for f in report.failures)
    assert "checkpoint 5" in text and stranger.key_id.hex() in text and "not in the trusted list" in text


def test_the_previous_log_key_cannot_sign_past_its_range(database_url: str, tmp_path: Path) -> None:
    """A leaked previous key signing a later checkpoint is caught, naming the key and its range."""
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    add_entries(database_url, 3)
    _seal(database_url, _signer(keyring))
    leaked = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(keyring._state.signing_raw))
    run(database_url, lambda db: rotate_log_key(db, keyring, ORIGIN, now=datetime.now(UTC)))
    add_entries(database_url, 2, 3)
    _seal(database_url, _signer(keyring))
    _resign(database_url, 5, leaked)

    report = _verify(database_url, _listed(database_url, keyring))
    assert not report.ok
    text = " ".join(str(f) for f in report.failures)
    assert leaked.key_id.hex() in text and "0..3 only" in text


def test_a_malformed_key_list_is_refused() -> None:
    for text in ("", "{}", '{"keys": []}', '{"keys": [{"vkey": "x", "first_size": 0}]}'):
        with pytest.raises(NoteError):
            LogKeys.from_json(text)
