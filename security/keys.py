"""Key providers: where the KEK, the HMAC keys and the audit signing key live.

A :class:`KeyProvider` performs operations with its keys and never hands one
out, so that a provider whose keys never leave a hardware token
(``security.pkcs11_keys``) fits behind the same interface:

* wrap and unwrap a subject key under the KEK (``"kek"``);
* the blind-index HMAC (``"blind-index"``, ``security.blind_index``);
* sign and verify the service's access tokens (``"token-hmac"``, HMAC-SHA256);
* sign audit checkpoints (``"audit-log"``, Ed25519), with its public key.

The default provider is :class:`LocalKeyring`, a JSON file holding the keys in
base64. It is created with mode 0600, replaced atomically on every change, and
checked by :func:`keyring_permissions_problem` at start-up.

The file grows with the service: a keyring written by a later version, with key
purposes this one does not know, is read and rewritten with those keys kept; a
keyring written by an earlier version, lacking a purpose this one needs, is
refused with a message naming it unless the caller asks for the missing keys to
be added (development start-up, ``mhr keys upgrade``).

Wrapped-key blob (version 1)::

    offset  size  field
    0       1     format (1 = AES-256-GCM under a KEK)
    1       1     length L of the KEK id (1..255)
    2       L     KEK id (ASCII)
    2+L     4     KEK version (uint32, big-endian)
    6+L     12    nonce (random)
    18+L    n+16  wrapped key || tag

Bytes ``0 .. 6+L`` are the header; the GCM associated data is
``header || aad``, so the KEK named in the blob is authenticated along with
whatever the caller binds the key to (typically the subject id).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from security.envelope import IntegrityError

__all__ = [
    "BLIND_INDEX_PURPOSE",
    "CHECK_MESSAGE",
    "KEK_PURPOSE",
    "LOG_SIGNING_KEY_NAME",
    "SECRET_PURPOSES",
    "TOKEN_PURPOSE",
    "CheckpointSigning",
    "KekLifecycle",
    "KekRef",
    "KekRetired",
    "KeyCheck",
    "KeyProvider",
    "KeyringError",
    "LocalKeyring",
    "keyring_permissions_problem",
    "parse_wrapped",
    "public_key_check_value",
    "wrap_header",
]

TOKEN_PURPOSE: Final = "token-hmac"  # noqa: S105 - a key's name, not a secret
BLIND_INDEX_PURPOSE: Final = "blind-index"
SECRET_PURPOSES: Final = (TOKEN_PURPOSE, BLIND_INDEX_PURPOSE)
LOG_SIGNING_KEY_NAME: Final = "audit-log"
KEK_PURPOSE: Final = "kek"
# The fixed message whose MAC under a key is that key's check value.
CHECK_MESSAGE: Final = b"mhr key check value v1"
_CHECK_BYTES: Final = 8

_WRAP_FORMAT: Final = 1
_KEY_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_UINT32_MAX: Final = 0xFFFF_FFFF
_FILE_FORMAT: Final = 1


class KekRetired(IntegrityError):
    """The blob names a KEK version below the minimum decryption version: retired, refused.

    An integrity-class failure (callers that treat every IntegrityError alike stay safe), told
    apart so that data still wrapped under a retired version is reported as such, never passed
    off as tampering.
    """


class KeyringError(Exception):
    """The keyring cannot be created, read or changed.

    Messages name the file and the problem, never key material.
    """


@dataclass(frozen=True)
class KekRef:
    """Names one version of a key-encryption key."""

    key_id: str
    version: int


@dataclass(frozen=True)
class KeyCheck:
    """Names one key and proves which key it is, without revealing it.

    ``check_value`` is a key check value: HMAC-SHA256 of a fixed message under
    the key, truncated to 64 bits (hex). Two keyrings that hold the same key
    give the same value; the value says nothing usable about the key itself, so
    the database may keep it to tell whether a keyring is the one its data needs.
    """

    purpose: str
    key_id: str
    check_value: str


def key_check_value(raw_key: bytes) -> str:
    return hmac.new(raw_key, CHECK_MESSAGE, hashlib.sha256).digest()[:_CHECK_BYTES].hex()


def public_key_check_value(public_key: Ed25519PublicKey) -> str:
    """Check value of a key pair whose private half cannot be read (a token's): its public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(CHECK_MESSAGE + raw).digest()[:_CHECK_BYTES].hex()


class KeyProvider(Protocol):
    """What the rest of the service may ask of a key store: operations, never key material."""

    def current_kek(self) -> KekRef:
        """The KEK version new wraps use."""
        ...

    def wrap_key(self, plaintext_key: bytes, aad: bytes) -> bytes:
        """Wrap a key under the current KEK; the blob names the KEK it used."""
        ...

    def unwrap_key(self, blob: bytes, aad: bytes) -> bytes:
        """Unwrap with whichever held KEK version the blob names.

        Raises ``security.envelope.IntegrityError`` on any failure.
        """
        ...

    def blind_index_mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 (32 bytes) of ``message`` under the current blind-index key."""
        ...

    def blind_index_kid(self) -> str:
        """The kid of the blind-index key this provider made last (the one a rotation adds)."""
        ...

    def blind_index_kids(self) -> tuple[str, ...]:
        """The kids of every blind-index key held (several while one is being rotated)."""
        ...

    def blind_index_mac_for(self, kid: str, message: bytes) -> bytes | None:
        """HMAC-SHA256 of ``message`` under blind-index key ``kid``; None if it is not held.

        Which key indexes what is the database's record (``service.records.index_keys``), not
        the provider's "current": a rotation makes the new key current here before any row uses it.
        """
        ...

    def token_key_id(self) -> str:
        """The kid of the key new access tokens are signed with."""
        ...

    def sign_token(self, kid: str, message: bytes) -> bytes:
        """HMAC-SHA256 of a token's signing input under key ``kid``; KeyringError if not held."""
        ...

    def verify_token(self, kid: str, message: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is the HMAC of ``message`` under key ``kid`` (False if not held).

        Called for every token not yet seen: it must cost microseconds.
        """
        ...

    def holds_token_key(self, kid: str) -> bool:
        """Whether tokens signed under ``kid`` can still verify (the key is held)."""
        ...

    def rotate_secret(self, purpose: str) -> str:
        """Make a new key current for ``purpose`` (its kid returned); older ones stay held."""
        ...

    def retire_secret(self, purpose: str, kid: str) -> None:
        """Destroy a non-current key of ``purpose``; KeyringError for the current or an unknown kid."""
        ...

    def rotate_checkpoint_key(self) -> Ed25519PublicKey:
        """Replace the audit log key with a new one (its public key returned); the old is destroyed."""
        ...

    def sign_checkpoint(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message`` under the audit log key."""
        ...

    def checkpoint_public_key(self) -> Ed25519PublicKey:
        """The public half of the audit log key, for verifiers."""
        ...

    def key_checks(self) -> tuple[KeyCheck, ...]:
        """Every held key (each KEK version, every secret, the log key) by id and check value."""
        ...

    def close(self) -> None:
        """Release what the provider holds open (a token session); it is not used after."""
        ...


@runtime_checkable
class KekLifecycle(Protocol):
    """What rotating and retiring the KEK asks of a provider (operators' commands, the rewrap job)."""

    def rotate_kek(self) -> KekRef:
        """Create the next KEK version and make it the one new wraps use."""
        ...

    def kek_versions(self) -> tuple[int, ...]:
        """The KEK versions held (that can unwrap), ascending."""
        ...

    def min_decrypt_version(self) -> int:
        """The lowest KEK version an unwrap accepts; a blob naming a lower one is KekRetired."""
        ...

    def retire_kek_below(self, version: int) -> tuple[int, ...]:
        """Destroy every KEK version below ``version`` (never the current); returns those destroyed.

        After it an unwrap under a destroyed version raises KekRetired. Irreversible: the
        caller checks first that nothing it still needs is wrapped under them.
        """
        ...

    def reload(self) -> None:
        """Pick up KEK versions another process added or retired (the file or the token changed)."""
        ...


class CheckpointSigning:
    """The audit log key as ``security.signed_note`` signs with it: a provider's operation."""

    __slots__ = ("_provider",)

    def __init__(self, provider: KeyProvider) -> None:
        self._provider = provider

    def sign(self, data: bytes) -> bytes:
        return self._provider.sign_checkpoint(data)

    def public_key(self) -> Ed25519PublicKey:
        return self._provider.checkpoint_public_key()


# --- wrapped-key blob ------------------------------------------------------


def wrap_header(ref: KekRef) -> bytes:
    kid = ref.key_id.encode("ascii")
    return bytes((_WRAP_FORMAT, len(kid))) + kid + struct.pack(">I", ref.version)


def parse_wrapped(blob: bytes) -> tuple[KekRef, bytes, bytes, bytes]:
    """Split a blob into (kek, header, nonce, ct||tag); IntegrityError if malformed."""
    if len(blob) < 2 or blob[0] != _WRAP_FORMAT:
        raise IntegrityError
    kid_len = blob[1]
    header_len = 2 + kid_len + 4
    if kid_len == 0 or len(blob) < header_len + _NONCE_SIZE + _TAG_SIZE:
        raise IntegrityError
    try:
        kid = blob[2 : 2 + kid_len].decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError from None
    (version,) = struct.unpack_from(">I", blob, 2 + kid_len)
    header = blob[:header_len]
    nonce = blob[header_len : header_len + _NONCE_SIZE]
    return KekRef(kid, int(version)), header, nonce, blob[header_len + _NONCE_SIZE :]


# --- local keyring file ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class _SecretSet:
    current: str
    keys: dict[str, bytes]


# eq=False: nothing should compare key material (and not in variable time).
@dataclass(frozen=True, eq=False)
class _State:
    """One immutable snapshot of the keyring.

    Changes build a new snapshot, persist it, then swap the reference, so a
    reader never sees half a rotation and memory never holds a key that is
    not on disk (a wrap under such a key would be unrecoverable after restart).
    """

    kek_id: str
    kek_current: int
    keks: dict[int, AESGCM]
    kek_raw: dict[int, bytes] = field(repr=False)
    secrets: dict[str, _SecretSet] = field(repr=False)
    signing_raw: bytes = field(repr=False)
    # The minimum decryption version: versions below it were destroyed by a retirement.
    kek_retired_below: int = 1
    # The document as read: what a later version wrote that this one does not know (other
    # purposes, other sections) is written back unchanged, never dropped by a rotation here.
    document: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def replace(self, **changes: Any) -> _State:
        fields = {
            "kek_id": self.kek_id,
            "kek_current": self.kek_current,
            "keks": self.keks,
            "kek_raw": self.kek_raw,
            "secrets": self.secrets,
            "signing_raw": self.signing_raw,
            "kek_retired_below": self.kek_retired_below,
            "document": self.document,
        }
        return _State(**{**fields, **changes})


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64d(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyringError(f"keyring: {what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyringError(f"keyring: {what} is not valid base64") from None
    if len(raw) != _KEY_SIZE:
        raise KeyringError(f"keyring: {what} must be {_KEY_SIZE} bytes")
    return raw


def _new_kid(existing: Mapping[str, bytes]) -> str:
    while True:
        kid = secrets.token_hex(4)
        if kid not in existing:
            return kid


def _new_secret_set() -> _SecretSet:
    kid = _new_kid({})
    return _SecretSet(kid, {kid: os.urandom(_KEY_SIZE)})


def _new_signing_key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _fresh_state() -> _State:
    raw = os.urandom(_KEY_SIZE)
    return _State(
        # A random id tells this deployment's blobs from another's.
        kek_id=f"local-{secrets.token_hex(8)}",
        kek_current=1,
        keks={1: AESGCM(raw)},
        kek_raw={1: raw},
        secrets={purpose: _new_secret_set() for purpose in SECRET_PURPOSES},
        signing_raw=_new_signing_key(),
    )


def _to_json(state: _State) -> bytes:
    known_secrets = {
        purpose: {"current": s.current, "keys": {k: _b64e(v) for k, v in s.keys.items()}}
        for purpose, s in state.secrets.items()
    }
    doc = {
        **state.document,
        "format": _FILE_FORMAT,
        "kek": {
            "key_id": state.kek_id,
            "current": state.kek_current,
            "retired_below": state.kek_retired_below,
            "versions": {str(v): _b64e(k) for v, k in sorted(state.kek_raw.items())},
        },
        "secrets": {**state.document.get("secrets", {}), **known_secrets},
        "signing": {**state.document.get("signing", {}), LOG_SIGNING_KEY_NAME: _b64e(state.signing_raw)},
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KeyringError(f"keyring: {what} must be an object")
    return value


def _secret_set(purpose: str, entry: dict[str, Any]) -> _SecretSet:
    keys = {
        kid: _b64d(raw, f"secret {purpose}/{kid}")
        for kid, raw in _obj(entry.get("keys"), f"secrets.{purpose}.keys").items()
    }
    cur = entry.get("current")
    if not isinstance(cur, str) or cur not in keys:
        raise KeyringError(f"keyring: secrets.{purpose}.current does not name a held key")
    return _SecretSet(cur, keys)


def _from_json(data: bytes, *, add_missing: bool = False) -> tuple[_State, tuple[str, ...]]:
    """The keyring in ``data`` and the purposes it lacked (added only with ``add_missing``).

    Without ``add_missing`` a missing purpose raises KeyringError naming it.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyringError("keyring: file is not valid JSON") from None
    doc = _obj(doc, "document")
    if doc.get("format") != _FILE_FORMAT:
        raise KeyringError(f"keyring: unsupported format {doc.get('format')!r}")

    kek = _obj(doc.get("kek"), "kek")
    kek_id = kek.get("key_id")
    if not isinstance(kek_id, str) or not kek_id.isascii() or not 0 < len(kek_id) < 256:
        raise KeyringError("keyring: kek.key_id must be 1-255 ASCII characters")
    kek_raw: dict[int, bytes] = {}
    for v, k in _obj(kek.get("versions"), "kek.versions").items():
        if not v.isdigit() or not 0 < int(v) <= _UINT32_MAX:
            raise KeyringError(f"keyring: bad kek version {v!r}")
        kek_raw[int(v)] = _b64d(k, f"kek version {v}")
    current = kek.get("current")
    if isinstance(current, bool) or not isinstance(current, int) or current not in kek_raw:
        raise KeyringError("keyring: kek.current does not name a held version")
    retired_below = kek.get("retired_below", 1)
    if (
        isinstance(retired_below, bool)
        or not isinstance(retired_below, int)
        or not 0 < retired_below <= current
        or any(v < retired_below for v in kek_raw)
    ):
        raise KeyringError("keyring: kek.retired_below must be 1..current and above every held version")

    missing: list[str] = []
    secrets_doc = _obj(doc.get("secrets", {}), "secrets")
    secret_sets: dict[str, _SecretSet] = {}
    for purpose in SECRET_PURPOSES:
        if purpose in secrets_doc:
            secret_sets[purpose] = _secret_set(purpose, _obj(secrets_doc[purpose], f"secrets.{purpose}"))
        else:
            missing.append(purpose)
            secret_sets[purpose] = _new_secret_set()
    # Purposes of a later version: each must still be well formed, since it is written back.
    for purpose, entry in secrets_doc.items():
        if purpose not in SECRET_PURPOSES:
            _obj(entry, f"secrets.{purpose}")

    signing = _obj(doc.get("signing", {}), "signing")
    if LOG_SIGNING_KEY_NAME in signing:
        signing_raw = _b64d(signing[LOG_SIGNING_KEY_NAME], f"signing.{LOG_SIGNING_KEY_NAME}")
    else:
        missing.append(LOG_SIGNING_KEY_NAME)
        signing_raw = _new_signing_key()

    if missing and not add_missing:
        names = ", ".join(missing)
        raise KeyringError(
            f"keyring: it holds no {names} key (written by an earlier version of mhr); add the keys "
            "this version needs with `mhr keys upgrade`, which keeps every key the keyring holds"
        )
    state = _State(
        kek_id=kek_id,
        kek_current=current,
        keks={v: AESGCM(k) for v, k in kek_raw.items()},
        kek_raw=kek_raw,
        secrets=secret_sets,
        signing_raw=signing_raw,
        kek_retired_below=retired_below,
        document=doc,
    )
    return state, tuple(missing)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, data: bytes) -> Path:
    """Write ``data`` to a new 0600 file in ``directory`` and fsync it."""
    while True:
        tmp = directory / f".keyring-{secrets.token_hex(8)}.tmp"
        try:
            # O_EXCL: never follow or reuse a file someone planted there.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        break
    try:
        # The mode given to open() is filtered by the umask; make it exact.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _publish_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` without replacing an existing file."""
    try:
        # link() fails if path exists, unlike rename(): two processes starting
        # at once cannot overwrite each other's freshly generated keys.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Operations:
    """The keyed objects one snapshot's operations use, built once per snapshot.

    HMAC is keyed once per key and the keyed state copied per message, which
    saves hashing the padded key each time (a token verify is then ~1 us).
    """

    __slots__ = ("macs", "signing")

    def __init__(self, state: _State) -> None:
        self.macs = {
            purpose: {kid: hmac.new(raw, digestmod=hashlib.sha256) for kid, raw in entry.keys.items()}
            for purpose, entry in state.secrets.items()
        }
        self.signing = Ed25519PrivateKey.from_private_bytes(state.signing_raw)


class LocalKeyring(KeyProvider):
    """Keys in a local JSON file (base64), readable by the service user only."""

    def __init__(self, path: Path, state: _State) -> None:
        """Use :meth:`create`, :meth:`load` or :meth:`load_or_create`."""
        self._path = path
        self._lock = threading.Lock()
        self._file_stamp = self._stamp()
        self._swap(state)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _follow_file(self) -> None:
        """Take up a KEK rotated or retired by another process (``mhr keys rotate``): one stat.

        Called before every wrap, so new subject keys are wrapped under the version current in
        the file, not the one this process loaded; and on a blob naming a version not held.
        """
        if self._stamp() != self._file_stamp:
            with self._lock:
                if self._stamp() != self._file_stamp:
                    self._reload_locked()

    def _swap(self, state: _State) -> None:
        # One reference holds both, so an operation never pairs one snapshot's keys with another's.
        self._current = (state, _Operations(state))

    @property
    def _state(self) -> _State:
        return self._current[0]

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self._path)!r}, kek={self.current_kek()})"

    @property
    def path(self) -> Path:
        return self._path

    # -- construction ----------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Generate fresh keys into a new file; KeyringError if it exists."""
        try:
            return cls._create(Path(path))
        except FileExistsError:
            raise KeyringError(f"keyring {os.fspath(path)} already exists") from None

    @classmethod
    def _create(cls, path: Path) -> LocalKeyring:
        parent = path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode passes through the umask too.
            parent.chmod(0o700)
        state = _fresh_state()
        try:
            tmp = _write_temp(parent, _to_json(state))
            _publish_new(tmp, path)
            _fsync_dir(parent)
        except FileExistsError:
            raise
        except OSError as exc:
            raise KeyringError(f"cannot create keyring {path}: {exc.strerror}") from None
        return cls(path, state)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, add_missing: bool = False) -> LocalKeyring:
        """Read an existing keyring file.

        A key purpose this version needs and the file lacks is refused (KeyringError naming
        it), or with ``add_missing`` generated and written into the file, every other key kept.
        """
        return cls.upgrade(path)[0] if add_missing else cls._load(Path(path))

    @classmethod
    def _load(cls, p: Path) -> LocalKeyring:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read keyring {p}: {exc.strerror}") from None
        try:
            state, _missing = _from_json(data)
        except KeyringError as exc:
            raise KeyringError(f"{p}: {exc}") from None
        return cls(p, state)

    @classmethod
    def upgrade(cls, path: str | os.PathLike[str]) -> tuple[LocalKeyring, tuple[str, ...]]:
        """Load the keyring, adding the key purposes it lacks; returns it and what was added."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read keyring {p}: {exc.strerror}") from None
        try:
            state, missing = _from_json(data, add_missing=True)
        except KeyringError as exc:
            raise KeyringError(f"{p}: {exc}") from None
        keyring = cls(p, state)
        if missing:
            keyring._persist(state)
        return keyring, missing

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str], *, add_missing: bool = False) -> LocalKeyring:
        """Load the keyring, creating it on first start."""
        p = Path(path)
        if p.exists():
            return cls.load(p, add_missing=add_missing)
        try:
            return cls._create(p)
        except FileExistsError:
            # Another process created it between our check and our link.
            return cls.load(p, add_missing=add_missing)

    def _persist(self, state: _State) -> None:
        try:
            tmp = _write_temp(self._path.parent, _to_json(state))
            try:
                os.replace(tmp, self._path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self._path.parent)
            self._file_stamp = self._stamp()
        except OSError as exc:
            raise KeyringError(f"cannot write keyring {self._path}: {exc.strerror}") from None

    def close(self) -> None:
        """Nothing is held open: the file is read once, at load."""

    # -- KEK -------------------------------------------------------------

    def current_kek(self) -> KekRef:
        state = self._state
        return KekRef(state.kek_id, state.kek_current)

    def wrap_key(self, plaintext_key: bytes, aad: bytes) -> bytes:
        if not plaintext_key:
            raise ValueError("nothing to wrap")
        self._follow_file()
        state = self._state
        header = wrap_header(KekRef(state.kek_id, state.kek_current))
        nonce = os.urandom(_NONCE_SIZE)
        sealed = state.keks[state.kek_current].encrypt(nonce, plaintext_key, header + aad)
        return header + nonce + sealed

    def unwrap_key(self, blob: bytes, aad: bytes) -> bytes:
        ref, header, nonce, sealed = parse_wrapped(blob)
        state = self._state
        if ref.key_id == state.kek_id and ref.version != state.kek_current:
            # A newer version another process took up, or an older one it may have retired: a
            # retirement reaches this process before it unwraps under that version again.
            self._follow_file()
            state = self._state
        aead = state.keks.get(ref.version)
        if ref.key_id == state.kek_id and ref.version < state.kek_retired_below:
            raise KekRetired
        if ref.key_id != state.kek_id or aead is None:
            raise IntegrityError
        try:
            return aead.decrypt(nonce, sealed, header + aad)
        except InvalidTag:
            raise IntegrityError from None

    def rotate_kek(self) -> KekRef:
        """Add a new current KEK version; older versions stay for unwrapping.

        Subject keys wrapped under older versions are re-wrapped by ``mhr keys
        rewrap`` (service.keys), then old versions retired with
        :meth:`retire_kek_below`. Another process using this file keeps
        wrapping under the version it loaded until it reloads; its blobs remain
        unwrappable since no version is dropped here.
        """
        with self._lock:
            # Start from the file, not memory: another process may have rotated since we loaded.
            self._reload_locked()
            old = self._state
            version = max(old.kek_raw) + 1
            if version > _UINT32_MAX:
                raise KeyringError("keyring: KEK version space exhausted")
            raw = os.urandom(_KEY_SIZE)
            new = old.replace(
                kek_current=version,
                keks={**old.keks, version: AESGCM(raw)},
                kek_raw={**old.kek_raw, version: raw},
            )
            self._persist(new)
            self._swap(new)
            return KekRef(new.kek_id, version)

    def kek_versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._state.kek_raw))

    def min_decrypt_version(self) -> int:
        return self._state.kek_retired_below

    def retire_kek_below(self, version: int) -> tuple[int, ...]:
        with self._lock:
            self._reload_locked()
            old = self._state
            if not 0 < version <= old.kek_current:
                raise KeyringError(
                    f"keyring: cannot retire below v{version}: the current KEK is v{old.kek_current}"
                )
            destroyed = tuple(v for v in sorted(old.kek_raw) if v < version)
            new = old.replace(
                keks={v: k for v, k in old.keks.items() if v >= version},
                kek_raw={v: k for v, k in old.kek_raw.items() if v >= version},
                kek_retired_below=max(version, old.kek_retired_below),
            )
            # The file is replaced whole (rename): the old versions' bytes leave the live file at
            # once. Copies of the keyring (its backups) still hold them: SECURITY.md, KEK epochs.
            self._persist(new)
            self._swap(new)
            return destroyed

    def reload(self) -> None:
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read keyring {self._path}: {exc.strerror}") from None
        try:
            state, _missing = _from_json(data, add_missing=False)
        except KeyringError as exc:
            raise KeyringError(f"{self._path}: {exc}") from None
        if state.kek_id != self._state.kek_id:
            # Another deployment's keyring put in this one's place: never taken up while running.
            raise KeyringError(f"{self._path}: the file now holds another KEK ({state.kek_id}); not taken up")
        self._file_stamp = self._stamp()
        self._swap(state)

    # -- HMAC operations -------------------------------------------------

    @staticmethod
    def _check_purpose(purpose: str) -> None:
        if purpose not in SECRET_PURPOSES:
            raise KeyringError(f"unknown secret purpose {purpose!r}")

    def current_kid(self, purpose: str) -> str:
        """The kid of the current key for ``purpose`` (an id, not the key)."""
        self._check_purpose(purpose)
        return self._state.secrets[purpose].current

    def _mac(self, purpose: str, kid: str, message: bytes) -> bytes | None:
        keyed = self._current[1].macs[purpose].get(kid)
        if keyed is None:
            return None
        mac = keyed.copy()
        mac.update(message)
        return mac.digest()

    def blind_index_mac(self, message: bytes) -> bytes:
        mac = self._mac(BLIND_INDEX_PURPOSE, self._state.secrets[BLIND_INDEX_PURPOSE].current, message)
        assert mac is not None  # the current kid is always held
        return mac

    def blind_index_kid(self) -> str:
        return self._state.secrets[BLIND_INDEX_PURPOSE].current

    def blind_index_kids(self) -> tuple[str, ...]:
        self._follow_file()
        return tuple(sorted(self._state.secrets[BLIND_INDEX_PURPOSE].keys))

    def blind_index_mac_for(self, kid: str, message: bytes) -> bytes | None:
        return self._mac(BLIND_INDEX_PURPOSE, kid, message)

    def token_key_id(self) -> str:
        return self._state.secrets[TOKEN_PURPOSE].current

    def sign_token(self, kid: str, message: bytes) -> bytes:
        mac = self._mac(TOKEN_PURPOSE, kid, message)
        if mac is None:
            raise KeyringError(f"no {TOKEN_PURPOSE} key {kid!r} is held")
        return mac

    def verify_token(self, kid: str, message: bytes, mac: bytes) -> bool:
        expected = self._mac(TOKEN_PURPOSE, kid, message)
        return expected is not None and hmac.compare_digest(expected, mac)

    def holds_token_key(self, kid: str) -> bool:
        return kid in self._state.secrets[TOKEN_PURPOSE].keys

    def rotate_secret(self, purpose: str) -> str:
        """Add a new current secret for ``purpose`` and return its kid.

        Old secrets stay, so tokens carrying an old kid still verify. For
        ``"blind-index"`` every stored index must be recomputed under the new
        key before searches use it: an index made under one key never matches
        one made under another.
        """
        self._check_purpose(purpose)
        with self._lock:
            old = self._state
            entry = old.secrets[purpose]
            kid = _new_kid(entry.keys)
            new = old.replace(
                secrets={
                    **old.secrets,
                    purpose: _SecretSet(kid, {**entry.keys, kid: os.urandom(_KEY_SIZE)}),
                },
            )
            self._persist(new)
            self._swap(new)
            return kid

    def retire_secret(self, purpose: str, kid: str) -> None:
        """Drop a superseded secret: tokens carrying its kid no longer verify.

        The caller decides when that is safe (``service.keys.secret_rotation``
        waits out the token lifetime); the current key is never dropped here.
        """
        self._check_purpose(purpose)
        with self._lock:
            old = self._state
            entry = old.secrets[purpose]
            if kid == entry.current:
                raise KeyringError(f"{purpose} key {kid!r} is the current one; rotate before retiring it")
            if kid not in entry.keys:
                raise KeyringError(f"no {purpose} key {kid!r} is held")
            kept = {k: v for k, v in entry.keys.items() if k != kid}
            new = old.replace(secrets={**old.secrets, purpose: _SecretSet(entry.current, kept)})
            self._persist(new)
            self._swap(new)

    # -- audit log signing -----------------------------------------------

    def rotate_checkpoint_key(self) -> Ed25519PublicKey:
        """A new audit log key replaces the old, which is not kept: checkpoints it signed stay
        verifiable by its public key (``service.keys.log_key_rotation`` records it)."""
        with self._lock:
            new = self._state.replace(signing_raw=_new_signing_key())
            self._persist(new)
            self._swap(new)
            return self._current[1].signing.public_key()

    def sign_checkpoint(self, message: bytes) -> bytes:
        return self._current[1].signing.sign(message)

    def checkpoint_public_key(self) -> Ed25519PublicKey:
        return self._current[1].signing.public_key()

    # -- identification --------------------------------------------------

    def key_checks(self) -> tuple[KeyCheck, ...]:
        state = self._state
        checks = [
            KeyCheck(KEK_PURPOSE, f"{state.kek_id}/v{version}", key_check_value(raw))
            for version, raw in sorted(state.kek_raw.items())
        ]
        for purpose, entry in sorted(state.secrets.items()):
            checks += [
                KeyCheck(purpose, kid, key_check_value(raw)) for kid, raw in sorted(entry.keys.items())
            ]
        checks.append(KeyCheck(LOG_SIGNING_KEY_NAME, "ed25519", key_check_value(state.signing_raw)))
        return tuple(checks)


def keyring_permissions_problem(path: str | os.PathLike[str]) -> str | None:
    """A human-readable problem with the keyring file's permissions, or None.

    Group or other access of any kind (read, write, execute) is a problem: the
    file holds every key in clear. A missing or non-regular file is reported
    too, since nothing safe can be said about it.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return f"keyring {p} does not exist"
    except OSError as exc:
        return f"cannot stat keyring {p}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"keyring {p} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"keyring {p} has mode {mode:04o}: group or others can access it; run `chmod 600 {p}`"
    return None
