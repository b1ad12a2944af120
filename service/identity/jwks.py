"""Fetching and caching clients' JWKS from their registered URLs."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from security.client_assertion import validate_public_jwks

log = logging.getLogger(__name__)
MAX_JWKS_BYTES = 64 * 1024


class JwksUnavailable(Exception):
    pass


class JwksCache:
    def __init__(self, *, timeout_seconds: float, ttl_seconds: int) -> None:
        self._timeout = timeout_seconds
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._lock = asyncio.Lock()

    async def keys(self, url: str, *, refresh: bool = False) -> list[dict[str, Any]]:
        entry = self._entries.get(url)
        # A kid miss may mean the client rotated keys: refetch, but not more than every 10 s.
        fresh_enough = entry is not None and (time.monotonic() - entry[0] < (10 if refresh else self._ttl))
        if entry is not None and fresh_enough:
            return entry[1]
        async with self._lock:
            keys = await self._fetch(url)
            self._entries[url] = (time.monotonic(), keys)
            return keys

    async def _fetch(self, url: str) -> list[dict[str, Any]]:
        try:
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
                response = await client.get(url, headers={"Accept": "application/json"})
                response.raise_for_status()
                if len(response.content) > MAX_JWKS_BYTES:
                    raise JwksUnavailable("JWKS too large")
                return validate_public_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("JWKS fetch failed", extra={"error_type": type(exc).__name__})
            raise JwksUnavailable("JWKS could not be fetched") from exc
