"""The SMART Backend Services token endpoint: what it grants, and everything it must refuse.

Authentication failures must be indistinguishable to the caller (one error,
one description), so that the endpoint is no oracle for which client ids
exist, which keys are registered or which check failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mhr_testkit import JWT_BEARER, Party, Service, sync_url

import service.identity.jwks as jwks_module
from security.jwk import PrivateKey, generate_client_key, public_jwk, sign_client_assertion
from service.identity.registry import ClientRegistration, RegistrationError, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store.database import Database
from service.store.tables import AssertionJti

FORM = {"content-type": "application/x-www-form-urlencoded"}


# --- helpers ------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_for(service: Service, party: Party, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": party.client_id,
        "sub": party.client_id,
        "aud": service.token_url,
        "iat": now,
        "exp": now + 60,
        "jti": secrets.token_urlsafe(18),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(key: PrivateKey, claims: dict[str, Any], *, kid: str | None = None, alg: str | None = None) -> str:
    jwk = public_jwk(key)
    return jwt.encode(claims, key, algorithm=alg or jwk["alg"], headers={"kid": kid or jwk["kid"]})


def token_form(assertion: str, scope: str = "system/*.rs", **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
        "scope": scope,
        **extra,
    }


def post_token(service: Service, assertion: str, scope: str = "system/*.rs", **extra: str) -> Any:
    return service.client.post("/auth/token", data=token_form(assertion, scope, **extra))


def assert_oauth_error(response: Any, status: int, error: str) -> dict[str, Any]:
    """An RFC 6749 error: the status, only ``error`` and ``error_description``, never cached."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    return body


def disable(service: Service, client_id: str) -> None:
    async def work(db: Database) -> None:
        async with db.transaction() as session:
            assert await IdentityRepository(session).disable_client(client_id, datetime.now(UTC))

    service._run(work)


def granted_claims(service: Service, access_token: str) -> Any:
    """The access token's claims, verified with the service's own codec."""
    return service.fastapi.state.runtime.tokens.verify(access_token, now=datetime.now(UTC))  # type: ignore[attr-defined]


# --- what a client gets ----------------------------------------------------------


@pytest.mark.parametrize("key_kind", ["EC", "RSA"])
def test_client_credentials_grant_issues_a_short_lived_token(service: Service, key_kind: str) -> None:
    clinic = service.register("clinic", "clinic", key_kind=key_kind)
    header = jwt.get_unverified_header(service.assertion(clinic))
    assert header["alg"] == ("ES384" if key_kind == "EC" else "RS384")

    response = service.request_token(clinic, "system/Organization.rs")

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"].lower() == "bearer"
    assert body["scope"] == "system/Organization.rs"
    assert 0 < body["expires_in"] <= 300
    claims = granted_claims(service, body["access_token"])
    assert claims.client_id == clinic.client_id
    assert claims.organization_id == clinic.organization_id
    assert claims.role == "clinic"
    assert claims.scope == "system/Organization.rs"
    lifetime = (claims.expires_at - datetime.now(UTC)).total_seconds()
    assert 0 < lifetime <= service.settings.token_lifetime_seconds
    # The token is the service's own (HMAC under the keyring), and it works.
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    read = service.client.get(
        "/fhir/Organization", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert read.status_code == 200


def test_form_content_type_with_charset_is_accepted(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    body = "&".join(f"{k}={v}" for k, v in token_form(service.assertion(clinic)).items())
    response = service.client.post(
        "/auth/token",
        content=body.encode(),
        headers={"content-type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert response.status_code == 200, response.text


def test_assertion_may_live_exactly_the_maximum(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    assertion = sign(clinic.key, claims_for(service, clinic, exp=int(time.time()) + 300))
    assert post_token(service, assertion).status_code == 200


def test_person_acting_through_the_client_is_carried_into_the_token(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    assertion = service.assertion(clinic, person="staff-7f3a")
    response = post_token(service, assertion)
    assert response.status_code == 200
    assert granted_claims(service, response.json()["access_token"]).person == "staff-7f3a"


# --- scopes: granted = requested within what the client is allowed ---------------


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        ("system/Organization.read", "system/Organization.rs"),
        ("system/*.read", "system/*.rs"),
        ("system/*.*", "system/*.cruds"),
        ("system/Observation.write", "system/Observation.cud"),
        ("system/Patient.rs system/Patient.read", "system/Patient.rs"),
    ],
)
def test_v1_scope_spelling_is_granted_as_v2(service: Service, requested: str, granted: str) -> None:
    clinic = service.register("clinic", "clinic")
    response = service.request_token(clinic, requested)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == granted


@pytest.mark.parametrize(
    ("kind", "registered", "requested", "granted"),
    [
        # Registration narrower than the role: the registration wins.
        (
            "clinic",
            "system/Organization.rs system/Observation.cruds",
            "system/*.rs",
            "system/Observation.rs system/Organization.rs",
        ),
        (
            "clinic",
            "system/Organization.rs system/Observation.cruds",
            "system/Observation.c system/Patient.r",
            "system/Observation.c",
        ),
        # Asking for more than allowed is not an error while something remains.
        # (An authority also manages its own Subscriptions.)
        ("authority", None, "system/*.cruds", "system/*.rs system/Subscription.cruds"),
        (
            "authority",
            None,
            "system/Patient.cruds system/Observation.r",
            "system/Observation.r system/Patient.rs",
        ),
        ("auditor", None, "system/*.rs", "system/AuditEvent.rs system/Organization.rs"),
        ("admin", None, "system/*.cruds", "system/Organization.rs"),
        # Never more than asked for.
        ("clinic", None, "system/Observation.r", "system/Observation.r"),
    ],
)
def test_granted_scopes_are_within_requested_and_registered(
    service: Service, kind: str, registered: str | None, requested: str, granted: str
) -> None:
    purposes = ("PUBHLTH",) if kind == "authority" else ()  # an authority's token needs one
    party = service.register(kind, kind, scopes=registered, purposes=purposes)
    response = service.request_token(party, requested)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == granted
    assert granted_claims(service, response.json()["access_token"]).scope == granted


@pytest.mark.parametrize(
    ("kind", "registered", "requested"),
    [
        ("authority", None, "system/Patient.c"),  # authorities never write
        # (its only writes are its own Subscriptions: system/*.cud grants Subscription.cud)
        ("authority", None, "system/Observation.cud"),
        ("auditor", None, "system/Patient.rs"),  # auditors read no clinical data
        ("admin", None, "system/Observation.rs"),
        ("clinic", "system/Organization.rs", "system/Observation.rs"),
    ],
)
def test_scope_escalation_is_refused(
    service: Service, kind: str, registered: str | None, requested: str
) -> None:
    party = service.register(kind, kind, scopes=registered)
    assert_oauth_error(service.request_token(party, requested), 400, "invalid_scope")


@pytest.mark.parametrize(
    "scope",
    [
        "openid",
        "patient/Observation.rs",
        "user/*.rs",
        "system/Observation.xyz",
        "system/Observation.sr",
        "system/observation.rs",
        "launch/patient",
    ],
)
def test_malformed_scope_is_invalid_scope(service: Service, scope: str) -> None:
    clinic = service.register("clinic", "clinic")
    assert_oauth_error(service.request_token(clinic, scope), 400, "invalid_scope")


def test_missing_scope_is_invalid_scope(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    form = token_form(service.assertion(clinic))
    del form["scope"]
    assert_oauth_error(service.client.post("/auth/token", data=form), 400, "invalid_scope")


# --- purpose of use ----------------------------------------------------------------


def test_registered_purpose_of_use_is_carried_into_the_token(service: Service) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH", "TREAT"))
    response = service.request_token(authority, "system/*.rs", purpose_of_use="TREAT")
    assert response.status_code == 200, response.text
    assert granted_claims(service, response.json()["access_token"]).purpose == "TREAT"


@pytest.mark.parametrize("purpose", ["HRESCH", "NOT-A-PURPOSE", "pubhlth"])
def test_unregistered_purpose_of_use_is_refused(service: Service, purpose: str) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    assert_oauth_error(
        service.request_token(authority, "system/*.rs", purpose_of_use=purpose), 400, "invalid_scope"
    )


def test_purpose_of_use_refused_when_client_has_none_registered(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    assert_oauth_error(
        service.request_token(clinic, "system/*.rs", purpose_of_use="TREAT"), 400, "invalid_scope"
    )


def test_single_registered_purpose_is_the_default(service: Service) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    response = service.request_token(authority, "system/*.rs")
    assert granted_claims(service, response.json()["access_token"]).purpose == "PUBHLTH"


def test_no_purpose_when_several_are_registered_is_refused_with_the_reason(service: Service) -> None:
    # A token without a purpose would let the authority see nothing, silently: refused instead.
    authority = service.register("authority", "authority", purposes=("PUBHLTH", "TREAT"))
    response = service.request_token(authority, "system/*.rs")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "hl7-b2b" in response.json()["error_description"]
    assert "PUBHLTH, TREAT" in response.json()["error_description"]


# --- the authentication-failure matrix ------------------------------------------------


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url_json(header)}.{b64url_json(claims)}.{b64url(signature)}"


def _hs256_with_public_key(service: Service, party: Party, other: Party) -> str:
    # The classic RS/HS confusion: HMAC keyed with the public key's PEM.
    secret = party.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": public_jwk(party.key)["kid"]}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims_for(service, party))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _hs256_with_public_jwk(service: Service, party: Party, other: Party) -> str:
    secret = json.dumps(public_jwk(party.key)).encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": public_jwk(party.key)["kid"]}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims_for(service, party))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _tampered_signature(service: Service, party: Party, other: Party) -> str:
    head, body, signature = service.assertion(party).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{body}.{b64url(bytes(raw))}"


def _tampered_payload(service: Service, party: Party, other: Party) -> str:
    head, _body, signature = service.assertion(party).split(".")
    # Stretch the lifetime and swap the jti, keeping the original signature.
    forged = claims_for(service, party, exp=int(time.time()) + 200)
    return f"{head}.{b64url_json(forged)}.{signature}"


def _replayed(service: Service, party: Party, other: Party) -> str:
    assertion = service.assertion(party)
    assert post_token(service, assertion).status_code == 200
    return assertion


def _disabled(service: Service, party: Party, other: Party) -> str:
    disable(service, party.client_id)
    return service.assertion(party)


def _es256_p256(service: Service, party: Party, other: Party) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        claims_for(service, party), key, algorithm="ES256", headers={"kid": public_jwk(party.key)["kid"]}
    )


def _rs384_against_ec_key(service: Service, party: Party, other: Party) -> str:
    rsa_key = generate_client_key("RSA")
    return sign(rsa_key, claims_for(service, party), kid=public_jwk(party.key)["kid"])


AUTHENTICATION_FAILURES: dict[str, Callable[[Service, Party, Party], str]] = {
    "expired": lambda s, p, o: sign(
        p.key, claims_for(s, p, iat=int(time.time()) - 120, exp=int(time.time()) - 5)
    ),
    "exp too far ahead": lambda s, p, o: sign(p.key, claims_for(s, p, exp=int(time.time()) + 360)),
    "exp missing": lambda s, p, o: sign(p.key, claims_for(s, p, exp=None)),
    "aud is the FHIR base": lambda s, p, o: sign(p.key, claims_for(s, p, aud=s.settings.fhir_base_url)),
    "aud is another server": lambda s, p, o: sign(
        p.key, claims_for(s, p, aud="https://other.example/auth/token")
    ),
    "aud missing": lambda s, p, o: sign(p.key, claims_for(s, p, aud=None)),
    "replayed jti": _replayed,
    "jti missing": lambda s, p, o: sign(p.key, claims_for(s, p, jti=None)),
    "unknown kid": lambda s, p, o: sign(p.key, claims_for(s, p), kid="no-such-kid"),
    "unregistered key": lambda s, p, o: sign(generate_client_key("EC"), claims_for(s, p)),
    "other client's key": lambda s, p, o: sign(o.key, claims_for(s, p)),
    "alg none": lambda s, p, o: _forge(
        {"alg": "none", "typ": "JWT", "kid": public_jwk(p.key)["kid"]}, claims_for(s, p)
    ),
    "alg none without kid": lambda s, p, o: _forge({"alg": "none"}, claims_for(s, p)),
    "HS256 keyed with public PEM": _hs256_with_public_key,
    "HS256 keyed with public JWK": _hs256_with_public_jwk,
    "ES256 on P-256": _es256_p256,
    "RS384 against an EC key": _rs384_against_ec_key,
    "tampered signature": _tampered_signature,
    "tampered payload": _tampered_payload,
    "empty signature": lambda s, p, o: service_assertion_without_signature(s, p),
    "iss is another client": lambda s, p, o: sign(p.key, claims_for(s, p, iss=o.client_id)),
    "sub is another client": lambda s, p, o: sign(p.key, claims_for(s, p, sub=o.client_id)),
    "sub missing": lambda s, p, o: sign(p.key, claims_for(s, p, sub=None)),
    "iss unknown": lambda s, p, o: sign(
        p.key, claims_for(s, p, iss="clinic-0000000000000000", sub="clinic-0000000000000000")
    ),
    "iss missing": lambda s, p, o: sign(p.key, claims_for(s, p, iss=None)),
    "disabled client": _disabled,
    "person claim too long": lambda s, p, o: sign(p.key, claims_for(s, p, person="x" * 200)),
    "not a JWT": lambda s, p, o: "not-a-jwt",
    "three garbage segments": lambda s, p, o: "a.b.c",
}


def service_assertion_without_signature(service: Service, party: Party) -> str:
    head, body, _signature = service.assertion(party).split(".")
    return f"{head}.{body}."


@pytest.fixture
def reference_failure(service: Service) -> dict[str, Any]:
    """What any authentication failure looks like: an unknown client's."""
    stranger = sign_client_assertion(
        generate_client_key("EC"), client_id="clinic-unknown", token_url=service.token_url
    )
    return assert_oauth_error(post_token(service, stranger), 401, "invalid_client")


@pytest.mark.parametrize("case", list(AUTHENTICATION_FAILURES))
def test_authentication_failure_is_one_uniform_invalid_client(
    service: Service, reference_failure: dict[str, Any], case: str
) -> None:
    party = service.register("clinic", "clinic")
    other = service.register("other", "clinic")
    assertion = AUTHENTICATION_FAILURES[case](service, party, other)

    response = post_token(service, assertion)

    body = assert_oauth_error(response, 401, "invalid_client")
    # No oracle: every failure reads the same, naming no client, key or check.
    assert body == reference_failure
    for leak in (party.client_id, other.client_id, "kid", "expired", "aud", "signature", "jti", "disabled"):
        assert leak not in body["error_description"]


def test_authentication_failures_share_one_description(service: Service) -> None:
    party = service.register("clinic", "clinic")
    other = service.register("other", "clinic")
    bodies = set()
    for case in (
        "expired",
        "aud is the FHIR base",
        "unknown kid",
        "alg none",
        "tampered signature",
        "iss unknown",
        "sub is another client",
        "replayed jti",
    ):
        response = post_token(service, AUTHENTICATION_FAILURES[case](service, party, other))
        bodies.add(response.content)
    assert len(bodies) == 1


def test_assertion_refused_for_bad_scope_cannot_be_replayed(service: Service) -> None:
    # The jti is spent once the signature verified, whatever happened next.
    clinic = service.register("clinic", "clinic")
    assertion = service.assertion(clinic)
    assert_oauth_error(post_token(service, assertion, "system/Nope.xyz"), 400, "invalid_scope")
    assert_oauth_error(post_token(service, assertion, "system/*.rs"), 401, "invalid_client")


def test_same_jti_from_two_clients_is_not_a_replay(service: Service) -> None:
    first = service.register("first", "clinic")
    second = service.register("second", "clinic")
    jti = "shared-" + uuid.uuid4().hex
    assert post_token(service, sign(first.key, claims_for(service, first, jti=jti))).status_code == 200
    assert post_token(service, sign(second.key, claims_for(service, second, jti=jti))).status_code == 200


# --- malformed requests -------------------------------------------------------------


def test_wrong_content_type_is_invalid_request(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    form = token_form(service.assertion(clinic))
    as_json = service.client.post("/auth/token", json=form)
    assert_oauth_error(as_json, 400, "invalid_request")
    multipart = service.client.post("/auth/token", files={"x": ("x.txt", b"x")}, data=form)
    assert_oauth_error(multipart, 400, "invalid_request")
    body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
    no_type = service.client.post("/auth/token", content=body)
    assert_oauth_error(no_type, 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        b"grant_type",  # no '='
        b"grant_type=client_credentials&&scope=system/*.rs",
        b"\xff\xfe=\x00",
        "grant_type=client_credentials&scope=système".encode(),
        b"&".join(f"p{i}=v".encode() for i in range(40)),  # too many fields
    ],
    ids=["no-equals", "empty-pair", "binary", "non-ascii", "too-many-fields"],
)
def test_malformed_form_body_is_invalid_request(service: Service, body: bytes) -> None:
    assert_oauth_error(service.client.post("/auth/token", content=body, headers=FORM), 400, "invalid_request")


@pytest.mark.parametrize("repeated", ["scope", "client_assertion", "grant_type"])
def test_repeated_parameter_is_invalid_request(service: Service, repeated: str) -> None:
    clinic = service.register("clinic", "clinic")
    form = token_form(service.assertion(clinic))
    pairs = [*form.items(), (repeated, form[repeated])]
    response = service.client.post("/auth/token", content=_encode(pairs), headers=FORM)
    assert_oauth_error(response, 400, "invalid_request")


def _encode(pairs: list[tuple[str, str]]) -> bytes:
    from urllib.parse import urlencode

    return urlencode(pairs).encode()


@pytest.mark.parametrize(
    "grant_type", ["password", "authorization_code", "refresh_token", "CLIENT_CREDENTIALS"]
)
def test_unsupported_grant_type(service: Service, grant_type: str) -> None:
    clinic = service.register("clinic", "clinic")
    form = token_form(service.assertion(clinic), grant_type=grant_type)
    assert_oauth_error(service.client.post("/auth/token", data=form), 400, "unsupported_grant_type")


@pytest.mark.parametrize(
    ("drop", "replace"),
    [
        ("grant_type", None),
        ("client_assertion", None),
        ("client_assertion_type", None),
        (None, ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer")),
        (None, ("client_assertion", "")),
    ],
)
def test_missing_or_wrong_parameters_are_invalid_request(
    service: Service, drop: str | None, replace: tuple[str, str] | None
) -> None:
    clinic = service.register("clinic", "clinic")
    form = token_form(service.assertion(clinic))
    if drop:
        del form[drop]
    if replace:
        form[replace[0]] = replace[1]
    assert_oauth_error(service.client.post("/auth/token", data=form), 400, "invalid_request")


def test_client_secret_authentication_is_not_offered(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    form = {
        "grant_type": "client_credentials",
        "client_id": clinic.client_id,
        "client_secret": "guess",
        "scope": "system/*.rs",
    }
    assert_oauth_error(service.client.post("/auth/token", data=form), 400, "invalid_request")


# --- discovery -------------------------------------------------------------------------


def test_smart_configuration_advertises_backend_services(service: Service) -> None:
    response = service.client.get("/fhir/.well-known/smart-configuration")
    assert response.status_code == 200
    config = response.json()
    assert config["token_endpoint"] == service.token_url
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"ES384", "RS384"}
    assert "client-confidential-asymmetric" in config["capabilities"]
    assert "permission-v2" in config["capabilities"]


# --- the replay store --------------------------------------------------------------------


def test_replay_store_keeps_used_jtis_and_purges_expired_ones(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    engine = sa.create_engine(sync_url(service.settings.database_url))
    table = AssertionJti.__table__
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [
                    {
                        "client_id": clinic.client_id,
                        "jti": "long-gone",
                        "expires_at": now - timedelta(hours=1),
                    },
                    {
                        "client_id": "clinic-other",
                        "jti": "also-gone",
                        "expires_at": now - timedelta(seconds=5),
                    },
                    {
                        "client_id": clinic.client_id,
                        "jti": "still-live",
                        "expires_at": now + timedelta(minutes=4),
                    },
                ],
            )
        exp = int(time.time()) + 120
        assertion = sign(clinic.key, claims_for(service, clinic, jti="fresh-one", exp=exp))
        assert post_token(service, assertion).status_code == 200

        with engine.connect() as conn:
            rows = {(r.client_id, r.jti): r.expires_at for r in conn.execute(sa.select(table))}
    finally:
        engine.dispose()
    assert set(rows) == {(clinic.client_id, "still-live"), (clinic.client_id, "fresh-one")}
    # Kept exactly as long as the assertion could be replayed.
    kept = rows[(clinic.client_id, "fresh-one")]
    kept = kept if kept.tzinfo else kept.replace(tzinfo=UTC)
    assert int(kept.timestamp()) == exp


# --- JWKS by URL -------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 serving whatever the test puts in it."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                if server.delay:
                    server.release.wait(server.delay)
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (the timeout test) is expected

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def serve(self, *keys: PrivateKey) -> None:
        self.document = {"keys": [public_jwk(k) for k in keys]}

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


class _Clock:
    """Monotonic time for the JWKS cache only, so a test can let its refetch throttle pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_jwks_url_client_gets_a_token_and_the_jwks_is_cached(
    service: Service, jwks_server: JwksServer
) -> None:
    authority = service.register("authority", "authority", jwks_url=jwks_server.url, purposes=("PUBHLTH",))
    jwks_server.serve(authority.key)

    assert service.request_token(authority, "system/*.rs").status_code == 200
    assert service.request_token(authority, "system/*.rs").status_code == 200
    assert jwks_server.hits == 1


def test_jwks_url_rsa_key(service: Service, jwks_server: JwksServer) -> None:
    authority = service.register(
        "authority", "authority", jwks_url=jwks_server.url, key_kind="RSA", purposes=("PUBHLTH",)
    )
    jwks_server.serve(authority.key)
    assert service.request_token(authority, "system/*.rs").status_code == 200


def test_key_rotation_at_the_url_is_picked_up_on_kid_miss(
    service: Service, jwks_server: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(jwks_module, "time", clock)
    authority = service.register("authority", "authority", jwks_url=jwks_server.url, purposes=("PUBHLTH",))
    jwks_server.serve(authority.key)
    assert service.request_token(authority, "system/*.rs").status_code == 200
    assert jwks_server.hits == 1

    new_key = generate_client_key("EC")
    jwks_server.serve(new_key)

    def with_new_key() -> Any:
        assertion = sign_client_assertion(new_key, client_id=authority.client_id, token_url=service.token_url)
        return post_token(service, assertion)

    # A kid miss refetches, but not more than every 10 s: nobody can make us hammer the client's server.
    assert_oauth_error(with_new_key(), 401, "invalid_client")
    assert jwks_server.hits == 1

    clock.offset = 11  # well inside the 300 s cache lifetime: only the kid miss can explain a fetch
    assert with_new_key().status_code == 200
    assert jwks_server.hits == 2
    # The retired key no longer works once the rotation was seen.
    assert_oauth_error(service.request_token(authority, "system/*.rs"), 401, "invalid_client")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_jwks_url_is_invalid_client(service: Service) -> None:
    authority = service.register(
        "authority", "authority", jwks_url=f"http://127.0.0.1:{_closed_port()}/jwks.json"
    )
    body = assert_oauth_error(service.request_token(authority, "system/*.rs"), 401, "invalid_client")
    assert body["error_description"] == "client authentication failed"


@pytest.mark.parametrize("problem", ["http 500", "private key material", "not a JWKS"])
def test_bad_jwks_at_the_url_is_invalid_client(
    service: Service, jwks_server: JwksServer, problem: str
) -> None:
    authority = service.register("authority", "authority", jwks_url=jwks_server.url, purposes=("PUBHLTH",))
    jwks_server.serve(authority.key)
    if problem == "http 500":
        jwks_server.status = 500
    elif problem == "private key material":
        jwk = public_jwk(authority.key)
        jwk["d"] = b64url(b"\x01" * 48)
        jwks_server.document = {"keys": [jwk]}
    else:
        jwks_server.document = {"hello": "world"}
    assert_oauth_error(service.request_token(authority, "system/*.rs"), 401, "invalid_client")


def test_slow_jwks_url_times_out(database_url: str, tmp_path: Path, jwks_server: JwksServer) -> None:
    with Service.start(database_url, tmp_path, jwks_fetch_timeout_seconds=0.5) as service:
        authority = service.register(
            "authority", "authority", jwks_url=jwks_server.url, purposes=("PUBHLTH",)
        )
        jwks_server.serve(authority.key)
        jwks_server.delay = 5.0
        started = time.monotonic()
        response = service.request_token(authority, "system/*.rs")
        elapsed = time.monotonic() - started
    assert_oauth_error(response, 401, "invalid_client")
    assert elapsed < 3


def test_plain_http_jwks_url_is_refused_at_registration(service: Service) -> None:
    async def work(db: Database) -> None:
        async with db.transaction() as session:
            repo = IdentityRepository(session)
            org = await add_organization(repo, name=f"Authority {uuid.uuid4().hex[:6]}", kind="authority")
            await add_client(
                repo,
                ClientRegistration(
                    organization=org.id, role="authority", jwks_url="http://jwks.example.org/k"
                ),
            )

    with pytest.raises(RegistrationError, match="https"):
        service._run(work)
