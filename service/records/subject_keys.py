"""Per-migrant subject keys: created at first intake, wrapped by the keyring's KEK.

This is the only place in the service that turns a wrapped key into a cipher.
"""

from __future__ import annotations

from security.envelope import IntegrityError, SubjectCipher, new_data_key
from security.keys import KeyProvider

SUBJECT_KEY_VERSION = 1


def _wrap_aad(subject_id: str) -> bytes:
    # Binds a wrapped key to its subject row: swapping wrapped keys between rows fails.
    return b"mhr.subject-key.v1\x00" + subject_id.encode()


class SubjectKeys:
    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys

    def create(self, subject_id: str) -> tuple[bytes, SubjectCipher]:
        key = new_data_key()
        wrapped = self._keys.wrap_key(key, _wrap_aad(subject_id))
        return wrapped, SubjectCipher(key, SUBJECT_KEY_VERSION)

    def cipher(self, subject_id: str, wrapped: bytes | None, key_version: int) -> SubjectCipher:
        if wrapped is None:
            # Erased: the data is unreadable by design. Same error as tampering.
            raise IntegrityError
        return SubjectCipher(self._keys.unwrap_key(wrapped, _wrap_aad(subject_id)), key_version)
