"""Local keyring: file safety, KEK wrap/unwrap and rotation, named secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def _raw_secret(path: Path, purpose: str, kid: str | None = None) -> bytes:
    """A secret as the file holds it: only to show that nothing else ever shows it."""
    entry = json.loads(path.read_text())["secrets"][purpose]
    return base64.b64decode(entry["keys"][kid or entry["current"]])


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
    assert loaded.token_key_id() == created.token_key_id()
    assert loaded.blind_index_mac(b"m") == created.blind_index_mac(b"m")


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
    secret = _raw_secret(keyring.path, "token-hmac")
    with pytest.raises(KeyringError) as info:
        LocalKeyring.load(_corrupt(keyring.path, edit))
    # Error messages never carry key material.
    assert secret.hex() not in str(info.value)


def test_reload_gives_the_same_keys(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(b"k" * 32, AAD)
    reloaded = LocalKeyring.load(keyring.path)
    assert reloaded.current_kek() == keyring.current_kek()
    assert reloaded.unwrap_key(blob, AAD) == b"k" * 32
    assert reloaded.blind_index_mac(b"m") == keyring.blind_index_mac(b"m")
    kid = keyring.token_key_id()
    assert reloaded.token_key_id() == kid
    assert reloaded.verify_token(kid, b"m", keyring.sign_token(kid, b"m"))
    message = b"audit head"
    signature = keyring.sign_checkpoint(message)
    reloaded.checkpoint_public_key().verify(signature, message)


def test_two_keyrings_do_not_share_keys(tmp_path: Path) -> None:
    a = LocalKeyring.create(tmp_path / "a.json")
    b = LocalKeyring.create(tmp_path / "b.json")
    assert a.current_kek().key_id != b.current_kek().key_id
    assert a.blind_index_mac(b"m") != b.blind_index_mac(b"m")
    assert not b.verify_token(a.token_key_id(), b"m", a.sign_token(a.token_key_id(), b"m"))
    _unwrap_fails(b, a.wrap_key(new_data_key(), AAD))


def test_repr_does_not_leak(keyring: LocalKeyring) -> None:
    text = repr(keyring)
    for purpose in ("token-hmac", "blind-index"):
        assert _raw_secret(keyring.path, purpose).hex() not in text


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
    old_kid = keyring.token_key_id()
    old_mac = keyring.sign_token(old_kid, b"m")
    index_before = keyring.blind_index_mac(b"m")
    new_kid = keyring.rotate_secret("token-hmac")
    assert new_kid != old_kid
    assert keyring.token_key_id() == new_kid
    new_mac = keyring.sign_token(new_kid, b"m")
    assert new_mac != old_mac
    # Tokens under the old kid still verify; the other purpose is untouched.
    assert keyring.verify_token(old_kid, b"m", old_mac)
    assert keyring.holds_token_key(old_kid) and keyring.holds_token_key(new_kid)
    assert keyring.blind_index_mac(b"m") == index_before
    reloaded = LocalKeyring.load(keyring.path)
    assert reloaded.token_key_id() == new_kid
    assert reloaded.verify_token(old_kid, b"m", old_mac)
    assert reloaded.verify_token(new_kid, b"m", new_mac)


# --- operations --------------------------------------------------------------


def test_hmac_operations_are_hmac_sha256_under_each_purposes_key(keyring: LocalKeyring) -> None:
    path = keyring.path
    index_key = _raw_secret(path, "blind-index")
    token_key = _raw_secret(path, "token-hmac")
    assert index_key != token_key
    assert keyring.blind_index_mac(b"m") == hmac.new(index_key, b"m", hashlib.sha256).digest()
    kid = keyring.token_key_id()
    assert keyring.sign_token(kid, b"m") == hmac.new(token_key, b"m", hashlib.sha256).digest()


def test_token_verify_refuses_what_it_did_not_sign(keyring: LocalKeyring) -> None:
    kid = keyring.token_key_id()
    mac = keyring.sign_token(kid, b"m")
    assert keyring.verify_token(kid, b"m", mac)
    assert not keyring.verify_token(kid, b"n", mac)
    assert not keyring.verify_token(kid, b"m", mac[:-1] + bytes([mac[-1] ^ 1]))
    assert not keyring.verify_token("no-such-kid", b"m", mac)
    assert not keyring.holds_token_key("no-such-kid")
    with pytest.raises(KeyringError):
        keyring.sign_token("no-such-kid", b"m")
    with pytest.raises(KeyringError):
        keyring.rotate_secret("nope")


def test_checkpoint_signing(keyring: LocalKeyring) -> None:
    signature = keyring.sign_checkpoint(b"m")
    assert len(signature) == 64
    keyring.checkpoint_public_key().verify(signature, b"m")


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


# --- keyrings of other versions ----------------------------------------------


def _edit(path: Path, change: object) -> dict[str, object]:
    doc: dict[str, object] = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    return doc


def test_keyring_of_a_later_version_keeps_what_this_one_does_not_know(keyring: LocalKeyring) -> None:
    later_purpose = {"current": "k1", "keys": {"k1": base64.b64encode(b"x" * 32).decode()}}

    def add(doc: dict[str, object]) -> None:
        doc["secrets"]["export-signing"] = later_purpose  # type: ignore[index]
        doc["signing"]["notifications"] = base64.b64encode(b"y" * 32).decode()  # type: ignore[index]
        doc["rotation"] = {"min_kek_version": 1}

    _edit(keyring.path, add)
    blob = keyring.wrap_key(b"k" * 32, AAD)
    loaded = LocalKeyring.load(keyring.path)
    assert loaded.unwrap_key(blob, AAD) == b"k" * 32
    # Rewritten by a rotation here, the file still holds every key and section of the later version.
    loaded.rotate_kek()
    loaded.rotate_secret("blind-index")
    after = json.loads(keyring.path.read_text())
    assert after["secrets"]["export-signing"] == later_purpose
    assert after["signing"]["notifications"] == base64.b64encode(b"y" * 32).decode()
    assert after["rotation"] == {"min_kek_version": 1}
    assert LocalKeyring.load(keyring.path).unwrap_key(blob, AAD) == b"k" * 32


def test_keyring_of_an_earlier_version_is_refused_naming_the_missing_key(keyring: LocalKeyring) -> None:
    _edit(keyring.path, lambda doc: doc["secrets"].pop("blind-index"))
    before = keyring.path.read_bytes()
    with pytest.raises(KeyringError, match=r"holds no blind-index key.*mhr keys upgrade"):
        LocalKeyring.load(keyring.path)
    assert keyring.path.read_bytes() == before  # refused: nothing written


def test_earlier_keyring_gains_the_missing_key_and_keeps_the_rest(keyring: LocalKeyring) -> None:
    blob = keyring.wrap_key(b"k" * 32, AAD)
    kid = keyring.token_key_id()
    token_mac = keyring.sign_token(kid, b"m")
    old_index = keyring.blind_index_mac(b"m")
    _edit(keyring.path, lambda doc: (doc["secrets"].pop("blind-index"), doc.pop("signing")))
    upgraded, added = LocalKeyring.upgrade(keyring.path)
    assert added == ("blind-index", "audit-log")
    assert upgraded.unwrap_key(blob, AAD) == b"k" * 32
    assert upgraded.verify_token(kid, b"m", token_mac)
    assert upgraded.blind_index_mac(b"m") != old_index  # a new key: the old one was not in the file
    assert _mode(keyring.path) == 0o600
    # Written: a plain load now finds it, the same key.
    again = LocalKeyring.load(keyring.path)
    assert again.blind_index_mac(b"m") == upgraded.blind_index_mac(b"m")
    assert LocalKeyring.upgrade(keyring.path)[1] == ()
