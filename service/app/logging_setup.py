"""JSON log lines with the request id.

PHI must never reach a log: messages are fixed strings with pseudonymous ids,
URLs are logged without their query string, and tracebacks are written as
frames only, because an exception's message can quote submitted data.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

from service.core.request_context import current_request_id

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# uvicorn adds an ANSI-coloured copy of some messages: noise in a JSON line.
_SKIPPED = _STANDARD | {"color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": current_request_id(),
            "pid": record.process,  # which worker, when there are several
        }
        for key, value in vars(record).items():
            if key not in _SKIPPED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, _, tb = record.exc_info
            entry["error_type"] = exc_type.__name__
            entry["stack"] = [
                f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in traceback.extract_tb(tb)
            ]
        return orjson.dumps(entry, default=str).decode()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made: a stream swapped out and closed since (a test runner's capture, a redirect) would
    otherwise turn every later line, from any thread, into a "Logging error" traceback."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        return  # always the current sys.stderr


def configure_logging(level: str) -> None:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log prints the full URL (with query strings that can hold
    # identifiers); our ASGI layer writes a safe access line instead.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every URL it requests at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
