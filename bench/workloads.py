"""What the workloads share: the mhr server under test, its data loaded through the API, request files.

``bench.run`` (every workload) and ``bench.compare`` (a baseline against the working
tree) both build their workloads from these.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.generate import exam
from bench.loadgen import Load
from bench.parties import psql
from bench.servers import REPO, Server, free_port, running

FHIR = "application/fhir+json"
SINCE = "2020-01-01T00:00:00Z"
CONNECTIONS = {"W1": 8, "W2": 16, "W3": 8, "W4": 8, "W5": 16, "hello": 16}


def log(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def mhr_env(db_url: str, keyring: Path, port: int) -> dict[str, str]:
    return {
        "MHR_ENV": "development",
        "MHR_DATABASE_URL": db_url,
        "MHR_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MHR_KEYRING_PATH": str(keyring),
        "MHR_LOG_LEVEL": "WARNING",
        "MHR_TOKEN_LIFETIME_SECONDS": "3600",
        # The per-client rate limit is a policy, not capacity: raised out of reach, still on the path.
        "MHR_RATE_LIMIT_PER_SECOND": "1000000",
        "MHR_RATE_LIMIT_BURST": "1000000",
    }


@contextmanager
def mhr_server(name: str, db_url: str, keyring: Path, out: Path, *, tree: Path = REPO) -> Iterator[Server]:
    """``mhr serve`` with 2 workers on a free port, from ``tree`` (this checkout, or a baseline's
    own build with its own venv: see ``bench.baseline``)."""
    port = free_port()
    argv = [str(tree / ".venv" / "bin" / "mhr"), "serve", "--workers", "2", "--port", str(port)]
    with running(
        name,
        argv,
        port=port,
        ready_path="/readyz",
        log_path=out / f"{name}.log",
        env=mhr_env(db_url, keyring, port),
        cwd=tree,
    ) as server:
        yield server


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# W2's candidates: current resources of the types an authority reads, in a stable shuffle.
READ_CANDIDATES = (
    "SELECT resource_type, id FROM resources WHERE resource_type IN ('Patient', 'Observation', "
    "'Encounter', 'Immunization', 'DiagnosticReport', 'ImagingStudy', 'DocumentReference') "
    "ORDER BY md5(id) LIMIT 3000"
)


def permitted_reads(server: Server, token: str, database: str) -> list[str]:
    """W2's request paths: the candidates this authority is given (200), as the server decides.

    Some generated resources are withheld from it (a label its consent does not name); a
    refusal is a different, cheaper path, and wrk would count each one as an error.
    """
    paths = [f"/fhir/{t}/{i}" for t, i in ids(database, READ_CANDIDATES)]
    headers = {"Authorization": f"Bearer {token}", "Accept": FHIR}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        return [path for path in paths if client.get(path).status_code == 200]


def first_page_path() -> str:
    return f"/fhir/Patient?_lastUpdated=gt{SINCE}&_count=50"


def first_pull(base: str, token: str, rng: random.Random, pages: int = 20) -> list[str]:
    """An authority's first pull: everything since 2020, 50 a page, the first ``pages`` pages
    (or as many as there are) as a client gets them, by following next links. Ten walks, shuffled.
    The first page counts the total (W3f measures it alone); the others carry it in their cursor."""
    url: str | None = base + first_page_path()
    walk = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}", "Accept": FHIR}) as client:
        while url is not None and len(walk) < pages:
            walk.append(url.removeprefix(base))
            response = client.get(url)
            response.raise_for_status()
            links = response.json().get("link", [])
            url = next((link["url"] for link in links if link["relation"] == "next"), None)
    lines = walk * 10
    rng.shuffle(lines)
    return lines


def ids(db: str, sql: str) -> list[list[str]]:
    out = psql(db, sql)
    return [line.split("|") for line in out.splitlines() if line]


async def _post_all(
    base: str, token: str, bundles: Callable[[int], dict[str, Any]], count: int, conc: int
) -> int:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR}
    queue = iter(range(count))
    failures = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for index in queue:
            response = await client.post(
                f"{base}/fhir", content=orjson.dumps(bundles(index)), headers=headers
            )
            if response.status_code != 200:
                failures += 1
                if failures < 3:
                    log(f"load failed {response.status_code}: {response.text[:300]}")

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(conc)))
    return failures


def load_through_api(server: Server, token: str, count: int, database: str) -> dict[str, Any]:
    """POST ``count`` exams, 4 at a time. Statistics are refreshed after the first hundred, where
    autovacuum would refresh them on a default PostgreSQL (see ``analyze``)."""
    now = datetime.now(UTC)
    began = time.perf_counter()
    first = min(100, count)
    failures = asyncio.run(_post_all(server.base_url, token, lambda i: exam(i, 1, now), first, 4))
    analyze(database)
    failures += asyncio.run(
        _post_all(server.base_url, token, lambda i: exam(first + i, 1, now), count - first, 4)
    )
    seconds = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{failures} exams failed to load")
    return {
        "exams": count,
        "seconds": round(seconds, 1),
        "exams_per_s": round(count / seconds, 1),
        "connections": 4,
    }


def analyze(database: str) -> None:
    """Planner statistics, as autovacuum keeps them on a default PostgreSQL. This machine's
    server runs with autovacuum off, and plans made for empty tables (a join driven from the
    wrong side, say) make a growing database look slower than it is."""
    psql(database, "ANALYZE")


def smoke(server: Server, load: Load) -> None:
    """One request of the workload, checked by hand before wrk replays it thousands of times."""
    line = load.requests_file.open().readline().rstrip("\n")
    path, _, body = line.partition("\t")
    headers = {"Accept": FHIR}
    if load.token:
        headers["Authorization"] = f"Bearer {load.token}"
    if body:
        headers["Content-Type"] = FHIR
    response = httpx.request(
        load.method, server.base_url + path, content=body or None, headers=headers, timeout=60
    )
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"{load.name}: {load.method} {path} -> {response.status_code} {response.text[:400]}"
        )
    data = response.json() if response.content else {}
    if data.get("resourceType") == "Bundle" and data.get("type") == "searchset" and not data.get("entry"):
        raise RuntimeError(f"{load.name}: {path} answered an empty Bundle")
