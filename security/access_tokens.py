"""The service's own access tokens: short-lived JWTs, HMAC-SHA256 under a keyring secret.

Every request verifies one, so verification must be cheap: an HMAC verify is
microseconds, an Ed25519 verify ~160 us. The tokens are only ever verified by
this service (all replicas share the keyring), so a symmetric key loses
nothing. Client assertions, verified by us but signed by others, stay asymmetric.

The HMAC is the key provider's operation (:class:`TokenKeys`), so the key may
live in a token: this module builds and splits the JWS (RFC 7515 compact form)
itself, and leaves the claims' checks (expiry, audience, issuer) to PyJWT.
"""

from __future__ import annotations

import binascii
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import jwt
from jwt.utils import base64url_decode, base64url_encode

from security.roles import Role

ALGORITHM = "HS256"
# Verified tokens remembered (LRU): a client reuses its token for every request of its
# lifetime, and decoding one costs more than the rest of a cached read's authentication.
VERIFIED_CACHE_SIZE = 4096


class TokenInvalid(Exception):
    """Uniform for every reason: expired, forged, foreign, malformed."""


@dataclass(frozen=True)
class AccessClaims:
    client_id: str
    organization_id: str
    role: Role
    scope: str
    purpose: str | None
    expires_at: datetime
    token_id: str
    person: str | None = None


class TokenKeys(Protocol):
    """The key provider's token operations (``security.keys.KeyProvider`` has them)."""

    def token_key_id(self) -> str: ...

    def sign_token(self, kid: str, message: bytes) -> bytes: ...

    def verify_token(self, kid: str, message: bytes, mac: bytes) -> bool: ...

    def holds_token_key(self, kid: str) -> bool: ...


def _b64_json(value: dict[str, object]) -> bytes:
    return base64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))


class AccessTokenCodec:
    """Issues and verifies access tokens with the provider's token key operations."""

    def __init__(self, *, issuer: str, audience: str, keys: TokenKeys) -> None:
        self._issuer = issuer
        self._audience = audience
        self._keys = keys
        # Only tokens that passed verification get in, so forged ones cannot crowd it.
        self._verified: OrderedDict[str, tuple[str, AccessClaims]] = OrderedDict()

    def issue(
        self,
        *,
        client_id: str,
        organization_id: str,
        role: Role,
        scope: str,
        purpose: str | None,
        person: str | None,
        now: datetime,
        lifetime_seconds: int,
    ) -> tuple[str, AccessClaims]:
        issued = int(now.timestamp())
        claims: dict[str, object] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": client_id,
            "org": organization_id,
            "role": role,
            "scope": scope,
            "iat": issued,
            "exp": issued + lifetime_seconds,
            "jti": secrets.token_urlsafe(16),
        }
        if purpose:
            claims["pou"] = purpose
        if person:
            claims["person"] = person
        kid = self._keys.token_key_id()
        signing_input = _b64_json({"alg": ALGORITHM, "typ": "JWT", "kid": kid}) + b"." + _b64_json(claims)
        signature = base64url_encode(self._keys.sign_token(kid, signing_input))
        return (signing_input + b"." + signature).decode("ascii"), self._claims(claims)

    def verify(self, token: str, *, now: datetime | None = None) -> AccessClaims:
        cached = self._verified.get(token)
        if cached is not None:
            kid, claims = cached
            # Still in force: not expired, and its key not retired from the keyring since.
            if claims.expires_at > (now or datetime.now(UTC)) and self._keys.holds_token_key(kid):
                self._verified.move_to_end(token)
                return claims
            del self._verified[token]
        parsed, kid = self._decode(token)
        if now is not None and parsed.expires_at <= now:
            raise TokenInvalid
        self._verified[token] = (kid, parsed)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return parsed

    def _decode(self, token: str) -> tuple[AccessClaims, str]:
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if not isinstance(kid, str) or header.get("alg") != ALGORITHM:
                raise TokenInvalid
            signing_input, _, signature = token.encode("ascii").rpartition(b".")
            if signing_input.count(b".") != 1:
                raise TokenInvalid
            if not self._keys.verify_token(kid, signing_input, base64url_decode(signature)):
                raise TokenInvalid
            # The signature was checked above, by the provider; PyJWT checks the claims.
            claims = jwt.decode(
                token,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "verify_signature": False,
                    "verify_exp": True,
                    "verify_iat": True,
                    "verify_nbf": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "require": ["exp", "iat", "sub", "jti", "aud", "iss"],
                },
            )
            parsed = self._claims(claims)
        except (jwt.PyJWTError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise TokenInvalid from exc
        return parsed, kid

    @staticmethod
    def _claims(claims: dict[str, object]) -> AccessClaims:
        def text(name: str) -> str:
            value = claims[name]
            if not isinstance(value, str):
                raise TypeError(name)
            return value

        exp = claims["exp"]
        if not isinstance(exp, int):
            raise TypeError("exp")
        purpose = claims.get("pou")
        person = claims.get("person")
        return AccessClaims(
            client_id=text("sub"),
            organization_id=text("org"),
            role=Role(text("role")),
            scope=text("scope"),
            purpose=purpose if isinstance(purpose, str) else None,
            person=person if isinstance(person, str) else None,
            expires_at=datetime.fromtimestamp(exp, UTC),
            token_id=text("jti"),
        )
