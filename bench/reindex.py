"""The blind-index re-index rate, migrants and tokens per second, keyring file vs SoftHSM2.

    python -m bench.reindex                      # 300 small exams, 3 rounds, SQLite
    python -m bench.reindex --exams 1000 --database-url postgresql+asyncpg://...  # a scratch DB

Each round seeds a migrated database with ``--exams`` generated exams (bench.generate's small
shape, written through the Intake use-case as ``POST /fhir`` does), then times a whole index
rotation as an operator runs it: ``mhr keys rotate-index`` and the ``keys.reindex`` jobs of
``--batch-size`` migrants each, run by the job worker of ``--wait`` (every batch its own
transaction; each migrant's versions decrypted, their label tokens, search tokens, match keys and
grants re-derived). The baseline, in the same run, is the provider alone computing the same
number of index HMACs: the ratio is what decryption, labelling, the database and the jobs add.
Medians over rounds; results to stdout and ``bench/results/reindex.json``. A PostgreSQL URL must
name a scratch database: it is emptied.
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

from sqlalchemy import delete, func, insert, select, text

from bench.generate import small_exam
from bench.key_ops import MODULES, PIN, _softhsm
from security.keys import KeyProvider, LocalKeyring
from service.audit.recorder import record_audit
from service.core.request_context import SOURCE
from service.core.settings import Environment, Settings
from service.identity.repository import IdentityRepository
from service.keys.index_commands import work_here
from service.keys.index_rotation import left_to_reindex, rotate_index
from service.keys.progress import Progress
from service.records import index_keys
from service.records.context import Actor
from service.records.intake import Intake
from service.records.repository import RecordRepository
from service.runtime.providers import Runtime, build_runtime
from service.store import migrate
from service.store.tables import Base, Organization, SearchToken

RESULTS = Path(__file__).parent / "results"
ORG = "bench-clinic"


async def _release(runtime: Runtime) -> None:
    # close_runtime without closing the provider, which the next round uses.
    await runtime.audit_writer.drain()
    await runtime.audit_writer.database.dispose()
    await runtime.database.dispose()


async def _seed(settings: Settings, keys: KeyProvider, exams: int) -> None:
    runtime = build_runtime(settings, keys=keys)
    try:
        async with runtime.database.transaction() as session:
            for table in reversed(Base.metadata.sorted_tables):
                await session.execute(delete(table))
            await session.execute(
                insert(Organization).values(
                    id=ORG, name="Bench clinic", kind="clinic", created_at=datetime.now(UTC)
                )
            )
        async with runtime.database.reading() as session:
            await runtime.records.index_keys.refresh(session)
        actor = Actor("bench-client", ORG, "clinic", person="bench-reindex")
        now = datetime.now(UTC)
        for index in range(exams):
            async with runtime.database.transaction() as session:
                intake = Intake(runtime.records, RecordRepository(session), IdentityRepository(session))
                result = await intake.transaction(small_exam(index, 1, now), actor)
                await record_audit(
                    session,
                    result.transaction_record(actor, detail="bench-reindex"),
                    request_id=f"bench-reindex-{index}",
                    source=SOURCE,
                )
    finally:
        await _release(runtime)


async def _noop_audit(session: object, subtype: str, entity: tuple[str, str]) -> None:
    """The bench records no admin entry (the command does)."""


async def _reindex(settings: Settings, keys: KeyProvider, batch: int, run_id: str) -> tuple[float, int, int]:
    from service.keys.reindex_job import start_reindex

    runtime = build_runtime(settings, keys=keys)
    try:
        async with runtime.database.reading() as session:
            tokens = int((await session.execute(select(func.count()).select_from(SearchToken))).scalar_one())
            versions = int(
                (await session.execute(text("SELECT count(*) FROM resource_versions"))).scalar_one()
            )
        start = time.perf_counter()
        phase = await rotate_index(runtime.database, keys, _noop_audit, now=datetime.now(UTC))
        async with runtime.database.transaction() as session:
            total = await left_to_reindex(session, phase.current)
            await start_reindex(session, run_id, phase.current, batch)
        assert await work_here(runtime, phase.current, run_id, Progress(io.StringIO(), total), total) == 0
        elapsed = time.perf_counter() - start
        async with runtime.database.reading() as session:
            assert await left_to_reindex(session, phase.current) == 0
        return elapsed, total, tokens + versions
    finally:
        await _release(runtime)


def _baseline(keys: KeyProvider, macs: int) -> float:
    kid = keys.blind_index_kid()
    start = time.perf_counter()
    for n in range(macs):
        keys.blind_index_mac_for(kid, b"identifier\x00urn:bench\x00%d" % n)
    return macs / (time.perf_counter() - start)


def measure(name: str, keys: KeyProvider, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    url = args.database_url or f"sqlite+aiosqlite:///{tmp / f'{name}.sqlite3'}"
    migrate.upgrade(url)
    settings = Settings(
        env=Environment.test,
        database_url=url,
        public_base_url="https://mhr.bench",
        keyring_path=tmp / "keyring.json",
        log_level="WARNING",
    )
    migrants, tokens, baselines = [], [], []
    for round_no in range(args.rounds):
        asyncio.run(_seed(settings, keys, args.exams))
        elapsed, moved, derived = asyncio.run(
            _reindex(settings, keys, args.batch_size, f"bench-{name}-{round_no}")
        )
        migrants.append(moved / elapsed)
        tokens.append(derived / elapsed)
        baselines.append(_baseline(keys, derived))
    rate, per_token, base = (
        statistics.median(migrants),
        statistics.median(tokens),
        statistics.median(baselines),
    )
    return {
        "migrants_per_second": rate,
        "tokens_per_second": per_token,
        "provider_only_macs_per_second": base,
        "ratio": base / per_token,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exams", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--database-url", help="a scratch database (default: a temporary SQLite file)")
    args = parser.parse_args()
    index_keys.SETTLE_SECONDS = 0.0  # one process: nobody else has to take the rotation up
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mhr-bench-reindex-") as tmp:
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json")
        results["keyring"] = measure("keyring", keyring, args, Path(tmp))
        _softhsm(Path(tmp)).close()  # a token with its keys; rotating needs a read-write session
        from security.pkcs11_keys import Pkcs11Keys

        module = next(m for m in MODULES if m.is_file())
        hsm = Pkcs11Keys.open(module, "bench", PIN, writable=True)
        try:
            results["softhsm2"] = measure("softhsm2", hsm, args, Path(tmp))
        finally:
            hsm.close()
    where = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"re-index of {args.exams} migrants, batches of {args.batch_size}, {where}, median of {args.rounds}"
    )
    print(f"{'':10} {'migrants/s':>11} {'tokens/s':>10} {'provider macs/s':>16} {'ratio':>7}")
    for name, found in results.items():
        print(
            f"{name:10} {found['migrants_per_second']:11.0f} {found['tokens_per_second']:10.0f} "
            f"{found['provider_only_macs_per_second']:16.0f} {found['ratio']:7.1f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reindex.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
