"""The documented bulk path: exams written in-process through the service's own Intake use-case.

This path runs exactly what ``POST /fhir`` runs after authentication (the
Intake use-case: profile validation, ifNoneExist, reference checks, subject
keys, AES-256-GCM envelope encryption, blind indexes, Provenance, consent
grants, one audit entry per exam), but without HTTP, in one process per core,
with ``--batch`` exams per database transaction (fewer commits; an exam that
fails takes its batch with it, and the next run resumes). ``--no-validate``
skips the profile validation, for generated exams already known to pass it.

    python -m bench.bulk_load --db mhr_bench_scale --keyring K --parties DIR --start 1000 --count 99000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench.generate import exam, small_exam
from bench.parties import database_url, load, psql
from service.audit.recorder import record_audit
from service.core.request_context import SOURCE
from service.core.settings import Environment, Settings
from service.fhir_validation import Issue
from service.identity.repository import IdentityRepository
from service.records.context import Actor
from service.records.intake import Intake
from service.records.repository import RecordRepository
from service.runtime.providers import build_runtime, close_runtime

ANALYZE_GROWTH = 1.25


class _Trusting:
    """A validator that accepts everything: for exams from the generator, which validate clean.
    The profiles a stored resource declares are still the real validator's answer, so that a
    bulk-loaded exam reads exactly like one posted."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def applicable_profiles(self, resource: Any) -> list[str]:
        return list(self.real.applicable_profiles(resource))

    def validate_bundle(self, bundle: Any) -> list[Issue]:
        return []

    def validate(self, resource: Any) -> list[Issue]:
        return []


def _settings(db: str, keyring: Path) -> Settings:
    return Settings(
        env=Environment.development,
        database_url=database_url(db),
        public_base_url="http://127.0.0.1:8000",
        keyring_path=keyring,
        log_level="WARNING",
    )


async def _load(
    db: str,
    keyring: Path,
    parties_dir: Path,
    indexes: range,
    seed: int,
    shape: str,
    batch: int,
    validate: bool,
) -> int:
    runtime = build_runtime(_settings(db, keyring))
    if not validate:
        runtime.records = replace(runtime.records, validator=_Trusting(runtime.records.validator))  # type: ignore[arg-type]
    clinic = load(parties_dir)["clinic"]
    actor = Actor(clinic.client_id, clinic.organization_id, "clinic", person="bench-bulk-load")
    make = small_exam if shape == "small" else exam
    now = datetime.now(UTC)
    done = 0
    try:
        for start in range(indexes.start, indexes.stop, batch):
            async with runtime.database.transaction() as session:
                for index in range(start, min(start + batch, indexes.stop)):
                    bundle = make(index, seed, now)
                    if await _loaded(runtime.records.indexer, RecordRepository(session), actor, bundle):
                        continue  # loaded by an earlier, interrupted run: loading resumes
                    intake = Intake(runtime.records, RecordRepository(session), IdentityRepository(session))
                    result = await intake.transaction(bundle, actor)
                    await record_audit(
                        session,
                        result.transaction_record(actor, detail="bench-bulk-load"),
                        request_id=f"bench-bulk-{index}",
                        source=SOURCE,
                    )
                    done += 1
    finally:
        await close_runtime(runtime)
    return done


async def _loaded(indexer: Any, repo: RecordRepository, actor: Actor, bundle: dict[str, Any]) -> bool:
    """Whether this exam's migrant (by passport, as ``ifNoneExist`` finds it) is already stored."""
    query = bundle["entry"][0]["request"]["ifNoneExist"]
    system, _, value = query.removeprefix("identifier=").partition("|")
    found = await repo.resources_with_identifier(
        actor.organization_id, "Patient", indexer.identifier(system, value)
    )
    return bool(found)


def _worker(args: tuple[str, Path, Path, range, int, str, int, bool]) -> int:
    # uvloop, as the server runs: asyncio's pure-Python transports cost the loader half its CPU
    # in asyncpg's executemany writes.
    return uvloop.run(_load(*args))


def bulk_load(
    db: str,
    keyring: Path,
    parties_dir: Path,
    *,
    start: int,
    count: int,
    seed: int = 1,
    shape: str = "small",
    batch: int = 16,
    processes: int | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """Load ``count`` exams numbered from ``start``; returns what was done and how long it took."""
    processes = processes or os.cpu_count() or 1
    # Interleaved slices of whole batches, so that every process has the same mix of shapes.
    chunk = batch * 16  # each job builds a runtime (IG, validator): not too often
    jobs = [
        (db, keyring, parties_dir, range(s, min(s + chunk, start + count)), seed, shape, batch, validate)
        for s in range(start, start + count, chunk)
    ]
    began = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    loaded = 0
    analyzed_at = max(start, 100)  # exams in the database when the statistics were last taken
    with ctx.Pool(processes) as pool:
        for done in pool.imap_unordered(_worker, jobs):
            loaded += done
            # Planner statistics as autovacuum keeps them (it is off on this machine): taken again
            # each time the tables have grown by a quarter. Without them the plans made for the
            # nearly empty tables stay, and the load slows as it grows (a grant lookup driven from
            # the organization scans every grant: 33 -> 100 exams/s at 8k). Not more often: each
            # ANALYZE reads a sample of every table, and the load waits for those reads.
            if start + loaded >= analyzed_at * ANALYZE_GROWTH:
                psql(db, "ANALYZE")
                analyzed_at = start + loaded
    seconds = time.perf_counter() - began
    return {
        "exams": loaded,
        "shape": shape,
        "seconds": round(seconds, 1),
        "exams_per_s": round(loaded / seconds, 1),
        "processes": processes,
        "batch": batch,
        "validated": validate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--keyring", type=Path, required=True)
    parser.add_argument("--parties", type=Path, required=True, help="directory with parties.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shape", choices=("full", "small"), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--processes", type=int)
    parser.add_argument("--no-validate", dest="validate", action="store_false")
    args = parser.parse_args(argv)
    print(
        bulk_load(
            args.db,
            args.keyring,
            args.parties,
            start=args.start,
            count=args.count,
            seed=args.seed,
            shape=args.shape,
            batch=args.batch,
            processes=args.processes,
            validate=args.validate,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
