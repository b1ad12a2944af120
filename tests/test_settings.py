"""Outside development, insecure configurations refuse to start and say what to change."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from security.keys import LocalKeyring
from service.app.factory import create_app
from service.cli import main as cli
from service.core.settings import Environment, Settings, SettingsError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings read MHR_* variables: none from the caller's shell may leak into these tests."""
    for name in list(os.environ):
        if name.startswith("MHR_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``mhr`` configures the root logger for its process; give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "keyring.json"
    LocalKeyring.create(path)
    return path


def production(keyring: Path, **overrides: Any) -> Settings:
    """A production configuration that is safe unless an override makes it not."""
    values: dict[str, Any] = {
        "env": Environment.production,
        "public_base_url": "https://mhr.health.example.org",
        "keyring_path": keyring,
        "deployment_name": "mhr.health.example.org/prod",
        "database_url": "postgresql+asyncpg://mhr@db.internal/mhr",
    }
    values.update(overrides)
    return Settings(**values)


def refusal(settings: Settings) -> str:
    with pytest.raises(SettingsError) as caught:
        settings.check_safe_to_start()
    return str(caught.value)


def test_safe_production_configuration_starts(keyring: Path) -> None:
    settings = production(keyring)
    settings.check_safe_to_start()
    assert settings.token_url == "https://mhr.health.example.org/auth/token"
    assert settings.fhir_base_url == "https://mhr.health.example.org/fhir"


def test_production_is_the_default_environment() -> None:
    assert Settings().env is Environment.production
    # ...so a bare start with no configuration at all is refused.
    assert "MHR_PUBLIC_BASE_URL" in refusal(Settings())


def test_production_without_public_base_url_refuses(keyring: Path) -> None:
    message = refusal(production(keyring, public_base_url=None))
    assert message.startswith("refusing to start")
    assert "MHR_PUBLIC_BASE_URL is not set" in message
    assert "https" in message


def test_production_with_http_base_url_refuses(keyring: Path) -> None:
    message = refusal(production(keyring, public_base_url="http://mhr.health.example.org"))
    assert "MHR_PUBLIC_BASE_URL must be an https:// URL" in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o601])
def test_production_with_group_or_world_accessible_keyring_refuses(keyring: Path, mode: int) -> None:
    keyring.chmod(mode)
    message = refusal(production(keyring))
    assert str(keyring) in message
    assert f"chmod 600 {keyring}" in message


def test_production_with_default_deployment_name_refuses(keyring: Path) -> None:
    message = refusal(production(keyring, deployment_name="mhr.example.org/dev"))
    assert "MHR_DEPLOYMENT_NAME" in message
    assert "set it to this deployment's name" in message


def test_every_problem_is_reported_at_once(keyring: Path) -> None:
    keyring.chmod(0o644)
    message = refusal(
        production(keyring, public_base_url="http://x.example", deployment_name="mhr.example.org/dev")
    )
    for expected in ("MHR_PUBLIC_BASE_URL", "chmod 600", "MHR_DEPLOYMENT_NAME"):
        assert expected in message


def test_settings_come_from_the_environment(keyring: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHR_ENV", "production")
    monkeypatch.setenv("MHR_PUBLIC_BASE_URL", "http://plain.example.org/")
    monkeypatch.setenv("MHR_KEYRING_PATH", str(keyring))
    monkeypatch.setenv("MHR_DEPLOYMENT_NAME", "plain.example.org/prod")
    settings = Settings()
    assert settings.public_base_url == "http://plain.example.org"  # trailing slash dropped
    assert "https://" in refusal(settings)


def test_app_factory_refuses_an_unsafe_configuration(keyring: Path) -> None:
    with pytest.raises(SettingsError, match="MHR_PUBLIC_BASE_URL"):
        create_app(production(keyring, public_base_url=None))


def test_mhr_serve_refuses_with_a_clear_message(
    keyring: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MHR_ENV", "production")
    monkeypatch.setenv("MHR_KEYRING_PATH", str(keyring))
    monkeypatch.setenv("MHR_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'never.sqlite3'}")

    assert cli.main(["serve"]) == 2

    err = capsys.readouterr().err
    assert "refusing to start" in err
    assert "MHR_PUBLIC_BASE_URL" in err
    assert "MHR_DEPLOYMENT_NAME" in err
    # Refused before touching anything: no database was created.
    assert not (tmp_path / "never.sqlite3").exists()


@pytest.mark.parametrize("env", [Environment.development, Environment.test])
def test_development_accepts_the_convenient_defaults(tmp_path: Path, env: Environment) -> None:
    keyring = tmp_path / "keyring.json"
    LocalKeyring.create(keyring)
    keyring.chmod(0o644)
    settings = Settings(env=env, keyring_path=keyring, port=8123)
    settings.check_safe_to_start()
    assert settings.public_base_url == "http://127.0.0.1:8123"
    assert settings.token_url == "http://127.0.0.1:8123/auth/token"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_lifetime_seconds", 7200),  # access tokens stay short-lived
        ("assertion_max_lifetime_seconds", 600),  # SMART: at most five minutes
        ("max_request_bytes", 10),
        ("log_level", "CHATTY"),
        ("port", 0),
    ],
)
def test_out_of_range_settings_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(env=Environment.development, **{field: value})
