"""Per-migrant subject keys: created at first intake, wrapped by the key provider's KEK.

This is the only place in the service that turns a wrapped key into a cipher.
Use-cases do it through :class:`OpenedKeys`, created for one request or job:
each migrant's key is unwrapped at most once in it (an unwrap may be a round
trip to a hardware token), and nothing of it is kept once the request or job
is over. There is no cache of plaintext keys beyond that.
"""

from __future__ import annotations

from security.envelope import SubjectCipher, new_data_key
from security.keys import KeyProvider, parse_wrapped

SUBJECT_KEY_VERSION = 1


class SubjectErased(Exception):
    """The migrant was erased: their key is destroyed on purpose. Not an integrity failure:
    callers answer 410 Gone (to the clinic that submitted the data) or 404, never 500."""


def _wrap_aad(subject_id: str) -> bytes:
    # Binds a wrapped key to its subject row: swapping wrapped keys between rows fails.
    return b"mhr.subject-key.v1\x00" + subject_id.encode()


def kek_version_of(wrapped: bytes) -> int:
    """The KEK version a wrapped key names in its header (read in clear; nothing is decrypted)."""
    return parse_wrapped(wrapped)[0].version


def rewrapped(keys: KeyProvider, subject_id: str, wrapped: bytes) -> bytes:
    """The same subject key wrapped again under the provider's current KEK (IntegrityError if
    ``wrapped`` does not unwrap); the plaintext key lives only inside this call."""
    aad = _wrap_aad(subject_id)
    return keys.wrap_key(keys.unwrap_key(wrapped, aad), aad)


class SubjectKeys:
    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys

    def create(self, subject_id: str) -> tuple[bytes, SubjectCipher]:
        key = new_data_key()
        wrapped = self._keys.wrap_key(key, _wrap_aad(subject_id))
        return wrapped, SubjectCipher(key, SUBJECT_KEY_VERSION)

    def cipher(self, subject_id: str, wrapped: bytes | None, key_version: int) -> SubjectCipher:
        """Unwrap (every call: use-cases go through :meth:`opened` instead)."""
        if wrapped is None:
            raise SubjectErased  # erased: unreadable by design, and said so (not tampering)
        return SubjectCipher(self._keys.unwrap_key(wrapped, _wrap_aad(subject_id)), key_version)

    def opened(self) -> OpenedKeys:
        """A fresh set of unwrapped keys for one request or job."""
        return OpenedKeys(self)


class OpenedKeys:
    """The subject keys one request or job has unwrapped, each at most once.

    Keyed by the wrapped blob as well as the subject: a different blob for the
    same migrant (a re-wrap, a tampered row) is unwrapped, and checked, on its
    own, never answered from another blob's key. Created per request or job,
    passed down to what decrypts, and dropped with it (:meth:`close` forgets
    the keys at once, for a job that goes on with other work).
    """

    __slots__ = ("_ciphers", "_keys")

    def __init__(self, keys: SubjectKeys) -> None:
        self._keys = keys
        self._ciphers: dict[tuple[str, int, bytes], SubjectCipher] = {}

    def create(self, subject_id: str) -> tuple[bytes, SubjectCipher]:
        wrapped, cipher = self._keys.create(subject_id)
        self._ciphers[(subject_id, cipher.key_version, wrapped)] = cipher
        return wrapped, cipher

    def cipher(self, subject_id: str, wrapped: bytes | None, key_version: int) -> SubjectCipher:
        if wrapped is None:
            raise SubjectErased
        slot = (subject_id, key_version, wrapped)
        cipher = self._ciphers.get(slot)
        if cipher is None:
            cipher = self._keys.cipher(subject_id, wrapped, key_version)
            self._ciphers[slot] = cipher
        return cipher

    def close(self) -> None:
        self._ciphers.clear()
