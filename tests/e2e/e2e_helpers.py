"""A real server: ``mhr serve`` in a subprocess on a free port, for clients that speak HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mhr_testkit import REPO, Party, Service, live_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    base_url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60, what: str = "server"
) -> None:
    """Poll ``/readyz`` until 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n" + log_path.read_text(errors="replace")[-4000:])
        time.sleep(0.2)


@dataclass
class LiveServer:
    base_url: str
    registry: Service  # registers parties on the same database and keyring
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def fhir_url(self) -> str:
        return f"{self.base_url}/fhir"

    def token(self, party: Party, scope: str | None = None, purpose: str | None = None) -> str:
        return live_token(self.base_url, party, scope, purpose)


def server_env(database_url: str, tmp_path: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "MHR_ENV": "development",
        "MHR_DATABASE_URL": database_url,
        "MHR_KEYRING_PATH": str(tmp_path / "keyring.json"),
        "MHR_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MHR_PORT": str(port),
        "MHR_LOG_LEVEL": "INFO",
        # Tests stop servers with SIGTERM: no load balancer to wait for (test_serve_workers sets one).
        "MHR_DRAIN_SECONDS": "0",
    }


@pytest.fixture
def live_server(database_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    port = free_port()
    log_path = tmp_path / "server.log"
    with Service.start(database_url, tmp_path) as registry:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=REPO,
                env=server_env(database_url, tmp_path, port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(base, process, log_path)
            yield LiveServer(base, registry, process, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
