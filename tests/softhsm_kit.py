"""SoftHSM2 helpers for the tests that run against both key providers (a plain module, so that
test files import it by name: ``conftest`` is ambiguous with tests/e2e/conftest.py on the path)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)
HSM_PIN = "4711-test"
HSM_TOKEN = "mhr-test"
HSM_EMPTY_TOKEN = "mhr-empty"  # initialised, no keys: for refusals (never given keys in-process)
HSM_ROTATION_TOKEN = "mhr-rotation"  # its keys are rotated by tests: never assume them fresh
HSM_ROTATE_TOKEN = "mhr-rotate"  # its KEKs are rotated and destroyed by the rotation tests only


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    config: Path
    pin: str = HSM_PIN
    token: str = HSM_TOKEN
    empty_token: str = HSM_EMPTY_TOKEN
    rotation_token: str = HSM_ROTATION_TOKEN
    rotate_token: str = HSM_ROTATE_TOKEN

    def settings(self, token: str | None = None) -> dict[str, object]:
        return {
            "key_provider": "pkcs11",
            "pkcs11_module": self.module,
            "pkcs11_token_label": token or self.token,
            "pkcs11_pin": self.pin,
        }


def hsm_required() -> bool:
    """In CI the HSM tests must run: a missing SoftHSM2 or python-pkcs11 fails them."""
    return os.environ.get("CI") == "true" or os.environ.get("MHR_REQUIRE_POSTGRES") == "1"


def init_softhsm_token(config: Path, label: str) -> None:
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            HSM_PIN,
            "--so-pin",
            "so-" + HSM_PIN,
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(config)},
        check=True,
        capture_output=True,
    )


def softhsm_config(directory: Path) -> Path:
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    config = directory / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return config
