"""Sensitive codes and security labels withhold a resource from an authority until a consent names them.

Issue 11 items 2 and 3, end to end on both databases: a clinic submits resources carrying codes of
each sensitive family (in every stored type that can carry them) or security labels of its own; an
authority whose consent names no label gets 404 on read, does not find them by search or in
`$everything`; once a consent names the label, it gets them. Labels the service cannot grant
(confidentiality V, unknown codes or systems) stay withheld whatever the consent names.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

from service.records.relabel import RelabelCounts, relabel
from service.store.database import Database

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ATC = "http://www.whocc.no/atc"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def consent(patient_id: str, organization_id: str) -> dict[str, Any]:
    """An active consent to disclose everything (no sensitive label) to one authority for PUBHLTH."""
    today = datetime.now(UTC).date()
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": cc("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
        "category": [cc(LOINC, "59284-0")],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": (today - timedelta(days=30)).isoformat(),
        "policy": [{"uri": "https://mhr.example.org/fhir/policy/voluntary-consent"}],
        "provision": {
            "type": "permit",
            "period": {
                "start": (today - timedelta(days=30)).isoformat(),
                "end": (today + timedelta(days=365)).isoformat(),
            },
            "actor": [
                {
                    "role": cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP"),
                    "reference": {"reference": f"Organization/{organization_id}"},
                }
            ],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "PUBHLTH"}],
        },
    }


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _resource(resource_type: str, element: str, concept: dict[str, Any], patient: str) -> dict[str, Any]:
    """A minimal valid resource of this type with ``concept`` in ``element``."""
    subject = {"reference": f"Patient/{patient}"}
    when = "2025-03-05T14:00:00+01:00"
    base: dict[str, Any] = {
        "Observation": {
            "status": "final",
            "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
            "code": cc(LOINC, "29463-7"),
            "subject": subject,
            "effectiveDateTime": when,
            "valueCodeableConcept": cc(SNOMED, "131194007"),  # non-reactive
        },
        "Condition": {"subject": subject, "recordedDate": when},
        "DiagnosticReport": {
            "status": "final",
            "code": cc(LOINC, "11502-2"),
            "subject": subject,
            "issued": when,
        },
        "MedicationAdministration": {
            "status": "completed",
            "medicationCodeableConcept": cc(ATC, "J04AC01"),  # isoniazid
            "subject": subject,
            "effectiveDateTime": when,
        },
        "Immunization": {
            "status": "completed",
            "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "88"),
            "patient": subject,
            "occurrenceDateTime": when,
        },
        "DocumentReference": {
            "status": "current",
            "subject": subject,
            "date": when,
            "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="}}],
        },
        "ImagingStudy": {"status": "available", "subject": subject, "started": when},
    }[resource_type]
    resource = {"resourceType": resource_type, **base}
    if element in ("reasonCode", "category", "conclusionCode"):
        resource[element] = [concept]
    elif element == "component.code":
        resource["component"] = [{"code": concept, "valueString": "reactive"}]
    else:
        resource[element] = concept
    return resource


# (label a consent must name, resource type, element, system, code); every stored type that
# carries codes appears in each family, with the codes issue 11 item 3 found served unlabelled.
CODE_CASES: list[tuple[str, str, str, str, str]] = [
    ("HIV", "Condition", "code", SNOMED, "86406008"),
    ("HIV", "Observation", "code", LOINC, "56888-1"),
    ("HIV", "Observation", "code", LOINC, "7917-8"),
    ("HIV", "DocumentReference", "type", LOINC, "75622-1"),
    ("HIV", "DiagnosticReport", "conclusionCode", ICD10, "B20.1"),
    ("HIV", "MedicationAdministration", "medicationCodeableConcept", ATC, "J05AR03"),
    ("HIV", "Immunization", "reasonCode", ICD10CM, "Z21"),
    ("HIV", "ImagingStudy", "reasonCode", ICD10, "B22.0"),
    ("STD", "Condition", "code", ICD10, "A53.9"),
    ("STD", "Observation", "code", LOINC, "20507-0"),
    ("STD", "Observation", "component.code", LOINC, "24111-7"),
    ("STD", "DiagnosticReport", "code", LOINC, "21613-5"),
    ("STD", "DocumentReference", "category", SNOMED, "76272004"),
    ("STD", "MedicationAdministration", "reasonCode", ICD10CM, "A54.00"),
    ("PSY", "Condition", "code", SNOMED, "35489007"),
    ("PSY", "Condition", "category", ICD10, "F43.1"),
    ("PSY", "Observation", "valueCodeableConcept", ICD10CM, "F32.A"),
    ("PSY", "DocumentReference", "type", SNOMED, "47505003"),
    ("PSY", "MedicationAdministration", "reasonCode", ICD10, "F20.0"),
    ("SUD", "Condition", "code", SNOMED, "7200002"),
    ("SUD", "Observation", "valueCodeableConcept", ICD10, "F10.2"),
    ("SUD", "DiagnosticReport", "conclusionCode", ICD10CM, "F11.20"),
    ("SUD", "MedicationAdministration", "reasonCode", SNOMED, "75544000"),
    ("SUD", "DocumentReference", "type", ICD10, "F15"),
]
FAMILIES = sorted({c[0] for c in CODE_CASES})

# (case, meta.security a clinic puts on an otherwise unremarkable Observation, labels to name, disclosable).
CLINIC_LABEL_CASES: list[tuple[str, list[dict[str, str]], tuple[tuple[str, str], ...], bool]] = [
    ("STD", [{"system": ACT_CODE, "code": "STD"}], ((ACT_CODE, "STD"),), True),
    ("MH", [{"system": ACT_CODE, "code": "MH"}], ((ACT_CODE, "MH"),), True),
    ("SDV", [{"system": ACT_CODE, "code": "SDV"}], ((ACT_CODE, "SDV"),), True),
    ("ETH read as SUD", [{"system": ACT_CODE, "code": "ETH"}], ((ACT_CODE, "SUD"),), True),
    ("R alone", [{"system": CONFIDENTIALITY, "code": "R"}], ((CONFIDENTIALITY, "R"),), True),
    ("V", [{"system": CONFIDENTIALITY, "code": "V"}], ((CONFIDENTIALITY, "V"),), False),
    (
        "HIV and V",
        [{"system": ACT_CODE, "code": "HIV"}, {"system": CONFIDENTIALITY, "code": "V"}],
        ((ACT_CODE, "HIV"), (CONFIDENTIALITY, "V")),
        False,
    ),
    ("sensitivity code not grantable", [{"system": ACT_CODE, "code": "SEX"}], ((ACT_CODE, "SEX"),), False),
    ("refrain policy", [{"system": ACT_CODE, "code": "NODSCLCD"}], ((ACT_CODE, "NODSCLCD"),), False),
    (
        "unknown system",
        [{"system": "urn:clinic:labels", "code": "HIV"}],
        (("urn:clinic:labels", "HIV"),),
        False,
    ),
]


@dataclass
class World:
    service: Service
    clinic: Party
    authority: Party
    patient: str
    baseline: set[str]  # ids of the exam's resources an authority sees without naming a label

    def post_consent(self, labels: tuple[tuple[str, str], ...] = ()) -> None:
        body = consent(self.patient, self.authority.organization_id)
        if labels:
            body["provision"]["securityLabel"] = [{"system": s, "code": c} for s, c in labels]
        response = self.service.client.post(
            "/fhir/Consent",
            content=json.dumps(body),
            headers={**FHIR_HEADERS, **self.service.headers(self.clinic)},
        )
        assert response.status_code == 201, response.text

    def write(self, resources: list[dict[str, Any]]) -> list[str]:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                    "resource": r,
                    "request": {"method": "POST", "url": r["resourceType"]},
                }
                for i, r in enumerate(resources)
            ],
        }
        reply = submit(self.service, self.clinic, bundle)
        assert reply.status_code == 200, reply.text
        return [e["response"]["location"].split("/")[1] for e in reply.json()["entry"]]

    def _get(self, path: str, **params: str) -> Any:
        return self.service.client.get(path, params=params, headers=self.service.headers(self.authority))

    def read(self, resource_type: str, resource_id: str) -> int:
        return int(self._get(f"/fhir/{resource_type}/{resource_id}").status_code)

    def search_ids(self, resource_type: str) -> set[str]:
        body = self._get(f"/fhir/{resource_type}", patient=self.patient, _count="100").json()
        return {e["resource"]["id"] for e in body.get("entry", [])}

    def everything_ids(self) -> set[str]:
        response = self._get(f"/fhir/Patient/{self.patient}/$everything", _count="1000")
        if response.status_code != 200:
            return set()
        return {e["resource"]["id"] for e in response.json().get("entry", [])}

    def sees(self, resource_type: str, resource_id: str) -> tuple[int, bool, bool]:
        """(read status, found by search, found in $everything)."""
        return (
            self.read(resource_type, resource_id),
            resource_id in self.search_ids(resource_type),
            resource_id in self.everything_ids(),
        )


@pytest.fixture
def world(service: Service) -> World:
    clinic = service.register("clinic", "clinic")
    authority = service.register("authority A", "authority", purposes=("PUBHLTH",))
    bundle = load_example(EXAMPLES[1])
    reply = submit(service, clinic, bundle)
    assert reply.status_code == 200, reply.text
    patient = next(
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    w = World(service, clinic, authority, patient, set())
    w.post_consent()  # names no label
    w.baseline = w.everything_ids()
    assert patient in w.baseline
    return w


WITHHELD = (404, False, False)
SHOWN = (200, True, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitive_codes_are_withheld_until_the_consent_names_the_label(world: World, family: str) -> None:
    cases = [c for c in CODE_CASES if c[0] == family]
    resources = [
        _resource(rtype, element, cc(system, code), world.patient)
        for _, rtype, element, system, code in cases
    ]
    ids = world.write(resources)
    everything = world.everything_ids()
    for (_, rtype, element, _system, code), rid in zip(cases, ids, strict=True):
        assert world.sees(rtype, rid) == WITHHELD, (rtype, element, code)
        assert rid not in everything
    # The clinic's copy says why: the label and confidentiality R are on meta.security.
    stored = world.service.client.get(
        f"/fhir/{cases[0][1]}/{ids[0]}", headers=world.service.headers(world.clinic)
    ).json()
    assert {(c["system"], c["code"]) for c in stored["meta"]["security"]} == {
        (ACT_CODE, family),
        (CONFIDENTIALITY, "R"),
    }

    world.post_consent(((ACT_CODE, family),))
    for (_, rtype, element, _system, code), rid in zip(cases, ids, strict=True):
        assert world.sees(rtype, rid) == SHOWN, (rtype, element, code)


def test_other_families_are_not_opened_by_naming_one(world: World) -> None:
    resources = [
        _resource(rtype, element, cc(system, code), world.patient)
        for _, rtype, element, system, code in CODE_CASES
    ]
    ids = world.write(resources)
    world.post_consent(((ACT_CODE, "HIV"),))
    everything = world.everything_ids()
    for (label, _rtype, _element, _system, code), rid in zip(CODE_CASES, ids, strict=True):
        assert (rid in everything) is (label == "HIV"), (label, code)


@pytest.mark.parametrize(
    ("case", "security", "names", "disclosable"), CLINIC_LABEL_CASES, ids=[c[0] for c in CLINIC_LABEL_CASES]
)
def test_labels_a_clinic_puts_on_fail_closed(
    world: World,
    case: str,
    security: list[dict[str, str]],
    names: tuple[tuple[str, str], ...],
    disclosable: bool,
) -> None:
    plain = _resource("Observation", "code", cc(LOINC, "5196-1"), world.patient)  # HBsAg: not sensitive
    labelled = copy.deepcopy(plain)
    labelled["meta"] = {"security": security}
    plain_id, labelled_id = world.write([plain, labelled])
    assert world.sees("Observation", plain_id) == SHOWN
    assert world.sees("Observation", labelled_id) == WITHHELD
    world.post_consent(names)
    assert world.sees("Observation", labelled_id) == (SHOWN if disclosable else WITHHELD)
    # Naming every label a consent can grant changes nothing for a label it cannot.
    if not disclosable:
        every = [(ACT_CODE, c) for c in ("HIV", "MH", "PSY", "SDV", "STD", "SUD")]
        world.post_consent((*every, (CONFIDENTIALITY, "R"), *names))
        assert world.sees("Observation", labelled_id) == WITHHELD
    assert world.everything_ids() >= world.baseline | {plain_id}


def test_relabel_brings_rows_written_under_older_rules_in_line(world: World, database_url: str) -> None:
    """`mhr records relabel`: tokens computed by an older labeller (here: that of an unlabelled
    resource, which the old one gave STD labels and SNOMED HIV codes) are recomputed, versions
    written before labels were kept per version (no token) get theirs, and the grants follow
    the current grantable labels."""
    plain = _resource("Observation", "code", cc(LOINC, "5196-1"), world.patient)
    std = copy.deepcopy(plain)
    std["meta"] = {"security": [{"system": ACT_CODE, "code": "STD"}]}
    hiv = _resource("Condition", "code", cc(SNOMED, "86406008"), world.patient)
    plain_id, std_id, hiv_id = world.write([plain, std, hiv])
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.begin() as conn:
            old = conn.execute(
                sa.text("SELECT labels_token FROM resource_versions WHERE id = :id"), {"id": plain_id}
            ).scalar_one()
            conn.execute(
                sa.text("UPDATE resource_versions SET labels_token = :t WHERE id IN (:a, :b)"),
                {"t": old, "a": std_id, "b": hiv_id},
            )
            conn.execute(
                sa.text("UPDATE resource_versions SET labels_token = NULL WHERE id = :id"), {"id": plain_id}
            )
        assert world.sees("Observation", std_id) == SHOWN  # what the old rules let through
        assert world.sees("Condition", hiv_id) == SHOWN
        assert world.sees("Observation", plain_id) == WITHHELD  # no token: fails closed

        runtime = world.service.fastapi.state.runtime  # type: ignore[attr-defined]

        async def run(db: Database) -> RelabelCounts:
            return await relabel(db, runtime.records)

        counts = world.service._run(run)
        assert counts.migrants == 1
        assert counts.changed == 3
        assert world.sees("Observation", std_id) == WITHHELD
        assert world.sees("Condition", hiv_id) == WITHHELD
        assert world.sees("Observation", plain_id) == SHOWN
        assert world.service._run(run).changed == 0  # idempotent
        world.post_consent(((ACT_CODE, "STD"), (ACT_CODE, "HIV")))
        assert world.sees("Observation", std_id) == SHOWN
        assert world.sees("Condition", hiv_id) == SHOWN
    finally:
        engine.dispose()
