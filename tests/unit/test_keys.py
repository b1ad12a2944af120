"""Local keyring: file safety, KEK wrap/unwrap and rotation, named secrets."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from security.envelope import IntegrityError, new_data_key
from security.keys import (
    KekRef,
    KeyProvider,
    KeyringError,
    LocalKeyring,
    keyring_permissions_problem,
)

MESSAGE = "ciphertext failed its integrity check"
AAD = b"subject:7"


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask000", "umask022", "umask277"])
def permissive_umask(request: pytest.FixtureRequest) -> Iterator[None]:
    # The keyring's mode must not depend on the process umask: with 000 a
    # careless open() gives 0666, with 277 it gives 0400 (unwritable).
    old = os.umask(request.param)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring.create(tmp_path / "keyring.json")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _unwrap_fails(provider: KeyProvider, blob: bytes, aad: bytes = AAD) -> None:
    with pytest.raises(IntegrityError) as info:
        provider.unwrap_key(blob, aad)
    assert str(info.value) == MESSAGE
    assert info.value.__cause__ is None


# --- file creation and permissions -----------------------------------------


@pytest.mark.usefixtures("permissive_umask")
def test_create_makes_a_0600_file_and_0700_parent(tmp_path: Path) -> None:
    path = tmp_path / "new" / "keyring.json"
    LocalKeyring.create(path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert stat.S_ISREG(path.stat().st_mode)
    # The temporary file was renamed or removed, not left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json"]
    assert keyring_permissions_problem(path) is None


@pytest.mark.usefixtures("permissive_umask")
def test_existing_parent_permissions_are_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    LocalKeyring.create(tmp_path / "keyring.json")
    assert _mode(tmp_path) == 0o755


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    first = LocalKeyring.create(path)
    before = path.read_bytes()
    with pytest.raises(KeyringError):
        LocalKeyring.create(path)
    assert path.read_bytes() == before
    assert LocalKeyring.load(path).current_kek() == first.current_kek()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o666])
def test_permissions_problem_reported(keyring: LocalKeyring, mode: int) -> None:
    keyring.path.chmod(mode)
    problem = keyring_permissions_problem(keyring.path)
    assert problem is not None
    assert str(keyring.path) in problem
    assert f"{mode:04o}" in problem


def test_permissions_problem_for_missing_or_non_regular(tmp_path: Path) -> None:
    assert keyring_permissions_problem(tmp_path / "absent.json") is not None
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    assert keyring_permissions_problem(directory) is not None


def test_permissions_ok_for_0400(keyring: LocalKeyring) -> None:
    keyring.path.chmod(0o400)
    assert keyring_permissions_problem(keyring.path) is None


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    created = LocalKeyring.load_or_create(path)
    assert _mode(path) == 0o600
    loaded = LocalKeyring.load_or_create(path)
    assert loaded.current_kek() == created.current_kek()
    assert loaded.secret("token-hmac") == created.secret("token-hmac")


def test_load_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyringError):
        LocalKeyring.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KeyringError):
        LocalKeyring.load(bad)


def _corrupt(path: Path, edit: str) -> Path:
    doc = json.loads(path.read_text())
    if edit == "short-kek":
        doc["kek"]["versions"]["1"] = "AAAA"
    elif edit == "bad-base64":
        doc["secrets"]["token-hmac"]["keys"] = {"x": "!!!"}
        doc["secrets"]["token-hmac"]["current"] = "x"
    elif edit == "current-missing":
        doc["kek"]["current"] = 2
    elif edit == "format":
        doc["format"] = 2
    elif edit == "no-signing":
        del doc["signing"]
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edit", ["short-kek", "bad-base64", "current-missing", "format", "no-signing"])
def test_load_rejects_malformed_keyring(keyring: LocalKeyring, edit: str) -> None:
    secret = keyring.secret("token-hmac")[1]
    with pytest.raises(KeyringError) as info:
        LocalKeyring.load(_corrupt(keyring.path, edit))
    # Error messages never carry key material.
    assert secret.hex() not in str(info.value)


def test_reload_gives_the_same_keys(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(b"k" * 32, AAD)
    reloaded = LocalKeyring.load(keyring.path)
    assert reloaded.current_kek() == keyring.current_kek()
    assert reloaded.unwrap_key(blob, AAD) == b"k" * 32
    for purpose in ("token-hmac", "blind-index"):
        assert reloaded.secret(purpose) == keyring.secret(purpose)
    message = b"audit head"
    signature = keyring.log_signing_key().sign(message)
    reloaded.log_signing_key().public_key().verify(signature, message)


def test_two_keyrings_do_not_share_keys(tmp_path: Path) -> None:
    a = LocalKeyring.create(tmp_path / "a.json")
    b = LocalKeyring.create(tmp_path / "b.json")
    assert a.current_kek().key_id != b.current_kek().key_id
    assert a.secret("blind-index")[1] != b.secret("blind-index")[1]
    _unwrap_fails(b, a.wrap_key(new_data_key(), AAD))


def test_repr_does_not_leak(keyring: LocalKeyring) -> None:
    text = repr(keyring)
    for purpose in ("token-hmac", "blind-index"):
        assert keyring.secret(purpose)[1].hex() not in text


# --- wrap / unwrap -----------------------------------------------------------


def test_wrap_unwrap_round_trip(keyring: LocalKeyring) -> None:
    key = new_data_key()
    blob = keyring.wrap_key(key, AAD)
    assert keyring.unwrap_key(blob, AAD) == key
    assert keyring.wrap_key(key, AAD) != blob  # fresh nonce


def test_wrapped_blob_names_its_kek(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(new_data_key(), AAD)
    ref = keyring.current_kek()
    kid = ref.key_id.encode("ascii")
    assert blob[0] == 1
    assert blob[1] == len(kid)
    assert blob[2 : 2 + len(kid)] == kid
    assert struct.unpack(">I", blob[2 + len(kid) : 6 + len(kid)])[0] == ref.version == 1
    assert len(blob) == 6 + len(kid) + 12 + 32 + 16


def test_unwrap_with_wrong_aad_fails(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(new_data_key(), AAD)
    _unwrap_fails(keyring, blob, b"subject:8")
    _unwrap_fails(keyring, blob, b"")


def test_every_flipped_bit_in_wrapped_key_fails(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(new_data_key(), AAD)
    for i in range(len(blob) * 8):
        tampered = bytearray(blob)
        tampered[i // 8] ^= 1 << (i % 8)
        _unwrap_fails(keyring, bytes(tampered))


def test_every_truncation_of_wrapped_key_fails(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(new_data_key(), AAD)
    for n in range(len(blob)):
        _unwrap_fails(keyring, blob[:n])


def test_unknown_kek_version_fails(keyring: LocalKeyring) -> None:
    blob = bytearray(keyring.wrap_key(new_data_key(), AAD))
    kid_len = blob[1]
    blob[2 + kid_len : 6 + kid_len] = struct.pack(">I", 99)
    _unwrap_fails(keyring, bytes(blob))


def test_wrap_rejects_empty_key(keyring: LocalKeyring) -> None:
    with pytest.raises(ValueError):
        keyring.wrap_key(b"", AAD)


# --- rotation ----------------------------------------------------------------


@pytest.mark.usefixtures("permissive_umask")
def test_rotate_kek_keeps_old_versions(keyring: LocalKeyring) -> None:
    key_old = new_data_key()
    old_blob = keyring.wrap_key(key_old, AAD)
    before = keyring.current_kek()

    after = keyring.rotate_kek()
    assert after == KekRef(before.key_id, before.version + 1)
    assert keyring.current_kek() == after

    key_new = new_data_key()
    new_blob = keyring.wrap_key(key_new, AAD)
    kid_len = new_blob[1]
    assert struct.unpack(">I", new_blob[2 + kid_len : 6 + kid_len])[0] == after.version
    assert keyring.unwrap_key(old_blob, AAD) == key_old
    assert keyring.unwrap_key(new_blob, AAD) == key_new

    # Persisted atomically with the same safe mode, no temp files left.
    assert _mode(keyring.path) == 0o600
    assert sorted(p.name for p in keyring.path.parent.iterdir()) == ["keyring.json"]
    reloaded = LocalKeyring.load(keyring.path)
    assert reloaded.current_kek() == after
    assert reloaded.unwrap_key(old_blob, AAD) == key_old
    assert reloaded.unwrap_key(new_blob, AAD) == key_new

    assert keyring.rotate_kek().version == before.version + 2


def test_rotate_secret(keyring: LocalKeyring) -> None:
    old_kid, old_secret = keyring.secret("token-hmac")
    other = keyring.secret("blind-index")
    new_kid = keyring.rotate_secret("token-hmac")
    assert new_kid != old_kid
    kid, secret = keyring.secret("token-hmac")
    assert kid == new_kid
    assert len(secret) == 32
    assert secret != old_secret
    assert keyring.secret_by_kid("token-hmac", old_kid) == old_secret
    assert keyring.secret("blind-index") == other
    reloaded = LocalKeyring.load(keyring.path)
    assert reloaded.secret("token-hmac") == (new_kid, secret)
    assert reloaded.secret_by_kid("token-hmac", old_kid) == old_secret


# --- named secrets -----------------------------------------------------------


def test_secrets_per_purpose(keyring: LocalKeyring) -> None:
    tk, token_secret = keyring.secret("token-hmac")
    bk, index_secret = keyring.secret("blind-index")
    assert len(token_secret) == len(index_secret) == 32
    assert token_secret != index_secret
    assert keyring.secret_by_kid("token-hmac", tk) == token_secret
    assert keyring.secret_by_kid("blind-index", bk) == index_secret
    assert keyring.secret_by_kid("token-hmac", "no-such-kid") is None
    with pytest.raises(KeyringError):
        keyring.secret("audit-log")
    with pytest.raises(KeyringError):
        keyring.secret_by_kid("nope", tk)
    with pytest.raises(KeyringError):
        keyring.rotate_secret("nope")


def test_log_signing_key(keyring: LocalKeyring) -> None:
    key = keyring.log_signing_key()
    assert isinstance(key, Ed25519PrivateKey)
    signature = key.sign(b"m")
    keyring.log_signing_key().public_key().verify(signature, b"m")


def test_local_keyring_is_a_key_provider(keyring: LocalKeyring) -> None:
    provider: KeyProvider = keyring
    assert provider.current_kek().version == 1


def test_key_checks_tell_keys_apart_without_revealing_them(keyring: LocalKeyring, tmp_path: Path) -> None:
    checks = keyring.key_checks()
    assert {c.purpose for c in checks} == {"kek", "token-hmac", "blind-index", "audit-log"}
    # The same keyring read again gives the same record; another keyring shares no check value.
    assert LocalKeyring.load(keyring.path).key_checks() == checks
    other = LocalKeyring.create(tmp_path / "other.json").key_checks()
    assert not {c.check_value for c in checks} & {c.check_value for c in other}
    text = keyring.path.read_text()
    for check in checks:
        assert len(check.check_value) == 16 and check.check_value not in text
    # A rotation adds a key to the record and keeps the old one.
    keyring.rotate_kek()
    after = {(c.purpose, c.key_id) for c in keyring.key_checks()}
    assert {(c.purpose, c.key_id) for c in checks} < after
