"""The peer: fhirstarter (FastAPI + fhir.resources) over the thinnest PostgreSQL JSONB store.

Patient and Observation create and read, as fhirstarter's own example does
them: the handler gets a validated model, stores ``model_dump_json()`` and
answers reads with ``model_validate_json()``. One table, one durable commit per
create, an asyncpg pool per worker. Runs in ``bench/.venv-peer`` (fhirstarter
pins an older FastAPI); ``FHIR_SEQUENCE=R4B`` is set by the bench.

Table (created by the bench): resources(type text, id uuid, body jsonb, primary key (type, id)).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhirstarter import FHIRProvider, FHIRStarter, InteractionContext
from fhirstarter.exceptions import FHIRResourceNotFoundError

DSN = os.environ.get("PEER_DSN", "postgresql://postgres@127.0.0.1:5432/mhr_bench_peer")
_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        async with _lock:
            if _pool is None:
                _pool = await asyncpg.create_pool(DSN, min_size=2, max_size=10)
    return _pool


async def _create(resource_type: str, resource: Patient | Observation) -> str:
    id_ = str(uuid.uuid4())
    resource.id = id_
    async with (await pool()).acquire() as conn:
        await conn.execute(
            "INSERT INTO resources (type, id, body) VALUES ($1, $2, $3::jsonb)",
            resource_type,
            id_,
            resource.model_dump_json(),
        )
    return id_


async def _read(resource_type: str, id_: str) -> str:
    try:
        key = uuid.UUID(id_)
    except ValueError:
        raise FHIRResourceNotFoundError from None
    async with (await pool()).acquire() as conn:
        body = await conn.fetchval(
            "SELECT body::text FROM resources WHERE type = $1 AND id = $2", resource_type, key
        )
    if body is None:
        raise FHIRResourceNotFoundError
    return str(body)


provider = FHIRProvider()


@provider.create(Patient)
async def patient_create(context: InteractionContext, resource: Patient) -> str:
    return await _create("Patient", resource)


@provider.read(Patient)
async def patient_read(context: InteractionContext, id_: str) -> Patient:
    return Patient.model_validate_json(await _read("Patient", id_))


@provider.create(Observation)
async def observation_create(context: InteractionContext, resource: Observation) -> str:
    return await _create("Observation", resource)


@provider.read(Observation)
async def observation_read(context: InteractionContext, id_: str) -> Observation:
    return Observation.model_validate_json(await _read("Observation", id_))


app = FHIRStarter(title="bench peer")
app.add_providers(provider)
