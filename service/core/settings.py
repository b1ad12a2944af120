"""One validated settings object, read from ``MHR_*`` environment variables.

Development is the only environment where convenient-but-unsafe choices are
accepted (plain-http base URL, SQLite, a demo data set). Anywhere else they
refuse to start, because a migrant health record service that starts "mostly
configured" is worse than one that does not start.

The development server (``make run``, i.e. ``mhr serve --demo``) writes the
settings it serves with to ``var/dev.env``. An ``mhr`` command whose
environment has no ``MHR_ENV`` at all, run in that directory, reads that file,
so ``mhr token`` in a second terminal talks to the development server with
nothing exported. The file configures development only: one that says anything
else is refused; a process with ``MHR_ENV`` set (production sets it; the image
does) never reads it, and neither does a server (``mhr serve``, the app
factory): a service's settings come from its environment alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import sysconfig
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from security.keys import keyring_permissions_problem

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Where a wheel puts the implementation guide (pyproject's data-files), below the install prefix.
INSTALLED_IG = Path("share") / "mhr" / "fhir"
DEFAULT_VAR_DIR = Path("var")
DEVELOPMENT_ENV_FILE = DEFAULT_VAR_DIR / "dev.env"


def default_ig_dir() -> Path:
    """The implementation guide: ``fhir/`` beside ``service/`` in a checkout (or an editable
    install), else the copy a wheel installed under the environment's data prefix."""
    checkout = PROJECT_ROOT / "fhir"
    # In site-packages, fhir/ is fhir.resources' namespace package, which holds no guide.
    if (checkout / "CapabilityStatement-mhr.json").is_file():
        return checkout
    return Path(sysconfig.get_path("data")) / INSTALLED_IG


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
    # Where the keys live: "keyring" (the file above) or "pkcs11" (an HSM, whose keys never
    # leave it; README "Keys in an HSM"). The token's PIN comes from MHR_PKCS11_PIN or a file.
    key_provider: Literal["keyring", "pkcs11"] = "keyring"
    pkcs11_module: Path | None = None
    pkcs11_token_label: str = "mhr"  # noqa: S105 - a token's name, not its PIN
    pkcs11_pin: SecretStr | None = None
    pkcs11_pin_file: Path | None = None
    ig_dir: Path = Field(default_factory=default_ig_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    token_lifetime_seconds: int = Field(default=300, ge=30, le=3600)
    assertion_max_lifetime_seconds: int = Field(default=300, ge=30, le=300)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # A client that has not sent its whole body by then gets 408 (a slow client holds a worker).
    request_body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Work limits on a JSON body, checked before it is parsed (values) or right after (the
    # rest), so that no body costs more than a second of validation; see README "Limits".
    max_json_values: int = Field(default=100_000, ge=100)
    max_json_array_items: int = Field(default=10_000, ge=10)
    max_json_depth: int = Field(default=64, ge=16, le=1000)  # orjson stops at 1024 levels
    max_json_string_chars: int = Field(default=1024 * 1024, ge=1024)
    # A transaction is one database transaction: at most 500 entries, whatever is set here.
    max_bundle_entries: int = Field(default=500, ge=1, le=500)
    # Threads per process that parse and validate bodies at once; more requests wait their turn.
    body_work_threads: int = Field(default=2, ge=1, le=32)
    # On SIGTERM: this long reporting "draining" (/readyz 503) while still serving, so that a
    # load balancer steers away; then new connections are refused and in-flight requests get
    # up to graceful_shutdown_seconds. Set drain_seconds to the balancer's time to notice.
    drain_seconds: float = Field(default=5.0, ge=0, le=600)
    graceful_shutdown_seconds: float = Field(default=20.0, ge=1, le=600)
    # Background work (service.jobs, README "Background work"): job workers in each server
    # process (0: none there; run `mhr worker` instead), how long a lease lasts before another
    # worker may take over a job whose worker died, and how often an idle worker looks for work.
    job_workers: int = Field(default=1, ge=0, le=32)
    # False: this server process runs none of the shared background work (the audit integrator,
    # job workers, the kept totals' upkeep), only what it needs for itself; `mhr worker`, or the
    # background process of `mhr serve --workers N`, runs it. The supervisor sets it in its
    # server processes: a request's event loop then never waits behind a seal or a delivery.
    background_in_server: bool = True
    job_lease_seconds: float = Field(default=300.0, ge=1, le=86_400)
    job_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # Done jobs older than this are deleted by the daily jobs.purge-done job (service.jobs.purge).
    done_job_retention_days: int = Field(default=30, ge=1, le=3650)
    # Modules imported at start-up that register further job kinds (a JSON list in MHR_JOB_MODULES).
    job_modules: tuple[str, ...] = ()
    # Subscription delivery (service.subscriptions.delivery, README "Delivery"): a failed POST is
    # retried with exponential backoff from the base up to the cap, for this many hours after the
    # first failure (at least 72 outside development), then the subscription is set to error.
    subscription_retry_hours: float = Field(default=72.0, gt=0, le=24 * 365)
    subscription_retry_base_seconds: float = Field(default=5.0, gt=0, le=3600)
    subscription_retry_cap_seconds: float = Field(default=900.0, gt=0, le=86_400)
    # One POST to a receiver: connect and whole-request timeouts (a subscription's own timeout
    # may shorten the latter). Short, because a job holds its transaction while it waits.
    subscription_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    subscription_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Per-client rate limit, a token bucket in cost units: a write costs more than a search,
    # a search more than a read. Enforced per process (per replica).
    rate_limit_enabled: bool = True
    rate_limit_per_second: float = Field(default=100.0, gt=0)
    rate_limit_burst: float = Field(default=1000.0, gt=0)
    rate_limit_read_cost: float = Field(default=1.0, ge=0)
    rate_limit_search_cost: float = Field(default=2.0, ge=0)
    rate_limit_write_cost: float = Field(default=10.0, ge=0)
    # The token endpoint (when rate limits are enabled): every request per source address, and
    # tokens issued per client (a refused assertion never drains a client's bucket).
    token_rate_per_address_per_second: float = Field(default=10.0, gt=0)
    token_rate_per_address_burst: float = Field(default=100.0, gt=0)
    token_rate_per_client_per_second: float = Field(default=2.0, gt=0)
    token_rate_per_client_burst: float = Field(default=100.0, gt=0)
    jwks_fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    jwks_cache_seconds: int = Field(default=300, ge=0)
    client_status_cache_seconds: float = Field(default=10.0, ge=0, le=60)
    # How long a write sent with an Idempotency-Key is remembered: a retry within this time gets
    # the original answer. (A transaction's Bundle.identifier is remembered for good.)
    idempotency_key_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    # Fault injection for tests of client retries: the process exits, as if killed, right
    # after its Nth committed request transaction, before that request is answered.
    # Refused outside development and test.
    test_exit_after_commits: int = Field(default=0, ge=0)
    # Bulk Data export (service.bulk, README "Bulk export"): where the encrypted output files
    # live, how long a finished export's files are kept before the purge job removes them, how
    # many migrants one checkpointed step writes, and a pause between steps that leaves the
    # database to other work while a large export runs (0: none).
    export_dir: Path = DEFAULT_VAR_DIR / "exports"
    export_retention_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    export_subjects_per_step: int = Field(default=200, ge=1, le=10_000)
    export_step_pause_seconds: float = Field(default=0.0, ge=0, le=60)
    # Completion figures (service.figures): a count from 1 to this minus one is suppressed in
    # every report and chart, so that a figure never points at a handful of migrants.
    figures_min_cell: int = Field(default=5, ge=1, le=100)
    log_level: str = "INFO"
    deployment_name: str = "mhr.example.org/dev"
    # Consent.policy URIs that mean "disclosure required by law" (a statutory public-health
    # basis) rather than voluntary consent; set per destination jurisdiction.
    statutory_policies: tuple[str, ...] = ("https://mhr.example.org/fhir/policy/statutory-public-health",)
    # Days from arrival (or, before the arrival is recorded, from the task's creation) to a
    # follow-up task's due date, by classification code (service.tasks.classes); others: 30.
    followup_due_days: dict[str, int] = Field(
        default_factory=lambda: {"B1-pulmonary": 14, "B1-extrapulmonary": 30, "B0": 30, "B2": 30, "B3": 30}
    )

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
        if self.public_base_url is None:  # check_safe_to_start refuses to serve without it
            raise SettingsError(
                "MHR_PUBLIC_BASE_URL is not set: the public address of the service is needed here"
            )
        return self.public_base_url

    @property
    def fhir_base_url(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def key_store(self) -> str:
        """Where the keys are, for messages: the keyring file or the token (never its PIN)."""
        if self.key_provider == "pkcs11":
            return f"PKCS#11 token {self.pkcs11_token_label!r}"
        return f"keyring {self.keyring_path}"

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
            if self.key_provider == "keyring" and self.keyring_path.exists():
                problem = keyring_permissions_problem(self.keyring_path)
                if problem:
                    problems.append(f"keyring {self.keyring_path}: {problem}")
            if self.subscription_retry_hours < 72:
                problems.append(
                    "MHR_SUBSCRIPTION_RETRY_HOURS is below 72: receivers must get at least three "
                    "days to come back before their subscription is set to error"
                )
            if self.test_exit_after_commits:
                problems.append("MHR_TEST_EXIT_AFTER_COMMITS is a test fault; unset it outside development")
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


def development_env_file() -> Path | None:
    """The development server's settings file, when this process should read it."""
    if "MHR_ENV" in os.environ or not DEVELOPMENT_ENV_FILE.is_file():
        return None
    return DEVELOPMENT_ENV_FILE


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = "_".join(str(part) for part in item["loc"]) or "settings"
        problems.append(f"MHR_{field.upper()}: {item['msg']}")
    return "invalid settings: " + "; ".join(problems)


def load_settings(*, development_file: bool = False) -> Settings:
    """Settings from the environment; with ``development_file`` (the ``mhr`` client commands)
    also from ``var/dev.env`` while ``MHR_ENV`` is unset.

    Raises SettingsError, whose message names each bad variable, on invalid values.
    """
    env_file = development_env_file() if development_file else None
    try:
        settings = Settings(_env_file=env_file)
    except ValidationError as exc:
        where = f" (from the environment and {env_file})" if env_file else ""
        raise SettingsError(_describe(exc) + where) from None
    if env_file is not None and settings.env is not Environment.development:
        raise SettingsError(
            f"{env_file} holds development settings only but does not say MHR_ENV=development: "
            "delete it, or set MHR_ENV"
        )
    return settings


def _env_line(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name}="{escaped}"'


def write_development_env(settings: Settings, path: Path = DEVELOPMENT_ENV_FILE) -> None:
    """Write what the development server serves with, for ``mhr`` commands run beside it."""
    if settings.env is not Environment.development:
        raise SettingsError(f"{path} is written for MHR_ENV=development only")
    lines = [
        "# Written by `mhr serve --demo` (`make run`): the development server's settings.",
        "# `mhr` commands run in this directory read it while MHR_ENV is unset.",
        "# Development only: a process with MHR_ENV set never reads it.",
        _env_line("MHR_ENV", Environment.development.value),
        _env_line("MHR_PUBLIC_BASE_URL", settings.base_url),
        _env_line("MHR_DATABASE_URL", settings.database_url),
        _env_line("MHR_KEYRING_PATH", str(settings.keyring_path)),
        _env_line("MHR_DEPLOYMENT_NAME", settings.deployment_name),
    ]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The database URL may carry a password: owner-only, replaced atomically.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
