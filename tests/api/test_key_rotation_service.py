"""Key rotations as operators run them: another process rotates, servers restart, clients go on.

The rotation runs on a keyring loaded apart from the running server's (as the
CLI does); a server started after it signs with the new keys and still accepts
tokens and verifies checkpoints made under the old ones.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mhr_testkit import Service

from security.keys import LocalKeyring
from service.audit import log as audit_log
from service.audit.log_keys import LogKeySuperseded
from service.cli.main import main as cli_main
from service.keys.log_key_rotation import rotate_log_key
from service.keys.secret_rotation import rotate_token_key
from service.store.database import Database

AUDIT_SCOPE = "system/AuditEvent.rs"


def _run(url: str, work: Any) -> Any:
    async def go() -> Any:
        database = Database(url)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(go())


def _seal(service: Service) -> int:
    signer = service.fastapi.state.runtime.log_signer  # type: ignore[attr-defined]
    return int(_run(service.settings.database_url, lambda db: audit_log.seal_all(db, signer, signer.name)))


def test_tokens_and_checkpoints_survive_a_rotation_and_a_restart(
    database_url: str, tmp_path: Path, capsys: Any
) -> None:
    with Service.start(database_url, tmp_path) as before:
        clinic = before.register("clinic", "clinic")
        auditor = before.register("auditor", "auditor")
        old_headers = before.headers(auditor, AUDIT_SCOPE)
        before.token(clinic)
        first = _seal(before)
        assert first > 0
        # Never rotated: the one key, for every size, the same as /audit/key.
        single = before.client.get("/audit/keys", headers=old_headers).json()["keys"]
        vkey = before.client.get("/audit/key", headers=old_headers).text.strip()
        assert single == [
            {
                "vkey": vkey,
                "key_hash": vkey.split("+")[1],
                "first_size": 0,
                "last_size": None,
                "status": "current",
            }
        ]
        assert before.client.get("/audit/keys", headers=before.headers(clinic)).status_code == 403

        # `mhr keys rotate-token` and `mhr audit rotate-key`, in a process of their own.
        operator_keys = LocalKeyring.load(before.settings.keyring_path)
        now = datetime.now(UTC)
        tokens = _run(
            database_url,
            lambda db: rotate_token_key(
                db, operator_keys, token_lifetime_seconds=before.settings.token_lifetime_seconds, now=now
            ),
        )
        logs = _run(
            database_url,
            lambda db: rotate_log_key(db, operator_keys, before.settings.deployment_name, now=now),
        )
        assert logs.first_size == first + 1
        # The server started before the rotation holds the old log key: it must not seal.
        before.token(clinic)
        with pytest.raises(LogKeySuperseded):
            _seal(before)

    with Service.start(database_url, tmp_path) as after:
        # The token issued before the rotation is still accepted; new ones carry the new kid.
        listing = after.client.get("/audit/keys", headers=old_headers)
        assert listing.status_code == 200, listing.text
        new_token = after.token(auditor, AUDIT_SCOPE)
        header = json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "=="))
        assert header["kid"] == tokens.current
        second = _seal(after)
        assert second > first

        keys = listing.json()["keys"]
        assert [(k["first_size"], k["last_size"], k["status"]) for k in keys] == [
            (0, first, "previous"),
            (first + 1, None, "current"),
        ]
        assert keys[1]["vkey"] == logs.current_vkey
        # /audit/key answers the current key, as the README's single-key use expects.
        current = after.client.get("/audit/key", headers=old_headers).text.strip()
        assert current == logs.current_vkey

    listing_file = tmp_path / "log-keys.json"
    listing_file.write_text(json.dumps({"keys": keys}))
    verify = ["audit", "verify", "--database-url", database_url]
    assert cli_main([*verify, "--keys", str(listing_file)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    # One key alone cannot verify a rotated log: the other key's checkpoints fail.
    assert cli_main([*verify, "--vkey", logs.current_vkey]) == 1
    unknown = f"checkpoint {first}: signature or format invalid (signed by a log key not in the trusted list"
    assert f"{unknown} (key hash {keys[0]['key_hash']})" in capsys.readouterr().err


def test_the_rotation_commands(database_url: str, tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    """`mhr keys rotate-token | token-keys | retire-token` and `mhr audit rotate-key | keys`."""
    with Service.start(database_url, tmp_path) as service:
        service.token(service.register("clinic", "clinic"))
        first = _seal(service)
    monkeypatch.setenv("MHR_ENV", "test")
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    monkeypatch.setenv("MHR_DEPLOYMENT_NAME", service.settings.deployment_name)
    old_kid = LocalKeyring.load(tmp_path / "keyring.json").token_key_id()

    assert cli_main(["keys", "rotate-token"]) == 0
    out = capsys.readouterr().out
    assert f"{old_kid} still verifies" in out and f"mhr keys retire-token {old_kid}" in out
    assert cli_main(["keys", "token-keys"]) == 0
    listed = json.loads(capsys.readouterr().out)["token_keys"]
    assert {k["kid"]: k["status"] for k in listed}[old_kid] == "previous"
    assert cli_main(["keys", "retire-token", old_kid]) == 1
    assert "may be valid until" in capsys.readouterr().err
    assert LocalKeyring.load(tmp_path / "keyring.json").holds_token_key(old_kid)

    assert cli_main(["audit", "rotate-key"]) == 0
    assert f"tree size {first + 1} and later" in capsys.readouterr().out
    assert cli_main(["audit", "keys"]) == 0
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(capsys.readouterr().out)
    assert cli_main(["audit", "verify", "--keys", str(keys_file)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
