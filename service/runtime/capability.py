"""The CapabilityStatement, built from ``fhir/`` and this deployment's URLs, validated once at start."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from service.core.settings import Settings

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SOFTWARE_VERSION = "0.1.0"


def load_capability_statement(ig_dir: Path, settings: Settings) -> dict[str, Any]:
    statement: dict[str, Any] = orjson.loads((ig_dir / "CapabilityStatement-mhr.json").read_bytes())
    statement["date"] = datetime.now(UTC).date().isoformat()
    statement["software"] = {"name": "mhr", "version": SOFTWARE_VERSION}
    statement["implementation"] = {
        "description": "mhr migrant health records",
        "url": settings.fhir_base_url,
    }
    for rest in statement.get("rest", []):
        security = rest.setdefault("security", {})
        extensions = [e for e in security.get("extension", []) if e.get("url") != OAUTH_URIS]
        extensions.append(
            {"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": settings.token_url}]}
        )
        security["extension"] = extensions
    # Fails start-up on a malformed statement rather than serving one.
    CapabilityStatement.model_validate(statement)
    return statement
