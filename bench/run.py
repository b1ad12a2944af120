"""``make bench``: every workload and baseline in one run, figures to ``bench/results/``.

    python -m bench.run              # default: 1k exams, 30 s per workload, scale 10k (about 15-20 min)
    python -m bench.run --quick      # small counts, 4 s per workload (under 3 minutes)
    python -m bench.run --scale 100000 --profile W1,W2

Everything runs on this machine: PostgreSQL at 127.0.0.1:5432 (databases
``mhr_bench``, ``mhr_bench_peer``, ``mhr_bench_scale``, or under ``BENCH_DB_PREFIX``; never ``test``), the
servers under test with 2 uvicorn workers, and wrk. See README, "Performance".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from bench import baseline, compare, report, scale
from bench.generate import exam
from bench.loadgen import Load, ensure_wrk, measure
from bench.parties import DB_PREFIX, database_url, psql, recreate_database, setup
from bench.parties import load as load_parties
from bench.servers import REPO, Server, free_port, running
from bench.validation import ceiling
from bench.workloads import (
    CONNECTIONS,
    FHIR,
    analyze,
    first_page_path,
    first_pull,
    ids,
    load_through_api,
    log,
    mhr_server,
    permitted_reads,
    smoke,
    write_lines,
)

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PEER_VENV = BENCH / ".venv-peer"
PEER_REQUIREMENTS = BENCH / "peer" / "requirements.txt"
MAIN_DB = DB_PREFIX
PEER_DB = f"{DB_PREFIX}_peer"


# --- setup ------------------------------------------------------------------------------
def ensure_peer_venv() -> None:
    """fhirstarter pins an older FastAPI: it gets its own venv, from PyPI, pinned."""
    stamp = PEER_VENV / ".installed"
    wanted = PEER_REQUIREMENTS.read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    log("installing the peer (fhirstarter) into bench/.venv-peer")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    pip = [str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    for extra in (["--upgrade", "pip"], ["-r", str(PEER_REQUIREMENTS)]):
        done = subprocess.run([*pip, *extra], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"cannot install the peer:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    stamp.write_text(wanted)


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    with Path("/proc/cpuinfo").open() as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "fhir.resources",
        "SQLAlchemy",
        "asyncpg",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    peer_python = PEER_VENV / "bin" / "python"  # absent with --no-peer on a fresh checkout
    peer = subprocess.run(
        [str(peer_python), "-m", "pip", "list", "--format=json"] if peer_python.exists() else ["false"],
        capture_output=True,
        text=True,
        check=False,
    )
    peer_packages = {
        p["name"]: p["version"]
        for p in (json.loads(peer.stdout) if peer.returncode == 0 else [])
        if p["name"].lower() in ("fhirstarter", "fastapi", "fhir.resources", "uvicorn", "asyncpg", "pydantic")
    }
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": _version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": psql("postgres", "SHOW server_version"),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
        "packages": packages,
        "peer_packages": peer_packages,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        # The figures are of the working tree: say which tracked files differ from the commit.
        "git_modified": subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "diff",
                "--name-only",
                "HEAD",
                "--",
                "service",
                "security",
                "migrations",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split(),
    }


# --- request files ----------------------------------------------------------------------
def write_bundles(path: Path, first: int, count: int) -> Path:
    now = datetime.now(UTC)
    with path.open("wb") as handle:
        for index in range(first, first + count):
            handle.write(b"/fhir\t" + orjson.dumps(exam(index, 1, now)) + b"\n")
    return path


def observation(patient_id: str, rng: random.Random) -> dict[str, Any]:
    """The W5 resource: one vital sign, as a clinic system would post it."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T09:30:00+03:00",
        "valueQuantity": {
            "value": rng.randint(55, 110),
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


# --- steps ------------------------------------------------------------------------------
def failure(extra: dict[str, Any], phase: str, exc: Exception) -> None:
    log(f"{phase} failed: {exc!r}")
    traceback.print_exc()
    extra.setdefault("failures", []).append({"phase": phase, "error": repr(exc)[:2000]})


def create_observations(base: str, path: str, token: str | None, bodies: list[bytes]) -> list[str]:
    """Create resources one by one; the ids from the Location headers."""
    headers = {"Content-Type": FHIR}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    created = []
    with httpx.Client(timeout=30) as client:
        for body in bodies:
            response = client.post(f"{base}{path}", content=body, headers=headers)
            if response.status_code != 201:
                raise RuntimeError(f"create failed {response.status_code}: {response.text[:300]}")
            location = response.headers["Location"]
            created.append(location.split("/Observation/")[1].split("/")[0])
    return created


class Runner:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.results: list[dict[str, Any]] = []
        self.profiles: dict[str, dict[str, Any]] = {}

    def run(
        self, server: Server, load: Load, *, workload: str, label: str, database: str | None
    ) -> dict[str, Any]:
        smoke(server, load)
        if database is not None:
            analyze(database)  # what the workloads before this one wrote is in the statistics
        log(f"{label}: {load.connections} connections, {self.args.duration:g} s")
        figures = measure(
            server, load, seconds=self.args.duration, warmup=self.args.warmup, database=database
        )
        figures.update({"id": workload, "label": label})
        self.results.append(figures)
        log(
            f"  {figures['rps']} req/s  p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms  "
            f"p99 {figures['p99_ms']} ms  errors {figures['errors']}  server CPU {figures['server_cpu_pct']}%"
        )
        if workload in self.args.profile and server.name.startswith("mhr"):
            self.profile(server, load, workload)
        return figures

    def profile(self, server: Server, load: Load, workload: str) -> None:
        """A separate, unmeasured run with py-spy sampling the workers (it costs CPU itself)."""
        pyspy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
        target = self.out / f"profile-{workload}.txt"
        seconds = max(5, round(self.args.duration))
        spy = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(server.process.pid),
                "--subprocesses",
                "-r",
                "97",
                "-d",
                str(seconds),
                "-f",
                "raw",
                "-o",
                str(target),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        measure(server, load, seconds=seconds, warmup=0)
        spy.wait(timeout=seconds + 60)
        self.profiles[workload] = {"file": target.name, "top": report.profile_summary(target)}
        log(f"  profile of {workload}: {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 4 s per workload")
    parser.add_argument("--exams", type=int, help="exams loaded through the API (default 1000; quick 100)")
    parser.add_argument("--scale", type=int, help="exams in the scale database (default 10000; quick 500)")
    parser.add_argument("--duration", type=float, help="seconds per measured workload (default 30; quick 4)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 3; quick 1)")
    parser.add_argument(
        "--profile",
        help="workloads to profile with py-spy after measuring them (default W1,W2,W3a; quick none)",
    )
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip W2 and W3 before (a baseline commit) and after"
    )
    compare.arguments(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    args.exams = args.exams or (100 if quick else 1000)
    args.scale = args.scale or (500 if quick else 10_000)
    args.duration = args.duration or (4.0 if quick else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 3.0)
    compare.defaults(args)
    if args.profile is None:
        args.profile = "" if quick else "W1,W2,W3a"
    args.profile = {p.strip() for p in args.profile.split(",") if p.strip()}

    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    ensure_wrk()
    if not args.no_peer:
        ensure_peer_venv()
    info = machine()
    log(
        f"results in {out}; {info['cores']} cores, {info['cpu']}, "
        f"load average {info['load_average_at_start']}"
    )
    runner = Runner(args, out)
    extra: dict[str, Any] = {}

    # Request files for intake: bodies never repeat within a run (each is a new migrant).
    w1_count = 200 if quick else 1500
    w1_file = write_bundles(out / "w1-exams.txt", 1_000_000, w1_count)
    w1_warm = write_bundles(out / "w1-warmup.txt", 2_000_000, 30 if quick else 150)

    # --- mhr on the 1k database ------------------------------------------------------
    log(f"database {MAIN_DB}: fresh, migrated, parties registered")
    parties = setup(MAIN_DB, out / "parties")
    keyring = out / "parties" / "keyring.json"
    with mhr_server("mhr", database_url(MAIN_DB), keyring, out) as server:
        clinic = parties["clinic"].token(server.base_url, "system/*.cruds")
        authority = parties["authority-a"].token(server.base_url, "system/*.rs", "PUBHLTH")
        log(f"loading {args.exams} exams through the API (POST /fhir, 4 connections)")
        extra["api_load"] = load_through_api(server, clinic, args.exams, MAIN_DB)
        log(f"  {extra['api_load']}")
        rng = random.Random(7)
        patients = [
            r[0] for r in ids(MAIN_DB, "SELECT id FROM resources WHERE resource_type = 'Patient' ORDER BY id")
        ]
        w2 = write_lines(out / "w2.txt", permitted_reads(server, authority, MAIN_DB))
        w3a = write_lines(out / "w3a.txt", first_pull(server.base_url, authority, rng))
        w3b = write_lines(out / "w3b.txt", [f"/fhir/Observation?patient={p}&_count=50" for p in patients])
        w4 = write_lines(out / "w4.txt", [f"/fhir/Patient/{p}/$everything" for p in patients])
        w5_bodies = [orjson.dumps(observation(rng.choice(patients), rng)) for _ in range(300)]
        w5c = write_lines(out / "w5-create.txt", [f"/fhir/Observation\t{b.decode()}" for b in w5_bodies])

        c = CONNECTIONS
        runner.run(
            server,
            Load("W2", w2, c["W2"], token=authority),
            workload="W2",
            label="W2 authority read",
            database=MAIN_DB,
        )
        runner.run(
            server,
            Load("W3a", w3a, c["W3"], token=authority),
            workload="W3a",
            label=f"W3 Patient?_lastUpdated page at {args.exams} exams",
            database=MAIN_DB,
        )
        w3f = write_lines(out / "w3-first.txt", [first_page_path()])
        runner.run(
            server,
            Load("W3f", w3f, c["W3"], token=authority),
            workload="W3f",
            label=f"W3 first page, total counted, at {args.exams} exams",
            database=MAIN_DB,
        )
        runner.run(
            server,
            Load("W3b", w3b, c["W3"], token=authority),
            workload="W3b",
            label=f"W3 Observation?patient page at {args.exams} exams",
            database=MAIN_DB,
        )
        runner.run(
            server,
            Load("W4", w4, c["W4"], token=authority),
            workload="W4",
            label="W4 Patient/$everything",
            database=MAIN_DB,
        )
        runner.run(
            server,
            Load("W5c", w5c, c["W5"], method="POST", token=clinic),
            workload="W5c",
            label="W5 clinic create Observation",
            database=MAIN_DB,
        )
        created = create_observations(server.base_url, "/fhir/Observation", clinic, w5_bodies)
        w5r = write_lines(out / "w5-read.txt", [f"/fhir/Observation/{i}" for i in created])
        runner.run(
            server,
            Load("W5r", w5r, c["W5"], token=clinic),
            workload="W5r",
            label="W5 clinic read Observation",
            database=MAIN_DB,
        )
        w1 = runner.run(
            server,
            Load("W1", w1_file, c["W1"], method="POST", token=clinic, timeout_s=60, warmup_file=w1_warm),
            workload="W1",
            label="W1 intake (exam Bundle)",
            database=MAIN_DB,
        )
        if w1["requests"] > w1_count:
            w1["note"] = f"{w1['requests'] - w1_count} bundles were sent twice (the file has {w1_count})"

    # --- the HTTP-stack ceiling ------------------------------------------------------------
    port = free_port()
    hello_file = write_lines(out / "hello.txt", ["/hello"])
    with running(
        "hello",
        [sys.executable, "-m", "bench.serve_app", "bench.baselines.hello:app", str(port)],
        port=port,
        ready_path="/hello",
        log_path=out / "hello.log",
    ) as server:
        runner.run(
            server,
            Load("hello", hello_file, c["hello"]),
            workload="hello",
            label="HTTP-stack ceiling (FastAPI hello)",
            database=None,
        )

    # --- the validation ceiling ------------------------------------------------------------
    seconds = max(5.0, args.duration / 2)
    log(
        f"validation ceiling: fhir.resources on the W1 Bundles, {psutil.cpu_count()} processes, {seconds:g} s"
    )
    validation_file = out / "w1-validation.ndjson"
    validation_file.write_bytes(
        b"".join(line.split(b"\t", 1)[1] for line in w1_file.read_bytes().splitlines(keepends=True)[:200])
    )
    extra["validation"] = ceiling(validation_file, seconds)
    log(f"  {extra['validation']}")
    extra["validation_profiles"] = ceiling(validation_file, seconds, kind="mhr ProfileValidator")
    log(f"  {extra['validation_profiles']}")

    # --- the peer --------------------------------------------------------------------------
    try:
        if not args.no_peer:
            recreate_database(PEER_DB)
            psql(
                PEER_DB,
                "CREATE TABLE resources (type text NOT NULL, id uuid NOT NULL, body jsonb NOT NULL, "
                "PRIMARY KEY (type, id))",
            )
            port = free_port()
            env = {"FHIR_SEQUENCE": "R4B", "PEER_DSN": f"postgresql://postgres@127.0.0.1:5432/{PEER_DB}"}
            argv = [
                str(PEER_VENV / "bin" / "python"),
                "-m",
                "bench.serve_app",
                "bench.peer.app:app",
                str(port),
            ]
            with running(
                "peer", argv, port=port, ready_path="/metadata", log_path=out / "peer.log", env=env
            ) as server:
                peer_c = write_lines(
                    out / "peer-create.txt", [f"/Observation\t{b.decode()}" for b in w5_bodies]
                )
                runner.run(
                    server,
                    Load("W5c", peer_c, c["W5"], method="POST"),
                    workload="peer-W5c",
                    label="peer fhirstarter create Observation",
                    database=PEER_DB,
                )
                peer_ids = create_observations(server.base_url, "/Observation", None, w5_bodies)
                peer_r = write_lines(out / "peer-read.txt", [f"/Observation/{i}" for i in peer_ids])
                runner.run(
                    server,
                    Load("W5r", peer_r, c["W5"]),
                    workload="peer-W5r",
                    label="peer fhirstarter read Observation",
                    database=PEER_DB,
                )
    except Exception as exc:  # the figures measured so far are still written
        failure(extra, "peer", exc)

    # --- before and after: W2 and W3 of a baseline commit and of this tree, same run ----------
    base = None
    try:
        if not args.no_baseline:
            base = baseline.build(args.baseline, log=log)
            extra["before_after"] = compare.compare(
                args, out, base, scale_exams=0 if args.no_scale else args.scale
            )
    except Exception as exc:  # the figures measured so far are still written
        failure(extra, "before_after", exc)

    # --- scale: W3 at args.scale exams -------------------------------------------------------
    try:
        if not args.no_scale:
            log(f"scale database: {args.scale} exams")
            began = time.perf_counter()
            manifest = scale.ensure(args.scale, log=log, migrate_database=baseline.migrator(base))
            extra["scale"] = {**manifest, "prepare_seconds_this_run": round(time.perf_counter() - began, 1)}
            state = scale.STATE
            # A copy: the server migrates what it serves, and the kept database stays as loaded.
            scale_db = scale.copy(f"{scale.DB}_run")
            with mhr_server("mhr-scale", database_url(scale_db), state / "keyring.json", out) as server:
                scale_parties = load_parties(state)
                authority = scale_parties["authority-a"].token(server.base_url, "system/*.rs", "PUBHLTH")
                full_patients = [
                    r[0]
                    for r in ids(
                        scale_db,
                        "SELECT DISTINCT subject_id FROM resources WHERE resource_type = 'Immunization' "
                        "ORDER BY subject_id LIMIT 1000",
                    )
                ]
                w3b_s = write_lines(
                    out / "w3b-scale.txt", [f"/fhir/Observation?patient={p}&_count=50" for p in full_patients]
                )
                n = manifest["exams"]
                # Cursors are bound to the client and keyed: this database's authority walks its own.
                w3a_s = write_lines(out / "w3a-scale.txt", first_pull(server.base_url, authority, rng))
                runner.run(
                    server,
                    Load("W3a", w3a_s, c["W3"], token=authority),
                    workload="W3a-scale",
                    label=f"W3 Patient?_lastUpdated page at {n} exams",
                    database=scale_db,
                )
                runner.run(
                    server,
                    Load("W3f", w3f, c["W3"], token=authority),
                    workload="W3f-scale",
                    label=f"W3 first page, total counted, at {n} exams",
                    database=scale_db,
                )
                runner.run(
                    server,
                    Load("W3b", w3b_s, c["W3"], token=authority),
                    workload="W3b-scale",
                    label=f"W3 Observation?patient page at {n} exams",
                    database=scale_db,
                )
    except Exception as exc:  # the figures measured so far are still written
        failure(extra, "scale", exc)

    total = time.perf_counter() - started
    document = report.build(args, info, runner.results, extra, runner.profiles, total)
    report.write(document, out, RESULTS)
    log(f"done in {total / 60:.1f} min: {RESULTS / 'latest.md'}")
    print((RESULTS / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
