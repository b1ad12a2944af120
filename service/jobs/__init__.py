"""Durable background work: a transactional outbox that workers lease, retry and give up on.

A use-case that causes work calls :func:`enqueue` with the session of the change that causes it
(it never commits: the request owns the transaction), so the job exists exactly when the change
does: a rolled-back request leaves no job, a committed one cannot lose it. Workers (inside
``mhr serve`` and in ``mhr worker``, service.app.background) lease due jobs, PostgreSQL with
``FOR UPDATE SKIP LOCKED``, SQLite under its single writer (every transaction there begins
IMMEDIATE); a lease expires, so a job whose worker was killed is taken over. A failure is retried
with exponential backoff and jitter up to the kind's ``max_attempts``, then the job is ``dead``
with its reason, for an operator (``mhr jobs list --state dead``, ``mhr jobs retry ID``).

Exactly once: a handler runs inside the transaction that marks its job done, and that
transaction first checks, row-locked, that this worker still holds the lease. An effect in the
database therefore commits together with the job's completion or not at all; a repeat after a
crash finds nothing half-done. An effect outside the database (a delivery to a peer) must carry
the job's ``idempotency_key`` so that the peer can ignore a repeat.

No PHI in jobs: a payload carries pseudonymous ids (subject, resource and organization ids) and
parameters, never names, dates of birth, identifiers, clinical content or keys. The jobs table is
not encrypted, ``mhr jobs list`` shows payloads to operators, and dead jobs outlive the data they
name. The error kept for a failure is the exception's type and, only for a :class:`JobError`,
its message (written for operators); other exceptions' text may quote data and is never stored.

Why a table of our own: no well-kept library serves both PostgreSQL and SQLite and enqueues in
the caller's SQLAlchemy transaction. procrastinate, pgqueuer and PgQueuer-style queues are
PostgreSQL only; saq, arq, rq and dramatiq need Redis or RabbitMQ (a second store, and no
transactional enqueue); Celery's SQLAlchemy transport is experimental and outside our transaction;
huey's SQLite storage is synchronous and has no PostgreSQL one.
"""

from service.jobs.kinds import JobContext, JobError, JobKind, PermanentJobError
from service.jobs.queue import enqueue

__all__ = ["JobContext", "JobError", "JobKind", "PermanentJobError", "enqueue"]
