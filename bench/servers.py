"""Servers under test (started as subprocesses, always stopped) and what they cost while measured."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
# The uvicorn settings of ``mhr serve`` (service/cli/main.py), used for the baselines too.
UVICORN_SETTINGS: dict[str, Any] = {
    "log_config": None,
    "proxy_headers": True,
    "server_header": False,
    "timeout_keep_alive": 5,
    "timeout_graceful_shutdown": 20,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        try:
            master = psutil.Process(self.process.pid)
            return [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@contextmanager
def running(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    ready_path: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path = REPO,
) -> Iterator[Server]:
    """Start ``argv``, wait until ``ready_path`` answers 200 (and both workers are up), stop it after."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(name, port, process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{server.base_url}{ready_path}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        # uvicorn answers as soon as the first worker is up; give the second one time to start.
        for _ in range(20):
            if sum(1 for p in server.processes() if "python" in p.name().lower()) >= 3:
                break
            time.sleep(0.5)
        time.sleep(2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for child in server.processes():
                child.kill()
            process.kill()
            process.wait()


def _cpu(procs: dict[int, psutil.Process]) -> dict[int, float]:
    seconds = {}
    for pid, proc in procs.items():
        try:
            times = proc.cpu_times()
            seconds[pid] = times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return seconds


def database_backends(database: str | None) -> dict[int, psutil.Process]:
    """The PostgreSQL backends serving ``database`` (server pools keep them open between requests)."""
    if not database:
        return {}
    done = subprocess.run(
        [
            "psql",
            *("-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-At"),
            "-c",
            f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'",  # noqa: S608 - bench's own names
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    procs = {}
    for line in done.stdout.split():
        try:
            procs[int(line)] = psutil.Process(int(line))
        except (ValueError, psutil.NoSuchProcess):
            continue
    return procs


class Monitor:
    """CPU seconds of the server (all its processes), of its database backends, of the whole
    machine, and the server's resident memory sampled every 250 ms, over one measurement."""

    def __init__(self, server: Server | None, database: str | None = None) -> None:
        self.server = server
        self.database = database
        self._stop = threading.Event()
        self._rss: list[int] = []

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            total = 0
            for proc in self.server.processes() if self.server else []:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self._rss.append(total)

    def __enter__(self) -> Monitor:
        self._server_procs = {p.pid: p for p in self.server.processes()} if self.server else {}
        self._server_start = _cpu(self._server_procs)
        self._db_start = _cpu(database_backends(self.database))
        self._system_start = psutil.cpu_times()
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._began
        self._stop.set()
        self._thread.join()
        server_end = _cpu(self._server_procs)
        db_procs = database_backends(self.database)
        db_end = _cpu(db_procs)
        system_end = psutil.cpu_times()
        self.server_cpu_s = sum(v - self._server_start.get(k, 0.0) for k, v in server_end.items())
        self.db_cpu_s = sum(v - self._db_start.get(k, 0.0) for k, v in db_end.items())
        busy = [
            getattr(system_end, f) - getattr(self._system_start, f)
            for f in ("user", "system", "nice", "irq", "softirq")
            if hasattr(system_end, f)
        ]
        self.machine_cpu_s = sum(busy)

    def figures(self, loadgen_cpu_s: float) -> dict[str, Any]:
        cores = psutil.cpu_count() or 1
        window = self.seconds
        other = self.machine_cpu_s - self.server_cpu_s - self.db_cpu_s - loadgen_cpu_s
        return {
            "server_cpu_pct": round(100 * self.server_cpu_s / window, 1),
            "server_rss_mib_max": round(max(self._rss, default=0) / 2**20, 1),
            "db_cpu_pct": round(100 * self.db_cpu_s / window, 1),
            "loadgen_cpu_pct": round(100 * loadgen_cpu_s / window, 1),
            "other_cpu_pct": round(100 * max(other, 0.0) / window, 1),
            "machine_busy_pct": round(100 * self.machine_cpu_s / (window * cores), 1),
        }
