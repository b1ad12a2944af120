"""What stock SMART clients send to the token endpoint: scopes it cannot grant, and the purpose of
use in the standard place (the client assertion's HL7 B2B extension, UDAP Security IG)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from mhr_testkit import JWT_BEARER, Party, Service

from security.jwk import generate_client_key, public_jwk
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store.database import Database


def _claims(service: Service, access_token: str) -> Any:
    return service.fastapi.state.runtime.tokens.verify(access_token, now=datetime.now(UTC))  # type: ignore[attr-defined]


def _request(service: Service, party: Party, scope: str, purposes: tuple[str, ...] = (), **form: str) -> Any:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": service.assertion(party, purposes=purposes),
        "scope": scope,
        **form,
    }
    return service.client.post("/auth/token", data=data)


@pytest.fixture
def authority(service: Service) -> Party:
    return service.register("authority", "authority", purposes=("PUBHLTH", "TREAT"))


# --- scopes ---------------------------------------------------------------------------------
def test_scopes_a_backend_service_cannot_hold_are_dropped_not_refused(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    # What fhirclient sends: launch/patient in front of the scopes it was configured with.
    response = _request(service, clinic, "launch/patient openid offline_access patient/*.read system/*.rs")
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/*.rs"  # the response says what was granted
    assert _claims(service, response.json()["access_token"]).scope == "system/*.rs"


def test_nothing_grantable_is_invalid_scope_with_the_reason(service: Service) -> None:
    clinic = service.register("clinic", "clinic", scopes="system/Observation.rs")
    for scope in ("launch/patient openid", "system/Patient.rs", "system/Observation.bogus"):
        response = _request(service, clinic, scope)
        assert response.status_code == 400, scope
        assert response.json()["error"] == "invalid_scope"
        assert "system/Observation.rs" in response.json()["error_description"]


# --- purpose of use ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "purpose"),
    [
        (("PUBHLTH",), "PUBHLTH"),
        (("urn:oid:2.16.840.1.113883.5.8#TREAT",), "TREAT"),
        (("http://terminology.hl7.org/CodeSystem/v3-ActReason#PUBHLTH",), "PUBHLTH"),
    ],
)
def test_purpose_of_use_in_the_hl7_b2b_extension(
    service: Service, authority: Party, sent: tuple[str, ...], purpose: str
) -> None:
    response = _request(service, authority, "system/*.rs", purposes=sent)
    assert response.status_code == 200, response.text
    assert _claims(service, response.json()["access_token"]).purpose == purpose


def test_the_older_form_parameter_still_works_and_must_agree(service: Service, authority: Party) -> None:
    legacy = _request(service, authority, "system/*.rs", purpose_of_use="TREAT")
    assert _claims(service, legacy.json()["access_token"]).purpose == "TREAT"
    same = _request(service, authority, "system/*.rs", purposes=("TREAT",), purpose_of_use="TREAT")
    assert same.status_code == 200
    both = _request(service, authority, "system/*.rs", purposes=("PUBHLTH",), purpose_of_use="TREAT")
    assert both.status_code == 400 and both.json()["error"] == "invalid_request"
    several = _request(service, authority, "system/*.rs", purposes=("PUBHLTH", "TREAT"))
    assert several.status_code == 400 and "one purpose" in several.json()["error_description"]


def test_an_unregistered_purpose_is_refused_with_what_is_registered(
    service: Service, authority: Party
) -> None:
    response = _request(service, authority, "system/*.rs", purposes=("HMARKT",))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert "PUBHLTH, TREAT" in response.json()["error_description"]


def test_a_token_with_no_usable_purpose_is_refused_with_the_reason(service: Service) -> None:
    nothing_registered = service.register("authority", "authority")
    response = _request(service, nothing_registered, "system/*.rs")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "purpose of use is required" in response.json()["error_description"]
    # Clinics read their own submissions whatever the purpose: none needed.
    clinic = service.register("clinic", "clinic")
    assert _request(service, clinic, "system/*.rs").status_code == 200


def test_a_registered_default_purpose_serves_clients_that_send_none(service: Service) -> None:
    key = generate_client_key("EC")

    async def work(db: Database) -> Party:
        async with db.transaction() as session:
            repo = IdentityRepository(session)
            org = await add_organization(repo, name="Authority with a default", kind="authority")
            client = await add_client(
                repo,
                ClientRegistration(
                    organization=org.id,
                    role="authority",
                    jwks={"keys": [public_jwk(key)]},
                    purposes=("TREAT",),
                    default_purpose="PUBHLTH",
                ),
            )
            assert client.purposes == "PUBHLTH TREAT"  # a default is registered too
            return Party(org.id, client.id, "authority", key, client.scopes)

    party: Party = service._run(work)
    defaulted = _request(service, party, "system/*.rs")
    assert defaulted.status_code == 200, defaulted.text
    assert _claims(service, defaulted.json()["access_token"]).purpose == "PUBHLTH"
    chosen = _request(service, party, "system/*.rs", purposes=("TREAT",))
    assert _claims(service, chosen.json()["access_token"]).purpose == "TREAT"


def test_a_malformed_b2b_extension_is_not_a_token(service: Service, authority: Party) -> None:
    now = int(datetime.now(UTC).timestamp())
    claims = {
        "iss": authority.client_id,
        "sub": authority.client_id,
        "aud": service.token_url,
        "iat": now,
        "exp": now + 60,
        "jti": f"jti-{now}",
        "extensions": {"hl7-b2b": {"purpose_of_use": [{"code": "PUBHLTH"}]}},
    }
    jwk = public_jwk(authority.key)
    assertion = jwt.encode(claims, authority.key, algorithm=jwk["alg"], headers={"kid": jwk["kid"]})
    response = service.client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
            "scope": "system/*.rs",
        },
    )
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


# --- 403 says insufficient_scope --------------------------------------------------------------
def test_a_403_on_a_clinical_route_names_insufficient_scope(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    narrow = service.headers(clinic, "system/Observation.rs")
    for response in (
        service.client.get("/fhir/Patient/anything", headers=narrow),
        service.client.get("/fhir/Patient?_id=x", headers=narrow),
        service.client.post(
            "/fhir", content=b"{}", headers={**narrow, "Content-Type": "application/fhir+json"}
        ),
    ):
        assert response.status_code == 403, response.text
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and 'error="insufficient_scope"' in challenge
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    wrong_role = service.client.post(
        "/fhir/Observation/$validate",
        content=b"{}",
        headers={
            **service.headers(authority, purpose_of_use="PUBHLTH"),
            "Content-Type": "application/fhir+json",
        },
    )
    assert wrong_role.status_code == 403
    assert 'error="insufficient_scope"' in wrong_role.headers["www-authenticate"]
