"""The request id, visible to logging and error handling without passing it around."""

from __future__ import annotations

import os
import socket
from contextvars import ContextVar

# This service instance, as named in audit entries (BALP source observer).
SOURCE = f"{socket.gethostname()}:{os.getpid()}"

_request_id: ContextVar[str] = ContextVar("request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(value: str) -> object:
    return _request_id.set(value)


def reset_request_id(token: object) -> None:
    _request_id.reset(token)  # type: ignore[arg-type]
