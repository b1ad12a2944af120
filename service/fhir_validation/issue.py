"""One validation finding, as it becomes an OperationOutcome issue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue. ``diagnostics`` never contains submitted data."""

    severity: str  # "error" | "warning"
    code: str  # FHIR issue-type code: structure, required, value, code-invalid, ...
    expression: str  # FHIRPath, e.g. Bundle.entry[2].resource.valueCodeableConcept
    diagnostics: str
