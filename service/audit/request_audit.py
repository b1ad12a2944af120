"""What the refusal chokepoint needs to know about the request in flight.

The ASGI layer `service.api.refusal_audit` opens one `RequestAudit` per HTTP
request; code below it (authentication, the session dependencies, the recorder
and the audit writer) says on it who the caller is and whether the request's
own entries are on the record. When the response is a refusal and nothing
recorded it, the chokepoint writes its entry. Outside a request (the CLI, the
integrator) there is none and every function here is a no-op.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from service.audit.events import AuditAgent, AuditRecord


@dataclass
class RequestAudit:
    agent: AuditAgent | None = None  # the authenticated caller, once known
    purpose: str | None = None
    # Refusal entries built by the code that refused (with entities, the consent decision ...).
    handed: list[AuditRecord] = field(default_factory=list)
    committed: bool = False  # an entry of this request is committed
    in_transaction: bool = False  # an entry waits in the request's transaction
    authenticated: bool = False  # authentication ran for this request (succeeded or not)
    throttled: bool = False  # refused by a rate limit: aggregated, not one entry each
    reason: str | None = None  # a fixed reason code for the refusal, never request data


_current: ContextVar[RequestAudit | None] = ContextVar("request_audit", default=None)


def begin() -> tuple[RequestAudit, object]:
    state = RequestAudit()
    return state, _current.set(state)


def end(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current() -> RequestAudit | None:
    return _current.get()


def identified(agent: AuditAgent, purpose: str | None) -> None:
    state = _current.get()
    if state is not None:
        state.agent, state.purpose, state.authenticated = agent, purpose, True


def hand_over(record: AuditRecord) -> None:
    """A refusal's own entry, for the chokepoint to write (the request's transaction rolls back)."""
    state = _current.get()
    if state is not None:
        state.handed.append(record)


def entry_committed() -> None:
    state = _current.get()
    if state is not None:
        state.committed = True


def entry_in_transaction() -> None:
    state = _current.get()
    if state is not None:
        state.in_transaction = True


def transaction_ended(committed: bool) -> None:
    state = _current.get()
    if state is not None:
        if committed and state.in_transaction:
            state.committed = True
        state.in_transaction = False


def refusal_reason(reason: str, *, throttled: bool = False) -> None:
    state = _current.get()
    if state is not None:
        state.reason = reason
        state.throttled = state.throttled or throttled


def authentication_attempted() -> None:
    state = _current.get()
    if state is not None:
        state.authenticated = True
