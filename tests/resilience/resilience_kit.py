"""Helpers for the resilience tests: a restartable real server, unique exam bundles, DB probes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from e2e_helpers import free_port, server_env
from mhr_testkit import EXAMPLES, REPO, Party, live_token, load_example, sync_url

REFUGEE_EXAMPLE = next(p for p in EXAMPLES if p.stem == "exam-refugee-vaccinations")
PASSPORT = "N014782936"


def unique_bundle(
    example: Path = REFUGEE_EXAMPLE, *, passport: str | None = None, replace: dict[str, str] | None = None
) -> tuple[dict[str, Any], str]:
    """The example with a fresh passport number and fresh fullUrls (so each is a new migrant)."""
    text = load_example(example)
    raw = json.dumps(text, ensure_ascii=False)
    passport = passport or "P" + uuid.uuid4().hex[:9].upper()
    raw = raw.replace(PASSPORT, passport)
    for old in {e["fullUrl"] for e in text["entry"] if "fullUrl" in e}:
        raw = raw.replace(old, f"urn:uuid:{uuid.uuid4()}")
    for old, new in (replace or {}).items():
        raw = raw.replace(old, new)
    bundle: dict[str, Any] = json.loads(raw)
    if "identifier" in bundle:  # a new exam has its own Bundle.identifier (else it is a resubmission)
        bundle["identifier"]["value"] = f"exam-{uuid.uuid4()}"
    # The other identifiers (UNHCR, IOM, case numbers) must be unique too: a clinic's second
    # migrant with the same UNHCR number is refused as a conflict.
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            for identifier in entry["resource"].get("identifier", []):
                if identifier["value"] != passport:
                    identifier["value"] = f"{identifier['value']}-{uuid.uuid4().hex[:8].upper()}"
    return bundle, passport


@dataclass
class ServerProcess:
    """``mhr serve`` as a subprocess that can be SIGKILLed and started again on the same port."""

    database_url: str
    tmp_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.tmp_path / "server.log"

    def env(self) -> dict[str, str]:
        return {**server_env(self.database_url, self.tmp_path, self.port), **self.extra_env}

    def start(self, timeout: float = 60) -> float:
        """Start and wait until /readyz answers 200; returns the seconds it took."""
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=REPO,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = began + timeout
        while True:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def token(self, party: Party, scope: str | None = None, purpose: str | None = None) -> str:
        return live_token(self.base_url, party, scope, purpose)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def audit_contents(database_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT content FROM audit_entries ORDER BY id")).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(bytes(r) if not isinstance(r, str) else r) for r in rows]


def scalar(database_url: str, sql: str) -> Any:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()
