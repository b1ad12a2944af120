"""C2SP signed notes and tlog checkpoints (Ed25519)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from security.signed_note import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    key_id,
)

DASH = "\u2014"

# Known answer: the example in the documentation of golang.org/x/mod/sumdb/note,
# the implementation the C2SP signed-note spec was written down from. Ed25519
# is deterministic, so signing must reproduce the published note byte for byte.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n"
    f"{DASH} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZ"
    "SNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

# The example body from c2sp.org/tlog-checkpoint (its signature key is not
# published, so only the body is used).
SPEC_CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"

ORIGIN = "mhr.example/audit"
ROOT = hashlib.sha256(b"root").digest()


@pytest.fixture(scope="module")
def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def signer(private_key: Ed25519PrivateKey) -> NoteSigner:
    return NoteSigner(ORIGIN, private_key)


@pytest.fixture(scope="module")
def verifier(signer: NoteSigner) -> NoteVerifier:
    return NoteVerifier.from_vkey(signer.vkey())


def _sig_line(name: str, blob: bytes) -> str:
    return f"{DASH} {name} {base64.b64encode(blob).decode()}\n"


def _split(note: str) -> tuple[str, bytes]:
    """Text and raw signature blob of a note with one signature."""
    text, line = note[: note.rindex("\n\n") + 1], note[note.rindex("\n\n") + 2 :]
    return text, base64.b64decode(line.rstrip("\n").rsplit(" ", 1)[1])


# --- known answers ----------------------------------------------------------------


def test_go_sumdb_note_known_answer() -> None:
    signer = NoteSigner.from_skey(GO_SKEY)
    assert signer.vkey() == GO_VKEY
    assert signer.key_id.hex() == "c74f20a3"
    assert signer.sign(GO_TEXT) == GO_NOTE
    assert NoteVerifier.from_vkey(GO_VKEY).verify(GO_NOTE) == GO_TEXT


def test_key_id_is_spec_formula(signer: NoteSigner) -> None:
    raw = base64.b64decode(signer.vkey().split("+", 2)[2])
    assert raw[0] == 0x01
    expected = hashlib.sha256(ORIGIN.encode() + b"\n" + raw).digest()[:4]
    assert signer.key_id == expected
    assert signer.vkey() == f"{ORIGIN}+{expected.hex()}+{base64.b64encode(raw).decode()}"


def test_spec_checkpoint_body_round_trips() -> None:
    checkpoint = Checkpoint.parse(SPEC_CHECKPOINT)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.body() == SPEC_CHECKPOINT


# --- round trips ------------------------------------------------------------------


def test_checkpoint_sign_verify_parse(signer: NoteSigner, verifier: NoteVerifier) -> None:
    checkpoint = Checkpoint(ORIGIN, 42, ROOT, ("ext one", "ext two"))
    note = signer.sign(checkpoint.body())
    assert note.startswith(f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\next one\next two\n\n")
    assert Checkpoint.parse(verifier.verify(note)) == checkpoint
    assert verifier.verify(note.encode()) == checkpoint.body()


def test_empty_tree_checkpoint(signer: NoteSigner, verifier: NoteVerifier) -> None:
    empty = Checkpoint(ORIGIN, 0, hashlib.sha256(b"").digest())
    assert Checkpoint.parse(verifier.verify(signer.sign(empty.body()))) == empty


def test_text_with_blank_lines(signer: NoteSigner, verifier: NoteVerifier) -> None:
    # The text ends at the *last* blank line, so inner blank lines survive.
    for text in ("a\n\nb\n", "a\n\n", "\n", "é ünïcode\n"):
        assert verifier.verify(signer.sign(text)) == text


def test_vkey_round_trip(signer: NoteSigner, verifier: NoteVerifier) -> None:
    assert verifier.vkey() == signer.vkey()
    assert verifier.name == ORIGIN
    assert verifier.key_id == signer.key_id
    assert signer.verifier().vkey() == signer.vkey()


# --- cosignatures and unknown keys ------------------------------------------------


def test_signatures_by_unknown_keys_are_ignored(signer: NoteSigner, verifier: NoteVerifier) -> None:
    body = Checkpoint(ORIGIN, 7, ROOT).body()
    witness = NoteSigner("witness.example/w1", Ed25519PrivateKey.generate())
    ours = signer.sign(body)[len(body) + 1 :]
    theirs = witness.sign(body)[len(body) + 1 :]
    garbage_id = _sig_line("unknown.example", b"\x00\x01\x02\x03" + b"x" * 64)
    for lines in (theirs + ours, ours + theirs, garbage_id + ours + theirs):
        assert verifier.verify(body + "\n" + lines) == body


def test_same_name_other_key_is_not_ours(verifier: NoteVerifier) -> None:
    impostor = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())  # same name, other key ID
    with pytest.raises(NoteError, match="not signed"):
        verifier.verify(impostor.sign("hello\n"))


def test_other_name_is_not_ours(private_key: Ed25519PrivateKey, verifier: NoteVerifier) -> None:
    # Same key under another name has another key ID: ignored, so unsigned.
    renamed = NoteSigner("other.example/log", private_key)
    with pytest.raises(NoteError, match="not signed"):
        verifier.verify(renamed.sign("hello\n"))


# --- tampering --------------------------------------------------------------------


def test_tampered_body(signer: NoteSigner, verifier: NoteVerifier) -> None:
    note = signer.sign(Checkpoint(ORIGIN, 42, ROOT).body())
    with pytest.raises(NoteError, match="does not verify"):
        verifier.verify(note.replace("\n42\n", "\n43\n"))


@pytest.mark.parametrize("position", [4, 5, 40, 67])
def test_tampered_signature(signer: NoteSigner, verifier: NoteVerifier, position: int) -> None:
    text, blob = _split(signer.sign("body\n"))
    bad = blob[:position] + bytes([blob[position] ^ 0x01]) + blob[position + 1 :]
    with pytest.raises(NoteError, match="does not verify"):
        verifier.verify(text + "\n" + _sig_line(ORIGIN, bad))


def test_one_bad_signature_by_our_key_sinks_the_note(signer: NoteSigner, verifier: NoteVerifier) -> None:
    note = signer.sign("body\n")
    _, blob = _split(note)
    bad = blob[:-1] + bytes([blob[-1] ^ 0x01])
    with pytest.raises(NoteError, match="does not verify"):
        verifier.verify(note + _sig_line(ORIGIN, bad))


def test_wrong_length_signature_by_our_key(signer: NoteSigner, verifier: NoteVerifier) -> None:
    text, blob = _split(signer.sign("body\n"))
    for bad in (blob[:-1], blob + b"\x00"):
        with pytest.raises(NoteError, match="wrong length"):
            verifier.verify(text + "\n" + _sig_line(ORIGIN, bad))


# --- malformed notes --------------------------------------------------------------


def test_malformed_notes(signer: NoteSigner, verifier: NoteVerifier) -> None:
    good = signer.sign("body\n")
    text, blob = _split(good)
    sig = base64.b64encode(blob).decode()
    malformed = [
        "",
        "body\n",  # no signatures at all
        "body\n\n",  # blank line but no signature lines
        good.rstrip("\n"),  # last signature line unterminated
        good.replace("\n\n", "\n"),  # no blank line before signatures
        f"body\n\n- {ORIGIN} {sig}\n",  # hyphen, not em dash
        f"body\n\n{DASH}{ORIGIN} {sig}\n",  # no space after the dash
        f"body\n\n{DASH} {ORIGIN}\n",  # no signature
        f"body\n\n{DASH} {ORIGIN}  {sig}\n",  # double space
        f"body\n\n{DASH} {ORIGIN} {sig[:-1]}\n",  # broken base64
        f"body\n\n{DASH} {ORIGIN} {sig.rstrip('=')}\n",  # unpadded base64
        f"body\n\n{DASH} {ORIGIN} AAAA\n",  # shorter than a key ID plus a byte
        f"body\n\n{DASH} bad+name {sig}\n",  # '+' is not allowed in key names
        f"body\n\n{DASH}  {sig}\n",  # empty key name
        "bo\x00dy\n" + good[len(text) :],  # control character in the text
        "body\r\n" + good[len(text) :],
        good + "\n",  # trailing blank line: no signatures after the last one
    ]
    for note in malformed:
        with pytest.raises(NoteError):
            verifier.verify(note)


def test_non_canonical_base64_signature(signer: NoteSigner, verifier: NoteVerifier) -> None:
    text, blob = _split(signer.sign("body\n"))
    sig = base64.b64encode(blob).decode()
    # 68 bytes leave 2 unused bits before the "="; setting one gives a second
    # spelling of the same bytes, which a strict decoder must refuse.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(sig[-2]) | 1]
    assert sig.endswith("=") and last != sig[-2]
    with pytest.raises(NoteError, match="canonical"):
        verifier.verify(f"{text}\n{DASH} {ORIGIN} {sig[:-2]}{last}=\n")


def test_invalid_utf8_bytes(verifier: NoteVerifier) -> None:
    with pytest.raises(NoteError, match="UTF-8"):
        verifier.verify(b"\xff\xfe\n\n")
    with pytest.raises(NoteError, match="UTF-8"):
        verifier.verify("lone \ud800 surrogate\n\n")


def test_size_limits(signer: NoteSigner, verifier: NoteVerifier) -> None:
    big = "x" * MAX_NOTE_BYTES + "\n"
    with pytest.raises(NoteError, match="too large"):
        verifier.verify(signer.sign(big))
    with pytest.raises(NoteError, match="too large"):
        verifier.verify(signer.sign(big).encode())
    body = "body\n"
    ours = signer.sign(body)[len(body) + 1 :]
    other = _sig_line("witness.example", b"\x01\x02\x03\x04" + b"s" * 64)
    assert verifier.verify(body + "\n" + other * 15 + ours) == body  # spec minimum is 16
    with pytest.raises(NoteError, match="too many"):
        verifier.verify(body + "\n" + other * MAX_SIGNATURES + ours)


# --- keys -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u3000b", "a\nb"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(NoteError):
        NoteSigner(name, Ed25519PrivateKey.generate())


def test_key_id_rejects_bad_name() -> None:
    with pytest.raises(NoteError):
        key_id("a b", Ed25519PrivateKey.generate().public_key())


def test_malformed_vkeys(signer: NoteSigner) -> None:
    name, id_hex, key_text = signer.vkey().split("+", 2)
    raw = base64.b64decode(key_text)
    other_id = bytes([signer.key_id[0] ^ 1]).hex() + id_hex[2:]
    not_ed25519 = base64.b64encode(b"\x02" + raw[1:]).decode()
    short = base64.b64encode(raw[:-1]).decode()
    bad = [
        "",
        name,
        f"{name}+{id_hex}",
        f"{name}+{id_hex.upper()}+{key_text}" if id_hex != id_hex.upper() else "x",
        f"{name}+{id_hex[:7]}+{key_text}",
        f"{name}+{other_id}+{key_text}",  # ID does not match the key
        f"{name}+{id_hex}+{not_ed25519}",
        f"{name}+{id_hex}+{short}",
        f"{name}+{id_hex}+{key_text}=",  # 33 bytes need no padding
        f"{name}+{id_hex}+{key_text[:-1]}",
        f"bad name+{id_hex}+{key_text}",
        f"+{id_hex}+{key_text}",
    ]
    for vkey in bad:
        with pytest.raises(NoteError):
            NoteVerifier.from_vkey(vkey)


def test_malformed_skeys() -> None:
    prefix, rest = GO_SKEY[: len("PRIVATE+KEY+")], GO_SKEY[len("PRIVATE+KEY+") :]
    for skey in (rest, "PRIVATE+KEY+x", prefix + rest.replace("c74f20a3", "c74f20a4"), GO_VKEY):
        with pytest.raises(NoteError):
            NoteSigner.from_skey(skey)


def test_sign_rejects_bad_text(signer: NoteSigner) -> None:
    for text in ("", "no newline", "tab\there\n", "cr\r\n"):
        with pytest.raises(NoteError):
            signer.sign(text)


def test_public_key_bytes_in_vkey(private_key: Ed25519PrivateKey, signer: NoteSigner) -> None:
    pub = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert signer.vkey().endswith(base64.b64encode(b"\x01" + pub).decode())


# --- checkpoint parsing -----------------------------------------------------------

ROOT_B64 = base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    "body",
    [
        f"{ORIGIN}\n42\n{ROOT_B64}",  # no final newline
        f"{ORIGIN}\n42\n",  # no root line
        f"{ORIGIN}\n42\n{ROOT_B64}\n\n",  # empty extension line
        f"\n42\n{ROOT_B64}\n",  # empty origin
        f"{ORIGIN}\n042\n{ROOT_B64}\n",  # leading zero
        f"{ORIGIN}\n00\n{ROOT_B64}\n",
        f"{ORIGIN}\n-1\n{ROOT_B64}\n",
        f"{ORIGIN}\n+1\n{ROOT_B64}\n",
        f"{ORIGIN}\n 1\n{ROOT_B64}\n",
        f"{ORIGIN}\n1_000\n{ROOT_B64}\n",
        f"{ORIGIN}\n\u0664\u0662\n{ROOT_B64}\n",  # Arabic-Indic digits: int() would take them
        f"{ORIGIN}\n{1 << 64}\n{ROOT_B64}\n",  # beyond uint64
        f"{ORIGIN}\n\n{ROOT_B64}\n",
        f"{ORIGIN}\n42\n{ROOT_B64[:-1]}\n",  # broken base64
        f"{ORIGIN}\n42\n{ROOT_B64.rstrip('=')}\n",  # unpadded
        f"{ORIGIN}\n42\n{base64.b64encode(ROOT[:31]).decode()}\n",  # 31-byte hash
        f"{ORIGIN}\n42\n{base64.b64encode(ROOT + b'x').decode()}\n",  # 33-byte hash
        f"{ORIGIN}\r\n42\n{ROOT_B64}\n",  # CRLF
        f"{ORIGIN}\n42\n{ROOT_B64}\nbad\x01ext\n",
    ],
)
def test_checkpoint_parse_rejects(body: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(body)


def test_checkpoint_parse_accepts_edges() -> None:
    top = Checkpoint.parse(f"{ORIGIN}\n{(1 << 64) - 1}\n{ROOT_B64}\n")
    assert top.size == (1 << 64) - 1
    assert Checkpoint.parse(f"{ORIGIN}\n0\n{ROOT_B64}\n").size == 0
    ext = Checkpoint.parse(f"{ORIGIN}\n1\n{ROOT_B64}\nx\ny z\n")
    assert ext.extensions == ("x", "y z")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        (ORIGIN, -1, ROOT, ()),
        (ORIGIN, 1 << 64, ROOT, ()),
        (ORIGIN, 1, ROOT[:16], ()),
        (ORIGIN, 1, ROOT, ("",)),
        (ORIGIN, 1, ROOT, ("two\nlines",)),
    ],
)
def test_checkpoint_constructor_rejects(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(NoteError):
        Checkpoint(origin, size, root, extensions)
