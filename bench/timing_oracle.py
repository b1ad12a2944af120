"""Can an authority tell "exists but withheld" from "does not exist" by how long a 404 takes?

    python -m bench.timing_oracle                 # 250 requests of each kind per route
    python -m bench.timing_oracle --per-kind 400 --exams 40

Starts the service as ``make bench`` does (``mhr serve``, 2 workers, PostgreSQL
database ``mhr_bench_timing``, recreated), loads exams through the API whose
Consents name authority A only, and then, as authority B, asks each authority
route for ids that exist but are withheld and for ids that name nothing,
interleaved in one shuffled sequence over one keep-alive connection (so that
drift, caches and the other worker hit both kinds alike). It prints the 10th,
50th and 90th percentile of each kind per route, the difference of medians,
and whether the distributions *separate*: the 10th percentile of one above the
90th of the other (the criterion the issue was filed with) and, because a busy
machine widens both distributions until that criterion sees nothing, the
probability that a withheld request is the slower of a pair with its Mann-Whitney
z score (0.5 and |z| < 3: no measurable shift). Both kinds must
answer 404 (or an empty searchset) with identical bodies; the script checks that
too. A measurement, not a test: results go to stdout and ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.generate import exam
from bench.parties import database_url, setup
from bench.run import RESULTS, mhr_server

DB = "mhr_bench_timing"
FHIR = "application/fhir+json"
ROUTES: dict[str, str] = {
    "read Patient": "/fhir/Patient/{id}",
    "read Observation": "/fhir/Observation/{oid}",
    "vread Observation": "/fhir/Observation/{oid}/_history/1",
    "history Observation": "/fhir/Observation/{oid}/_history",
    "search Observation?_id": "/fhir/Observation?_id={oid}",
    "Patient/$everything": "/fhir/Patient/{id}/$everything",
}


def log(message: str) -> None:
    print(f"[timing {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def only_authority_a(bundle: dict[str, Any]) -> dict[str, Any]:
    """The exam without the Consent that names authority B: B's reads are withheld, A's are not."""
    bundle["entry"] = [
        e
        for e in bundle["entry"]
        if not (e["resource"]["resourceType"] == "Consent" and "authority-b" in json.dumps(e["resource"]))
    ]
    return bundle


def load_exams(base: str, token: str, count: int) -> list[tuple[str, str]]:
    """(Patient id, one Observation id) per exam, through POST /fhir."""
    now = datetime.now(UTC)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR}
    found = []
    with httpx.Client(timeout=120) as client:
        for index in range(count):
            reply = client.post(
                f"{base}/fhir", content=orjson.dumps(only_authority_a(exam(index, 11, now))), headers=headers
            )
            reply.raise_for_status()
            locations = [e["response"]["location"].split("/") for e in reply.json()["entry"]]
            patient = next(loc[1] for loc in locations if loc[0] == "Patient")
            observation = next(loc[1] for loc in locations if loc[0] == "Observation")
            found.append((patient, observation))
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(
    base: str, token: str, subjects: list[tuple[str, str]], per_kind: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    rng = random.Random(seed)
    plan: list[tuple[str, str, str]] = []
    for route, template in ROUTES.items():
        for _ in range(per_kind):
            patient, observation = rng.choice(subjects)
            plan.append((route, "withheld", template.format(id=patient, oid=observation)))
            plan.append((route, "absent", template.format(id=uuid.uuid4(), oid=uuid.uuid4())))
    rng.shuffle(plan)
    timings: dict[str, dict[str, list[float]]] = {r: {"withheld": [], "absent": []} for r in ROUTES}
    bodies: dict[tuple[str, str], set[bytes]] = {}
    headers = {"Authorization": f"Bearer {token}", "Accept": FHIR}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for _, _, path in plan[: min(200, len(plan))]:  # warm-up: caches, pools, prepared plans
            client.get(path)
        for route, kind, path in plan:
            began = time.perf_counter_ns()
            response = client.get(path)
            elapsed_ms = (time.perf_counter_ns() - began) / 1e6
            timings[route][kind].append(elapsed_ms)
            body = response.content
            if response.headers.get("content-type", "").startswith(FHIR) and b'"searchset"' in body:
                parsed = response.json()
                body = orjson.dumps({"total": parsed.get("total"), "entry": parsed.get("entry", [])})
            bodies.setdefault((route, kind), set()).add(f"{response.status_code} ".encode() + body)
    for route in ROUTES:
        withheld, absent = bodies[(route, "withheld")], bodies[(route, "absent")]
        if withheld != absent or len(withheld) != 1:
            log(f"!! {route}: answers differ between kinds: {sorted(withheld | absent)[:3]}")
    return timings


def mann_whitney(first: list[float], second: list[float]) -> tuple[float, float]:
    """P(a request of ``first`` is slower than one of ``second``) and its z score (normal
    approximation of the Mann-Whitney U test): 0.5 and |z| < 3 mean no measurable shift."""
    pooled = sorted([(v, 0) for v in first] + [(v, 1) for v in second])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):  # average ranks over ties
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    n1, n2 = len(first), len(second)
    u = sum(r for r, (_, group) in zip(ranks, pooled, strict=True) if group == 0) - n1 * (n1 + 1) / 2
    z = (u - n1 * n2 / 2) / ((n1 * n2 * (n1 + n2 + 1) / 12) ** 0.5)
    return u / (n1 * n2), z


def report(timings: dict[str, dict[str, list[float]]]) -> tuple[list[str], bool]:
    """Percentiles per kind and route; "separate" is the issue's criterion (p10 of one kind above
    p90 of the other); P(slower) and z tell a smaller but consistent shift on a busy machine."""
    lines = [
        f"{'route':<24} {'kind':<9} {'n':>4} {'p10 ms':>7} {'p50 ms':>7} {'p90 ms':>7}"
        "   separate?  p50 diff   P(withheld slower)      z",
    ]
    any_separate = False
    for route, kinds in timings.items():
        stats = {k: (percentile(v, 0.1), statistics.median(v), percentile(v, 0.9)) for k, v in kinds.items()}
        (w10, w50, w90), (a10, a50, a90) = stats["withheld"], stats["absent"]
        separate = w10 > a90 or a10 > w90
        any_separate |= separate
        for kind in ("withheld", "absent"):
            p10, p50, p90 = stats[kind]
            tail = ""
            if kind == "absent":
                slower, z = mann_whitney(kinds["withheld"], kinds["absent"])
                tail = (
                    f"   {'YES' if separate else 'no':<9}  {w50 - a50:+.2f} ms   {slower:>18.3f} {z:>+6.1f}"
                )
            lines.append(
                f"{route:<24} {kind:<9} {len(kinds[kind]):>4} {p10:>7.2f} {p50:>7.2f} {p90:>7.2f}{tail}"
            )
    return lines, any_separate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--exams", type=int, default=30, help="exams loaded (their ids are the withheld ones)"
    )
    parser.add_argument("--per-kind", type=int, default=250, help="requests per kind and route (>= 200)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    args = parser.parse_args(argv)
    out = RESULTS / f"timing-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    log(f"database {DB}: fresh, migrated, parties registered")
    parties = setup(DB, out / "parties")
    with mhr_server("mhr-timing", database_url(DB), out / "parties" / "keyring.json", out) as server:
        clinic = parties["clinic"].token(server.base_url, "system/*.cruds")
        authority = parties["authority-b"].token(server.base_url, "system/*.rs", "PUBHLTH")
        log(f"loading {args.exams} exams whose Consents name authority A only")
        subjects = load_exams(server.base_url, clinic, args.exams)
        total = args.per_kind * 2 * len(ROUTES)
        log(f"{total} requests as authority B, interleaved: withheld ids vs ids that name nothing")
        timings = measure(server.base_url, authority, subjects, args.per_kind, args.seed)
    lines, separate = report(timings)
    print("\n".join(lines))
    verdict = (
        "distributions SEPARATE on at least one route"
        if separate
        else "no route separates (p10 of neither kind above p90 of the other)"
    )
    print(verdict)
    Path(out / "timing.txt").write_text("\n".join([args.label, *lines, verdict]) + "\n")
    Path(out / "timing.json").write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
