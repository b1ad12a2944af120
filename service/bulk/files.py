"""Export files at rest: NDJSON sealed in AES-256-GCM records under a per-export key.

An export's output is PHI, so it is never written in clear. Each export gets a fresh 256-bit
file key, wrapped by the key provider (the KEK that wraps subject keys, under an AAD naming the
export) and kept wrapped in ``bulk_exports``; the files hold only ciphertext. A file is a
sequence of records, one per checkpointed step::

    uint32 length | 12-byte nonce | ciphertext + tag      (length = 12 + ciphertext + tag)

and each record's AAD names the export, the resource type and the record's index, so that a
record moved to another file or position, dropped or replayed fails to open. The committed
length and record count live in the database (``bulk_export_files``); bytes past them (an
attempt that was killed before its commit) are cut off before the next append and never served.
Streaming a file decrypts one record at a time: memory is bounded by one step's output.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from security.envelope import IntegrityError, new_data_key
from security.keys import KeyProvider

_KEY_AAD = b"mhr.export-file-key.v1\x00"
_RECORD_AAD = b"mhr.export-record.v1\x00"
_LENGTH = struct.Struct(">I")
_NONCE = 12
MAX_RECORD_BYTES = 1 << 30


def _field(raw: str) -> bytes:
    encoded = raw.encode("utf-8")
    return _LENGTH.pack(len(encoded)) + encoded


class FileCipher:
    """Seals and opens the records of one export's files."""

    __slots__ = ("_aead", "_export_id")

    def __init__(self, key: bytes, export_id: str) -> None:
        self._aead = AESGCM(key)
        self._export_id = export_id

    def __repr__(self) -> str:
        return "FileCipher()"

    def _aad(self, resource_type: str, index: int) -> bytes:
        return _RECORD_AAD + _field(self._export_id) + _field(resource_type) + struct.pack(">Q", index)

    def seal(self, resource_type: str, index: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, self._aad(resource_type, index))
        return _LENGTH.pack(len(sealed)) + sealed

    def open(self, resource_type: str, index: int, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], self._aad(resource_type, index))
        except InvalidTag:
            raise IntegrityError from None


def _key_aad(export_id: str) -> bytes:
    return _KEY_AAD + export_id.encode("utf-8")


def new_file_key(keys: KeyProvider, export_id: str) -> tuple[bytes, FileCipher]:
    """A fresh key for one export: (wrapped, for the database; cipher, for this process)."""
    key = new_data_key()
    return keys.wrap_key(key, _key_aad(export_id)), FileCipher(key, export_id)


def open_file_key(keys: KeyProvider, export_id: str, wrapped: bytes) -> FileCipher:
    """The export's cipher from its wrapped key (IntegrityError if it is not this export's)."""
    return FileCipher(keys.unwrap_key(wrapped, _key_aad(export_id)), export_id)


class ExportFiles:
    """The directory of export files (``MHR_EXPORT_DIR``): one subdirectory per export, 0700."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, export_id: str, resource_type: str) -> Path:
        return self.directory / export_id / f"{resource_type}.ndjson.sealed"

    def append(self, export_id: str, resource_type: str, committed: int, record: bytes) -> int:
        """Write ``record`` at the committed end of the file (cutting off whatever an attempt that
        did not commit left behind), durably; returns the new length, to commit with the step."""
        path = self.path(export_id, resource_type)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, committed)
            written = os.pwrite(fd, record, committed)
            if written != len(record):
                raise OSError("short write to an export file")
            os.fsync(fd)
        finally:
            os.close(fd)
        return committed + len(record)

    def records(self, export_id: str, resource_type: str, length: int, count: int) -> Iterator[bytes]:
        """The committed sealed records of a file, one at a time (IntegrityError if cut short)."""
        path = self.path(export_id, resource_type)
        with path.open("rb") as handle:
            offset = 0
            for _ in range(count):
                head = handle.read(_LENGTH.size)
                if len(head) != _LENGTH.size:
                    raise IntegrityError
                (size,) = _LENGTH.unpack(head)
                if size > MAX_RECORD_BYTES or offset + _LENGTH.size + size > length:
                    raise IntegrityError
                sealed = handle.read(size)
                if len(sealed) != size:
                    raise IntegrityError
                offset += _LENGTH.size + size
                yield sealed

    def remove(self, export_id: str) -> None:
        shutil.rmtree(self.directory / export_id, ignore_errors=True)
