"""One POST of a notification to a rest-hook endpoint, and what came of it as a fixed code.

The endpoint URL and the channel headers are the authority's secrets (a header often carries a
bearer token; a URL may carry one in its query): they are never logged, never put in an error
message, an audit entry or a job. What leaves this module is an outcome code such as
``delivered``, ``http-503``, ``timeout`` or ``unreachable``.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

DELIVERED = "delivered"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
REFUSED_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class Channel:
    """Where and how a subscription's notifications go (held in memory for one job only)."""

    endpoint: str
    headers: tuple[str, ...]  # "Name: value", decrypted
    payload_type: str
    timeout_seconds: float
    connect_timeout_seconds: float


def _headers(channel: Channel) -> dict[str, str]:
    headers = {"Content-Type": f"{channel.payload_type}; charset=utf-8"}
    for header in channel.headers:
        name, _, value = header.partition(":")
        name = name.strip()
        # The framing headers are ours to set: a subscriber's value could break the request.
        if name and name.lower() not in REFUSED_HEADERS:
            headers[name] = value.strip()
    return headers


async def post_notification(client: httpx.AsyncClient, channel: Channel, bundle: dict[str, Any]) -> str:
    """POST ``bundle``; a 2xx answer is ``delivered``, anything else a failure code."""
    timeout = httpx.Timeout(
        channel.timeout_seconds, connect=min(channel.connect_timeout_seconds, channel.timeout_seconds)
    )
    try:
        # httpx's timeouts are per phase (a receiver trickling its answer resets the read one);
        # the whole POST is bounded too, so that a delivery claim held for the timeout suffices.
        async with asyncio.timeout(channel.timeout_seconds):
            response = await client.post(
                channel.endpoint, content=orjson.dumps(bundle), headers=_headers(channel), timeout=timeout
            )
    except (httpx.TimeoutException, TimeoutError):
        return TIMEOUT
    except (httpx.HTTPError, ValueError):
        # Connection refused or reset, DNS, TLS, an endpoint httpx cannot use: all "unreachable"
        # (the exception's text names the endpoint, so it is not kept).
        return UNREACHABLE
    return DELIVERED if 200 <= response.status_code < 300 else f"http-{response.status_code}"


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for the process (the trust store read once): building it took 18 ms, and
    each delivery job built one with its client."""
    return httpx.create_ssl_context(trust_env=False)


def new_client() -> httpx.AsyncClient:
    """A client for one job's POSTs: no redirects followed (a 3xx is a failure: a receiver that
    moved updates its subscription), no cookies kept, certificates verified. Its connections
    are its own (none is reused by another job); only the TLS configuration is shared."""
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=_tls())
