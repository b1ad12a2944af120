"""A server process beside a background process (``MHR_BACKGROUND_IN_SERVER=false``, as
``mhr serve --workers N`` runs its servers) leaves the shared background work to it.

The servers then answer requests only; the audit log is sealed by ``mhr worker`` (or the
supervisor's background process), and by nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from mhr_testkit import EXAMPLES, REPO, Service, load_example, submit, sync_url

from service.audit.log import SEAL_INTERVAL_SECONDS


def _tree_and_entries(database_url: str) -> tuple[int, int]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT coalesce(max(size), 0) FROM audit_checkpoints")).scalar_one()
            entries = conn.execute(sa.text("SELECT count(*) FROM audit_entries")).scalar_one()
    finally:
        engine.dispose()
    return int(size), int(entries)


def test_a_server_beside_a_background_process_seals_nothing_and_mhr_worker_seals_it_all(
    database_url: str, tmp_path: Path
) -> None:
    with Service.start(database_url, tmp_path, background_in_server=False) as service:
        clinic = service.register("clinic", "clinic")
        reply = submit(service, clinic, load_example(EXAMPLES[1]))
        assert reply.status_code == 200, reply.text
        time.sleep(2 * SEAL_INTERVAL_SECONDS + 1)  # an integrator in this process would have sealed
        size, entries = _tree_and_entries(database_url)
        assert entries > 0 and size == 0, "the server sealed the log itself"

        env = {k: v for k, v in os.environ.items() if not k.startswith("MHR_")}
        env.update(
            {
                "MHR_ENV": "test",
                "MHR_DATABASE_URL": database_url,
                "MHR_PUBLIC_BASE_URL": str(service.settings.public_base_url),
                "MHR_KEYRING_PATH": str(service.settings.keyring_path),
                "MHR_LOG_LEVEL": "INFO",
            }
        )
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "service", "worker"], cwd=REPO, env=env, stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + 60
            while _tree_and_entries(database_url)[0] < entries:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mhr worker did not seal the server's entries"
                time.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=60)
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines() if line.strip()]
    assert any(r["msg"] == "background process started" for r in lines)
    assert any(r["msg"] == "background process stopped" for r in lines)
