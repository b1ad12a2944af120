"""Stock FHIR clients, unmodified, against a running server: fhirpy (sync and async) and fhirclient.

fhirclient (the SMART on FHIR Python client) logs in with its own backend-services code: it asks
for ``launch/patient`` on top of the scopes it was given, and sends no purpose of use except in
a client assertion. fhirpy pages with absolute next links, counts with ``_count=0``, and makes
``get_or_create`` a conditional create with the condition in the query string.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from e2e_helpers import LiveServer
from fhirclient import client as smart_client
from fhirclient.models.observation import Observation as SmartObservation
from fhirclient.models.patient import Patient as SmartPatient
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from mhr_testkit import EXAMPLES, load_example

from security.jwk import sign_client_assertion

CONSENTED = next(p for p in EXAMPLES if p.stem == "exam-refugee-vaccinations")
OBSERVATION_SYSTEM = "https://amman-clinic.example.org/fhir/sid/observation"


def _submit_all(live_server: LiveServer, clinic_token: str) -> dict[str, str]:
    """Every example exam, submitted once; the Patient id of each."""
    fhir = SyncFHIRClient(live_server.fhir_url, authorization=f"Bearer {clinic_token}")
    patients = {}
    for example in EXAMPLES:
        reply = fhir.execute("", method="post", data=load_example(example))
        patients[example.stem] = next(
            e["response"]["location"].split("/")[1]
            for e in reply["entry"]
            if e["response"]["location"].startswith("Patient/")
        )
    return patients


def _height(patient_id: str, identifier: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": OBSERVATION_SYSTEM, "value": identifier}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2025-03-06T09:30:00Z",
        "valueQuantity": {"value": 150, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"},
    }


def test_fhirpy_sync_count_fetch_all_iteration_and_get_or_create(live_server: LiveServer) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    token = live_server.token(clinic)
    patients = _submit_all(live_server, token)
    fhir = SyncFHIRClient(live_server.fhir_url, authorization=f"Bearer {token}")
    patient = patients[CONSENTED.stem]
    search = fhir.resources("Observation").search(patient=patient).limit(2)
    total = search.count()
    assert total > 2
    assert len(search.fetch_all()) == total  # pages of 2, following next links
    assert len(list(search)) == total  # iteration pages the same way
    assert fhir.resources("Patient").count() == len(EXAMPLES)

    identifier = f"H-{uuid.uuid4().hex[:8]}"
    conditional = fhir.resources("Observation").search(identifier=f"{OBSERVATION_SYSTEM}|{identifier}")
    created, was_created = conditional.get_or_create(
        fhir.resource("Observation", **_height(patient, identifier))
    )
    assert was_created
    again, was_created_again = conditional.get_or_create(
        fhir.resource("Observation", **_height(patient, identifier))
    )
    assert not was_created_again and again.id == created.id
    assert conditional.count() == 1


def test_fhirpy_async_count_fetch_all_iteration_and_get_or_create(live_server: LiveServer) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    token = live_server.token(clinic)
    patients = _submit_all(live_server, token)
    patient = patients[CONSENTED.stem]

    async def flow() -> None:
        fhir = AsyncFHIRClient(live_server.fhir_url, authorization=f"Bearer {token}")
        search = fhir.resources("Observation").search(patient=patient).limit(3)
        total = await search.count()
        assert total > 3
        assert len(await search.fetch_all()) == total
        assert len([r async for r in search]) == total
        identifier = f"H-{uuid.uuid4().hex[:8]}"
        conditional = fhir.resources("Observation").search(identifier=f"{OBSERVATION_SYSTEM}|{identifier}")
        first, created = await conditional.get_or_create(
            fhir.resource("Observation", **_height(patient, identifier))
        )
        second, created_again = await conditional.get_or_create(
            fhir.resource("Observation", **_height(patient, identifier))
        )
        assert created and not created_again and first.id == second.id

    asyncio.run(flow())


def _smart(live_server: LiveServer, party: Any, scope: str, purposes: tuple[str, ...] = ()) -> Any:
    """fhirclient configured as its documentation says for backend services: a signed assertion."""
    assertion = sign_client_assertion(
        party.key,
        client_id=party.client_id,
        token_url=f"{live_server.base_url}/auth/token",
        purposes=purposes,
    )
    settings = {
        "app_id": party.client_id,
        "api_base": live_server.fhir_url + "/",
        "scope": scope,
        "jwt_token": assertion,
    }
    smart = smart_client.FHIRClient(settings=settings)
    smart.prepare()  # reads the CapabilityStatement, finds the token endpoint
    smart.authorize()  # client_credentials with the assertion, asking for "launch/patient <scope>"
    assert smart.ready
    return smart


def test_fhirclient_logs_in_with_its_own_backend_services_code_and_reads(live_server: LiveServer) -> None:
    registry = live_server.registry
    clinic = registry.register("clinic", "clinic")
    # The example Consent names authority-a (registered before the Consent is written).
    authority = registry.register(
        "authority A", "authority", purposes=("PUBHLTH", "TREAT"), org_id="authority-a"
    )
    patients = _submit_all(live_server, live_server.token(clinic))
    patient_id = patients[CONSENTED.stem]

    smart = _smart(live_server, clinic, "system/*.rs")
    patient = SmartPatient.read(patient_id, smart.server)
    assert patient.id == patient_id and patient.identifier
    observations = list(
        SmartObservation.where(struct={"patient": patient_id}).perform_resources_iter(smart.server)
    )
    assert observations and all(o.subject.reference == f"Patient/{patient_id}" for o in observations)

    # Its purpose of use in the assertion's HL7 B2B extension: it sees what consent permits.
    smart_authority = _smart(live_server, authority, "system/*.rs", purposes=("PUBHLTH",))
    search = SmartPatient.where(struct={"_lastUpdated": "gt2000-01-01"})
    disclosed = list(search.perform_resources_iter(smart_authority.server))
    assert [p.id for p in disclosed] == [patient_id]


def test_fhirclient_without_a_usable_purpose_is_told_why(live_server: LiveServer) -> None:
    authority = live_server.registry.register("authority A", "authority", purposes=("PUBHLTH", "TREAT"))
    with pytest.raises(Exception) as refused:
        _smart(live_server, authority, "system/*.rs")
    response = getattr(refused.value, "response", None)
    assert response is not None and response.status_code == 400
    assert "purpose of use is required" in response.json()["error_description"]
