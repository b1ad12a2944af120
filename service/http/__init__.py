"""The request layer under every router: the ASGI middleware (request id, body limits,
per-route metrics, closing connections while draining), the one mapping of domain errors
and HTTP refusals to OperationOutcome, and per-client rate limits.

Routers and their plumbing import it; use-cases raise domain errors instead.
"""
