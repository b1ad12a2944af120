"""The client that POSTs notifications (service.subscriptions.sender): one TLS configuration for
the process, and certificates verified with it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.subscriptions.sender import DELIVERED, UNREACHABLE, Channel, _tls, new_client, post_notification


def test_the_tls_configuration_verifies_certificates_and_host_names() -> None:
    context = _tls()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0, "no trust anchors loaded"
    assert _tls() is context  # the trust store is read once for the process, not once a job


@pytest.fixture
def self_signed_receiver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS receiver on 127.0.0.1 whose certificate no trusted authority signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/hook", cert_path
    finally:
        server.shutdown()
        server.server_close()


def _channel(endpoint: str) -> Channel:
    return Channel(endpoint, (), "application/fhir+json", timeout_seconds=5, connect_timeout_seconds=5)


def test_a_receiver_whose_certificate_no_trusted_authority_signed_is_not_sent_to(
    self_signed_receiver: tuple[str, Path],
) -> None:
    endpoint, cert_path = self_signed_receiver

    async def post_with(client: httpx.AsyncClient) -> str:
        async with client:
            return await post_notification(client, _channel(endpoint), {"resourceType": "Bundle"})

    assert asyncio.run(post_with(new_client())) == UNREACHABLE
    # The receiver itself answers: trusted explicitly, the same POST is delivered.
    trusting = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert_path)))
    assert asyncio.run(post_with(trusting)) == DELIVERED
