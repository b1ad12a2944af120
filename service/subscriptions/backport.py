"""The Subscriptions R5 Backport IG 1.1.0 (R4) identifiers this service reads and writes."""

from __future__ import annotations

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
SUBSCRIPTION_PROFILE = IG + "backport-subscription"
NOTIFICATION_PROFILE = IG + "backport-subscription-notification-r4"
STATUS_PROFILE = IG + "backport-subscription-status-r4"

PAYLOAD_CONTENT = IG + "backport-payload-content"  # on Subscription.channel._payload
HEARTBEAT_PERIOD = IG + "backport-heartbeat-period"  # on Subscription.channel, seconds
TIMEOUT = IG + "backport-timeout"  # on Subscription.channel, seconds
MAX_COUNT = IG + "backport-max-count"  # on Subscription.channel: events per notification
FILTER_CRITERIA = IG + "backport-filter-criteria"  # on Subscription._criteria
TOPIC_CANONICAL = IG + "capabilitystatement-subscriptiontopic-canonical"

# Payload contents: "full-resource" exists in the IG, and is refused here (no PHI is pushed).
ID_ONLY, EMPTY, FULL_RESOURCE = "id-only", "empty", "full-resource"
OFFERED_CONTENTS = (ID_ONLY, EMPTY)

# Notification types (SubscriptionStatus.type).
HANDSHAKE = "handshake"
HEARTBEAT = "heartbeat"
EVENT_NOTIFICATION = "event-notification"
QUERY_STATUS = "query-status"
QUERY_EVENT = "query-event"
NOTIFICATION_TYPES = (HANDSHAKE, HEARTBEAT, EVENT_NOTIFICATION, QUERY_STATUS, QUERY_EVENT)
