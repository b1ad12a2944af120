"""Many more concurrent reads than the connection pool holds: each waits for its audit entry
while holding its read connection, and the audit writer must still get one of its own."""

from __future__ import annotations

import asyncio
import json

import httpx
import sqlalchemy as sa
from e2e_helpers import LiveServer
from mhr_testkit import EXAMPLES, FHIR_HEADERS, load_example, sync_url

READERS = 80  # the pool holds 10 connections and 10 more on overflow


def test_reads_beyond_the_pool_size_all_answer_and_all_are_audited(
    live_server: LiveServer, database_url: str
) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    headers = {**FHIR_HEADERS, "Authorization": f"Bearer {live_server.token(clinic)}"}
    submitted = httpx.post(
        live_server.fhir_url, content=json.dumps(load_example(EXAMPLES[0])), headers=headers, timeout=60
    )
    assert submitted.status_code == 200, submitted.text
    location = submitted.json()["entry"][1]["response"]["location"].rsplit("/_history", 1)[0]

    async def read_all() -> list[int]:
        limits = httpx.Limits(max_connections=READERS)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as client:
            replies = await asyncio.gather(
                *(client.get(f"{live_server.fhir_url}/{location}") for _ in range(READERS))
            )
        return [r.status_code for r in replies]

    assert asyncio.run(read_all()) == [200] * READERS
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            reads = conn.execute(
                sa.text("SELECT count(*) FROM audit_entries WHERE subtype = 'read' AND outcome = '0'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert reads == READERS
