"""C2SP signed notes (https://c2sp.org/signed-note) and tlog checkpoints
(https://c2sp.org/tlog-checkpoint), Ed25519 only.

Checkpoints of the audit log are published in this format so that any
off-the-shelf transparency-log tooling (Go ``sumdb/note``, witnesses) can
check them, and so that holders of old checkpoints can demand consistency
proofs. Only signature type 0x01 (Ed25519) is implemented: the spec asks
implementations to support just the types their design needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Checkpoint",
    "Ed25519Signing",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "key_id",
]

ED25519_TYPE = 0x01
_SIG_PREFIX = "\u2014 "  # em dash, space
_HASH_SIZE = 32
_ED25519_SIG_SIZE = 64
_ED25519_KEY_SIZE = 32

# The spec requires accepting at least 16 signatures and asks verifiers to cap
# the rest; a checkpoint plus a few cosignatures is well under 1 KiB, so these
# limits only bound the work an attacker can make us do.
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 64 * 1024

# tlog-checkpoint: ASCII decimal, no leading zeros except for "0" itself.
_SIZE_RE = re.compile(r"(?:0|[1-9][0-9]*)", re.ASCII)
_MAX_TREE_SIZE = (1 << 64) - 1  # sizes are uint64 in every other implementation
_HEX8_RE = re.compile(r"[0-9a-f]{8}", re.ASCII)


class NoteError(ValueError):
    """A note, checkpoint or key is malformed, or no trusted signature verifies."""


def _b64decode_strict(text: str, what: str) -> bytes:
    """Standard padded base64, rejecting anything that does not re-encode identically.

    ``validate=True`` alone still accepts non-zero padding bits, which would
    give one value several spellings.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise NoteError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_key_name(name: str) -> None:
    if not name:
        raise NoteError("key name is empty")
    for ch in name:
        # "No Unicode spaces or plus"; control characters are banned note-wide.
        if ch == "+" or ch.isspace() or unicodedata.category(ch) in ("Zs", "Cc"):
            raise NoteError(f"key name contains forbidden character {ch!r}")


def _check_text(text: str, what: str) -> None:
    """Valid UTF-8, no ASCII control characters other than newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates cannot be UTF-8
        raise NoteError(f"{what} is not valid UTF-8") from exc
    for ch in text:
        if ch < " " and ch != "\n":
            raise NoteError(f"{what} contains control character {ch!r}")


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte key ID: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    _check_key_name(name)
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ED25519_TYPE]) + raw).digest()[:4]


# --- checkpoint --------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint body: origin, tree size, root hash, optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validate on construction too, so body() can never emit something
        # that parse() would refuse.
        if not self.origin:
            raise NoteError("checkpoint origin is empty")
        _check_text(self.origin, "checkpoint origin")
        if "\n" in self.origin:
            raise NoteError("checkpoint origin spans several lines")
        if isinstance(self.size, bool) or not 0 <= self.size <= _MAX_TREE_SIZE:
            raise NoteError("checkpoint tree size out of range")
        if len(self.root_hash) != _HASH_SIZE:
            raise NoteError(f"checkpoint root hash must be {_HASH_SIZE} bytes")
        for line in self.extensions:
            if not line or "\n" in line:
                raise NoteError("checkpoint extension lines must be single non-empty lines")
            _check_text(line, "checkpoint extension line")

    def body(self) -> str:
        lines = [self.origin, str(self.size), _b64(self.root_hash), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """Parse a checkpoint body (the note text, including its final newline)."""
        if not body.endswith("\n"):
            raise NoteError("checkpoint body must end with a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("checkpoint body needs origin, size and root hash lines")
        origin, size_text, root_text, *extensions = lines
        if not _SIZE_RE.fullmatch(size_text):
            raise NoteError("checkpoint tree size is not a canonical decimal number")
        root_hash = _b64decode_strict(root_text, "checkpoint root hash")
        return cls(origin, int(size_text), root_hash, tuple(extensions))


# --- signing -----------------------------------------------------------------


class Ed25519Signing(Protocol):
    """An Ed25519 signing key as something that signs: a private key object, or a key
    provider's operation whose key never leaves it (``security.keys.CheckpointSigning``)."""

    def sign(self, data: bytes) -> bytes: ...

    def public_key(self) -> Ed25519PublicKey: ...


class NoteSigner:
    """Signs note texts with one named Ed25519 key."""

    def __init__(self, name: str, private_key: Ed25519Signing) -> None:
        _check_key_name(name)
        self._name = name
        self._key = private_key
        self._id = key_id(name, private_key.public_key())

    @classmethod
    def from_skey(cls, skey: str) -> NoteSigner:
        """Load a Go ``sumdb/note`` signer key.

        The format is ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>``;
        accepting it lets keys made with the Go tooling (``note.GenerateKey``)
        be used as-is.
        """
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise NoteError("signer key must look like PRIVATE+KEY+<name>+<id>+<key>")
        _, _, name, id_hex, key_text = parts
        raw = _b64decode_strict(key_text, "signer key")
        if len(raw) != 1 + _ED25519_KEY_SIZE or raw[0] != ED25519_TYPE:
            raise NoteError("signer key is not an Ed25519 key")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if not _HEX8_RE.fullmatch(id_hex) or bytes.fromhex(id_hex) != signer.key_id:
            raise NoteError("signer key ID does not match the key")
        return signer

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._id

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self._name, self._key.public_key())

    def vkey(self) -> str:
        """The public verifier key string, ``<name>+<hex id>+<base64(0x01 || key)>``."""
        return self.verifier().vkey()

    def sign(self, body: str) -> str:
        """Return the signed note: ``body``, a blank line, then this key's signature line."""
        if not body.endswith("\n"):
            raise NoteError("note text must end with a newline")
        _check_text(body, "note text")
        signature = self._key.sign(body.encode("utf-8"))
        return f"{body}\n{_SIG_PREFIX}{self._name} {_b64(self._id + signature)}\n"


# --- verifying ---------------------------------------------------------------


class NoteVerifier:
    """Checks notes for a valid signature by one trusted Ed25519 key."""

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        _check_key_name(name)
        self._name = name
        self._key = public_key
        self._id = key_id(name, public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<8 hex key id>+<base64(0x01 || 32-byte key)>``.

        The name cannot contain '+' but the base64 can, so split only twice.
        """
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise NoteError("verifier key must look like <name>+<id>+<key>")
        name, id_hex, key_text = parts
        if not _HEX8_RE.fullmatch(id_hex):
            raise NoteError("verifier key ID must be 8 lowercase hex digits")
        raw = _b64decode_strict(key_text, "verifier key")
        if len(raw) != 1 + _ED25519_KEY_SIZE or raw[0] != ED25519_TYPE:
            raise NoteError("verifier key is not an Ed25519 key")
        try:
            public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
        except ValueError as exc:
            raise NoteError("verifier key is not a valid Ed25519 point") from exc
        verifier = cls(name, public_key)
        # A key ID that disagrees with the key means a mangled or forged vkey.
        if bytes.fromhex(id_hex) != verifier.key_id:
            raise NoteError("verifier key ID does not match the key")
        return verifier

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._id

    def vkey(self) -> str:
        raw = self._key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self._name}+{self._id.hex()}+{_b64(bytes([ED25519_TYPE]) + raw)}"

    def verify(self, note: str | bytes) -> str:
        """Return the note text if this key signed it; raise `NoteError` otherwise.

        Signature lines from other keys (other name or other key ID) are
        ignored, as the spec requires, so cosigned notes verify. Every line
        from this key must verify: the spec says a failing known signature
        SHOULD sink the whole note, and a log has no reason to sign twice.
        """
        if isinstance(note, bytes):
            if len(note) > MAX_NOTE_BYTES:
                raise NoteError("note is too large")
            try:
                note = note.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NoteError("note is not valid UTF-8") from exc
        elif len(note) > MAX_NOTE_BYTES:  # cheap bound before encoding
            raise NoteError("note is too large")
        _check_text(note, "note")
        if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
            raise NoteError("note is too large")

        # The text ends at the last blank line; it keeps its final newline.
        split = note.rfind("\n\n")
        if split < 0:
            raise NoteError("note has no blank line before its signatures")
        text, sig_block = note[: split + 1], note[split + 2 :]
        if not sig_block:
            raise NoteError("note has no signature lines")
        if not sig_block.endswith("\n"):
            raise NoteError("note signatures must end with a newline")
        lines = sig_block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise NoteError("note has too many signatures")

        message = text.encode("utf-8")
        verified = False
        for line in lines:
            name, sig = self._parse_signature_line(line)
            if name != self._name or sig[:4] != self._id:
                continue
            if len(sig) != 4 + _ED25519_SIG_SIZE:
                raise NoteError("signature by the trusted key has the wrong length")
            try:
                self._key.verify(sig[4:], message)
            except InvalidSignature as exc:
                raise NoteError("signature by the trusted key does not verify") from exc
            verified = True
        if not verified:
            raise NoteError(f"note is not signed by {self._name}")
        return text

    @staticmethod
    def _parse_signature_line(line: str) -> tuple[str, bytes]:
        if not line.startswith(_SIG_PREFIX):
            raise NoteError("malformed signature line")
        name, sep, sig_text = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep:
            raise NoteError("malformed signature line")
        _check_key_name(name)
        sig = _b64decode_strict(sig_text, "signature")
        if len(sig) < 5:
            raise NoteError("signature is too short")
        return name, sig
