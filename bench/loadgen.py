"""wrk (Debian) with a Lua script that replays a file of requests; its own CPU measured with wait4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.servers import Monitor, Server

SCRIPT = Path(__file__).resolve().parent / "wrk" / "requests.lua"


def ensure_wrk() -> str:
    """wrk from Debian, installed when missing (the bench runs as root, or with sudo available)."""
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not available")
    return found


@dataclass
class Load:
    """One measured workload: which requests, how many connections, for how long."""

    name: str
    requests_file: Path
    connections: int
    method: str = "GET"
    token: str | None = None
    timeout_s: int = 30
    warmup_file: Path | None = None  # for writes that must not repeat (intake): other bodies


def _wrk(
    server: Server, load: Load, seconds: float, *, warmup: bool = False
) -> tuple[dict[str, Any], float, str]:
    requests_file = load.warmup_file if warmup and load.warmup_file else load.requests_file
    env = {**os.environ, "BENCH_REQUESTS": str(requests_file), "BENCH_METHOD": load.method}
    if load.token:
        env["BENCH_TOKEN"] = load.token
    argv = [
        "wrk",
        "-t1",
        f"-c{load.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={load.timeout_s}s",
        "-s",
        str(SCRIPT),
        server.base_url,
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in output.splitlines() if x.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output[-2000:]}")
    return json.loads(line.removeprefix("BENCH_JSON ")), usage.ru_utime + usage.ru_stime, output


def measure(
    server: Server, load: Load, *, seconds: float, warmup: float, database: str | None = None
) -> dict[str, Any]:
    """A short unmeasured warm-up, then the measured run with the server and database watched."""
    if warmup > 0:
        _wrk(server, load, warmup, warmup=True)
    time.sleep(0.5)
    with Monitor(server, database) as monitor:
        raw, loadgen_cpu, _ = _wrk(server, load, seconds)
    duration = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    lines = sum(1 for _ in load.requests_file.open("rb"))
    return {
        "workload": load.name,
        "target": server.name,
        "connections": load.connections,
        "seconds": round(duration, 1),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / duration, 1),
        "p50_ms": round(raw["p50"] / 1000, 2),
        "p95_ms": round(raw["p95"] / 1000, 2),
        "p99_ms": round(raw["p99"] / 1000, 2),
        "max_ms": round(raw["max"] / 1000, 2),
        "errors": errors,
        "error_detail": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]},
        "distinct_requests": lines,
        **monitor.figures(loadgen_cpu),
    }
