"""Before and after in one run: W2 and W3 of a baseline commit and of the working tree.

    python -m bench.compare                          # baseline: the previous landing (bench.baseline)
    python -m bench.compare --scale 100000 --rounds 3 --round-seconds 10
    BENCH_BASELINE_REF=ec7e6f2 python -m bench.compare --quick

Both servers run side by side (2 uvicorn workers each, their own port), each on
its own database, and the two databases are identical copies: the 1k database
is loaded once through the baseline's ``POST /fhir`` at the baseline's schema
and copied, and the scale database (``bench.scale``, kept at the baseline's
schema) is copied twice. The working tree's server migrates its copy at start,
as a deployment would. Each workload then runs ``--rounds`` times on each side,
alternating which side goes first, so that what else the machine is doing
falls on both alike; the figures are the medians over the rounds and the
ratios after/before. ``make bench`` runs this as one of its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baseline, scale
from bench.loadgen import Load, ensure_wrk, measure
from bench.parties import DB_PREFIX, Party, database_url, recreate_database, setup
from bench.parties import load as load_parties
from bench.servers import REPO, Server
from bench.workloads import (
    CONNECTIONS,
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

RESULTS = REPO / "bench" / "results"
SIDES = ("before", "after")
SUMMARY = ("rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_pct", "db_cpu_pct")


@dataclass
class Workload:
    id: str
    label: str
    requests_file: Path
    connections: int
    # At least this long a round: a request slower than the round would leave it without figures.
    min_seconds: float = 0.0


@dataclass
class Side:
    name: str  # before | after
    server: Server
    database: str
    token: str


def _tree(side: str, base: baseline.Baseline) -> Path:
    return base.tree if side == "before" else REPO


def _alternate(
    sides: list[Side], workloads: list[Workload], args: argparse.Namespace, scale_label: str
) -> list[dict[str, Any]]:
    """Every workload, ``args.rounds`` times on each side, the side going first alternating."""
    rows = []
    for workload in workloads:
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
        for side in sides:
            smoke(side.server, Load(workload.id, workload.requests_file, 1, token=side.token))
            analyze(side.database)  # as autovacuum would, after what the side wrote before
        for round_no in range(args.rounds):
            order = sides if round_no % 2 == 0 else list(reversed(sides))
            for side in order:
                load = Load(workload.id, workload.requests_file, workload.connections, token=side.token)
                figures = measure(
                    side.server,
                    load,
                    seconds=max(args.round_seconds, workload.min_seconds),
                    warmup=args.warmup,
                    database=side.database,
                )
                runs[side.name].append(figures)
                log(
                    f"{workload.label} [{side.name}, round {round_no + 1}]: {figures['rps']} req/s  "
                    f"p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms  errors {figures['errors']}"
                )
        row: dict[str, Any] = {
            "id": workload.id,
            "label": workload.label,
            "scale": scale_label,
            "connections": workload.connections,
        }
        for name, figures in runs.items():
            row[name] = {k: round(statistics.median(f[k] for f in figures), 2) for k in SUMMARY}
            row[name]["errors"] = sum(f["errors"] for f in figures)
            row[name]["rounds"] = figures
        before, after = row["before"], row["after"]
        row["ratio"] = {
            k: round(after[k] / before[k], 2) if before[k] else None for k in ("rps", "p50_ms", "p99_ms")
        }
        rows.append(row)
    return rows


def _token(party: Party, server: Server) -> str:
    return party.token(server.base_url, "system/*.rs", "PUBHLTH")


def _run_pair(
    base: baseline.Baseline,
    databases: dict[str, str],
    keyring: Path,
    parties: dict[str, Party],
    out: Path,
    body: Callable[[list[Side]], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    with ExitStack() as stack:
        sides = []
        for name in SIDES:
            server = stack.enter_context(
                mhr_server(
                    f"{name}-{databases[name]}",
                    database_url(databases[name]),
                    keyring,
                    out,
                    tree=_tree(name, base),
                )
            )
            sides.append(Side(name, server, databases[name], _token(parties["authority-a"], server)))
        return body(sides)


def compare(args: argparse.Namespace, out: Path, base: baseline.Baseline, scale_exams: int) -> dict[str, Any]:
    """W2 and W3 before and after at ``args.exams`` exams, and W3 at ``scale_exams`` (0: not)."""
    began = time.perf_counter()
    log(f"baseline {args.baseline} = {base.short}; after = the working tree")
    c = CONNECTIONS
    rng = random.Random(7)
    document: dict[str, Any] = {
        "baseline": {"ref": base.ref, "commit": base.commit},
        "rounds": args.rounds,
        "seconds_per_round": args.round_seconds,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "workloads": [],
    }

    # --- the small database: loaded once, through the baseline's API, then copied --------
    small = {"before": f"{DB_PREFIX}_cmp_before", "after": f"{DB_PREFIX}_cmp_after"}
    workdir = out / "cmp-parties"
    parties = setup(small["before"], workdir, baseline.migrator(base))
    keyring = workdir / "keyring.json"
    with mhr_server("load-before", database_url(small["before"]), keyring, out, tree=base.tree) as server:
        clinic = parties["clinic"].token(server.base_url, "system/*.cruds")
        log(f"loading {args.exams} exams through the baseline's POST /fhir")
        document["api_load"] = load_through_api(server, clinic, args.exams, small["before"])
        authority = _token(parties["authority-a"], server)
        readable = permitted_reads(server, authority, small["before"])
        patients = [
            r[0]
            for r in ids(
                small["before"], "SELECT id FROM resources WHERE resource_type = 'Patient' ORDER BY id"
            )
        ]
        walk = first_pull(server.base_url, authority, rng)
    recreate_database(small["after"], template=small["before"])
    n = args.exams
    workloads = [
        Workload(
            "W2",
            "W2 authority read",
            write_lines(out / "cmp-w2.txt", readable),
            c["W2"],
        ),
        Workload(
            "W3a",
            f"W3 Patient?_lastUpdated page at {n} exams",
            write_lines(out / "cmp-w3a.txt", walk),
            c["W3"],
        ),
        Workload(
            "W3f",
            f"W3 first page, total counted, at {n} exams",
            write_lines(out / "cmp-w3f.txt", [first_page_path()]),
            c["W3"],
        ),
        Workload(
            "W3b",
            f"W3 Observation?patient page at {n} exams",
            write_lines(out / "cmp-w3b.txt", [f"/fhir/Observation?patient={p}&_count=50" for p in patients]),
            c["W3"],
        ),
    ]
    document["workloads"] += _run_pair(
        base, small, keyring, parties, out, lambda sides: _alternate(sides, workloads, args, f"{n}")
    )

    # --- the scale database: kept at the baseline's schema, two identical copies ------------
    if scale_exams:
        log(f"scale database: {scale_exams} exams (kept at the baseline's schema)")
        manifest = scale.ensure(scale_exams, log=log, migrate_database=baseline.migrator(base))
        document["scale"] = {k: v for k, v in manifest.items() if k != "fingerprint"}
        copies = {name: scale.copy(f"{scale.DB}_{name}") for name in SIDES}
        scale_parties = load_parties(scale.STATE)
        m = manifest["exams"]

        def scale_workloads(sides: list[Side]) -> list[dict[str, Any]]:
            full_patients = [
                r[0]
                for r in ids(
                    copies["before"],
                    "SELECT DISTINCT subject_id FROM resources WHERE resource_type = 'Immunization' "
                    "ORDER BY subject_id LIMIT 1000",
                )
            ]
            before = sides[0]
            scale_walk = first_pull(before.server.base_url, before.token, rng)
            loads = [
                Workload(
                    "W3a",
                    f"W3 Patient?_lastUpdated page at {m} exams",
                    write_lines(out / "cmp-w3a-scale.txt", scale_walk),
                    c["W3"],
                ),
                Workload(
                    "W3f",
                    f"W3 first page, total counted, at {m} exams",
                    workloads[2].requests_file,
                    c["W3"],
                    # Before this tree's indexes, one such page took seconds at 100k exams.
                    min_seconds=30.0,
                ),
                Workload(
                    "W3b",
                    f"W3 Observation?patient page at {m} exams",
                    write_lines(
                        out / "cmp-w3b-scale.txt",
                        [f"/fhir/Observation?patient={p}&_count=50" for p in full_patients],
                    ),
                    c["W3"],
                ),
            ]
            return _alternate(sides, loads, args, f"{m}")

        document["workloads"] += _run_pair(
            base, copies, scale.STATE / "keyring.json", scale_parties, out, scale_workloads
        )
    document["scaling"] = scaling(document["workloads"])
    document["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    document["minutes"] = round((time.perf_counter() - began) / 60, 1)
    return document


def scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each W3 workload's median p50 at the scale database over its p50 at the small one, per side."""
    by = {(r["id"], r["scale"]): r for r in rows}
    scales = sorted({r["scale"] for r in rows}, key=int)
    if len(scales) < 2:
        return []
    low, high = scales[0], scales[-1]
    out = []
    for workload in ("W3a", "W3f", "W3b"):
        if (workload, low) in by and (workload, high) in by:
            entry: dict[str, Any] = {"id": workload, "from": low, "to": high}
            for side in SIDES:
                small, large = by[(workload, low)][side]["p50_ms"], by[(workload, high)][side]["p50_ms"]
                entry[side] = round(large / small, 2) if small else None
            out.append(entry)
    return out


def markdown(doc: dict[str, Any]) -> str:
    b = doc["baseline"]
    lines = [
        f"## Before ({b['ref']} = {b['commit'][:7]}) and after (the working tree), in one run",
        "",
        f"Medians over {doc['rounds']} rounds of {doc['seconds_per_round']:g} s per side, the side going "
        f"first alternating; identical database copies. Load average {doc['load_average_at_start']} at "
        f"the start, {doc['load_average_at_end']} at the end ({doc['minutes']} min).",
        "",
        "| workload | conns | before req/s | after req/s | ratio | before p50 | after p50 | before p99 "
        "| after p99 | p99 ratio | errors (b/a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["workloads"]:
        bf, af, ratio = r["before"], r["after"], r["ratio"]
        lines.append(
            f"| {r['label']} | {r['connections']} | {bf['rps']:,.1f} | {af['rps']:,.1f} "
            f"| {ratio['rps'] or 'n/a'} "
            f"| {bf['p50_ms']:,.1f} | {af['p50_ms']:,.1f} | {bf['p99_ms']:,.1f} | {af['p99_ms']:,.1f} "
            f"| {ratio['p99_ms'] or 'n/a'} | {bf['errors']}/{af['errors']} |"
        )
    if doc.get("scaling"):
        lines += ["", "| p50 at the larger scale / at the smaller | before | after |", "|---|---:|---:|"]
        for s in doc["scaling"]:
            lines.append(
                f"| {s['id']}, {int(s['to']):,} / {int(s['from']):,} exams | {s['before']} | {s['after']} |"
            )
    return "\n".join(lines) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``bench.run`` shares with this module."""
    parser.add_argument(
        "--baseline",
        default=None,
        help="git ref to measure against (default: BENCH_BASELINE_REF, else the previous landing)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per side and workload (default 3; quick 1)")
    parser.add_argument("--round-seconds", type=float, help="seconds per round (default 10; quick 4)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 exams, scale 500, 4 s rounds, 1 round")
    parser.add_argument("--exams", type=int, help="exams in the small database (default 1000; quick 100)")
    parser.add_argument(
        "--scale", type=int, help="exams in the scale database (default 10000; quick 500; 0: none)"
    )
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each round (default 2; quick 1)"
    )
    arguments(parser)
    args = parser.parse_args(argv)
    args.exams = args.exams or (100 if args.quick else 1000)
    args.scale = args.scale if args.scale is not None else (500 if args.quick else 10_000)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    defaults(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"compare-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    ensure_wrk()
    document = compare(args, out, baseline.build(args.baseline, log=log), args.scale)
    (out / "compare.json").write_text(json.dumps(document, indent=2))
    text = markdown(document)
    (out / "compare.md").write_text(text)
    print(text)
    return 0


def defaults(args: argparse.Namespace) -> None:
    """Rounds, their length and the baseline, where not given (``args.quick`` shortens them)."""
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.round_seconds = args.round_seconds or (4.0 if args.quick else 10.0)
    args.baseline = args.baseline or baseline.default_ref()


if __name__ == "__main__":
    raise SystemExit(main())
