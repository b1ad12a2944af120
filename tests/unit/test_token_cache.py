"""The verified-token cache must never outlive what verification would decide."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from security.access_tokens import VERIFIED_CACHE_SIZE, AccessTokenCodec, TokenInvalid


class DictKeys:
    """Token key operations (HMAC-SHA256) over a dict the test can retire keys from."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.keys = keys

    def token_key_id(self) -> str:
        return "k1"

    def sign_token(self, kid: str, message: bytes) -> bytes:
        return hmac.new(self.keys[kid], message, hashlib.sha256).digest()

    def verify_token(self, kid: str, message: bytes, mac: bytes) -> bool:
        return kid in self.keys and hmac.compare_digest(self.sign_token(kid, message), mac)

    def holds_token_key(self, kid: str) -> bool:
        return kid in self.keys


def _codec(keys: dict[str, bytes]) -> AccessTokenCodec:
    return AccessTokenCodec(issuer="https://mhr.test", audience="https://mhr.test/fhir", keys=DictKeys(keys))


def _issue(codec: AccessTokenCodec, lifetime: int = 300) -> str:
    token, _ = codec.issue(
        client_id="c1",
        organization_id="o1",
        role="authority",
        scope="system/*.rs",
        purpose="PUBHLTH",
        person=None,
        now=datetime.now(UTC),
        lifetime_seconds=lifetime,
    )
    return token


def test_a_cached_token_expires_like_an_uncached_one() -> None:
    codec = _codec({"k1": b"k" * 32})
    token = _issue(codec, lifetime=60)
    now = datetime.now(UTC)
    assert codec.verify(token, now=now).client_id == "c1"
    assert codec.verify(token, now=now).client_id == "c1"  # from the cache
    with pytest.raises(TokenInvalid):
        codec.verify(token, now=now + timedelta(seconds=61))


def test_a_cached_token_stops_working_when_its_key_is_retired() -> None:
    keys = {"k1": b"k" * 32}
    codec = _codec(keys)
    token = _issue(codec)
    codec.verify(token, now=datetime.now(UTC))
    del keys["k1"]
    with pytest.raises(TokenInvalid):
        codec.verify(token, now=datetime.now(UTC))


def test_forged_tokens_are_refused_every_time_and_never_cached() -> None:
    codec = _codec({"k1": b"k" * 32})
    token = _issue(codec)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    for _ in range(2):
        with pytest.raises(TokenInvalid):
            codec.verify(forged, now=datetime.now(UTC))
    assert codec.verify(token, now=datetime.now(UTC)).client_id == "c1"


def test_the_cache_is_bounded() -> None:
    codec = _codec({"k1": b"k" * 32})
    tokens = [_issue(codec) for _ in range(VERIFIED_CACHE_SIZE + 10)]
    for token in tokens:
        codec.verify(token, now=datetime.now(UTC))
    assert len(codec._verified) == VERIFIED_CACHE_SIZE
    assert codec.verify(tokens[0], now=datetime.now(UTC)).client_id == "c1"  # verified again
