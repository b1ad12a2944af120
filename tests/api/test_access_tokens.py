"""Protected FHIR routes: who gets in, what the refusals look like, and that every error is FHIR.

Also the open endpoints (metadata, SMART discovery, health, metrics) and the
guarantees operators rely on: opaque 500s, request ids in JSON logs, no PHI
in logs or metrics.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import jwt
import pytest
import sqlalchemy as sa
from fastapi import Depends
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from mhr_testkit import BASE_URL, Party, Service, sync_url
from starlette.testclient import TestClient

from security.access_tokens import AccessTokenCodec
from security.keys import LocalKeyring
from security.roles import Role
from service.api.authorization import Interaction, Rule, requires
from service.api.deps import Principal
from service.app.logging_setup import JsonFormatter
from service.identity.repository import IdentityRepository
from service.store.database import Database

FHIR_JSON = "application/fhir+json"
# For a probe route: only clinics, and only with a Patient read scope.
ClinicPatientReader = Annotated[
    Principal, Depends(requires(Rule(Interaction.read, frozenset({Role.clinic}), "Patient")))
]
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


# --- helpers ------------------------------------------------------------------


def codec_for(
    keyring: LocalKeyring, service: Service, *, issuer: str | None = None, audience: str | None = None
) -> AccessTokenCodec:
    return AccessTokenCodec(
        issuer=issuer or service.settings.base_url,
        audience=audience or service.settings.fhir_base_url,
        keys=keyring,
    )


def service_codec(service: Service, **kwargs: Any) -> AccessTokenCodec:
    """A codec over the service's own keyring file: tokens it mints are genuine."""
    return codec_for(LocalKeyring.load(service.settings.keyring_path), service, **kwargs)


def mint(
    codec: AccessTokenCodec,
    party: Party,
    *,
    scope: str | None = None,
    now: datetime | None = None,
    lifetime: int = 300,
    role: str | None = None,
) -> str:
    token, _claims = codec.issue(
        client_id=party.client_id,
        organization_id=party.organization_id,
        role=role or party.role,
        scope=scope or party.scopes,
        purpose=None,
        person=None,
        now=now or datetime.now(UTC),
        lifetime_seconds=lifetime,
    )
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unpad(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def add_probe(service: Service, path: str, endpoint: Any) -> None:
    """A test-only GET route, ahead of every route the service has (its generic ones included)."""
    app = service.fastapi  # type: ignore[attr-defined]
    app.add_api_route(path, endpoint, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())


def assert_outcome(response: Any, status: int, code: str | set[str]) -> dict[str, Any]:
    """A FHIR OperationOutcome with the status and issue code, valid per R4B."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    OperationOutcome.model_validate(body)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] in ({code} if isinstance(code, str) else code)
    return body


def assert_invalid_token(response: Any) -> None:
    assert_outcome(response, 401, "login")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge


def disable(service: Service, client_id: str) -> None:
    async def work(db: Database) -> None:
        async with db.transaction() as session:
            assert await IdentityRepository(session).disable_client(client_id, datetime.now(UTC))

    service._run(work)


# --- who gets in ----------------------------------------------------------------------


def test_missing_token_is_401_with_a_bare_challenge(service: Service) -> None:
    response = service.client.get("/fhir/Organization")
    body = assert_outcome(response, 401, "login")
    # RFC 6750 3.1: no error code when the request carried no credentials at all.
    assert response.headers["www-authenticate"] == 'Bearer realm="mhr"'
    assert body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearer    ", "bearer"])
def test_wrong_scheme_or_empty_token_is_invalid_request(service: Service, header: str) -> None:
    response = service.client.get("/fhir/Organization", headers={"Authorization": header})
    assert_outcome(response, 401, "login")
    assert 'error="invalid_request"' in response.headers["www-authenticate"]


def test_token_in_query_string_is_not_accepted(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    token = service.token(clinic)
    response = service.client.get("/fhir/Organization", params={"access_token": token})
    assert_outcome(response, 401, "login")


def test_valid_token_is_accepted_and_lowercase_scheme_too(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    token = service.token(clinic)
    assert service.client.get("/fhir/Organization", headers=bearer(token)).status_code == 200
    assert (
        service.client.get("/fhir/Organization", headers={"Authorization": f"bearer {token}"}).status_code
        == 200
    )


def test_a_token_minted_with_the_service_key_is_genuine(service: Service) -> None:
    # Control for the forgeries below: the same path with the right key works.
    clinic = service.register("clinic", "clinic")
    token = mint(service_codec(service), clinic)
    assert service.client.get("/fhir/Organization", headers=bearer(token)).status_code == 200


def test_expired_token_is_invalid(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    token = mint(service_codec(service), clinic, now=datetime.now(UTC) - timedelta(minutes=10))
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))


def test_token_expiring_now_is_invalid(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    token = mint(service_codec(service), clinic, now=datetime.now(UTC) - timedelta(seconds=30), lifetime=30)
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))


@pytest.mark.parametrize(
    "change",
    [
        {"role": "clinic", "scope": "system/*.cruds"},
        {"scope": "system/*.cruds"},
        {"org": "another-organization"},
        {"exp": 4102444800},
    ],
    ids=["role-and-scope", "scope", "org", "exp"],
)
def test_tampered_payload_is_invalid(service: Service, change: dict[str, Any]) -> None:
    auditor = service.register("auditor", "auditor")
    head, body, signature = service.token(auditor).split(".")
    claims = json.loads(unpad(body))
    claims.update(change)
    forged = f"{head}.{b64url_json(claims)}.{signature}"
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(forged)))


def test_tampered_signature_is_invalid(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    head, body, signature = service.token(clinic).split(".")
    raw = bytearray(unpad(signature))
    raw[0] ^= 0x80
    forged = f"{head}.{body}.{b64url(bytes(raw))}"
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(forged)))


def test_token_signed_by_another_keyring_is_invalid(service: Service, tmp_path: Path) -> None:
    clinic = service.register("clinic", "clinic")
    foreign = LocalKeyring.create(tmp_path / "foreign" / "keyring.json")
    token = mint(codec_for(foreign, service), clinic)
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))


def test_token_with_the_service_kid_but_another_secret_is_invalid(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    genuine = service.token(clinic)
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    forged = jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256", headers={"kid": header["kid"]})
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(forged)))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_token_is_invalid(service: Service, alg: str) -> None:
    clinic = service.register("clinic", "clinic")
    genuine = service.token(clinic)
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    forged = f"{b64url_json({'alg': alg, 'typ': 'JWT', 'kid': header['kid']})}.{b64url_json(claims)}."
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(forged)))


@pytest.mark.parametrize("which", ["issuer", "audience"])
def test_token_for_another_deployment_is_invalid(service: Service, which: str) -> None:
    # Right key, wrong issuer or audience: e.g. a token minted for another service sharing a keyring backup.
    clinic = service.register("clinic", "clinic")
    elsewhere = {which: "https://elsewhere.example/fhir"}
    token = mint(service_codec(service, **elsewhere), clinic)
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))


def test_token_for_an_unknown_client_is_invalid(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    ghost = Party(clinic.organization_id, "clinic-0000000000000000", "clinic", clinic.key, clinic.scopes)
    token = mint(service_codec(service), ghost)
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))


@pytest.mark.parametrize("garbage", ["abc", "a.b.c", "e30.e30.", "x" * 5000])
def test_garbage_token_is_invalid(service: Service, garbage: str) -> None:
    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(garbage)))


def test_disabled_client_token_stops_working(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    token = service.token(clinic)
    assert service.client.get("/fhir/Organization", headers=bearer(token)).status_code == 200

    disable(service, clinic.client_id)

    assert_invalid_token(service.client.get("/fhir/Organization", headers=bearer(token)))
    refused = service.request_token(clinic)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"


def test_invalid_token_refusals_are_uniform(service: Service, tmp_path: Path) -> None:
    clinic = service.register("clinic", "clinic")
    expired = mint(service_codec(service), clinic, now=datetime.now(UTC) - timedelta(hours=1))
    foreign = mint(codec_for(LocalKeyring.create(tmp_path / "f" / "keyring.json"), service), clinic)
    outcomes = set()
    for token in (expired, foreign, "a.b.c"):
        response = service.client.get("/fhir/Organization", headers=bearer(token))
        outcomes.add((response.status_code, response.headers["www-authenticate"], response.content))
    assert len(outcomes) == 1


# --- scope and role ------------------------------------------------------------------------


def test_auditor_may_read_organizations(service: Service) -> None:
    auditor = service.register("auditor", "auditor")
    assert service.client.get("/fhir/Organization", headers=service.headers(auditor)).status_code == 200


def test_token_without_the_needed_scope_is_403(service: Service) -> None:
    auditor = service.register("auditor", "auditor")
    headers = service.headers(auditor, "system/AuditEvent.rs")
    response = service.client.get("/fhir/Organization", headers=headers)
    assert_outcome(response, 403, "forbidden")
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    read = service.client.get(f"/fhir/Organization/{auditor.organization_id}", headers=headers)
    assert_outcome(read, 403, "forbidden")


def test_read_and_search_are_separate_permissions(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    headers = service.headers(clinic, "system/Organization.r")
    assert (
        service.client.get(f"/fhir/Organization/{clinic.organization_id}", headers=headers).status_code == 200
    )
    assert_outcome(service.client.get("/fhir/Organization", headers=headers), 403, "forbidden")


@pytest.fixture
def clinic_only_route(service: Service) -> str:
    """A probe route only clinics holding a Patient read scope may use."""
    path = "/_probe/clinic-only"

    async def probe(principal: ClinicPatientReader) -> dict[str, str]:
        return {"client": principal.client_id}

    add_probe(service, path, probe)

    return path


def test_role_is_checked_as_well_as_scope(service: Service, clinic_only_route: str) -> None:
    clinic = service.register("clinic", "clinic")
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))

    allowed = service.client.get(clinic_only_route, headers=service.headers(clinic, "system/Patient.rs"))
    assert allowed.status_code == 200
    assert allowed.json() == {"client": clinic.client_id}

    # The authority holds system/*.rs, which covers Patient reads, but not the role.
    wrong_role = service.client.get(clinic_only_route, headers=service.headers(authority))
    assert_outcome(wrong_role, 403, "forbidden")
    assert "role" in wrong_role.json()["issue"][0]["diagnostics"]

    wrong_scope = service.client.get(
        clinic_only_route, headers=service.headers(clinic, "system/Observation.rs")
    )
    assert_outcome(wrong_scope, 403, "forbidden")


# --- every error is an OperationOutcome ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/fhir/NoSuchType", "/fhir/Organization/x/y/z", "/nothing-here"])
def test_unknown_route_is_404_outcome(service: Service, path: str) -> None:
    # An unknown resource type may say so ("not-supported"); anything else is plain not-found.
    assert_outcome(service.client.get(path), 404, {"not-found", "not-supported"})


def test_wrong_method_is_405_outcome(service: Service) -> None:
    response = service.client.delete("/fhir/metadata")
    assert_outcome(response, 405, "not-supported")
    assert "GET" in response.headers["allow"]
    assert_outcome(service.client.put("/auth/token", content=b""), 405, "not-supported")


def test_validation_error_is_400_outcome_without_echoing_input(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    canary = "Fatima-Canary-1987"
    response = service.client.get(f"/fhir/Organization?_count={canary}", headers=service.headers(clinic))
    body = assert_outcome(response, 400, "invalid")
    assert canary not in response.text
    assert "_count" in body["issue"][0]["diagnostics"]
    too_many = service.client.get("/fhir/Organization?_count=100000", headers=service.headers(clinic))
    assert_outcome(too_many, 400, "invalid")


@pytest.fixture
def small_service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    with Service.start(database_url, tmp_path, max_request_bytes=2048) as running:
        yield running


def test_oversized_body_is_413_outcome(small_service: Service) -> None:
    response = small_service.client.post(
        "/auth/token",
        content=b"a=" + b"x" * 4096,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    body = assert_outcome(response, 413, "too-costly")
    assert "2048" in body["issue"][0]["diagnostics"]


def test_oversized_chunked_body_is_413_outcome(small_service: Service) -> None:
    # No Content-Length: the limit is enforced while the body streams in.
    def chunks() -> Iterator[bytes]:
        for _ in range(16):
            yield b"x" * 512

    response = small_service.client.post(
        "/auth/token", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert "content-length" not in response.request.headers
    assert_outcome(response, 413, "too-costly")


def test_body_within_the_limit_is_served(small_service: Service) -> None:
    clinic = small_service.register("clinic", "clinic")
    assert small_service.request_token(clinic).status_code == 200


def service_log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The service's own lines; the test client's httpx loggers are not the service."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if not line["logger"].startswith("httpx")]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Log lines exactly as the service writes them (JSON), captured at INFO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_500_carries_only_a_correlation_id(service: Service, json_log: io.StringIO) -> None:
    canary = "Amina Yusuf passport P1234567 HIV positive"

    async def boom() -> None:
        raise RuntimeError(canary)

    add_probe(service, "/_probe/boom", boom)
    client = TestClient(service.client.app, base_url=BASE_URL, raise_server_exceptions=False)
    response = client.get("/_probe/boom")

    body = assert_outcome(response, 500, "exception")
    assert canary not in response.text
    assert "RuntimeError" not in response.text
    request_id = response.headers["x-request-id"]
    assert response.headers.get_list("x-request-id") == [request_id]
    assert len(body["issue"]) == 1
    assert body["issue"][0]["diagnostics"] == f"internal error; correlation id {request_id}"

    lines = service_log_lines(json_log)
    assert canary not in json.dumps(lines)
    errors = [line for line in lines if line["msg"] == "unhandled error"]
    assert errors
    assert errors[0]["request_id"] == request_id
    assert errors[0]["error_type"] == "RuntimeError"
    access = [line for line in lines if line["logger"] == "mhr.access"]
    assert access[-1]["request_id"] == request_id
    assert access[-1]["route"] == "/_probe/boom"
    assert access[-1]["status"] == 500


def test_inbound_request_id_is_kept_when_safe(service: Service) -> None:
    response = service.client.get("/healthz", headers={"X-Request-Id": "lb-1234abcd"})
    assert response.headers["x-request-id"] == "lb-1234abcd"
    hostile = service.client.get("/healthz", headers={"X-Request-Id": "evil\tinjected value"})
    assert hostile.headers["x-request-id"] != "evil\tinjected value"
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])


def test_access_log_names_route_templates_not_ids(service: Service, json_log: io.StringIO) -> None:
    clinic = service.register("clinic", "clinic")
    headers = service.headers(clinic)
    service.client.get(f"/fhir/Organization/{clinic.organization_id}", headers=headers)
    service.client.get("/fhir/Organization?name=Secret-Name-Canary", headers=headers)
    lines = service_log_lines(json_log)
    text = json.dumps(lines)
    assert clinic.organization_id not in text
    assert "Secret-Name-Canary" not in text
    routes = {line.get("route") for line in lines}
    assert "/fhir/Organization/{org_id}" in routes


# --- open endpoints --------------------------------------------------------------------------


def test_capability_statement_is_open_and_valid(service: Service) -> None:
    response = service.client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR_JSON)
    statement = response.json()
    CapabilityStatement.model_validate(statement)
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["implementation"]["url"] == service.settings.fhir_base_url
    security = statement["rest"][0]["security"]
    oauth = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    assert len(oauth) == 1
    assert {"url": "token", "valueUri": service.token_url} in oauth[0]["extension"]
    codes = [c["code"] for s in security["service"] for c in s["coding"]]
    assert "SMART-on-FHIR" in codes


def test_capability_statement_declares_r4_for_clients(service: Service) -> None:
    # Issue 2: the statement says 4.0.1 so that R4 clients (fhirpy, HAPI) accept the
    # server; the resources served are also valid R4B (validated with fhir.resources.R4B).
    assert service.client.get("/fhir/metadata").json()["fhirVersion"] == "4.0.1"


def test_smart_configuration_is_open(service: Service) -> None:
    response = service.client.get("/fhir/.well-known/smart-configuration")
    assert response.status_code == 200
    assert response.json()["token_endpoint"] == service.token_url


def test_health_and_readiness(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "alive"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": True, "migrations": True, "keyring": True},
        "reports": {"subject_keys_under_retired_kek_versions": 0},
    }


def test_not_ready_when_migrations_are_not_at_head(service: Service) -> None:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.begin() as conn:
            head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'not-head'"))
        try:
            response = service.client.get("/readyz")
        finally:
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    finally:
        engine.dispose()
    assert response.status_code == 503
    assert response.json()["checks"]["migrations"] is False
    assert response.headers["retry-after"]


def test_metrics_use_route_templates_and_no_ids(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    headers = service.headers(clinic)
    assert (
        service.client.get(f"/fhir/Organization/{clinic.organization_id}", headers=headers).status_code == 200
    )
    assert service.client.get("/fhir/Organization/missing-id-canary", headers=headers).status_code == 404
    service.client.get("/fhir/no-such-route-canary")

    response = service.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'mhr_http_requests_total{method="GET",route="/fhir/Organization/{org_id}",status="200"}' in text
    assert 'mhr_http_requests_total{method="GET",route="/fhir/Organization/{org_id}",status="404"}' in text
    assert 'route="unmatched"' in text
    assert 'mhr_tokens_total{outcome="issued"}' in text
    assert "mhr_http_request_duration_seconds_bucket" in text
    for leak in (clinic.organization_id, clinic.client_id, "missing-id-canary", "no-such-route-canary"):
        assert leak not in text


def test_405_names_every_method_the_path_allows(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    response = service.client.patch("/fhir/Observation/abc", headers=service.headers(clinic))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, PUT"
