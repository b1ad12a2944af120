"""Bulk Data export (Bulk Data Access IG 3.0.0): ``$export`` for an authority, system-wide and
for the Groups the service maintains, run as a resumable background job.

- ``endpoints``: kick-off, status (poll, manifest, cancel) and file download; HTTP only.
- ``parameters``: the kick-off's parameters and ``Prefer`` header, checked.
- ``groups``: the Groups an authority has ("the Class B arrivals assigned to it"), and membership.
- ``step``: one checkpointed step of an export: a batch of migrants, decided per resource version
  by the one visibility predicate, masked, written out, accounted for.
- ``jobs``: the job kinds (export step, purge of expired files).
- ``files``: the encrypted output files (AES-256-GCM records under a per-export key).
- ``repository``: SQL on the exports' tables.
"""
