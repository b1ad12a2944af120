"""One validated settings object, read from ``MHR_*`` environment variables.

Development is the only environment where convenient-but-unsafe choices are
accepted (plain-http base URL, SQLite, a demo data set). Anywhere else they
refuse to start, because a migrant health record service that starts "mostly
configured" is worse than one that does not start.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from security.keys import keyring_permissions_problem

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VAR_DIR = Path("var")


class Environment(StrEnum):
    development = "development"
    production = "production"
    test = "test"


class SettingsError(ValueError):
    """A configuration the service refuses to run with; the message says what to change."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MHR_", extra="ignore", frozen=True)

    env: Environment = Environment.production
    database_url: str = f"sqlite+aiosqlite:///{DEFAULT_VAR_DIR / 'mhr.sqlite3'}"
    public_base_url: str | None = None
    keyring_path: Path = DEFAULT_VAR_DIR / "keyring.json"
    ig_dir: Path = PROJECT_ROOT / "fhir"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    token_lifetime_seconds: int = Field(default=300, ge=30, le=3600)
    assertion_max_lifetime_seconds: int = Field(default=300, ge=30, le=300)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # A client that has not sent its whole body by then gets 408 (a slow client holds a worker).
    request_body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Per-client rate limit, a token bucket in cost units: a write costs more than a search,
    # a search more than a read. Enforced per process (per replica).
    rate_limit_enabled: bool = True
    rate_limit_per_second: float = Field(default=100.0, gt=0)
    rate_limit_burst: float = Field(default=1000.0, gt=0)
    rate_limit_read_cost: float = Field(default=1.0, ge=0)
    rate_limit_search_cost: float = Field(default=2.0, ge=0)
    rate_limit_write_cost: float = Field(default=10.0, ge=0)
    jwks_fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    jwks_cache_seconds: int = Field(default=300, ge=0)
    client_status_cache_seconds: float = Field(default=10.0, ge=0, le=60)
    log_level: str = "INFO"
    deployment_name: str = "mhr.example.org/dev"
    # Consent.policy URIs that mean "disclosure required by law" (a statutory public-health
    # basis) rather than voluntary consent; set per destination jurisdiction.
    statutory_policies: tuple[str, ...] = ("https://mhr.example.org/fhir/policy/statutory-public-health",)

    @field_validator("public_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _development_defaults(self) -> Self:
        if self.public_base_url is None and self.is_development:
            object.__setattr__(self, "public_base_url", f"http://{self.host}:{self.port}")
        return self

    @property
    def is_development(self) -> bool:
        return self.env in (Environment.development, Environment.test)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @cached_property
    def base_url(self) -> str:
        """Every absolute link the service writes starts here."""
        assert self.public_base_url is not None  # guaranteed by check_safe_to_start
        return self.public_base_url

    @property
    def fhir_base_url(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/auth/token"

    def check_safe_to_start(self) -> None:
        """Refuse insecure choices outside development; warn where a choice only suits a trial."""
        problems: list[str] = []
        if not self.is_development:
            if not self.public_base_url:
                problems.append(
                    "MHR_PUBLIC_BASE_URL is not set: every absolute link (paging, token "
                    "endpoint, audience) needs the public https address of this service"
                )
            elif not self.public_base_url.startswith("https://"):
                problems.append("MHR_PUBLIC_BASE_URL must be an https:// URL outside development")
            if self.keyring_path.exists():
                problem = keyring_permissions_problem(self.keyring_path)
                if problem:
                    problems.append(f"keyring {self.keyring_path}: {problem}")
            if self.deployment_name == "mhr.example.org/dev":
                problems.append(
                    "MHR_DEPLOYMENT_NAME is the development default; set it to this "
                    "deployment's name (it is the origin line of signed audit checkpoints)"
                )
        if problems:
            raise SettingsError("refusing to start: " + "; ".join(problems))
        if self.is_sqlite and not self.is_development:
            log.warning(
                "SQLite database in %s environment: suitable for a single-node trial only; "
                "use PostgreSQL (MHR_DATABASE_URL=postgresql+asyncpg://...) for production",
                self.env.value,
            )


def load_settings() -> Settings:
    return Settings()
