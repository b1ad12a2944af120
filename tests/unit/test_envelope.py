"""Resource envelope encryption: format, binding to the row, uniform failure."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from security.envelope import (
    HEADER_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    IntegrityError,
    SubjectCipher,
    ciphertext_digest,
    new_data_key,
    peek_key_version,
    resource_aad,
)

KEY = bytes(range(32))
AAD = resource_aad("Observation", "obs-1", 3, "subject-7")
MESSAGE = "ciphertext failed its integrity check"


def _open_fails(cipher: SubjectCipher, blob: bytes, aad: bytes) -> None:
    with pytest.raises(IntegrityError) as info:
        cipher.open(blob, aad)
    # One message whatever went wrong, and no chained cause to leak it.
    assert str(info.value) == MESSAGE
    assert info.value.__cause__ is None


def test_new_data_key_is_32_random_bytes() -> None:
    keys = {new_data_key() for _ in range(64)}
    assert len(keys) == 64
    assert all(len(k) == 32 for k in keys)


def test_round_trip() -> None:
    cipher = SubjectCipher(KEY, 1)
    for plaintext in (b"", b"x", b'{"resourceType":"Observation"}' * 100):
        assert cipher.open(cipher.seal(plaintext, AAD), AAD) == plaintext


def test_blob_layout_matches_the_documented_format() -> None:
    cipher = SubjectCipher(KEY, 0x01020304)
    plaintext = b"hello"
    blob = cipher.seal(plaintext, AAD)
    assert blob[:3] == b"MHR"
    assert blob[3] == 1
    assert blob[4] == 1
    assert blob[5:9] == b"\x01\x02\x03\x04"
    assert len(blob) == HEADER_SIZE + NONCE_SIZE + len(plaintext) + TAG_SIZE
    # Decrypt independently with the raw primitive: header || aad is the AAD.
    nonce = blob[9:21]
    assert AESGCM(KEY).decrypt(nonce, blob[21:], blob[:9] + AAD) == plaintext


def test_nonces_are_fresh() -> None:
    cipher = SubjectCipher(KEY, 1)
    nonces = {cipher.seal(b"same", AAD)[9:21] for _ in range(200)}
    assert len(nonces) == 200


def test_every_flipped_bit_fails() -> None:
    cipher = SubjectCipher(KEY, 1)
    blob = cipher.seal(b"patient data", AAD)
    for i in range(len(blob) * 8):
        tampered = bytearray(blob)
        tampered[i // 8] ^= 1 << (i % 8)
        _open_fails(cipher, bytes(tampered), AAD)


def test_every_truncation_fails() -> None:
    cipher = SubjectCipher(KEY, 1)
    blob = cipher.seal(b"patient data", AAD)
    for n in range(len(blob)):
        _open_fails(cipher, blob[:n], AAD)
    _open_fails(cipher, blob + b"\x00", AAD)


@pytest.mark.parametrize(
    "other",
    [
        resource_aad("Condition", "obs-1", 3, "subject-7"),
        resource_aad("Observation", "obs-2", 3, "subject-7"),
        resource_aad("Observation", "obs-1", 4, "subject-7"),
        resource_aad("Observation", "obs-1", 3, "subject-8"),
        b"",
    ],
)
def test_blob_copied_to_another_row_fails(other: bytes) -> None:
    cipher = SubjectCipher(KEY, 1)
    blob = cipher.seal(b"patient data", AAD)
    _open_fails(cipher, blob, other)


def test_wrong_key_fails() -> None:
    blob = SubjectCipher(KEY, 1).seal(b"patient data", AAD)
    _open_fails(SubjectCipher(new_data_key(), 1), blob, AAD)


def test_wrong_key_version_fails() -> None:
    blob = SubjectCipher(KEY, 1).seal(b"patient data", AAD)
    _open_fails(SubjectCipher(KEY, 2), blob, AAD)


def _forge(header: bytes, plaintext: bytes = b"data") -> bytes:
    # A blob whose tag is valid for its (bad) header: only the explicit header
    # checks can reject it, so these tests fail if those checks go.
    nonce = b"\x00" * 12
    return header + nonce + AESGCM(KEY).encrypt(nonce, plaintext, header + AAD)


def test_forged_well_formed_blob_opens() -> None:
    # Control for the tests below: the forging itself is right.
    blob = _forge(b"MHR" + bytes((1, 1)) + struct.pack(">I", 1))
    assert SubjectCipher(KEY, 1).open(blob, AAD) == b"data"


@pytest.mark.parametrize(
    "header",
    [
        b"MHX" + bytes((1, 1)) + struct.pack(">I", 1),
        b"mhr" + bytes((1, 1)) + struct.pack(">I", 1),
        b"MHR" + bytes((2, 1)) + struct.pack(">I", 1),
        b"MHR" + bytes((0, 1)) + struct.pack(">I", 1),
        b"MHR" + bytes((1, 2)) + struct.pack(">I", 1),
        b"MHR" + bytes((1, 0)) + struct.pack(">I", 1),
    ],
    ids=["magic", "magic-case", "version-2", "version-0", "alg-2", "alg-0"],
)
def test_wrong_magic_version_or_algorithm_fails(header: bytes) -> None:
    _open_fails(SubjectCipher(KEY, 1), _forge(header), AAD)


def test_peek_key_version() -> None:
    blob = SubjectCipher(KEY, 77).seal(b"x", AAD)
    assert peek_key_version(blob) == 77
    with pytest.raises(IntegrityError):
        peek_key_version(blob[:20])
    with pytest.raises(IntegrityError):
        peek_key_version(b"XYZ" + blob[3:])


def test_cipher_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        SubjectCipher(KEY[:16], 1)
    with pytest.raises(ValueError):
        SubjectCipher(KEY + b"\x00", 1)
    with pytest.raises(ValueError):
        SubjectCipher(KEY, -1)
    with pytest.raises(ValueError):
        SubjectCipher(KEY, 2**32)
    assert SubjectCipher(KEY, 2**32 - 1).key_version == 2**32 - 1


def test_repr_does_not_show_the_key() -> None:
    text = repr(SubjectCipher(KEY, 5))
    assert KEY.hex() not in text
    assert "5" in text


def test_resource_aad_is_unambiguous() -> None:
    # Plain concatenation would make these equal.
    assert resource_aad("Obs", "ervation1", 1, "s") != resource_aad("Observation", "1", 1, "s")
    assert resource_aad("a", "b", 1, "cd") != resource_aad("a", "bc", 1, "d")
    assert resource_aad("a", "b", 12, "c") != resource_aad("a", "b", 1, "2c")
    with pytest.raises(ValueError):
        resource_aad("a", "b", -1, "c")


def test_resource_aad_encoding_is_pinned() -> None:
    # Stored ciphertexts depend on these exact bytes.
    assert AAD == (
        b"\x00\x00\x00\x13mhr.resource-aad.v1"
        b"\x00\x00\x00\x0bObservation"
        b"\x00\x00\x00\x05obs-1"
        b"\x00\x00\x00\x00\x00\x00\x00\x03"
        b"\x00\x00\x00\x09subject-7"
    )
    assert resource_aad("Observation", "\u00e9", 3, "s")[38:43] == b"\x00\x00\x00\x02\xc3"


def test_ciphertext_digest() -> None:
    assert ciphertext_digest(b"") == ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    blob = SubjectCipher(KEY, 1).seal(b"x", AAD)
    assert ciphertext_digest(blob) == hashlib.sha256(blob).hexdigest()


_fields = st.tuples(st.text(max_size=20), st.text(max_size=20), st.integers(0, 2**64 - 1))


@given(a=_fields, b=_fields, s1=st.text(max_size=20), s2=st.text(max_size=20))
def test_resource_aad_is_injective(
    a: tuple[str, str, int], b: tuple[str, str, int], s1: str, s2: str
) -> None:
    if (a, s1) != (b, s2):
        assert resource_aad(*a, s1) != resource_aad(*b, s2)
    else:
        assert resource_aad(*a, s1) == resource_aad(*b, s2)


_CIPHER = SubjectCipher(KEY, 9)


@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=128))
def test_seal_open_round_trip_property(plaintext: bytes, aad: bytes) -> None:
    assert _CIPHER.open(_CIPHER.seal(plaintext, aad), aad) == plaintext


@settings(max_examples=200)
@given(plaintext=st.binary(max_size=256), data=st.data())
def test_any_bit_flip_fails_property(plaintext: bytes, data: st.DataObject) -> None:
    blob = _CIPHER.seal(plaintext, AAD)
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    tampered = bytearray(blob)
    tampered[bit // 8] ^= 1 << (bit % 8)
    _open_fails(_CIPHER, bytes(tampered), AAD)
