"""The project's packages are the ones imported.

PyPI has unrelated distributions named ``service``, ``security`` and
``migrations``; an environment holding one must not silently run it instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import migrations
import security
import service

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", [service, security, migrations], ids=lambda p: p.__name__)
def test_package_is_the_repository_one(package: object) -> None:
    location = Path(package.__file__).resolve()  # type: ignore[attr-defined]
    assert location == REPO / package.__name__ / "__init__.py"  # type: ignore[attr-defined]


def test_fhir_directory_is_data_and_does_not_shadow_fhir_resources() -> None:
    import fhir.resources

    assert not list((REPO / "fhir").rglob("*.py")), "fhir/ holds the IG as JSON; Python belongs in service/"
    assert REPO / "fhir" not in Path(fhir.resources.__file__).resolve().parents


def test_migration_template_ships_with_the_package() -> None:
    # pyproject's package-data: without it an installed `mhr` cannot create revisions.
    assert (REPO / "migrations" / "script.py.mako").is_file()
    assert (REPO / "migrations" / "versions" / "__init__.py").is_file()
