"""One validation finding, as it becomes an OperationOutcome issue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue. ``diagnostics`` never contains submitted data.

    ``basic`` marks a break of the base specification: unparseable, a wrong datatype, an
    element FHIR R4 itself requires missing, a code outside a required binding of the base.
    FHIR's REST API answers those 400 ("failed basic FHIR validation rules"); a resource that
    is valid FHIR but breaks a profile of the guide or a rule of this server is 422."""

    severity: str  # "error" | "warning"
    code: str  # FHIR issue-type code: structure, required, value, code-invalid, ...
    expression: str  # FHIRPath, e.g. Bundle.entry[2].resource.valueCodeableConcept
    diagnostics: str
    basic: bool = False
