"""A Bulk Data export whose worker is killed with SIGKILL mid-export resumes from its checkpoint
when a worker comes back, and its output holds each resource exactly once (both databases)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from bulk_kit import add_migrant, authority_headers, everything_exported, kick_off, permit, status_path
from bulk_kit import wait_for_manifest as wait
from mhr_testkit import Service, sync_url
from test_disclosure import make_world

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def quiet_service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    """The API without job workers of its own: the export runs in `mhr worker` processes."""
    with Service.start(
        database_url, tmp_path, job_workers=0, export_dir=tmp_path / "exports", export_subjects_per_step=1
    ) as running:
        yield running


def _worker(service: Service, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHR_")}
    env.update(
        {
            "MHR_ENV": "test",
            "MHR_DATABASE_URL": service.settings.database_url,
            "MHR_PUBLIC_BASE_URL": "http://testserver",
            "MHR_KEYRING_PATH": str(service.settings.keyring_path),
            "MHR_EXPORT_DIR": str(tmp_path / "exports"),
            "MHR_EXPORT_SUBJECTS_PER_STEP": "1",
            "MHR_EXPORT_STEP_PAUSE_SECONDS": "0.4",
            "MHR_JOB_LEASE_SECONDS": "2",
            "MHR_JOB_POLL_SECONDS": "0.1",
        }
    )
    with (tmp_path / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--workers", "1"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _progress(service: Service, export_id: str) -> tuple[str, int, list[tuple[str, int]]]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            state, done = conn.execute(
                sa.text("SELECT state, subjects_done FROM bulk_exports WHERE id = :id"), {"id": export_id}
            ).one()
            files = conn.execute(
                sa.text("SELECT resource_type, byte_length FROM bulk_export_files WHERE export_id = :id"),
                {"id": export_id},
            ).all()
            return str(state), int(done), [(str(t), int(n)) for t, n in files]
    finally:
        engine.dispose()


def test_a_killed_export_resumes_and_writes_each_resource_once(
    quiet_service: Service, tmp_path: Path
) -> None:
    service = quiet_service
    world = make_world(service)
    patients = {world.patient} | {add_migrant(service, world.clinic, n) for n in (0, 2, 3, 0)}
    for patient in patients:
        permit(world, patient, world.authority.organization_id)
    headers = authority_headers(service, world.authority)
    location = status_path(kick_off(service, headers))
    export_id = location.rsplit("/", 1)[1]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers.append(_worker(service, tmp_path, "first"))
        deadline = time.monotonic() + 90
        while _progress(service, export_id)[1] < 2:
            assert time.monotonic() < deadline, "the export made no progress"
            time.sleep(0.05)
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait(timeout=10)
        state, done, files = _progress(service, export_id)
        assert state == "running" and 2 <= done < len(patients)
        # As if the kill had come between a step's write and its commit: bytes past the
        # committed length, which the resumed step must cut off, never serve.
        for resource_type, committed in files:
            path = tmp_path / "exports" / export_id / f"{resource_type}.ndjson.sealed"
            assert path.stat().st_size == committed
            with path.open("ab") as handle:
                handle.write(os.urandom(300))
        workers.append(_worker(service, tmp_path, "second"))
        manifest = wait(service, headers, location)
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
    resources: list[Any] = everything_exported(service, headers, manifest)
    keys = [(r["resourceType"], r["id"]) for r in resources]
    assert len(keys) == len(set(keys)), "a resource was written twice"
    assert {i for t, i in keys if t == "Patient"} == patients
    # Nothing lost: the same as what a search of each type shows this authority.
    for item in manifest["output"]:
        seen = service.client.get(f"/fhir/{item['type']}", params={"_count": "100"}, headers=headers).json()
        assert item["count"] == seen["total"], item["type"]
