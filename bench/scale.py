"""The scale database: ``--scale`` exams loaded through the bulk path, kept between runs.

Composition: the first 1,000 exams are the full shape (the same seed as the
1k database the workloads run on, so ``Observation?patient=`` pages have the
same size at both scales); the rest are the small shape (see
``bench.generate.small_exam``). Every audit entry is sealed into the Merkle
log before the server starts, so that the integrator does not work during the
measurement.

Loading 100k exams takes a while (see README, "Performance"), so the database,
its keyring and a manifest are kept under ``bench/.state/scale``. A later run
reuses them when the generator is unchanged (a newer schema is reached by the
service's migrations) and the database already holds at least the requested count; otherwise it tops them up
(an interrupted load resumes: exams already stored are skipped) or rebuilds
them. The manifest records how each part was loaded and how long it took.

The kept database is never served: servers run on copies (:func:`copy`), which they
migrate at start. It is kept at the schema of a baseline when one is measured
(``bench.compare``), so that the baseline's copy starts at a revision it knows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bulk_load import _settings, bulk_load
from bench.parties import DB_PREFIX, database_url, psql, recreate_database, setup
from service.audit.log import seal_all
from service.runtime.providers import build_runtime, close_runtime
from service.store import migrate

BENCH = Path(__file__).resolve().parent
STATE = BENCH / ".state" / "scale"
DB = f"{DB_PREFIX}_scale"
FULL = 1000
SEED = 1


def _fingerprint() -> dict[str, Any]:
    return {
        "db": DB,
        "seed": SEED,
        "full": FULL,
        "generator": hashlib.sha256((BENCH / "generate.py").read_bytes()).hexdigest()[:16],
    }


def _exists() -> bool:
    sql = f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"  # noqa: S608 - a constant name
    return psql("postgres", sql) == "1"


def _seal(keyring: Path) -> float:
    async def run() -> None:
        runtime = build_runtime(_settings(DB, keyring))
        try:
            signer = runtime.log_signer
            await seal_all(runtime.database, signer, signer.name)
        finally:
            await close_runtime(runtime)

    began = time.perf_counter()
    asyncio.run(run())
    return round(time.perf_counter() - began, 1)


def ensure(
    target: int, log: Any = print, migrate_database: Callable[[str], None] = migrate.upgrade
) -> dict[str, Any]:
    """A scale database with at least ``target`` exams; returns its manifest.

    ``migrate_database`` sets the schema it is kept at: when a baseline is compared, the
    baseline's own (``bench.baseline.migrate``), so that identical copies serve both the
    baseline and the working tree (whose server migrates its copy further at start)."""
    manifest_path = STATE / "manifest.json"
    keyring = STATE / "keyring.json"
    manifest: dict[str, Any] | None = None
    if manifest_path.exists() and keyring.exists() and _exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != _fingerprint():
            log("scale database: generator or schema changed: rebuilding")
            manifest = None
    if manifest is None:
        STATE.mkdir(parents=True, exist_ok=True)
        keyring.unlink(missing_ok=True)
        setup(DB, STATE, migrate_database)
        manifest = {"fingerprint": _fingerprint(), "exams": 0, "loads": []}
    # What is there, counted (a cut-off load leaves more than the manifest says; loading resumes).
    # A newer schema is reached the way a deployment reaches it: by the service's own migrations.
    migrate_database(database_url(DB))
    have = int(psql(DB, "SELECT count(*) FROM subjects"))
    manifest["exams"] = have
    if have >= target:
        log(f"scale database: reusing {have} exams loaded earlier")
        manifest["reused"] = True
        _seal(keyring)  # an interrupted load may have left entries unsealed
        psql(DB, "VACUUM ANALYZE")  # as autovacuum would have it (off on this machine: bench.run.analyze)
        return manifest
    manifest["reused"] = False
    # A cut-off load leaves gaps only in its last chunks: start a little before the count, and
    # let the loader skip the exams that are there.
    resume = max(0, have - 256)
    parts = []
    if resume < min(FULL, target):
        parts.append(("full", resume, min(FULL, target) - resume))
    if target > max(resume, FULL):
        parts.append(("small", max(resume, FULL), target - max(resume, FULL)))
    for shape, start, count in parts:
        log(f"scale database: loading {count} {shape} exams from #{start} (bulk path, all cores)")
        manifest["loading"] = True
        manifest_path.write_text(json.dumps(manifest, indent=2))
        result = bulk_load(
            DB, keyring, STATE, start=start, count=count, seed=SEED, shape=shape, validate=shape == "full"
        )
        manifest["loading"] = False
        result["start"] = start
        result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        manifest["loads"].append(result)
        manifest["exams"] = int(psql(DB, "SELECT count(*) FROM subjects"))
        manifest_path.write_text(json.dumps(manifest, indent=2))
        log(f"scale database: {result}")
    seal_seconds = _seal(keyring)
    manifest["loads"].append({"sealed_audit_log_seconds": seal_seconds})
    psql(DB, "VACUUM ANALYZE")  # visibility map and statistics, as autovacuum would leave them
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def copy(name: str) -> str:
    """An identical copy of the scale database, for one server to run on (and write its audit
    entries to) while the kept one stays as loaded."""
    recreate_database(name, template=DB)
    return name


def server_env() -> dict[str, str]:
    return {"MHR_DATABASE_URL": database_url(DB), "MHR_KEYRING_PATH": str(STATE / "keyring.json")}


if __name__ == "__main__":
    import sys

    print(json.dumps(ensure(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000), indent=2))
