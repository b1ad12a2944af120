"""A KEK rotation reaches subscriptions' sealed channel headers: `mhr keys rewrap` re-wraps their
data keys, and `mhr keys retire` refuses while any is still under a version it would destroy.

On the keyring file and a SoftHSM2 token, on SQLite and PostgreSQL (tests/test_kek_rotation.py's
fixtures and token: its KEKs are rotated and destroyed by the rotation tests only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Service, sync_url
from test_kek_rotation import _status, cli_env, provider_settings  # noqa: F401 - fixtures

from security.sealed_headers import headers_kek_version
from service.cli.main import main as cli_main
from service.subscriptions.backport import PAYLOAD_CONTENT, SUBSCRIPTION_PROFILE
from service.subscriptions.headers import open_headers
from service.subscriptions.topics import Topic

SECRET = "Authorization: Bearer receiver-secret-7f3a"


def _subscription() -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [SUBSCRIPTION_PROFILE]},
        "status": "requested",
        "reason": "arrivals for the county health department",
        "criteria": Topic.record_visible.value,
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://receiver.example.org/hook",
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": "id-only"}]},
            "header": [SECRET],
        },
    }


def _sealed(database_url: str) -> list[tuple[str, bytes]]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, headers_sealed FROM subscriptions")).all()
    finally:
        engine.dispose()
    return [(str(r[0]), bytes(r[1])) for r in rows if r[1] is not None]


@pytest.mark.usefixtures("cli_env")
def test_rewrap_covers_sealed_subscription_headers_and_retire_waits_for_them(
    database_url: str,
    tmp_path: Path,
    provider_settings: dict[str, object],  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Service.start(database_url, tmp_path, job_workers=0, **provider_settings) as service:  # type: ignore[arg-type]
        authority = service.register("authority", "authority", purposes=("PUBHLTH",))
        headers = {
            **FHIR_HEADERS,
            **service.headers(authority, "system/*.rs system/Subscription.cruds", purpose_of_use="PUBHLTH"),
        }
        created = service.client.post(
            "/fhir/Subscription", content=json.dumps(_subscription()), headers=headers
        )
        assert created.status_code == 201, created.text
        old = _status(capsys)["current_kek_version"]
        assert cli_main(["keys", "rotate"]) == 0
        rotated = _status(capsys)
        new = rotated["current_kek_version"]
        assert rotated["subscription_headers_to_rewrap"] == 1
        assert rotated["subscription_headers_per_kek_version"] == {str(old): 1}

        capsys.readouterr()
        assert cli_main(["keys", "retire", "--below", str(new)]) == 2
        assert "sealed channel headers are still wrapped" in capsys.readouterr().err

        assert cli_main(["keys", "rewrap", "--wait"]) == 0
        done = _status(capsys)
        assert done["subscription_headers_to_rewrap"] == 0
        assert done["subscription_headers_per_kek_version"] == {str(new): 1}
        assert cli_main(["keys", "retire", "--below", str(new)]) == 0

        [(subscription_id, blob)] = _sealed(database_url)
        assert headers_kek_version(blob) == new
        keys = service.fastapi.state.runtime.keys  # type: ignore[attr-defined]
        assert open_headers(keys, subscription_id, blob) == [SECRET]
        assert _status(capsys)["subscription_headers_under_retired_versions"] == 0
