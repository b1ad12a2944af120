"""Both key providers, the keyring file and a PKCS#11 token (SoftHSM2), answer the same operations."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from softhsm_kit import SoftHsm, init_softhsm_token, softhsm_config

from security.access_tokens import AccessTokenCodec, TokenInvalid
from security.blind_index import BlindIndexer
from security.envelope import IntegrityError, new_data_key
from security.keys import CheckpointSigning, KeyProvider, KeyringError, LocalKeyring
from security.signed_note import Checkpoint, NoteError, NoteSigner

AAD = b"mhr.subject-key.v1\x00patient-7"
PASSPORT = "http://hl7.org/fhir/sid/passport-AUS"


@pytest.fixture(params=["keyring", "pkcs11"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    if request.param == "keyring":
        yield LocalKeyring.create(tmp_path / "keyring.json")
        return
    hsm: SoftHsm = request.getfixturevalue("softhsm")
    from security.pkcs11_keys import Pkcs11Keys

    opened = Pkcs11Keys.open(hsm.module, hsm.token, hsm.pin)
    try:
        yield opened
    finally:
        opened.close()


def test_wrap_unwrap_round_trip_bound_to_its_subject(provider: KeyProvider) -> None:
    key = new_data_key()
    blob = provider.wrap_key(key, AAD)
    assert provider.unwrap_key(blob, AAD) == key
    assert provider.wrap_key(key, AAD) != blob  # a fresh nonce each time
    assert key not in blob
    # Bound to the subject: another subject's AAD, any flipped bit, any truncation fails alike.
    for bad_blob, aad in [
        (blob, b"mhr.subject-key.v1\x00patient-8"),
        (blob[:-1] + bytes([blob[-1] ^ 1]), AAD),
        (blob[:20] + bytes([blob[20] ^ 1]) + blob[21:], AAD),
        (blob[:-5], AAD),
        (b"", AAD),
    ]:
        with pytest.raises(IntegrityError):
            provider.unwrap_key(bad_blob, aad)


def test_the_blob_names_the_kek_and_its_version(provider: KeyProvider) -> None:
    blob = provider.wrap_key(new_data_key(), AAD)
    ref = provider.current_kek()
    kid = ref.key_id.encode("ascii")
    assert blob[0] == 1 and blob[2 : 2 + len(kid)] == kid
    assert int.from_bytes(blob[2 + len(kid) : 6 + len(kid)], "big") == ref.version
    # A blob naming a version the provider does not hold fails like any other.
    edited = bytearray(blob)
    edited[2 + len(kid) + 3] ^= 0x7F
    with pytest.raises(IntegrityError):
        provider.unwrap_key(bytes(edited), AAD)


def test_providers_do_not_read_each_others_blobs(provider: KeyProvider, tmp_path: Path) -> None:
    other = LocalKeyring.create(tmp_path / "other.json")
    with pytest.raises(IntegrityError):
        provider.unwrap_key(other.wrap_key(new_data_key(), AAD), AAD)
    with pytest.raises(IntegrityError):
        other.unwrap_key(provider.wrap_key(new_data_key(), AAD), AAD)


def test_blind_index_under_the_providers_key(provider: KeyProvider, tmp_path: Path) -> None:
    indexer = BlindIndexer(provider.blind_index_mac)
    index = indexer.identifier(PASSPORT, "AB 123-456")
    assert len(index) == 16
    assert index == indexer.identifier(PASSPORT, "ab123456")  # normalised, deterministic
    assert index != indexer.identifier(PASSPORT, "AB123457")
    assert index != indexer.token("nationality", PASSPORT, "AB123456")
    assert len(indexer.derived_key("search-cursor.v2")) == 32
    foreign = BlindIndexer(LocalKeyring.create(tmp_path / "other.json").blind_index_mac)
    assert foreign.identifier(PASSPORT, "AB123456") != index


def test_access_tokens_signed_and_verified_by_the_provider(provider: KeyProvider, tmp_path: Path) -> None:
    def codec(keys: KeyProvider) -> AccessTokenCodec:
        return AccessTokenCodec(issuer="https://mhr.test", audience="https://mhr.test/fhir", keys=keys)

    mine = codec(provider)
    token, _ = mine.issue(
        client_id="c1",
        organization_id="o1",
        role="clinic",
        scope="system/*.cruds",
        purpose=None,
        person=None,
        now=datetime.now(UTC),
        lifetime_seconds=300,
    )
    assert codec(provider).verify(token).client_id == "c1"
    header, payload, signature = token.split(".")
    for forged in (f"{header}.{payload}.{signature[:-4]}AAAA", f"{header}.{payload[:-2]}.{signature}"):
        with pytest.raises(TokenInvalid):
            codec(provider).verify(forged)
    with pytest.raises(TokenInvalid):
        codec(LocalKeyring.create(tmp_path / "other.json")).verify(token)


def test_checkpoints_signed_by_the_provider_verify_with_its_public_key(provider: KeyProvider) -> None:
    signer = NoteSigner("mhr.test/log", CheckpointSigning(provider))
    note = signer.sign(Checkpoint("mhr.test/log", 3, b"\x01" * 32).body())
    assert signer.verifier().verify(note).startswith("mhr.test/log\n3\n")
    with pytest.raises(NoteError):
        signer.verifier().verify(note.replace("\n3\n", "\n4\n"))


def test_key_checks_are_stable_and_name_every_purpose(provider: KeyProvider) -> None:
    checks = provider.key_checks()
    assert {c.purpose for c in checks} == {"kek", "token-hmac", "blind-index", "audit-log"}
    assert provider.key_checks() == checks
    assert all(c.check_value and len(c.check_value) <= 16 for c in checks)


# --- PKCS#11 only -------------------------------------------------------------


def test_token_keys_never_leave_the_token(softhsm: SoftHsm) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    from security.pkcs11_keys import _module

    # Through the process's bookkeeping of the library: a raw session of our own would log
    # every provider of the token out when it closes (PKCS#11 logins are per application).
    library = _module(str(softhsm.module))
    with library.lock:
        token = library.lib.get_token(token_label=softhsm.token)
        session = library.open_session(token, softhsm.token, softhsm.pin, rw=False)
        try:
            secret_or_private = [
                *session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}),
                *session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}),
            ]
            labels = {key.label for key in secret_or_private}
            assert {"mhr-kek-v1", "mhr-token-hmac-v1", "mhr-blind-index-v1", "mhr-audit-log"} <= labels
            for key in secret_or_private:
                assert key[Attribute.SENSITIVE] is True
                assert key[Attribute.EXTRACTABLE] is False
                with pytest.raises(pkcs11.PKCS11Error):
                    key[Attribute.VALUE]
        finally:
            library.close_session(softhsm.token, session)


def test_closing_the_provider_that_logged_in_leaves_the_others_of_the_process_logged_in(
    softhsm: SoftHsm,
) -> None:
    """An operator's command run in a server's process (tests; a REPL) closes its provider first:
    PKCS#11 logs in per application, and logging out one session would log out them all."""
    from security.pkcs11_keys import Pkcs11Keys, _module

    first = Pkcs11Keys.open(softhsm.module, softhsm.token, softhsm.pin)
    second = Pkcs11Keys.open(softhsm.module, softhsm.token, softhsm.pin)
    try:
        # The scenario is real only if ``first`` is the session that logged in.
        assert _module(str(softhsm.module))._login.get(softhsm.token) is first._session
        subject_key = new_data_key()
        blob = first.wrap_key(subject_key, AAD)
        mac = first.blind_index_mac(b"passport")
    finally:
        first.close()
    try:
        assert second.unwrap_key(blob, AAD) == subject_key
        assert second.blind_index_mac(b"passport") == mac
    finally:
        second.close()
    # Once the last one closed, the token is logged out; the next provider logs in again.
    assert softhsm.token not in _module(str(softhsm.module))._login
    again = Pkcs11Keys.open(softhsm.module, softhsm.token, softhsm.pin)
    try:
        assert again.unwrap_key(blob, AAD) == subject_key
    finally:
        again.close()


def test_two_providers_of_one_process_used_from_many_threads_at_once_stay_correct(softhsm: SoftHsm) -> None:
    """The library is initialised single-threaded: without one lock for all its sessions this
    answered errors and once crashed the interpreter (issue 14)."""
    from security.pkcs11_keys import Pkcs11Keys

    providers = [Pkcs11Keys.open(softhsm.module, softhsm.token, softhsm.pin) for _ in range(2)]
    failures: list[str] = []

    def churn(provider: Pkcs11Keys, n: int) -> None:
        for i in range(150):
            aad = AAD + f"-{n}-{i}".encode()
            subject_key = new_data_key()
            try:
                if provider.unwrap_key(provider.wrap_key(subject_key, aad), aad) != subject_key:
                    failures.append("round trip")
                provider.reload()  # object searches interleaved with other threads' operations
            except Exception as exc:
                failures.append(type(exc).__name__)

    threads = [threading.Thread(target=churn, args=(providers[n % 2], n)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for provider in providers:
            provider.close()
    assert failures == []


def test_a_token_without_the_keys_is_refused_naming_them(softhsm: SoftHsm) -> None:
    from security.pkcs11_keys import Pkcs11Keys

    with pytest.raises(
        KeyringError, match=r"holds no kek, token-hmac, blind-index, audit-log key.*keys init"
    ):
        Pkcs11Keys.open(softhsm.module, softhsm.empty_token, softhsm.pin)


def test_a_wrong_pin_is_refused_without_echoing_it(softhsm: SoftHsm) -> None:
    from security.pkcs11_keys import Pkcs11Keys

    with pytest.raises(KeyringError, match="refused the PIN") as info:
        Pkcs11Keys.open(softhsm.module, softhsm.token, "0000-wrong")
    assert "0000-wrong" not in str(info.value)


def test_mhr_keys_init_creates_the_keys_in_the_token_once(softhsm: SoftHsm, tmp_path: Path) -> None:
    """`mhr keys init --provider pkcs11`, in a process of its own (a token of its own)."""
    config = softhsm_config(tmp_path / "hsm")
    init_softhsm_token(config, "mhr-cli")
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(config),
        "MHR_ENV": "test",
        "MHR_PKCS11_MODULE": str(softhsm.module),
        "MHR_PKCS11_TOKEN_LABEL": "mhr-cli",
        "MHR_PKCS11_PIN_FILE": str(pin_file),
    }
    env.pop("MHR_PKCS11_PIN", None)

    def mhr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, check=False
        )

    first = mhr("keys", "init", "--provider", "pkcs11")
    assert first.returncode == 0, first.stderr
    assert "created kek, token-hmac, blind-index, audit-log" in first.stdout
    second = mhr("keys", "init", "--provider", "pkcs11")
    assert second.returncode == 0, second.stderr
    assert "nothing created" in second.stdout
    assert softhsm.pin not in first.stdout + first.stderr + second.stdout + second.stderr


# --- a keyring of an earlier version at start-up ---------------------------------


def _without_blind_index(path: Path) -> None:
    import json

    doc = json.loads(path.read_text())
    del doc["secrets"]["blind-index"]
    path.write_text(json.dumps(doc))


def test_an_older_keyring_is_completed_in_development_and_refused_elsewhere(tmp_path: Path) -> None:
    from service.core.settings import Environment, Settings
    from service.runtime.providers import open_keyring

    path = tmp_path / "keyring.json"
    blob = LocalKeyring.create(path).wrap_key(b"k" * 32, AAD)
    _without_blind_index(path)
    production = Settings(env=Environment.production, keyring_path=path, public_base_url="https://mhr.test")
    with pytest.raises(KeyringError, match=r"holds no blind-index key.*mhr keys upgrade"):
        open_keyring(production)
    development = Settings(env=Environment.development, keyring_path=path)
    assert open_keyring(development).unwrap_key(blob, AAD) == b"k" * 32
    # Added to the file: production starts with it now, the same key.
    assert open_keyring(production).blind_index_mac(b"m") == open_keyring(development).blind_index_mac(b"m")


def test_mhr_keys_upgrade_adds_what_an_older_keyring_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli.main import main

    path = tmp_path / "keyring.json"
    kid = LocalKeyring.create(path).token_key_id()
    _without_blind_index(path)
    monkeypatch.setenv("MHR_ENV", "production")
    monkeypatch.setenv("MHR_KEYRING_PATH", str(path))
    assert main(["keys", "upgrade"]) == 0
    upgraded = LocalKeyring.load(path)
    assert upgraded.token_key_id() == kid
    assert main(["keys", "upgrade"]) == 0  # nothing more to add
