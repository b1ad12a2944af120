"""Client key pairs as JWKs, and signing client assertions (for ``mhr token``, demos, tests, benches)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def generate_client_key(kind: str = "EC") -> PrivateKey:
    if kind == "EC":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError("key kind must be EC or RSA")


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public JWK with an RFC 7638 thumbprint as ``kid``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        members = {
            "crv": "P-384",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(size, "big")),
            "y": _b64(numbers.y.to_bytes(size, "big")),
        }
        alg = "ES384"
    else:
        rsa_numbers = key.public_key().public_numbers()
        members = {"e": _int(rsa_numbers.e), "kty": "RSA", "n": _int(rsa_numbers.n)}
        alg = "RS384"
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return {**members, "kid": _b64(hashlib.sha256(canonical).digest()), "alg": alg, "use": "sig"}


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the key must be an EC P-384 or RSA private key")
    return key


def sign_client_assertion(
    key: PrivateKey,
    *,
    client_id: str,
    token_url: str,
    lifetime_seconds: int = 60,
    person: str | None = None,
    kid: str | None = None,
    now: float | None = None,
    purposes: tuple[str, ...] = (),
) -> str:
    """A SMART Backend Services client assertion; ``purposes`` go where UDAP's HL7 B2B
    authorization extension carries them (``extensions.hl7-b2b.purpose_of_use``)."""
    jwk = public_jwk(key)
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + lifetime_seconds,
        "jti": secrets.token_urlsafe(18),
    }
    if person:
        claims["person"] = person
    if purposes:
        claims["extensions"] = {"hl7-b2b": {"version": "1", "purpose_of_use": list(purposes)}}
    return jwt.encode(claims, key, algorithm=jwk["alg"], headers={"kid": kid or jwk["kid"], "typ": "JWT"})
