"""Write and read through the service under each key provider; each migrant's key unwrapped once a request.

The unwraps are counted through the real provider (keyring file or SoftHSM2 token),
wrapped so that every call still does its real work.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mhr_testkit import EXAMPLES, Party, Service, load_example, submit

from security.keys import KeyProvider, LocalKeyring


class CountingProvider:
    """A key provider that counts its unwraps and otherwise is the provider it wraps."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.unwraps = 0

    def unwrap_key(self, blob: bytes, aad: bytes) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap_key(blob, aad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _open(settings: dict[str, object], tmp_path: Path) -> KeyProvider:
    if not settings:
        return LocalKeyring.create(tmp_path / "keyring.json")
    from security.pkcs11_keys import Pkcs11Keys

    pin = settings["pkcs11_pin"]
    assert isinstance(pin, str)
    return Pkcs11Keys.open(Path(str(settings["pkcs11_module"])), str(settings["pkcs11_token_label"]), pin)


@pytest.fixture
def counted(
    database_url: str, tmp_path: Path, key_provider_settings: dict[str, object]
) -> Iterator[tuple[Service, CountingProvider]]:
    keys = CountingProvider(_open(key_provider_settings, tmp_path))
    with Service.start(database_url, tmp_path, keys=keys, **key_provider_settings) as running:  # type: ignore[arg-type]
        yield running, keys


def _patient_id(reply: Any) -> str:
    assert reply.status_code == 200, reply.text
    for entry in reply.json()["entry"]:
        rtype, rid, *_ = entry["response"]["location"].split("/")
        if rtype == "Patient":
            return str(rid)
    raise AssertionError("no Patient written")


def test_exam_written_and_read_back_under_each_provider(counted: tuple[Service, CountingProvider]) -> None:
    service, _keys = counted
    clinic = service.register("clinic", "clinic")
    bundle = load_example(EXAMPLES[0])
    patient = _patient_id(submit(service, clinic, bundle))
    headers = service.headers(clinic)
    read = service.client.get(f"/fhir/Patient/{patient}", headers=headers)
    assert read.status_code == 200
    sent = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    assert read.json()["identifier"] == sent["identifier"]
    # The blind index (the provider's HMAC) finds the migrant by passport, typed differently.
    passport = sent["identifier"][0]
    typed = passport["value"][:2].lower() + " " + passport["value"][2:]
    found = service.client.get(
        "/fhir/Patient", params={"identifier": f"{passport['system']}|{typed}"}, headers=headers
    )
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json().get("entry", [])] == [patient]


def _everything(service: Service, clinic: Party, patient: str) -> list[Any]:
    reply = service.client.get(f"/fhir/Patient/{patient}/$everything", headers=service.headers(clinic))
    assert reply.status_code == 200, reply.text
    entries: list[Any] = reply.json()["entry"]
    return entries


def test_everything_unwraps_the_migrants_key_once(counted: tuple[Service, CountingProvider]) -> None:
    service, keys = counted
    clinic = service.register("clinic", "clinic")
    patient = _patient_id(submit(service, clinic, load_example(EXAMPLES[0])))
    service.headers(clinic)  # the token first: only the read is counted
    before = keys.unwraps
    entries = _everything(service, clinic, patient)
    assert len(entries) > 5
    assert keys.unwraps - before == 1
    # The next request unwraps again: nothing of the key outlived the request.
    _everything(service, clinic, patient)
    assert keys.unwraps - before == 2


def test_a_search_page_unwraps_each_migrants_key_once(counted: tuple[Service, CountingProvider]) -> None:
    service, keys = counted
    clinic = service.register("clinic", "clinic")
    patients = {_patient_id(submit(service, clinic, load_example(example))) for example in EXAMPLES}
    headers = service.headers(clinic)
    before = keys.unwraps
    page = service.client.get("/fhir/Observation", params={"_count": "100"}, headers=headers)
    assert page.status_code == 200
    subjects = {e["resource"]["subject"]["reference"].split("/")[-1] for e in page.json()["entry"]}
    assert len(page.json()["entry"]) > len(subjects) > 1
    assert subjects <= patients
    assert keys.unwraps - before == len(subjects)


def test_a_token_is_refused_for_data_written_under_the_keyring(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The database names the keys its data needs: switching providers is not silent."""
    from softhsm_kit import SoftHsm

    from service.keys.keyring_match import KeyringMismatch

    hsm: SoftHsm = request.getfixturevalue("softhsm")
    with Service.start(database_url, tmp_path) as keyring_service:
        clinic = keyring_service.register("clinic", "clinic")
        _patient_id(submit(keyring_service, clinic, load_example(EXAMPLES[0])))
    with (
        pytest.raises(
            KeyringMismatch, match=f"PKCS#11 token '{hsm.token}'.*does not hold the kek key local-"
        ),
        Service.start(database_url, tmp_path, **hsm.settings()),  # type: ignore[arg-type]
    ):
        pass
