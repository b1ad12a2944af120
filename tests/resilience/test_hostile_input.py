"""Hostile input: each refused with a clear OperationOutcome and nothing stored, or (valid but
unusual text) accepted and returned byte for byte. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Party, Service, sync_url
from resilience_kit import ServerProcess, unique_bundle

from service.api.fhir_body import BodyLimits

MAX_DEPTH = BodyLimits().depth


def _stored(service: Service) -> int:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM resources")).scalar_one())
    finally:
        engine.dispose()


def _outcome(response: Any, status: int | tuple[int, ...]) -> dict[str, Any]:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and all(i.get("diagnostics") for i in body["issue"])
    return body


@pytest.fixture
def clinic(service: Service) -> Iterator[tuple[Service, Party, dict[str, str]]]:
    party = service.register("clinic", "clinic")
    yield service, party, {**FHIR_HEADERS, **service.headers(party)}


def _bundle_with_name(family: str) -> tuple[dict[str, Any], str]:
    bundle, passport = unique_bundle()
    bundle["entry"][0]["resource"]["name"][1]["family"] = family
    return bundle, passport


def _raw_bundle(text: str) -> bytes:
    return text.encode("utf-8")


HOSTILE_BODIES: dict[str, tuple[bytes, int]] = {
    # Too deep is too costly: refused with a 413 naming the depth limit.
    "nested-far-too-deep": (b"[" * 100_000 + b"]" * 100_000, 413),
    "nested-past-the-limit": (
        b'{"resourceType":"Bundle","x":' + b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5) + b"}",
        413,
    ),
    "huge-integer-literal": (b'{"resourceType":"Bundle","type":"transaction","x":' + b"9" * 5000 + b"}", 400),
    "number-out-of-range": (b'{"resourceType":"Bundle","type":"transaction","x":1e99999}', 400),
    "nan-literal": (b'{"resourceType":"Bundle","type":"transaction","x":NaN}', 400),
    "invalid-utf8": (b'{"resourceType":"Bundle","type":"transaction","x":"\xff\xfe\xc0\xae"}', 400),
    "lone-surrogate": (b'{"resourceType":"Bundle","type":"transaction","x":"\\ud800"}', 400),
    "empty": (b"", 400),
    "not-an-object": (b"[]", (400, 422)),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_malformed_json_is_refused_and_nothing_stored(
    clinic: tuple[Service, Party, dict[str, str]], name: str
) -> None:
    service, _, headers = clinic
    body, status = HOSTILE_BODIES[name]
    _outcome(service.client.post("/fhir", content=body, headers=headers), status)
    _outcome(service.client.post("/fhir/Patient", content=body, headers=headers), status)
    assert _stored(service) == 0


def test_duplicate_keys_are_refused(clinic: tuple[Service, Party, dict[str, str]]) -> None:
    service, _, headers = clinic
    bundle, _ = unique_bundle()
    text = json.dumps(bundle)
    # Two readings of one body: a "batch" to a parser that keeps the first key, a "transaction" to one
    # that keeps the last; and a Patient whose gender depends on the parser.
    smuggled = text.replace('"resourceType": "Bundle"', '"resourceType": "Bundle", "type": "batch"', 1)
    outcome = _outcome(service.client.post("/fhir", content=smuggled, headers=headers), 400)
    assert "repeats a key" in outcome["issue"][0]["diagnostics"]
    patient = text.replace('"gender": "male"', '"gender": "male", "gender": "female"', 1)
    _outcome(service.client.post("/fhir", content=patient, headers=headers), 400)
    assert _stored(service) == 0


@pytest.mark.parametrize(
    "family",
    ["Al\u0000Hassan", "Al\u0007Hassan", "Al\u001bHassan", "Al\u007fHassan", "x" * 1_100_000, ""],
    ids=["nul", "bell", "escape", "delete", "over-1MiB", "empty"],
)
def test_control_characters_and_oversized_strings_are_refused(
    clinic: tuple[Service, Party, dict[str, str]], family: str
) -> None:
    service, _, headers = clinic
    bundle, _ = _bundle_with_name(family)
    _outcome(service.client.post("/fhir", content=json.dumps(bundle), headers=headers), (400, 413, 422))
    assert _stored(service) == 0


@pytest.mark.parametrize(
    "family",
    [
        "\u0627\u0644\u062d\u0633\u0646",  # Arabic (RTL)
        "\u05db\u05d4\u05df",  # Hebrew (RTL)
        "\u202bAl-Hassan\u202c",  # explicit RTL embedding
        "Nguye\u0302\u0303n",  # combining marks (decomposed)
        "Z\u0351\u0352\u0353a\u0300\u0301\u0302lgo",  # stacked combining marks
        "\U0001d4d0\u200d\u0915\u094d\u0937",  # astral plane, ZWJ, Devanagari conjunct
    ],
    ids=["arabic", "hebrew", "rtl-embedding", "combining", "stacked-combining", "astral-zwj"],
)
def test_rtl_and_combining_names_round_trip(
    clinic: tuple[Service, Party, dict[str, str]], family: str
) -> None:
    service, _, headers = clinic
    bundle, _ = _bundle_with_name(family)
    reply = service.client.post(
        "/fhir", content=json.dumps(bundle, ensure_ascii=False).encode(), headers=headers
    )
    assert reply.status_code == 200, reply.text[:300]
    location = reply.json()["entry"][0]["response"]["location"]
    patient = service.client.get(f"/fhir/{location}", headers=headers).json()
    assert patient["name"][1]["family"] == family  # not normalised, not mangled


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/xml",
        "application/fhir+xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
    ],
)
def test_wrong_or_missing_content_type(
    clinic: tuple[Service, Party, dict[str, str]], content_type: str | None
) -> None:
    service, _, headers = clinic
    headers = {k: v for k, v in headers.items() if k != "Content-Type"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps(unique_bundle()[0])
    _outcome(service.client.post("/fhir", content=body, headers=headers), 415)
    if content_type != "application/x-www-form-urlencoded":
        search = service.client.post("/fhir/Patient/_search", content="_id=x", headers=headers)
        _outcome(search, 415)
    assert _stored(service) == 0


def test_bodies_over_the_limit_are_refused_before_being_read(database_url: str, tmp_path: Any) -> None:
    limit = 64 * 1024
    with Service.start(database_url, tmp_path, max_request_bytes=limit) as service:
        party = service.register("clinic", "clinic")
        headers = {**FHIR_HEADERS, **service.headers(party)}
        # Declared too large: refused on the header alone.
        declared = service.client.post("/fhir", content=b"{" + b" " * (limit + 10) + b"}", headers=headers)
        _outcome(declared, 413)
        # Streamed (chunked, no length): refused once the limit is passed.
        chunks = (b" " * 16384 for _ in range(64))
        _outcome(service.client.post("/fhir", content=chunks, headers=headers), 413)
        assert _stored(service) == 0


@pytest.mark.slow
@pytest.mark.postgres
def test_streamed_body_over_the_limit_is_cut_off_before_being_read_whole(
    pg_database: str, tmp_path: Any, registry: Service
) -> None:
    """On a real server: a chunked 64 MiB body is answered 413 and the connection closed long
    before the client could have sent it all."""
    server = ServerProcess(pg_database, tmp_path, extra_env={"MHR_MAX_REQUEST_BYTES": str(256 * 1024)})
    server.start()
    sent = 0
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(
                b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
            try:
                for _ in range(4096):  # 64 MiB
                    sock.sendall(chunk)
                    sent += 0x4000
            except (BrokenPipeError, ConnectionResetError):
                pass
            sock.settimeout(5)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    reply += data
            except (ConnectionResetError, TimeoutError):
                pass
    finally:
        server.stop()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"OperationOutcome" in reply
    assert sent < 64 * 1024 * 1024, "the whole body was accepted"


SQL_AND_HEADER_INJECTIONS = [
    "identifier=x' OR '1'='1",
    "identifier=http://hl7.org/fhir/sid/passport-SYR|x' OR 1=1 --",
    "_id=1;DROP TABLE resources",
    "_id=' UNION SELECT wrapped_key FROM subjects --",
    "_count=1e9",
    "_count=-1",
    "_offset=99999999999999999999",
    "date=2020'--",
    "_lastUpdated=gt2020-01-01' OR '1'='1",
    "_sort=id;DROP TABLE resources",
    "code=http://loinc.org|x') OR ('a'='a",
    "identifier=%0d%0aSet-Cookie:%20a=b",
    "_id=%0d%0aX-Injected:%20yes",
    "patient=Patient/..%2F..%2Fx",
    "_id=%00",
    "_count=%C2%B2",  # a superscript two: a Unicode digit that int() refuses
    "_offset=%D9%A3",  # an Arabic-Indic three
]


@pytest.mark.parametrize("query", SQL_AND_HEADER_INJECTIONS)
def test_search_injection_attempts(clinic: tuple[Service, Party, dict[str, str]], query: str) -> None:
    service, _, headers = clinic
    assert (
        service.client.post("/fhir", content=json.dumps(unique_bundle()[0]), headers=headers).status_code
        == 200
    )
    before = _stored(service)
    for response in (
        service.client.get(f"/fhir/Patient?{query}", headers=headers),
        service.client.post(
            "/fhir/Patient/_search",
            content=query,
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        ),
    ):
        assert response.status_code in (200, 400), response.text[:300]
        assert "set-cookie" not in response.headers and "x-injected" not in response.headers
        if response.status_code == 400:
            _outcome(response, 400)
        else:
            assert response.json()["total"] == 0  # matched nothing, leaked nothing
        assert "\r" not in response.text and "\n" not in response.text
    assert _stored(service) == before


def test_request_id_header_injection_is_not_echoed(clinic: tuple[Service, Party, dict[str, str]]) -> None:
    service, _, _ = clinic
    response = service.client.get("/fhir/metadata", headers={"X-Request-Id": "abc def<script>;x=1"})
    assert response.headers["x-request-id"] != "abc def<script>;x=1"
    assert response.headers["x-request-id"].isalnum()


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient/..%2F..%2Fetc%2Fpasswd",
        "/fhir/Patient/%2e%2e",
        "/fhir/Patient/..",
        "/fhir/..%2F..%2Fetc/passwd",
        "/fhir/Patient/%00",
        "/fhir/Patient/%C0%AE%C0%AE",
        "/fhir/Patient/" + "a" * 5000,
        "/fhir/Patient/x/_history/..%2F1",
        "/fhir/Patient/x/_history/99999999999999999999",
        "/fhir/Patient/..%5c..%5cwindows",
        "/fhir/Patient/%252e%252e",
    ],
)
def test_path_traversal_in_ids_is_not_found(clinic: tuple[Service, Party, dict[str, str]], path: str) -> None:
    service, _, headers = clinic
    # (".." segments are resolved by the client, so some of these arrive as /fhir/: 405)
    _outcome(service.client.get(path, headers=headers), (400, 404, 405))
    _outcome(service.client.put(path, content=b"{}", headers=headers), (400, 404, 405, 422))
    assert _stored(service) == 0


@pytest.mark.slow
@pytest.mark.postgres
def test_slow_clients_are_cut_off(pg_database: str, tmp_path: Any, registry: Service) -> None:
    server = ServerProcess(pg_database, tmp_path, extra_env={"MHR_REQUEST_BODY_TIMEOUT_SECONDS": "2"})
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            began = time.monotonic()
            sock.sendall(
                b"POST /auth/token HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\ng"
            )
            reply = b""
            try:
                for _ in range(20):  # a byte a second, far slower than the limit allows
                    sock.sendall(b" ")
                    time.sleep(0.5)
                    sock.setblocking(False)
                    try:
                        reply += sock.recv(65536)
                    except BlockingIOError:
                        pass
                    finally:
                        sock.setblocking(True)
                    if reply:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            elapsed = time.monotonic() - began
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"OperationOutcome" in reply
        assert elapsed < 6
    finally:
        server.stop()
