"""The ``{resource_type}`` of a clinical route: a type this service stores, else 404."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from service.http.errors import FhirError
from service.records.resource_types import STORED_TYPES


async def _known_type(resource_type: str) -> str:
    if resource_type not in STORED_TYPES:
        raise FhirError.single(404, "not-supported", "unknown or unsupported resource type")
    return resource_type


KnownType = Annotated[str, Depends(_known_type)]
