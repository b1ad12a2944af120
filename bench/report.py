"""The figures of one run: a JSON document, a Markdown table and a chart of latency by workload."""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.compare import markdown as compare_markdown

IDLE_LEAVES = ("Condition.wait", "select (selectors", "Connection._recv", "Queue.get", "wait (threading")


def profile_summary(path: Path, top: int = 12) -> list[dict[str, Any]]:
    """Where a server's busy time went: the project's own frames (service/, security/) by inclusive share.

    ``path`` holds py-spy's collapsed stacks ("frame;frame;... count"); idle
    threads (thread-pool waits, the event loop's select) are left out.
    """
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if any(leaf in frames[-1] for leaf in IDLE_LEAVES):
            continue
        total += int(count)
        if not any("RequestMiddleware" in f or "/service/" in "/" + f for f in frames) and any(
            "sqlalchemy/" in f or "asyncpg/" in f for f in frames
        ):
            # SQLAlchemy's async layer runs the ORM in greenlets: py-spy shows those stacks cut
            # off from the request that started them.
            detached = "SQLAlchemy ORM + asyncpg, in greenlets (stacks detached from the request)"
            inclusive[detached] = inclusive.get(detached, 0) + int(count)
        seen = set()
        for frame in frames:
            name, _, where = frame.partition(" (")
            source = "/" + where.split(":")[0]
            for package in ("/service/", "/security/"):
                if package in source:
                    key = f"{name} ({package.strip('/')}/{source.split(package, 1)[1]})"
                    if key not in seen:
                        seen.add(key)
                        inclusive[key] = inclusive.get(key, 0) + int(count)
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [{"frame": k, "busy_pct": round(100 * v / total, 1)} for k, v in ranked] if total else []


def _by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in results}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def targets(results: list[dict[str, Any]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met (None: not measured)."""
    r = _by_id(results)

    def get(workload: str, key: str) -> float | None:
        return r[workload][key] if workload in r else None

    w2_rps, w2_p99 = get("W2", "rps"), get("W2", "p99_ms")
    hello = get("hello", "rps")
    validation = extra.get("validation", {}).get("bundles_per_s")
    rows = [
        ("W2 >= 1,500 req/s", w2_rps, 1500, ">="),
        ("W2 p99 <= 50 ms", w2_p99, 50, "<="),
        ("W2 >= 30% of the HTTP-stack ceiling", _ratio(w2_rps, hello), 0.30, ">="),
        ("W5 create >= 2x the peer", _ratio(get("W5c", "rps"), get("peer-W5c", "rps")), 2.0, ">="),
        ("W5 read >= 2x the peer", _ratio(get("W5r", "rps"), get("peer-W5r", "rps")), 2.0, ">="),
        ("W1 >= 60% of the validation ceiling", _ratio(get("W1", "rps"), validation), 0.60, ">="),
        (
            "W3 _lastUpdated p50 at scale <= 1.5x at 1k",
            _ratio(get("W3a-scale", "p50_ms"), get("W3a", "p50_ms")),
            1.5,
            "<=",
        ),
        (
            "W3 first page (total counted) p50 at scale <= 3x at 1k",
            _ratio(get("W3f-scale", "p50_ms"), get("W3f", "p50_ms")),
            3.0,
            "<=",
        ),
        (
            "W3 patient= p50 at scale <= 1.5x at 1k",
            _ratio(get("W3b-scale", "p50_ms"), get("W3b", "p50_ms")),
            1.5,
            "<=",
        ),
        ("errors = 0 in every workload", sum(x["errors"] for x in results), 0, "<="),
        *before_after_targets(extra.get("before_after")),
    ]
    out = []
    for name, value, target, op in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"target": name, "value": value, "threshold": target, "met": met})
    return out


def before_after_targets(doc: dict[str, Any] | None) -> list[tuple[str, float | None, float, str]]:
    """The targets judged against the baseline measured in the same run (``bench.compare``)."""
    if not doc:
        return []
    small = min((int(r["scale"]) for r in doc["workloads"]), default=0)
    w2 = next((r for r in doc["workloads"] if r["id"] == "W2" and int(r["scale"]) == small), None)
    first_page = next((s for s in doc.get("scaling", []) if s["id"] == "W3f"), None)
    return [
        ("W2 after >= 1.5x before (same run, req/s)", w2["ratio"]["rps"] if w2 else None, 1.5, ">="),
        ("W2 after p99 <= 50 ms (16 connections)", w2["after"]["p99_ms"] if w2 else None, 50, "<="),
        (
            "W3 first page (total counted) p50 at scale <= 3x at 1k, after",
            first_page["after"] if first_page else None,
            3.0,
            "<=",
        ),
    ]


def build(
    args: argparse.Namespace,
    info: dict[str, Any],
    results: list[dict[str, Any]],
    extra: dict[str, Any],
    profiles: dict[str, str],
    total_seconds: float,
) -> dict[str, Any]:
    return {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make bench" + (" BENCH_ARGS=--quick" if args.quick else ""),
        "settings": {
            "quick": args.quick,
            "exams_via_api": args.exams,
            "scale_requested": args.scale,
            "seconds_per_workload": args.duration,
            "warmup_seconds": args.warmup,
            "uvicorn_workers": 2,
            "load_generator": "wrk -t1 (one thread), closed loop; latency from wrk's histogram",
        },
        "machine": info,
        "workloads": results,
        "baselines_and_loads": extra,
        "targets": targets(results, extra),
        "profiles": profiles,
        "total_minutes": round(total_seconds / 60, 1),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# mhr bench, {doc['finished_at']}",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, {m['wrk']}. Load average at start: {m['load_average_at_start']}. "
        f"Command: `{doc['command']}` ({doc['total_minutes']} min).",
        "",
        "CPU columns are percent of one core over the measured window (200% = both cores); "
        "`other` is everything else on the machine (other users' work included).",
        "",
        "| workload | conns | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU | server RSS MiB "
        "| DB CPU | wrk CPU | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["workloads"]:
        lines.append(
            f"| {r['label']} | {r['connections']} | {_fmt(r['rps'])} | {_fmt(r['p50_ms'])} "
            f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {r['errors']} | {r['server_cpu_pct']}% "
            f"| {_fmt(r['server_rss_mib_max'])} | {r['db_cpu_pct']}% | {r['loadgen_cpu_pct']}% "
            f"| {r['other_cpu_pct']}% |"
        )
    extra = doc["baselines_and_loads"]
    lines += ["", "| baseline / load | figure |", "|---|---|"]
    if "validation" in extra:
        v = extra["validation"]
        lines.append(
            f"| validation ceiling: fhir.resources, W1 Bundles, {v['processes']} processes "
            f"| {_fmt(v['bundles_per_s'])} bundles/s ({v['ms_per_bundle_per_core']} ms per bundle per core) |"
        )
    if "validation_profiles" in extra:
        v = extra["validation_profiles"]
        lines.append(
            f"| mhr ProfileValidator (R4B + profiles), same Bundles | {_fmt(v['bundles_per_s'])} bundles/s "
            f"({v['ms_per_bundle_per_core']} ms per bundle per core) |"
        )
    if "api_load" in extra:
        a = extra["api_load"]
        lines.append(
            f"| {a['exams']} exams loaded through POST /fhir ({a['connections']} connections) "
            f"| {a['seconds']} s, {a['exams_per_s']} exams/s |"
        )
    if "scale" in extra:
        s = extra["scale"]
        loads = "; ".join(
            f"{x['exams']} {x['shape']} exams in {x['seconds']} s "
            f"({x['exams_per_s']}/s, finished {x['finished_at']})"
            for x in s["loads"]
            if "exams" in x
        )
        sealed = [x["sealed_audit_log_seconds"] for x in s["loads"] if "sealed_audit_log_seconds" in x]
        lines.append(
            f"| scale database: {s['exams']:,} exams, bulk path (in-process Intake, 2 processes) "
            f"| {loads}; audit log sealed in {sum(sealed):.0f} s; "
            f"{'reused from an earlier run' if s.get('reused') else 'loaded in this run'} |"
        )
    for failed in extra.get("failures", []):
        lines.append(f"| **{failed['phase']} failed** | {failed['error'][:300]} |")
    lines += ["", "| target | measured | threshold | met |", "|---|---:|---:|---|"]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {_fmt(t['threshold'])} | {met} |")
    if "before_after" in extra:
        lines += ["", compare_markdown(extra["before_after"])]
    for workload, profile in doc["profiles"].items():
        lines += [
            "",
            f"Where {workload}'s server time goes (py-spy, a separate run; {profile['file']}; "
            "share of busy samples, inclusive, the project's own frames):",
            "",
        ]
        lines += [f"- {p['busy_pct']}% {p['frame']}" for p in profile["top"]]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["workloads"]
    labels = [f"{r['label']}\n{_fmt(r['rps'])} req/s, c={r['connections']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    y = range(len(rows))
    height = 0.27
    for offset, key, name in ((-height, "p50_ms", "p50"), (0, "p95_ms", "p95"), (height, "p99_ms", "p99")):
        ax.barh([i + offset for i in y], [r[key] for r in rows], height=height, label=name)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_title(f"mhr bench, {doc['finished_at']} ({doc['machine']['cores']} cores)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], out: Path, results: Path) -> None:
    (out / "bench.json").write_text(json.dumps(doc, indent=2))
    (out / "bench.md").write_text(markdown(doc))
    chart(doc, out / "latency.png")
    for name, latest in (
        ("bench.json", "latest.json"),
        ("bench.md", "latest.md"),
        ("latency.png", "latest.png"),
    ):
        shutil.copyfile(out / name, results / latest)


if __name__ == "__main__":
    import sys

    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    print(markdown(json.loads(source.read_text())))
