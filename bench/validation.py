"""The validation ceiling: fhir.resources parsing + validation of the W1 exam Bundles, in-process, all cores.

One process per core validates the same Bundles W1 submits, for a fixed time;
bundles/s is the sum. ``fhir.resources`` alone is the ceiling the issue names;
the service's own ``ProfileValidator`` (R4B + the profiles in ``fhir/``, what
intake runs) is measured the same way for reference.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import orjson


def _run(args: tuple[str, str, float]) -> tuple[int, float]:
    kind, path, seconds = args
    bundles = [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
    if kind == "fhir.resources":
        from fhir.resources.R4B.bundle import Bundle

        def check(bundle: dict[str, Any]) -> None:
            Bundle.model_validate(bundle)
    else:
        from service.fhir_validation import ProfileValidator

        validator = ProfileValidator.load(Path(__file__).resolve().parents[1] / "fhir")

        def check(bundle: dict[str, Any]) -> None:
            issues = validator.validate_bundle(bundle)
            if any(i.severity in ("error", "fatal") for i in issues):
                raise ValueError(f"generated exam does not validate: {issues[:3]}")

    check(bundles[0])  # warm caches outside the timed loop
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        check(bundles[done % len(bundles)])
        done += 1
    return done, time.perf_counter() - began


def ceiling(bundles_file: Path, seconds: float, kind: str = "fhir.resources") -> dict[str, Any]:
    """Bundles/s over all cores (one process each), and per core."""
    cores = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cores) as pool:
        results = pool.map(_run, [(kind, str(bundles_file), seconds)] * cores)
    rate = sum(n / s for n, s in results)
    return {
        "validator": kind,
        "processes": cores,
        "bundles": sum(n for n, _ in results),
        "bundles_per_s": round(rate, 1),
        "ms_per_bundle_per_core": round(1000 * cores / rate, 2),
    }
