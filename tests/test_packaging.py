"""The project's packages are the ones imported.

PyPI has unrelated distributions named ``service``, ``security`` and
``migrations``; an environment holding one must not silently run it instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import migrations
import security
import service
from service.store import migrate

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


def _copy_source(target: Path) -> None:
    """What a clean clone holds for a build, without this checkout's caches and venv."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    for name in ("service", "security", "migrations", "fhir"):
        shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_an_installed_wheel_ships_the_guide_and_finds_it(tmp_path: Path) -> None:
    """Installed non-editable (as the image does), the service finds fhir/ as data, not as a package."""
    source, dist = tmp_path / "source", tmp_path / "dist"
    _copy_source(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], check=True
    )
    (wheel,) = dist.glob("mhr-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    data = next(n for n in names if ".data/data/share/mhr/fhir/" in n).split("share/mhr/fhir/")[0]
    shipped = {
        n.removeprefix(data + "share/mhr/fhir/") for n in names if n.startswith(data + "share/mhr/fhir/")
    }
    expected = {str(p.relative_to(REPO / "fhir")) for p in (REPO / "fhir").rglob("*") if p.is_file()}
    assert shipped == expected, "pyproject's data-files must list every file of the implementation guide"
    assert not [n for n in names if n.startswith("fhir/")], "fhir/ must not become a package"

    # An environment of its own: the wheel installed into it, the dependencies seen from this one.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    probe = (
        "import json, service, service.core.settings as s\n"
        "from service.runtime.capability import load_capability_statement\n"
        "from service.fhir_validation import ProfileValidator\n"
        "from service.store.migrate import head_revision\n"
        "from service.runtime.providers import build_runtime\n"
        "settings = s.Settings(env='development')\n"
        "ProfileValidator.load(settings.ig_dir)\n"
        "build_runtime(settings)  # every data file the service reads at start-up\n"
        "statement = load_capability_statement(settings.ig_dir, settings)\n"
        "print(json.dumps({'service': service.__file__, 'ig': str(settings.ig_dir),\n"
        "    'head': head_revision(), 'capability': statement['resourceType']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MHR_")}
    found = json.loads(
        subprocess.run(
            [str(python), "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    assert Path(found["service"]).is_relative_to(purelib)
    assert Path(found["ig"]) == venv / "share" / "mhr" / "fhir"
    assert found["head"] == migrate.head_revision()
    assert found["capability"] == "CapabilityStatement"


def _pinned(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(";")[0].split("\\")[0].strip().split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_files_pin_every_declared_dependency() -> None:
    """`make lock` was run after the last change to pyproject.toml's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = [Requirement(r) for r in project["project"]["dependencies"]]
    extras = [Requirement(r) for group in project["project"]["optional-dependencies"].values() for r in group]
    build = [Requirement(r) for r in project["build-system"]["requires"]]
    full, image = _pinned(REPO / "requirements.lock"), _pinned(REPO / "requirements-runtime.lock")
    for requirement in [*runtime, *extras, *build]:
        name = canonicalize_name(requirement.name)
        assert name in full, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(full[name]), f"requirements.lock pins {name}=={full[name]}"
    for requirement in [*runtime, *build]:
        name = canonicalize_name(requirement.name)
        assert image.get(name) == full[name], (
            f"requirements-runtime.lock disagrees on {name}: run `make lock`"
        )
