"""Plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a lot per request).

One layer does what every request needs: a request id, the body size limit
(enforced while the body streams in, so an oversized body is never read
whole), the access log line and the metrics.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import FHIR_JSON, BodyTooLarge, OutcomeIssue, operation_outcome
from service.metrics import LATENCY, REQUESTS
from service.request_context import reset_request_id, set_request_id

access_log = logging.getLogger("mhr.access")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbound = _header(scope, b"x-request-id")
        request_id = (
            inbound.decode()
            if inbound and _SAFE_REQUEST_ID.match(inbound.decode("latin-1"))
            else uuid.uuid4().hex
        )
        token = set_request_id(request_id)
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                # Ours replaces any the app set (the 500 handler names it too).
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._too_large(send_wrapper)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLarge(self.max_body_bytes)
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except BodyTooLarge:
                if not status_holder["started"]:
                    await self._too_large(send_wrapper)
            except Exception:
                # Starlette's error middleware has already logged it and sent the
                # opaque 500; re-raising would let the server log the message too.
                if not status_holder["started"]:
                    raise
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope["method"]
            status = status_holder["status"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(elapsed)
            # The route template, never the raw path or query: those can hold identifiers.
            access_log.info(
                "request",
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            reset_request_id(token)

    async def _too_large(self, send: Send) -> None:
        body = orjson.dumps(
            operation_outcome(
                [
                    OutcomeIssue(
                        "too-costly",
                        f"request body exceeds the limit of {self.max_body_bytes} bytes",
                    )
                ]
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", FHIR_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
