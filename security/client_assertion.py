"""Verification of SMART Backend Services client assertions (RFC 7523 private_key_jwt).

Only asymmetric algorithms are accepted (ES384, RS384, as SMART requires), and
the algorithm must match the registered key's type, so ``alg: none`` and the
old trick of HMAC-signing with the public key as the secret cannot work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ALLOWED_ALGORITHMS = ("ES384", "RS384")
_KTY_FOR_ALG = {"ES384": "EC", "RS384": "RSA"}
# Private JWK members: a JWKS carrying any of them was pasted from the wrong file.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_PERSON_LENGTH = 128
# The HL7 B2B authorization extension (HL7 UDAP Security IG, "hl7-b2b"): the standard place for
# a client's purpose of use, as v3-ActReason codes, bare or prefixed with their code system.
B2B_EXTENSION = "hl7-b2b"
_ACT_REASON_PREFIXES = (
    "urn:oid:2.16.840.1.113883.5.8#",
    "http://terminology.hl7.org/CodeSystem/v3-ActReason#",
)
MAX_PURPOSES = 10


class AssertionInvalid(Exception):
    """The assertion does not authenticate the client. The reason is for logs, not for the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedAssertion:
    client_id: str
    jti: str
    expires_at: int
    person: str | None
    # extensions.hl7-b2b.purpose_of_use: v3-ActReason codes (prefix removed); others kept whole.
    purposes: tuple[str, ...] = ()


def b2b_purposes(claims: dict[str, Any]) -> tuple[str, ...]:
    """``extensions.hl7-b2b.purpose_of_use`` of verified assertion claims; raises AssertionInvalid
    when the extension is there but malformed (a client that sent one meant it)."""
    extensions = claims.get("extensions")
    if extensions is None:
        return ()
    b2b = extensions.get(B2B_EXTENSION) if isinstance(extensions, dict) else None
    if b2b is None and isinstance(extensions, dict):
        return ()
    if not isinstance(b2b, dict):
        raise AssertionInvalid("extensions.hl7-b2b malformed")
    raw = b2b.get("purpose_of_use", [])
    values = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(values, list)
        or len(values) > MAX_PURPOSES
        or not all(isinstance(v, str) and 1 <= len(v) <= 200 for v in values)
    ):
        raise AssertionInvalid("extensions.hl7-b2b.purpose_of_use malformed")
    codes = []
    for value in values:
        for prefix in _ACT_REASON_PREFIXES:
            if value.startswith(prefix):
                value = value[len(prefix) :]
                break
        codes.append(value)
    return tuple(dict.fromkeys(codes))


def unverified_kid_and_issuer(assertion: str) -> tuple[str | None, str | None]:
    """Read the header ``kid`` and claimed ``iss`` to find the client; nothing here is trusted."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AssertionInvalid("malformed assertion") from exc
    kid = header.get("kid")
    iss = claims.get("iss")
    return (kid if isinstance(kid, str) else None, iss if isinstance(iss, str) else None)


def validate_public_jwks(jwks: Any) -> list[dict[str, Any]]:
    """Check a JWKS at registration: a dict with usable public ES384/RS384 keys, each with a kid."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ValueError("JWKS must be an object with a non-empty 'keys' array")
    keys: list[dict[str, Any]] = []
    for key in jwks["keys"]:
        if not isinstance(key, dict):
            raise ValueError("every JWKS key must be an object")
        if _PRIVATE_MEMBERS & key.keys():
            raise ValueError("the JWKS contains private key material; register the public keys only")
        if not isinstance(key.get("kid"), str) or not key["kid"]:
            raise ValueError("every key needs a 'kid'")
        if key.get("kty") not in ("EC", "RSA"):
            raise ValueError("keys must be EC (ES384) or RSA (RS384)")
        _load_key(key, _alg_for(key))
        keys.append(key)
    return keys


def _alg_for(jwk: dict[str, Any]) -> str:
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in ALLOWED_ALGORITHMS or _KTY_FOR_ALG[alg] != jwk.get("kty"):
            raise ValueError("key algorithm must be ES384 (EC P-384) or RS384 (RSA)")
        return str(alg)
    return "ES384" if jwk.get("kty") == "EC" else "RS384"


def _load_key(jwk: dict[str, Any], alg: str) -> Any:
    try:
        if alg == "ES384":
            if jwk.get("crv") != "P-384":
                raise ValueError("ES384 keys must be on curve P-384")
            return ECAlgorithm.from_jwk(json.dumps(jwk))
        key = RSAAlgorithm.from_jwk(json.dumps(jwk))
    except (jwt.PyJWTError, KeyError, TypeError) as exc:
        raise ValueError("unusable public key") from exc
    if key.key_size < 2048:
        raise ValueError("RSA keys must be at least 2048 bits")
    return key


def verify_client_assertion(
    assertion: str,
    *,
    client_id: str,
    jwks_keys: list[dict[str, Any]],
    token_url: str,
    now: datetime,
    max_lifetime_seconds: int,
) -> VerifiedAssertion:
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        raise AssertionInvalid("malformed assertion") from exc
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AssertionInvalid("algorithm not allowed")
    kid = header.get("kid")
    candidates = [k for k in jwks_keys if k.get("kid") == kid] if kid else jwks_keys
    candidates = [k for k in candidates if k.get("kty") == _KTY_FOR_ALG[alg]]
    if not candidates:
        raise AssertionInvalid("no registered key matches kid and algorithm")
    claims: dict[str, Any] | None = None
    last_reason = "no candidate key"
    for jwk in candidates:
        try:
            key = _load_key(jwk, alg)
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=token_url,
                issuer=client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
                leeway=0,
            )
            break
        except jwt.ExpiredSignatureError as exc:
            raise AssertionInvalid("assertion expired") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise AssertionInvalid("wrong aud or iss") from exc
        except (jwt.PyJWTError, ValueError) as exc:
            last_reason = str(exc)
            continue
    if claims is None:
        raise AssertionInvalid(f"signature did not verify ({last_reason})")
    if claims.get("sub") != client_id:
        raise AssertionInvalid("sub must equal iss (the client id)")
    exp = claims["exp"]
    if not isinstance(exp, int) or exp - int(now.timestamp()) > max_lifetime_seconds:
        raise AssertionInvalid("exp too far ahead")
    if exp <= int(now.timestamp()):
        raise AssertionInvalid("assertion expired")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 1 <= len(jti) <= 255:
        raise AssertionInvalid("jti missing or too long")
    person = claims.get("person")
    if person is not None and (not isinstance(person, str) or not 1 <= len(person) <= MAX_PERSON_LENGTH):
        raise AssertionInvalid("person claim malformed")
    return VerifiedAssertion(
        client_id=client_id, jti=jti, expires_at=exp, person=person, purposes=b2b_purposes(claims)
    )
