"""FHIR validation for submitted resources: R4B structure plus the profiles in ``fhir/``.

Load once at start-up (``ProfileValidator.load(Path("fhir"))``) and share the instance; it is
read-only after loading and safe to use from several threads.
"""

from service.fhir_validation.ig import IGError, ImplementationGuide
from service.fhir_validation.issue import Issue
from service.fhir_validation.validator import AUTO_APPLY_URL, ProfileValidator

__all__ = ["AUTO_APPLY_URL", "IGError", "ImplementationGuide", "Issue", "ProfileValidator"]
