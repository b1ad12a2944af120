"""The Subscription resource, backport profile: what an authority may ask for, and how it reads back.

:func:`parse_subscription` turns a validated R4 Subscription into a :class:`SubscriptionRequest`
or refuses it with an OperationOutcome naming the element; :func:`render` builds the resource
from the stored columns (headers masked).

Kept: status, reason, criteria (a topic canonical), end, and the rest-hook channel (endpoint,
payload MIME type and content, header, heartbeat period, timeout, max count). Other elements
(contact, text) are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from service.domain.errors import Unprocessable
from service.store.tables import SubscriptionRow
from service.subscriptions.backport import (
    FILTER_CRITERIA,
    FULL_RESOURCE,
    HEARTBEAT_PERIOD,
    MAX_COUNT,
    OFFERED_CONTENTS,
    PAYLOAD_CONTENT,
    SUBSCRIPTION_PROFILE,
    TIMEOUT,
)
from service.subscriptions.headers import MASK, header_name, masked
from service.subscriptions.topics import Topic, topic_of

PAYLOAD_TYPES = ("application/fhir+json", "application/json")
MAX_HEADERS = 10
MAX_HEADER_CHARS = 1000
MAX_ENDPOINT_CHARS = 2000
MAX_REASON_CHARS = 1000
HEARTBEAT_RANGE = (60, 7 * 86400)  # seconds
TIMEOUT_RANGE = (1, 120)  # seconds
MAX_COUNT_RANGE = (1, 1000)  # events per notification (the default: 500)
CLIENT_STATUSES = ("requested", "active", "error", "off")


@dataclass(frozen=True)
class SubscriptionRequest:
    topic: Topic
    status: str  # as asked; the service decides what it becomes
    reason: str
    endpoint: str
    payload_type: str
    content: str
    headers: tuple[str, ...]
    heartbeat_seconds: int | None
    timeout_seconds: int | None
    max_count: int | None
    end: datetime | None
    resource_id: str | None


def _refuse(diagnostics: str, expression: str, code: str = "value") -> Unprocessable:
    return Unprocessable(diagnostics, expression=expression, code=code)


def _extensions(node: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for ext in node.get("extension", ()) if isinstance(node, dict) else ():
        if isinstance(ext, dict) and isinstance(ext.get("url"), str):
            found[ext["url"]] = ext
    return found


def _bounded(ext: dict[str, Any] | None, key: str, bounds: tuple[int, int], where: str) -> int | None:
    if ext is None:
        return None
    value = ext.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        raise _refuse(f"must be a whole number from {bounds[0]} to {bounds[1]}", where)
    return value


def _endpoint(value: Any, *, allow_http: bool) -> str:
    where = "Subscription.channel.endpoint"
    if not isinstance(value, str) or not value:
        raise _refuse("a rest-hook channel needs an endpoint", where, "required")
    if len(value) > MAX_ENDPOINT_CHARS:
        raise _refuse(f"an endpoint has at most {MAX_ENDPOINT_CHARS} characters", where)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise _refuse("the endpoint is not a URL", where) from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise _refuse(
            "the endpoint must be an https URL" if not allow_http else "the endpoint must be http(s)", where
        )
    if not parts.hostname or port == 0:
        raise _refuse("the endpoint must name a host", where)
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL would be stored and shown in clear: send them as a header.
        raise _refuse("put credentials in channel.header, not in the endpoint URL", where)
    if parts.fragment:
        raise _refuse("the endpoint cannot have a fragment", where)
    return value


def _headers(value: Any, stored: list[str]) -> tuple[str, ...]:
    where = "Subscription.channel.header"
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_HEADERS:
        raise _refuse(f"at most {MAX_HEADERS} headers", where)
    by_name = {header_name(h).lower(): h for h in stored}
    kept = []
    for index, header in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(header, str) or len(header) > MAX_HEADER_CHARS:
            raise _refuse(f"a header is a string of at most {MAX_HEADER_CHARS} characters", here)
        name, sep, rest = header.partition(":")
        if not sep or not name.strip() or any(c in header for c in "\r\n\x00") or not name.strip().isascii():
            raise _refuse("a header is 'Name: value' on one line", here)
        if rest.strip() == MASK:  # sent back as read: keep what is stored under this name
            original = by_name.get(name.strip().lower())
            if original is None:
                raise _refuse("a masked header names no stored header", here)
            kept.append(original)
        else:
            kept.append(f"{name.strip()}: {rest.strip()}")
    return tuple(kept)


def parse_subscription(
    resource: dict[str, Any], *, allow_http: bool, stored_headers: list[str] | None = None
) -> SubscriptionRequest:
    """The authority's request, checked; ``stored_headers`` (an update) resolve masked headers."""
    criteria = resource.get("criteria")
    if _extensions(resource.get("_criteria")).get(FILTER_CRITERIA) is not None:
        raise _refuse("these topics take no filter criteria", "Subscription.criteria", "not-supported")
    topic = topic_of(criteria) if isinstance(criteria, str) else None
    if topic is None:
        known = ", ".join(t.value for t in Topic)
        raise _refuse(
            f"criteria must be one of this server's topics: {known}", "Subscription.criteria", "not-supported"
        )
    channel = resource.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise _refuse("only the rest-hook channel is offered", "Subscription.channel.type", "not-supported")
    payload = channel.get("payload")
    if payload not in PAYLOAD_TYPES:
        raise _refuse(
            "channel.payload must be application/fhir+json", "Subscription.channel.payload", "not-supported"
        )
    content_ext = _extensions(channel.get("_payload")).get(PAYLOAD_CONTENT)
    content = content_ext.get("valueCode") if content_ext else None
    if content == FULL_RESOURCE:
        raise _refuse(
            "full-resource is not offered: notifications carry ids only (id-only or empty); "
            "fetch the resource with your own token",
            "Subscription.channel.payload",
            "not-supported",
        )
    if content not in OFFERED_CONTENTS:
        raise _refuse(
            f"channel._payload needs the {PAYLOAD_CONTENT} extension, id-only or empty",
            "Subscription.channel.payload",
            "required",
        )
    channel_ext = _extensions(channel)
    status = resource.get("status", "requested")
    if status not in CLIENT_STATUSES:
        raise _refuse("status is requested, active, error or off", "Subscription.status")
    reason = resource.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise _refuse(
            f"reason is required, at most {MAX_REASON_CHARS} characters", "Subscription.reason", "required"
        )
    end = resource.get("end")
    return SubscriptionRequest(
        topic=topic,
        status=status,
        reason=reason,
        endpoint=_endpoint(channel.get("endpoint"), allow_http=allow_http),
        payload_type=payload,
        content=str(content),
        headers=_headers(channel.get("header"), stored_headers or []),
        heartbeat_seconds=_bounded(
            channel_ext.get(HEARTBEAT_PERIOD),
            "valueUnsignedInt",
            HEARTBEAT_RANGE,
            "Subscription.channel.extension",
        ),
        timeout_seconds=_bounded(
            channel_ext.get(TIMEOUT), "valueUnsignedInt", TIMEOUT_RANGE, "Subscription.channel.extension"
        ),
        max_count=_bounded(
            channel_ext.get(MAX_COUNT), "valuePositiveInt", MAX_COUNT_RANGE, "Subscription.channel.extension"
        ),
        end=_end(end),
        resource_id=resource.get("id") if isinstance(resource.get("id"), str) else None,
    )


def _end(value: Any) -> datetime | None:
    """Subscription.end (a dateTime, already checked by the FHIR validator); a bare date or a
    time without zone is read as UTC."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _refuse("end must be a dateTime", "Subscription.end") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def render(row: SubscriptionRow, header_names: list[str]) -> dict[str, Any]:
    """The stored subscription as an R4 Subscription (backport profile); header values masked."""
    channel_ext: list[dict[str, Any]] = []
    if row.heartbeat_seconds is not None:
        channel_ext.append({"url": HEARTBEAT_PERIOD, "valueUnsignedInt": row.heartbeat_seconds})
    if row.timeout_seconds is not None:
        channel_ext.append({"url": TIMEOUT, "valueUnsignedInt": row.timeout_seconds})
    if row.max_count is not None:
        channel_ext.append({"url": MAX_COUNT, "valuePositiveInt": row.max_count})
    channel: dict[str, Any] = {}
    if channel_ext:
        channel["extension"] = channel_ext
    channel["type"] = "rest-hook"
    channel["endpoint"] = row.endpoint
    channel["payload"] = row.payload_type
    channel["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": row.payload_content}]}
    if header_names:
        channel["header"] = masked(header_names)
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": row.id,
        "meta": {
            "versionId": str(row.version_id),
            "lastUpdated": _instant(row.last_updated),
            "profile": [SUBSCRIPTION_PROFILE],
        },
        "status": row.status,
        "reason": row.reason,
        "criteria": row.topic,
        "channel": channel,
    }
    if row.end_at is not None:
        resource["end"] = _instant(row.end_at)
    if row.error:
        resource["error"] = row.error
    return resource
