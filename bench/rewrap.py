"""The KEK rewrap rate, subject keys per second, keyring file vs a PKCS#11 token (SoftHSM2).

    python -m bench.rewrap                       # 2000 subject keys, 3 rounds, SQLite
    python -m bench.rewrap --subjects 5000 --database-url postgresql+asyncpg://...  # a scratch DB

Each round seeds a migrated database with ``--subjects`` migrants (their subject keys wrapped
by the provider, as intake does), rotates the KEK, and times the whole rewrap as an operator
runs it: ``keys.rewrap`` jobs of ``--batch-size`` keys each, leased, run and completed by the
job worker of ``mhr keys rewrap --wait`` (service.keys.lifecycle), every batch its own
transaction. The baseline, measured in the same run, is the provider alone doing the same
number of unwrap-and-wrap pairs in a loop: the ratio is what the database and the jobs add.
Medians over rounds; results to stdout and ``bench/results/rewrap.json``. A PostgreSQL URL
must name a scratch database: its subjects and jobs tables are emptied.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, insert

from bench.key_ops import _softhsm
from security.keys import KekLifecycle, KeyProvider, LocalKeyring
from service.core.settings import Environment, Settings
from service.keys import lifecycle
from service.keys.progress import Progress
from service.records.subject_keys import SubjectKeys, kek_version_of, rewrapped
from service.runtime.providers import Runtime, build_runtime
from service.store import migrate
from service.store.tables import Job, Subject

RESULTS = Path(__file__).parent / "results"


async def _seed(settings: Settings, keys: KeyProvider, subjects: int) -> None:
    runtime = build_runtime(settings, keys=keys)
    try:
        async with runtime.database.transaction() as session:
            await session.execute(delete(Job))
            await session.execute(delete(Subject))
            rows = []
            for n in range(subjects):
                wrapped, _ = SubjectKeys(keys).create(f"bench-{n:07d}")
                rows.append(
                    {
                        "id": f"bench-{n:07d}",
                        "wrapped_key": wrapped,
                        "key_version": 1,
                        "kek_version": kek_version_of(wrapped),
                        "created_at": datetime.now(UTC),
                    }
                )
            await session.execute(insert(Subject), rows)
    finally:
        await _release(runtime)


async def _release(runtime: Runtime) -> None:
    # close_runtime without closing the provider, which the next round uses.
    await runtime.audit_writer.drain()
    await runtime.audit_writer.database.dispose()
    await runtime.database.dispose()


async def _rewrap(settings: Settings, keys: KeyProvider, batch: int, run_id: str) -> tuple[float, int]:
    runtime = build_runtime(settings, keys=keys)
    try:
        assert isinstance(keys, KekLifecycle)
        keys.rotate_kek()
        start = time.perf_counter()
        run = await lifecycle.start(runtime.database, keys, run_id, batch)
        await lifecycle.wait(runtime, run, Progress(io.StringIO(), run.to_rewrap))
        elapsed = time.perf_counter() - start
        left = (await lifecycle.status(runtime.database, keys)).stale
        assert left == 0, f"{left} subject keys left"
        return elapsed, run.to_rewrap
    finally:
        await _release(runtime)


def _baseline(keys: KeyProvider, subjects: int) -> float:
    blobs = [(f"bench-{n:07d}", SubjectKeys(keys).create(f"bench-{n:07d}")[0]) for n in range(subjects)]
    start = time.perf_counter()
    for subject_id, blob in blobs:
        rewrapped(keys, subject_id, blob)
    return subjects / (time.perf_counter() - start)


def measure(name: str, keys: KeyProvider, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    url = args.database_url or f"sqlite+aiosqlite:///{tmp / f'{name}.sqlite3'}"
    migrate.upgrade(url)
    settings = Settings(
        env=Environment.test,
        database_url=url,
        public_base_url="https://mhr.bench",
        keyring_path=tmp / "keyring.json",
    )
    rates, baselines = [], []
    for round_no in range(args.rounds):
        asyncio.run(_seed(settings, keys, args.subjects))
        elapsed, moved = asyncio.run(_rewrap(settings, keys, args.batch_size, f"bench-{name}-{round_no}"))
        rates.append(moved / elapsed)
        baselines.append(_baseline(keys, args.subjects))
    rate, base = statistics.median(rates), statistics.median(baselines)
    return {"rewrap_keys_per_second": rate, "provider_only_keys_per_second": base, "ratio": base / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--database-url", help="a scratch database (default: a temporary SQLite file)")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mhr-bench-rewrap-") as tmp:
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json")
        results["keyring"] = measure("keyring", keyring, args, Path(tmp))
        hsm = _softhsm(Path(tmp))
        try:
            results["softhsm2"] = measure("softhsm2", hsm, args, Path(tmp))
        finally:
            hsm.close()
    where = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"rewrap of {args.subjects} subject keys, batches of {args.batch_size}, {where}, "
        f"median of {args.rounds}"
    )
    print(f"{'':10} {'rewrap keys/s':>14} {'provider only':>14} {'ratio':>7}")
    for name, found in results.items():
        print(
            f"{name:10} {found['rewrap_keys_per_second']:14.0f} "
            f"{found['provider_only_keys_per_second']:14.0f} {found['ratio']:7.1f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rewrap.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
