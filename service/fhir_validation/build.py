"""Rebuild what the guide derives from the official FHIR R4 definitions (``make ig``).

    python -m service.fhir_validation.build           # rewrite the derived files
    python -m service.fhir_validation.build --check   # exit 1, naming them, if any is stale

Derived: the ``snapshot`` of every StructureDefinition in ``fhir/`` and
``service/fhir_validation/core_required_bindings.json`` (the base specification's required
bindings for every resource type the CapabilityStatement names, plus Bundle). The definitions
come from ``tools/ig`` (``make ig-tools`` installs them from the npm registry, pinned by its
package-lock.json), so the output is the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.fhir_validation.core import DEFINITIONS_DIR, CoreDefinitions
from service.fhir_validation.core_bindings import DATA_FILE, derive
from service.fhir_validation.snapshot import generate, with_snapshot

JSONObject = dict[str, Any]


def _dump(data: JSONObject) -> str:
    # The formatting of every file in fhir/: two-space indent, UTF-8 as is, final newline.
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _snapshots(core: CoreDefinitions, ig_dir: Path) -> dict[Path, str]:
    definitions = {
        path: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(ig_dir.glob("StructureDefinition-*.json"))
    }
    by_url = {sd["url"]: sd for sd in definitions.values()}
    built: dict[str, list[JSONObject]] = {}

    def snapshot_of(url: str) -> list[JSONObject]:
        if url in built:
            return built[url]
        if url in by_url:
            sd = by_url[url]
            base = snapshot_of(sd["baseDefinition"])
            built[url] = generate(base, sd["differential"]["element"], type_snapshot)
        else:
            built[url] = core.structure(url)["snapshot"]["element"]
        return built[url]

    def type_snapshot(code: str) -> list[JSONObject]:
        return list(core.type_definition(code)["snapshot"]["element"])

    return {path: _dump(with_snapshot(sd, snapshot_of(sd["url"]))) for path, sd in definitions.items()}


def _served_types(ig_dir: Path) -> list[str]:
    statement = json.loads((ig_dir / "CapabilityStatement-mhr.json").read_text(encoding="utf-8"))
    return [r["type"] for rest in statement["rest"] for r in rest["resource"]] + ["Bundle"]


def outputs(ig_dir: Path, definitions: Path) -> dict[Path, str]:
    """Every derived file and the text it should have."""
    core = CoreDefinitions.load(definitions)
    files = _snapshots(core, ig_dir)
    files[DATA_FILE] = json.dumps(derive(core, _served_types(ig_dir)), indent=1) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.fhir_validation.build", description=__doc__)
    parser.add_argument("--ig", type=Path, default=Path("fhir"), help="the guide folder (default: fhir)")
    parser.add_argument("--definitions", type=Path, default=DEFINITIONS_DIR, help="R4 definitions folder")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    try:
        files = outputs(args.ig, args.definitions)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"stale: {path} (run `make ig`)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
