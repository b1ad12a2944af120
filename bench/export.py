"""Bulk Data export at scale: resources/s, peak server RSS, time to first byte of the first file,
and W2 (authority reads) p99 with and without an export running, in the same run.

    .venv/bin/python -m bench.export --scale 100000           # the 100k-exam scale database
    .venv/bin/python -m bench.export --exams 3000             # a database of its own

``--scale N`` uses the scale database of ``bench.scale`` (loaded once by the bulk path, kept
under ``bench/.state/scale``, reused by later runs and by ``bench.compare``) and serves a copy of
it made from it as a template (``createdb -T``, seconds), so that repeated runs are cheap and the
kept database never receives an export's audit entries. ``--exams N`` builds (or reuses) the
database ``mhr_bench_export`` with N exams through the same bulk path (the first 1,000 of the
full shape, the rest small), each with a Consent for authority A.

Then ``mhr serve --workers 2`` (one job worker per process, as deployed) is started, and:

1. ``$export`` as authority A, kicked off, polled until the manifest, every file downloaded,
   sampling the RSS of every server process (psutil) every 0.2 s: the export's time from
   kick-off to the manifest, resources/s over it, the peak RSS of the largest server process,
   the time to first byte of the first file (after the manifest), the download rate;
2. unless ``--w2-seconds 0``: W2 (authority reads of single resources, wrk, 16 connections, as
   in ``bench.run``) alone, then W2 again while a second export runs (kicked off just before),
   then W2 alone once more: p99 with an export over p99 without (the mean of the two alone).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import baseline, scale
from bench.bulk_load import bulk_load
from bench.loadgen import Load, ensure_wrk
from bench.loadgen import measure as wrk_measure
from bench.parties import database_url, load, psql, setup
from bench.servers import REPO, Server, free_port, running
from bench.workloads import CONNECTIONS, mhr_env, permitted_reads, write_lines
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


def _kick_off(server: Server, headers: dict[str, str]) -> str:
    kicked = httpx.get(
        f"{server.base_url}/fhir/$export", headers={**headers, "Prefer": "respond-async"}, timeout=60
    )
    kicked.raise_for_status()
    return kicked.headers["Content-Location"]


def _manifest(status: str, headers: dict[str, str]) -> dict[str, Any]:
    while True:
        polled = httpx.get(status, headers=headers, timeout=60)
        if polled.status_code == 200:
            return dict(polled.json())
        polled.raise_for_status()
        time.sleep(0.5)


def _export(server: Server, headers: dict[str, str]) -> dict[str, Any]:
    sampler = RssSampler(server.process.pid)
    sampler.start()
    began = time.perf_counter()
    manifest = _manifest(_kick_off(server, headers), headers)
    exported = time.perf_counter() - began
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


def _w2_figures(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("rps", "p50_ms", "p99_ms", "max_ms", "errors", "server_cpu_pct", "db_cpu_pct", "machine_busy_pct")
    return {k: result[k] for k in keep}


def _w2(
    server: Server, headers: dict[str, str], token: str, db: str, out: Path, seconds: float
) -> dict[str, Any]:
    """W2 alone, W2 while an export runs, W2 alone again: the same server, the same requests."""
    ensure_wrk()
    w2 = Load(
        "W2", write_lines(out / "w2.txt", permitted_reads(server, token, db)), CONNECTIONS["W2"], token=token
    )
    before = wrk_measure(server, w2, seconds=seconds, warmup=3, database=db)
    status = _kick_off(server, headers)
    time.sleep(1.0)  # the first step under way
    during = wrk_measure(server, w2, seconds=seconds, warmup=0, database=db)
    still_running = httpx.get(status, headers=headers, timeout=60).status_code == 202
    began = time.perf_counter()
    _manifest(status, headers)
    rest = time.perf_counter() - began
    after = wrk_measure(server, w2, seconds=seconds, warmup=0, database=db)
    alone = (before["p99_ms"] + after["p99_ms"]) / 2
    return {
        "w2_alone_before": _w2_figures(before),
        "w2_during_export": _w2_figures(during),
        "w2_alone_after": _w2_figures(after),
        "export_still_running_when_w2_ended": still_running,
        "export_finished_after_w2_s": round(rest, 1),
        "p99_during_over_alone": round(during["p99_ms"] / alone, 2) if alone else None,
        "rps_during_over_alone": round(during["rps"] / ((before["rps"] + after["rps"]) / 2), 2),
    }


def measure(
    db: str, state: Path, out: Path, w2_seconds: float, extra_env: dict[str, str], tree: Path = REPO
) -> dict[str, Any]:
    """One side: ``mhr serve`` from ``tree`` (this checkout, or a baseline's build)."""
    port = free_port()
    keyring = state / "keyring.json"
    env = {
        **mhr_env(database_url(db), keyring, port),
        "MHR_EXPORT_DIR": str(out / "exports"),
        "MHR_JOB_POLL_SECONDS": "0.2",
        **extra_env,
    }
    argv = [str(BENCH.parent / ".venv" / "bin" / "mhr"), "serve", "--workers", "2", "--port", str(port)]
    parties = load(state)
    with running(
        "export", argv, port=port, ready_path="/readyz", log_path=out / "server.log", env=env
    ) as server:
        token = parties["authority-a"].token(server.base_url, "system/*.rs", purpose="PUBHLTH")
        headers = {"Authorization": f"Bearer {token}"}
        result = {"load_average": [round(x, 2) for x in os.getloadavg()], **_export(server, headers)}
        print(json.dumps(result), flush=True)
        if w2_seconds > 0:
            result["w2"] = _w2(server, headers, token, db, out, w2_seconds)
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--exams", type=int, help="a database of its own with this many exams (default 3000)")
    which.add_argument("--scale", type=int, help="the scale database (bench.scale) with this many exams")
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--w2-seconds", type=float, default=20.0, help="W2 per measurement (0: no W2)")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure this commit (built apart by bench.baseline), first, on its own fresh copy",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a server setting (repeatable)"
    )
    args = parser.parse_args()
    began = time.perf_counter()
    built = baseline.build(args.baseline) if args.baseline else None
    if args.scale:
        # Kept at the baseline's schema when one is measured (bench.scale): both sides' copies
        # start at a revision their server knows, and the working tree's migrates its copy on.
        manifest = scale.ensure(args.scale, migrate_database=baseline.migrator(built))
        data: dict[str, Any] = {"exams": manifest["exams"], "scale": True}
        db, state = f"{scale.DB}_export", scale.STATE
    else:
        data = ensure(args.exams or 3000)
        db, state = DB, STATE
    print(json.dumps({"database": data, "load_seconds": round(time.perf_counter() - began, 1)}), flush=True)
    if args.load_only:
        return 0
    out = BENCH / "results" / "export"
    out.mkdir(parents=True, exist_ok=True)
    extra_env = dict(item.split("=", 1) for item in args.env)
    sides = [("after", REPO)]
    if built is not None:
        sides.insert(0, (f"before ({built.short})", built.tree))
    results = {}
    for side, tree in sides:
        if args.scale:
            copied = time.perf_counter()
            scale.copy(db)  # a fresh copy per side and run: the kept database stays as loaded
            print(json.dumps({"copied_seconds": round(time.perf_counter() - copied, 1)}), flush=True)
        results[side] = measure(db, state, out, args.w2_seconds, extra_env, tree)
        print(json.dumps({side: results[side]}), flush=True)
    if len(results) == 2:
        before, after = results.values()
        print(
            json.dumps(
                {
                    "after_over_before_resources_per_s": round(
                        after["resources_per_s"] / before["resources_per_s"], 2
                    )
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
