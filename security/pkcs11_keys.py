"""A key provider whose keys never leave a PKCS#11 token (an HSM; SoftHSM2 in tests).

Every operation of :class:`security.keys.KeyProvider` runs inside the token:

* subject keys are wrapped and unwrapped by ``C_Encrypt``/``C_Decrypt`` with
  CKM_AES_GCM under an AES-256 KEK. The wrapped blob is the keyring's format
  (``security.keys``: header naming the KEK and its version, 96-bit random
  nonce, ciphertext and tag) and the GCM associated data is the same
  ``header || aad``, so the binding of a wrapped key to its subject is kept;
* the blind-index HMAC, and signing and verifying access tokens, are
  CKM_SHA256_HMAC with generic secret keys;
* audit checkpoints are signed with CKM_EDDSA by an Ed25519 private key.

Every key is created in the token as sensitive and non-extractable, each with
the one use it has (the KEK encrypts and decrypts, an HMAC key signs and
verifies, the log key signs). Keys are found by label::

    mhr-kek-v<N>          AES-256, CKA_ID = the KEK id (the same for every version); ``rotate_kek``
                          adds v<N+1>, ``retire_kek_below`` destroys the objects of lower versions
    mhr-<purpose>-v<N>    generic secret, CKA_ID = the key's kid   (token-hmac, blind-index)
    mhr-audit-log         Ed25519 key pair (the first one; version 1)
    mhr-audit-log-v<N>    Ed25519 key pair after a rotation (older pairs are destroyed)

The highest ``N`` is the current key of its purpose. Rotating and retiring keys
need a read-write session: open the provider with ``writable=True``. Objects of other labels
(another application's, or a purpose of a later version) are left alone.

Each provider has a session of its own; every call into the library, from any
session in the process, holds the library's one lock, and the login of a token
lasts until its last session closes (``_Module`` says why).
"""

from __future__ import annotations

import functools
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pkcs11
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error, UserAlreadyLoggedIn
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

from security.envelope import IntegrityError
from security.keys import (
    BLIND_INDEX_PURPOSE,
    CHECK_MESSAGE,
    KEK_PURPOSE,
    LOG_SIGNING_KEY_NAME,
    SECRET_PURPOSES,
    TOKEN_PURPOSE,
    KekLifecycle,
    KekRef,
    KekRetired,
    KeyCheck,
    KeyProvider,
    KeyringError,
    parse_wrapped,
    public_key_check_value,
    wrap_header,
)

__all__ = ["Pkcs11Keys", "read_pin"]

_ED25519_OID: Final = "1.3.101.112"
_LABEL: Final = re.compile(r"mhr-(kek|token-hmac|blind-index)-v([1-9][0-9]{0,8})", re.ASCII)
_LOG_LABEL: Final = f"mhr-{LOG_SIGNING_KEY_NAME}"
_LOG_VERSIONED: Final = re.compile(rf"{_LOG_LABEL}(?:-v([1-9][0-9]{{0,8}}))?", re.ASCII)
_NONCE_SIZE: Final = 12
_TAG_BITS: Final = 128
_CHECK_BYTES: Final = 8
_NEVER_LEAVES: Final = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.DERIVE: False,
}


class _Module:
    """One PKCS#11 library in this process, and what every provider and session of it shares.

    python-pkcs11 initialises the library with ``C_Initialize(NULL)``: PKCS#11 then lets the
    library assume that no two threads call it at once, and SoftHSM2 takes that literally (it
    disables its own mutexes). Two sessions are no protection: they share the library's session
    and object tables, and python-pkcs11 releases the GIL around each call. So every call into
    the library, from any session of any provider in the process, holds :attr:`lock` (providers
    locking only their own session raced an operator's in-process CLI against the server: 500s
    and a crash in the library).

    Logins are per application and token, not per session, and python-pkcs11 closes the session
    that logged in with ``C_Logout``, which logs out every other session of the token too. The
    session that logged in is therefore kept open until the last session of its token closes.
    """

    def __init__(self, path: str) -> None:
        # C_Initialize once per process and module: a second one would be refused.
        self.lib = pkcs11.lib(path)
        self.lock = threading.RLock()
        self._login: dict[str, Any] = {}
        self._open: dict[str, int] = {}

    def open_session(self, token: Any, token_label: str, pin: str, *, rw: bool) -> Any:
        """A session of ``token``; the first one of the token logs in with ``pin``. Hold the lock."""
        if token_label in self._login:
            session = token.open(rw=rw)  # shares the login of this process
        else:
            try:
                session = token.open(user_pin=pin, rw=rw)
                self._login[token_label] = session
            except UserAlreadyLoggedIn:
                # Logged in by a session this process does not track (another copy of the
                # library's handle): share that login; it is not this bookkeeping's to end.
                session = token.open(rw=rw)
        self._open[token_label] = self._open.get(token_label, 0) + 1
        return session

    def close_session(self, token_label: str, session: Any) -> None:
        """Close ``session``; the one that logged in closes (logs out) only as the last. Hold the lock."""
        left = self._open[token_label] - 1
        self._open[token_label] = left
        login = self._login.get(token_label)
        if session is not login:
            session.close()
        if left == 0 and login is not None:
            del self._login[token_label]
            login.close()


@functools.cache
def _module(path: str) -> _Module:
    return _Module(path)


@dataclass(frozen=True)
class _Keys:
    kek_id: str
    keks: dict[int, Any]
    hmac_current: dict[str, str]
    hmac: dict[str, dict[str, Any]]
    log_private: Any
    log_public: Ed25519PublicKey
    kek_checks: dict[int, str]


def _log_pairs(session: Any) -> dict[int, dict[ObjectClass, Any]]:
    """The audit log key pairs by version (``mhr-audit-log`` is version 1)."""
    pairs: dict[int, dict[ObjectClass, Any]] = {}
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for key in session.get_objects({Attribute.CLASS: cls}):
            match = _LOG_VERSIONED.fullmatch(key.label or "")
            if match:
                pairs.setdefault(int(match[1] or 1), {})[cls] = key
    return pairs


def _find(session: Any) -> tuple[dict[str, dict[int, Any]], Any, Any]:
    """Keys by purpose and version, and the current log key pair (or None), as the token holds them."""
    by_purpose: dict[str, dict[int, Any]] = {}
    for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        match = _LABEL.fullmatch(key.label or "")
        if match:
            by_purpose.setdefault(match[1], {})[int(match[2])] = key
    pairs = _log_pairs(session)
    current = pairs[max(pairs)] if pairs else {}
    return by_purpose, current.get(ObjectClass.PRIVATE_KEY), current.get(ObjectClass.PUBLIC_KEY)


def _generate_secret(session: Any, purpose: str, version: int, kid: str) -> None:
    session.generate_key(
        KeyType.GENERIC_SECRET,
        256,
        id=kid.encode("ascii"),
        label=f"mhr-{purpose}-v{version}",
        store=True,
        template={
            **_NEVER_LEAVES,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        },
    )


def _generate_log_pair(session: Any, label: str) -> None:
    session.generate_keypair(
        KeyType.EC_EDWARDS,
        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
        id=b"ed25519",
        label=label,
        store=True,
        public_template={
            Attribute.TOKEN: True,
            Attribute.EC_PARAMS: encode_named_curve_parameters(_ED25519_OID),
            Attribute.VERIFY: True,
        },
        private_template={**_NEVER_LEAVES, Attribute.SIGN: True},
    )


def _raw_public(public: Any) -> Ed25519PublicKey:
    point = bytes(public[Attribute.EC_POINT])
    # CKA_EC_POINT is a DER OCTET STRING (04 20 || key) in PKCS#11 2.40; some tokens give the raw key.
    raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
    return Ed25519PublicKey.from_public_bytes(raw)


def _generate_kek(session: Any, kek_id: str, version: int) -> None:
    session.generate_key(
        KeyType.AES,
        256,
        id=kek_id.encode("ascii"),
        label=f"mhr-{KEK_PURPOSE}-v{version}",
        store=True,
        template={
            **_NEVER_LEAVES,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
        },
    )


def _create_missing(session: Any) -> tuple[str, ...]:
    by_purpose, private, _public = _find(session)
    created = []
    if KEK_PURPOSE not in by_purpose:
        _generate_kek(session, f"hsm-{secrets.token_hex(8)}", 1)
        created.append(KEK_PURPOSE)
    for purpose in SECRET_PURPOSES:
        if purpose not in by_purpose:
            _generate_secret(session, purpose, 1, secrets.token_hex(4))
            created.append(purpose)
    if private is None:
        _generate_log_pair(session, _LOG_LABEL)
        created.append(LOG_SIGNING_KEY_NAME)
    return tuple(created)


class Pkcs11Keys(KeyProvider, KekLifecycle):
    """The key provider of one PKCS#11 token; open it with :meth:`open`."""

    def __init__(
        self, module: _Module, session: Any, keys: _Keys, token_label: str, *, writable: bool = False
    ) -> None:
        self._module = module
        self._session = session
        self._writable = writable
        self._keys = keys
        self._label = token_label
        # The library's lock, not this provider's: see _Module.
        self._lock = module.lock
        self._checks = self._key_checks()

    def __repr__(self) -> str:
        return f"Pkcs11Keys(token={self._label!r}, kek={self.current_kek()})"

    @staticmethod
    def _login(module: Path, token_label: str, pin: str, *, rw: bool) -> tuple[_Module, Any]:
        where = f"PKCS#11 token {token_label!r} ({module})"
        if not module.is_file():
            raise KeyringError(f"PKCS#11 module {module} does not exist")
        try:
            library = _module(os.fspath(module))
        except PKCS11Error as exc:
            raise KeyringError(f"{where}: {type(exc).__name__}") from None
        with library.lock:
            try:
                token = library.lib.get_token(token_label=token_label)
            except pkcs11.NoSuchToken:
                raise KeyringError(
                    f"{where}: no such token; initialise one (README, Keys in an HSM)"
                ) from None
            except PKCS11Error as exc:
                raise KeyringError(f"{where}: {type(exc).__name__}") from None
            try:
                return library, library.open_session(token, token_label, pin, rw=rw)
            except pkcs11.PinIncorrect:
                raise KeyringError(f"{where}: the token refused the PIN") from None
            except PKCS11Error as exc:
                raise KeyringError(f"{where}: cannot log in ({type(exc).__name__})") from None

    @classmethod
    def initialise(cls, module: Path, token_label: str, pin: str) -> tuple[str, ...]:
        """Create in the token every key this version needs and it lacks; never replaces one.

        Returns the purposes created (none when the token already holds them all).
        """
        library, session = cls._login(module, token_label, pin, rw=True)
        with library.lock:
            try:
                return _create_missing(session)
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {token_label!r}: cannot create keys ({type(exc).__name__})"
                ) from None
            finally:
                library.close_session(token_label, session)

    @classmethod
    def open(
        cls,
        module: Path,
        token_label: str,
        pin: str,
        *,
        create_missing: bool = False,
        writable: bool = False,
    ) -> Pkcs11Keys:
        """Log in to the token and find its keys.

        A purpose the token lacks is refused with a message naming it, unless
        ``create_missing`` (development) creates it first. ``writable`` opens a
        read-write session, which rotating and retiring keys need.
        """
        if create_missing:
            cls.initialise(module, token_label, pin)
        # A second provider in a process already logged in (an operator's command run beside a
        # serving one, in tests) shares the login: PKCS#11 logs in per application, not session.
        library, session = cls._login(module, token_label, pin, rw=writable)
        try:
            with library.lock:
                keys = cls._load(session, token_label)
            return cls(library, session, keys, token_label, writable=writable)
        except BaseException:
            with library.lock:
                library.close_session(token_label, session)
            raise

    @staticmethod
    def _load(session: Any, token_label: str) -> _Keys:
        by_purpose, private, public = _find(session)
        missing = [p for p in (KEK_PURPOSE, *SECRET_PURPOSES) if p not in by_purpose]
        if private is None or public is None:
            missing.append(LOG_SIGNING_KEY_NAME)
        if missing:
            raise KeyringError(
                f"PKCS#11 token {token_label!r} holds no {', '.join(missing)} key; create the keys "
                "this version needs with `mhr keys init --provider pkcs11` (it keeps every key the "
                "token holds)"
            )
        keks = by_purpose[KEK_PURPOSE]
        kek_ids = {bytes(k.id) for k in keks.values()}
        if len(kek_ids) != 1:
            raise KeyringError(f"PKCS#11 token {token_label!r}: its KEK versions disagree on the KEK id")
        kek_id = kek_ids.pop().decode("ascii")
        hmac_keys = {
            purpose: {bytes(k.id).decode("ascii"): k for k in by_purpose[purpose].values()}
            for purpose in SECRET_PURPOSES
        }
        current = {
            purpose: bytes(by_purpose[purpose][max(by_purpose[purpose])].id).decode("ascii")
            for purpose in SECRET_PURPOSES
        }
        return _Keys(
            kek_id=kek_id,
            keks=keks,
            hmac_current=current,
            hmac=hmac_keys,
            log_private=private,
            log_public=_raw_public(public),
            # CKA_CHECK_VALUE: the token's own check value of an AES key (PKCS#11 2.40, 3 bytes).
            kek_checks={v: bytes(k[Attribute.CHECK_VALUE]).hex() for v, k in keks.items()},
        )

    def close(self) -> None:
        with self._lock:
            self._module.close_session(self._label, self._session)

    # -- KEK -------------------------------------------------------------

    def current_kek(self) -> KekRef:
        return KekRef(self._keys.kek_id, max(self._keys.keks))

    def wrap_key(self, plaintext_key: bytes, aad: bytes) -> bytes:
        if not plaintext_key:
            raise ValueError("nothing to wrap")
        self._follow_token()
        ref = self.current_kek()
        header = wrap_header(ref)
        nonce = os.urandom(_NONCE_SIZE)
        with self._lock:
            sealed = self._keys.keks[ref.version].encrypt(
                plaintext_key,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, header + aad, _TAG_BITS),
            )
        return header + nonce + bytes(sealed)

    def unwrap_key(self, blob: bytes, aad: bytes) -> bytes:
        ref, header, nonce, sealed = parse_wrapped(blob)
        if ref.key_id == self._keys.kek_id and ref.version > max(self._keys.keks):
            self.reload()  # wrapped by a process that had already taken up a newer version
        keys = self._keys
        kek = keys.keks.get(ref.version)
        if ref.key_id == keys.kek_id and ref.version < min(keys.keks):
            raise KekRetired
        if ref.key_id != keys.kek_id or kek is None:
            raise IntegrityError
        try:
            with self._lock:
                return bytes(
                    kek.decrypt(
                        sealed,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, header + aad, _TAG_BITS),
                    )
                )
        except PKCS11Error:  # a failed tag is CKR_ENCRYPTED_DATA_INVALID (or a general error)
            if ref.version != max(keys.keks):
                # Another process may have destroyed this version (retired it): the handle is stale.
                self.reload()
                if ref.version < min(self._keys.keks):
                    raise KekRetired from None
            raise IntegrityError from None

    def kek_versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys.keks))

    def min_decrypt_version(self) -> int:
        # Retired versions are destroyed in the token: the lowest held one is the minimum.
        return min(self._keys.keks)

    def rotate_kek(self) -> KekRef:
        """Generate the next KEK version in the token (non-extractable, like every key here)."""
        self._changing("rotating the KEK")
        with self._lock:
            try:
                by_purpose, _private, _public = _find(self._session)
                version = max(by_purpose[KEK_PURPOSE]) + 1
                _generate_kek(self._session, self._keys.kek_id, version)
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {self._label!r}: cannot create a KEK ({type(exc).__name__})"
                ) from None
        self.reload()
        return KekRef(self._keys.kek_id, version)

    def retire_kek_below(self, version: int) -> tuple[int, ...]:
        """Destroy (C_DestroyObject) the token's KEK objects below ``version``."""
        self._changing("retiring KEK versions")
        with self._lock:
            try:
                keks = _find(self._session)[0][KEK_PURPOSE]
                if not 0 < version <= max(keks):
                    raise KeyringError(
                        f"PKCS#11 token {self._label!r}: cannot retire below v{version}: "
                        f"the current KEK is v{max(keks)}"
                    )
                destroyed = tuple(sorted(v for v in keks if v < version))
                for v in destroyed:
                    keks[v].destroy()
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {self._label!r}: cannot destroy a KEK ({type(exc).__name__})"
                ) from None
        self.reload()
        return destroyed

    def _follow_token(self) -> None:
        """Take up a KEK version another process generated (``mhr keys rotate``): one object search."""
        label = f"mhr-{KEK_PURPOSE}-v{max(self._keys.keks) + 1}"
        with self._lock:
            # Drained inside the lock: a search left open (C_FindObjectsFinal not yet called) would
            # make the session's next operation, another thread's unwrap, fail as "operation active".
            newer = bool(list(self._session.get_objects({Attribute.LABEL: label})))
        if newer:
            self.reload()

    def reload(self) -> None:
        with self._lock:
            keys = self._load(self._session, self._label)
            self._keys = keys
        self._checks = self._key_checks()

    # -- HMAC operations -------------------------------------------------

    def _hmac(self, purpose: str, kid: str, message: bytes) -> bytes | None:
        key = self._keys.hmac[purpose].get(kid)
        if key is None:
            return None
        with self._lock:
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_HMAC))

    def blind_index_mac(self, message: bytes) -> bytes:
        mac = self._hmac(BLIND_INDEX_PURPOSE, self._keys.hmac_current[BLIND_INDEX_PURPOSE], message)
        assert mac is not None  # the current kid is always held
        return mac

    def blind_index_kid(self) -> str:
        return self._keys.hmac_current[BLIND_INDEX_PURPOSE]

    def blind_index_kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys.hmac[BLIND_INDEX_PURPOSE]))

    def blind_index_mac_for(self, kid: str, message: bytes) -> bytes | None:
        try:
            return self._hmac(BLIND_INDEX_PURPOSE, kid, message)
        except PKCS11Error:
            if kid == self._keys.hmac_current[BLIND_INDEX_PURPOSE]:
                raise
            # Another process may have destroyed this (retired) key: the handle is stale.
            self.reload()
            return (
                None
                if kid not in self._keys.hmac[BLIND_INDEX_PURPOSE]
                else self._hmac(BLIND_INDEX_PURPOSE, kid, message)
            )

    def token_key_id(self) -> str:
        return self._keys.hmac_current[TOKEN_PURPOSE]

    def sign_token(self, kid: str, message: bytes) -> bytes:
        mac = self._hmac(TOKEN_PURPOSE, kid, message)
        if mac is None:
            raise KeyringError(f"no {TOKEN_PURPOSE} key {kid!r} is held")
        return mac

    def verify_token(self, kid: str, message: bytes, mac: bytes) -> bool:
        expected = self._hmac(TOKEN_PURPOSE, kid, message)
        return expected is not None and hmac.compare_digest(expected, mac)

    def holds_token_key(self, kid: str) -> bool:
        return kid in self._keys.hmac[TOKEN_PURPOSE]

    # -- rotation ----------------------------------------------------------

    def _changing(self, what: str) -> None:
        if not self._writable:
            raise KeyringError(f"PKCS#11 token {self._label!r}: {what} needs a read-write session")

    def rotate_secret(self, purpose: str) -> str:
        if purpose not in SECRET_PURPOSES:
            raise KeyringError(f"unknown secret purpose {purpose!r}")
        self._changing(f"rotating the {purpose} key")
        with self._lock:
            by_purpose, _private, _public = _find(self._session)
            held = {bytes(k.id).decode("ascii") for k in by_purpose[purpose].values()}
            kid = secrets.token_hex(4)
            while kid in held:
                kid = secrets.token_hex(4)
            try:
                _generate_secret(self._session, purpose, max(by_purpose[purpose]) + 1, kid)
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {self._label!r}: cannot create a key ({type(exc).__name__})"
                ) from None
        self.reload()
        return kid

    def retire_secret(self, purpose: str, kid: str) -> None:
        if purpose not in SECRET_PURPOSES:
            raise KeyringError(f"unknown secret purpose {purpose!r}")
        self._changing(f"retiring a {purpose} key")
        if kid == self._keys.hmac_current[purpose]:
            raise KeyringError(f"{purpose} key {kid!r} is the current one; rotate before retiring it")
        key = self._keys.hmac[purpose].get(kid)
        if key is None:
            raise KeyringError(f"no {purpose} key {kid!r} is held")
        with self._lock:
            try:
                key.destroy()
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {self._label!r}: cannot destroy a key ({type(exc).__name__})"
                ) from None
        self.reload()

    def rotate_checkpoint_key(self) -> Ed25519PublicKey:
        self._changing("rotating the audit log key")
        with self._lock:
            pairs = _log_pairs(self._session)
            try:
                _generate_log_pair(self._session, f"{_LOG_LABEL}-v{max(pairs, default=0) + 1}")
                # The new pair is in the token before the old one goes: a failure leaves a key.
                for pair in pairs.values():
                    for key in pair.values():
                        key.destroy()
            except PKCS11Error as exc:
                raise KeyringError(
                    f"PKCS#11 token {self._label!r}: cannot rotate the log key ({type(exc).__name__})"
                ) from None
        self.reload()
        return self._keys.log_public

    # -- audit log signing -----------------------------------------------

    def sign_checkpoint(self, message: bytes) -> bytes:
        with self._lock:
            return bytes(self._keys.log_private.sign(message, mechanism=Mechanism.EDDSA))

    def checkpoint_public_key(self) -> Ed25519PublicKey:
        return self._keys.log_public

    # -- identification --------------------------------------------------

    def _key_checks(self) -> tuple[KeyCheck, ...]:
        keys = self._keys
        checks = [
            KeyCheck(KEK_PURPOSE, f"{keys.kek_id}/v{version}", value)
            for version, value in sorted(keys.kek_checks.items())
        ]
        for purpose in sorted(SECRET_PURPOSES):
            for kid in sorted(keys.hmac[purpose]):
                mac = self._hmac(purpose, kid, CHECK_MESSAGE)
                assert mac is not None
                checks.append(KeyCheck(purpose, kid, mac[:_CHECK_BYTES].hex()))
        checks.append(
            KeyCheck(LOG_SIGNING_KEY_NAME, "ed25519-pkcs11", public_key_check_value(keys.log_public))
        )
        return tuple(checks)

    def key_checks(self) -> tuple[KeyCheck, ...]:
        return self._checks


def read_pin(pin: str | None, pin_file: Path | None) -> str:
    """The token PIN from a setting or from a file (its first line); KeyringError if neither."""
    if pin:
        return pin
    if pin_file is not None:
        try:
            return pin_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            raise KeyringError(f"cannot read the PKCS#11 PIN from {pin_file}") from None
    raise KeyringError("the PKCS#11 token needs its PIN: set MHR_PKCS11_PIN or MHR_PKCS11_PIN_FILE")
