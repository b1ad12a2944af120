"""The subscription topics this service publishes.

R4 has no SubscriptionTopic resource: in the backport a topic is a canonical URL that both sides
know. Their definitions are published in ``fhir/`` as R4 ``Basic`` resources carrying the R5
SubscriptionTopic elements as cross-version extensions (the IG's advice for R4 servers), and listed
in the CapabilityStatement with the IG's ``capabilitystatement-subscriptiontopic-canonical``
extension. The canonical base is fixed, like every canonical: it names the topic, not a server.
"""

from __future__ import annotations

from enum import StrEnum

TOPIC_BASE = "https://mhr.example.org/fhir/SubscriptionTopic/"


class Topic(StrEnum):
    # A resource version became visible to the authority: a new exam, a correction, or a new
    # consent that admits records to it. Focus: the version.
    record_visible = TOPIC_BASE + "record-visible"
    # A consent that admitted records to the authority, and under which it received data, was
    # withdrawn or narrowed. Focus: the Consent version that withdrew or narrowed.
    consent_withdrawn = TOPIC_BASE + "consent-withdrawn"
    # Follow-up tasks (service.tasks publishes these). Focus: the Task.
    task_assigned = TOPIC_BASE + "task-assigned"
    task_overdue = TOPIC_BASE + "task-overdue"

    @property
    def code(self) -> str:
        return self.value.removeprefix(TOPIC_BASE)


def topic_of(canonical: str) -> Topic | None:
    """The topic a Subscription's ``criteria`` names (a ``|version`` suffix is allowed), or None."""
    url = canonical.split("|", 1)[0]
    try:
        return Topic(url)
    except ValueError:
        return None
