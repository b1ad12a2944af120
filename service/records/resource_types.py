"""Which resource types the store keeps, and where each names its migrant."""

from __future__ import annotations

# The element that points at the Patient, per type (FHIR R4).
SUBJECT_ELEMENT: dict[str, str] = {
    "Encounter": "subject",
    "Observation": "subject",
    "DiagnosticReport": "subject",
    "ImagingStudy": "subject",
    "Condition": "subject",
    "Immunization": "patient",
    "MedicationAdministration": "subject",
    "DocumentReference": "subject",
    "Consent": "patient",
    "Specimen": "subject",
}
STORED_TYPES = frozenset({"Patient", "Provenance", *SUBJECT_ELEMENT})
# Written by the service alone (a Provenance per migrant for every write, naming the clinic,
# its client and the person): a client that could write one could forge who wrote what.
SERVICE_WRITTEN_TYPES = frozenset({"Provenance"})
# Types with an ``identifier`` element (R4): searchable by it and conditionally creatable.
# Provenance has none (and is written by the service alone).
IDENTIFIED_TYPES = STORED_TYPES - {"Provenance"}

# The element holding the clinical date used by the `date` search parameter.
DATE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Encounter": ("period.start",),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "Immunization": ("occurrenceDateTime",),
    "Condition": ("recordedDate", "onsetDateTime"),
    "ImagingStudy": ("started",),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "DocumentReference": ("date",),
    "Consent": ("dateTime",),
}

# The CodeableConcept element searched by `code`.
CODE_ELEMENTS: dict[str, str] = {
    "Observation": "code",
    "DiagnosticReport": "code",
    "Condition": "code",
    "Immunization": "vaccineCode",
    "Encounter": "type",
    "MedicationAdministration": "medicationCodeableConcept",
    "DocumentReference": "type",
}
