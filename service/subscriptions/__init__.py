"""FHIR Subscriptions (R5 Backport IG 1.1.0, for R4): topics, an authority's Subscriptions, events.

EDN's pattern: an authority is told, with ids only, that something concerns it, then pulls the
record with its own credentials, through the consent filter of every read.

- ``topics``: the topics this service publishes (canonical URLs; definitions in ``fhir/``).
- ``resource``: the Subscription resource as the backport profile shapes it, validated into
  :class:`~service.subscriptions.resource.SubscriptionRequest` (refusals as OperationOutcomes).
- ``repository``: SQL for subscriptions and their numbered events.
- ``events``: :func:`~service.subscriptions.events.publish`, called in the transaction of the
  change that causes an event; it numbers the events and enqueues their delivery
  (``outbox``: the ``subscription-delivery`` job kind, whose handler is the delivery worker's).
- ``changes``: which authorities a write concerns (the grant predicate, the same rule as reads)
  and the withdrawal notices, from the intake.
- ``notification``: ``subscription-notification`` Bundles (handshake, heartbeat, events, status).
- ``endpoints``: Subscription CRUD and search, ``$status`` and ``$events``.
"""
