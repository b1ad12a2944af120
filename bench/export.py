"""Bulk Data export at scale: resources/s, peak server RSS, time to first byte of the first file.

    .venv/bin/python -m bench.export --exams 3000

Builds (or reuses) its own PostgreSQL database ``mhr_bench_export`` with ``--exams`` exams
through the bulk path (bench.bulk_load: the first 1,000 of the full shape, the rest small),
each with a Consent for authority A; keys and parties under ``bench/.state/export``. Then starts
``mhr serve --workers 2`` (one job worker per process, as deployed), kicks off ``$export`` as
authority A, polls the status URL, and downloads every file, sampling the RSS of every server
process (psutil) every 0.2 s. Reported: the export's time from kick-off to the manifest,
resources/s over it, the peak RSS of the largest server process, the time to first byte of the
first file (after the manifest), and the download rate.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.bulk_load import bulk_load
from bench.parties import database_url, load, psql, setup
from bench.run import mhr_env
from bench.servers import free_port, running
from security.keys import LocalKeyring
from service.store import migrate

BENCH = Path(__file__).resolve().parent
STATE = BENCH / ".state" / "export"
DB = "mhr_bench_export"
FULL = 1000


def _exists() -> bool:
    return psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DB}'") == "1"  # noqa: S608


def ensure(exams: int) -> dict[str, Any]:
    keyring = STATE / "keyring.json"
    loads: list[dict[str, Any]] = []
    if not (_exists() and keyring.exists() and (STATE / "parties.json").exists()):
        STATE.mkdir(parents=True, exist_ok=True)
        keyring.unlink(missing_ok=True)
        setup(DB, STATE)
        LocalKeyring.create(keyring)
    migrate.upgrade(database_url(DB))
    have = int(psql(DB, "SELECT count(*) FROM subjects"))
    if have < min(FULL, exams):
        loads.append(bulk_load(DB, keyring, STATE, start=have, count=min(FULL, exams) - have, shape="full"))
        have = int(psql(DB, "SELECT count(*) FROM subjects"))
    if have < exams:
        loads.append(bulk_load(DB, keyring, STATE, start=have, count=exams - have, shape="small"))
    psql(DB, "VACUUM ANALYZE")
    return {"exams": int(psql(DB, "SELECT count(*) FROM subjects")), "loads": loads}


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    self.peak = max(self.peak, proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


def measure(out: Path) -> dict[str, Any]:
    port = free_port()
    keyring = STATE / "keyring.json"
    env = {
        **mhr_env(database_url(DB), keyring, port),
        "MHR_EXPORT_DIR": str(out / "exports"),
        "MHR_JOB_POLL_SECONDS": "0.2",
    }
    argv = [str(BENCH.parent / ".venv" / "bin" / "mhr"), "serve", "--workers", "2", "--port", str(port)]
    parties = load(STATE)
    with running(
        "export", argv, port=port, ready_path="/readyz", log_path=out / "server.log", env=env
    ) as server:
        token = parties["authority-a"].token(server.base_url, "system/*.rs", purpose="PUBHLTH")
        headers = {"Authorization": f"Bearer {token}"}
        sampler = RssSampler(server.process.pid)
        sampler.start()
        began = time.perf_counter()
        kicked = httpx.get(
            f"{server.base_url}/fhir/$export", headers={**headers, "Prefer": "respond-async"}, timeout=60
        )
        kicked.raise_for_status()
        status = kicked.headers["Content-Location"]
        while True:
            polled = httpx.get(status, headers=headers, timeout=60)
            if polled.status_code == 200:
                break
            polled.raise_for_status()
            time.sleep(0.5)
        exported = time.perf_counter() - began
        manifest = polled.json()
        total = sum(item["count"] for item in manifest["output"])
        first_byte: float | None = None
        downloaded = 0
        download_began = time.perf_counter()
        for item in manifest["output"]:
            started = time.perf_counter()
            with httpx.stream("GET", item["url"], headers=headers, timeout=600) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    if first_byte is None:
                        first_byte = time.perf_counter() - started
                    downloaded += chunk.count(b"\n")
        download_seconds = time.perf_counter() - download_began
        sampler.stopping.set()
        sampler.join()
    return {
        "resources": total,
        "lines_downloaded": downloaded,
        "export_seconds": round(exported, 1),
        "resources_per_s": round(total / exported, 1),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
        "first_file_ttfb_ms": round((first_byte or 0) * 1000, 1),
        "download_lines_per_s": round(downloaded / download_seconds, 1),
        "files": len(manifest["output"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exams", type=int, default=3000)
    parser.add_argument("--load-only", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    data = ensure(args.exams)
    print(json.dumps({"database": data, "load_seconds": round(time.perf_counter() - began, 1)}))
    if args.load_only:
        return 0
    out = BENCH / "results" / "export"
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(measure(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
