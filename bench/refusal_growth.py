"""How much the audit log grows under a flood of refusals nobody can be identified for.

    python -m bench.refusal_growth                       # this checkout
    python -m bench.refusal_growth --mhr ../main/.venv/bin/mhr   # another checkout, for a baseline

Starts ``mhr serve`` (one worker, SQLite in a temporary directory), sends the
same mix of unauthenticated API requests, bad bearer tokens and bad client
assertions at the token endpoint, stops the server (a graceful shutdown writes
what is counted), and reports the rows and bytes the audit log gained per
thousand requests. A count, not a timing: the figure does not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


async def _flood(base: str, total: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    kinds = [
        ("GET", "/fhir/Patient", {}, None),
        ("GET", "/fhir/Observation/x", {"Authorization": "Bearer not.a.token"}, None),
        (
            "POST",
            "/auth/token",
            {},
            {
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": "e30.e30.sig",
                "scope": "system/*.rs",
            },
        ),
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            method, path, headers, form = kinds[i % len(kinds)]
            response = await client.request(method, path, headers=headers, data=form)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def _audit_size(database: Path) -> tuple[int, int]:
    with sqlite3.connect(database) as conn:
        rows, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(content)), 0) FROM audit_entries"
        ).fetchone()
    return int(rows), int(size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serving(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    """The server until the block ends, then SIGTERM and a wait: a graceful shutdown."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mhr did not start:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mhr", default=str(REPO / ".venv" / "bin" / "mhr"), help="the mhr executable")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mhr-refusal-growth-") as tmp:
        work = Path(tmp)
        database = work / "mhr.sqlite3"
        port = _free_port()
        env = {
            "MHR_ENV": "development",
            "MHR_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "MHR_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "MHR_KEYRING_PATH": str(work / "keyring.json"),
            "MHR_LOG_LEVEL": "WARNING",
        }
        argv_serve = [args.mhr, "serve", "--workers", "1", "--port", str(port)]
        with _serving(argv_serve, {**os.environ, **env}, port, work / "mhr.log"):
            before = _audit_size(database)
            statuses = asyncio.run(_flood(f"http://127.0.0.1:{port}", args.requests, args.concurrency))
        after = _audit_size(database)  # after the graceful shutdown
    rows, size = after[0] - before[0], after[1] - before[1]
    print(
        json.dumps(
            {
                "mhr": args.mhr,
                "requests": args.requests,
                "statuses": dict(sorted(statuses.items())),
                "audit_rows_added": rows,
                "audit_content_bytes_added": size,
                "rows_per_1000_requests": round(1000 * rows / args.requests, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
