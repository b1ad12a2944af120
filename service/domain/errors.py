"""What a use-case refuses, in the service's own terms: no HTTP status, no OperationOutcome.

Use-cases (records intake and reading, erasure, keys, identity) raise these; the one HTTP
boundary, ``service.http.errors``, maps each kind to its status and default FHIR issue code. A use-case
names only what went wrong and where (``expression``); when the FHIR issue type says more than
the kind's default (``duplicate``, ``business-rule``, ``multiple-matches``) it passes ``code``.
Diagnostics are read by clients and land in audit details: never PHI, never exception text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request, as the use-case saw it."""

    diagnostics: str
    expression: str | None = None
    code: str | None = None  # a FHIR issue type finer than the kind's default
    severity: str = "error"


class DomainError(Exception):
    """A refusal a use-case raises; its kind (the subclass) decides the answer's status."""

    def __init__(self, diagnostics: str, *, expression: str | None = None, code: str | None = None) -> None:
        self.problems: tuple[Problem, ...] = (Problem(diagnostics, expression, code),)
        super().__init__(diagnostics)

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> Self:
        """One refusal listing several problems (a resource failing several validation rules)."""
        error = cls(problems[0].diagnostics)
        error.problems = tuple(problems)
        return error

    def __str__(self) -> str:
        return "; ".join(p.diagnostics for p in self.problems)


class Invalid(DomainError):
    """The request breaks FHIR's basic rules or the operation's own (malformed, missing parts)."""


class Unprocessable(DomainError):
    """Well-formed, but breaks a profile or a business rule of the record."""


class NotFound(DomainError):
    """Absent, or not the caller's to see: one answer for both, so there is no existence oracle."""


class Gone(DomainError):
    """It existed and was erased or completed on purpose: asking again will not bring it back."""


class Conflict(DomainError):
    """The current state does not allow it (an open request, a hold, a key in use)."""


class TooCostly(DomainError):
    """More than the service takes in one request (entries of a transaction, a page)."""


class PreconditionFailed(DomainError):
    """A condition the caller stated (If-Match, ifNoneExist) does not hold."""


class Forbidden(DomainError):
    """This caller may never do this to this record (a rule of the use-case, not of the token)."""


class NotSupported(DomainError):
    """The interaction does not exist for this type; ``allowed`` names the methods that do."""

    def __init__(
        self,
        diagnostics: str,
        *,
        allowed: Sequence[str] = (),
        expression: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(diagnostics, expression=expression, code=code)
        self.allowed = tuple(allowed)


class Unavailable(DomainError):
    """It cannot be done now, but can be later or by an operator (a retired key-encryption key)."""


class IntegrityFailure(DomainError):
    """Stored data failed its integrity check: answered opaquely, logged as an integrity event."""
