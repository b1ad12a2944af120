"""Plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a lot per request).

One layer does what every request needs: a request id, ``Cache-Control: no-store``
unless the route chose otherwise, the body size limit
(enforced while the body streams in, so an oversized body is never read
whole), the access log line and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.lifecycle import SHUTDOWN
from service.core.metrics import LATENCY, REQUESTS
from service.core.request_context import reset_request_id, set_request_id
from service.http.errors import FHIR_JSON, BodyTimeout, BodyTooLarge, OutcomeIssue, operation_outcome

access_log = logging.getLogger("mhr.access")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
# No path or query of this API holds a control character, and PostgreSQL refuses NUL in text:
# answered here, before any route, rather than as a database error deep inside one.
_CONTROL_IN_PATH = re.compile("[\x00-\x1f\x7f]")
_CONTROL_IN_QUERY = re.compile(rb"%(?:[01][0-9a-fA-F]|7[fF])|[\x00-\x1f\x7f]")


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
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout_seconds: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds

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
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    # Clinical and audit data must not stay in a browser, proxy or client cache:
                    # nothing is cacheable unless its route says so (the SMART configuration).
                    headers.append((b"cache-control", b"no-store"))
                if (status_holder.get("body_refused") or SHUTDOWN.draining) and not any(
                    k.lower() == b"connection" for k, _ in headers
                ):
                    # The rest of a refused body must not be read (and discarded) on this
                    # connection; and a draining server retires every connection it answers.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if _CONTROL_IN_PATH.search(scope.get("path", "")):
                await self._refuse(send_wrapper, 404, "not-found", "no such endpoint or resource")
                return
            if _CONTROL_IN_QUERY.search(scope.get("query_string", b"")):
                await self._refuse(send_wrapper, 400, "invalid", "the query string holds a control character")
                return
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._too_large(send_wrapper)
                return
            received = 0
            body_done = False
            # The whole body must arrive by this deadline: a slow client cannot hold a worker.
            body_deadline = started + self.body_timeout_seconds

            async def limited_receive() -> Message:
                nonlocal received, body_done
                if body_done:  # after the body only http.disconnect can come: no deadline
                    return await receive()
                remaining = body_deadline - time.perf_counter()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        message = await receive()
                except TimeoutError:
                    status_holder["body_refused"] = True
                    raise BodyTimeout(self.body_timeout_seconds) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        status_holder["body_refused"] = True
                        raise BodyTooLarge(self.max_body_bytes)
                    body_done = not message.get("more_body", False)
                else:
                    body_done = True
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except BodyTooLarge:
                if not status_holder["started"]:
                    await self._too_large(send_wrapper)
            except BodyTimeout as exc:
                if not status_holder["started"]:
                    await self._refuse(send_wrapper, 408, "timeout", str(exc.detail))
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
        await self._refuse(
            send, 413, "too-costly", f"request body exceeds the limit of {self.max_body_bytes} bytes"
        )

    async def _refuse(self, send: Send, status: int, code: str, text: str) -> None:
        body = orjson.dumps(operation_outcome([OutcomeIssue(code, text)]))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", FHIR_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
