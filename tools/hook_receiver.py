"""A rest-hook receiver for trying subscriptions by hand: it prints one line per notification.

    python3 tools/hook_receiver.py 127.0.0.1:9000     # listens there, on any path

Standard library only, so it runs before (or without) the project's virtual environment. Each
POST is answered 200 and printed, one line per event: the notification type, the event number
and, for an ``id-only`` payload, the event's focus (``.../fhir/Patient/<id>/_history/1``); a
handshake or heartbeat is one line of its type. Ids only: that is all the service ever pushes.
Not for production use: it has no TLS and no authentication check; a real receiver checks the
secret it gave in ``channel.header``.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 1 << 20  # a notification names ids only; anything larger is not one of ours


def _parameters(resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for parameter in resource.get("parameter", []):
        grouped.setdefault(str(parameter.get("name")), []).append(parameter)
    return grouped


def describe(bundle: dict[str, Any]) -> list[str]:
    """``["event-notification 3 http://.../Observation/x/_history/1", ...]``, one per event."""
    entries = bundle.get("entry") or [{}]
    status = _parameters(entries[0].get("resource", {}))
    kind = str((status.get("type") or [{}])[0].get("valueCode", "?"))
    lines: list[str] = []
    for event in status.get("notification-event", []):
        parts = _parameters({"parameter": event.get("part", [])})
        number = (parts.get("event-number") or [{}])[0].get("valueString", "?")
        focus = (parts.get("focus") or [{}])[0].get("valueReference", {}).get("reference")
        lines.append(f"{kind} {number} {focus}" if focus else f"{kind} {number}")
    return lines or [kind]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.send_response(413)
            self.end_headers()
            return
        body = self.rfile.read(length)
        try:
            lines = describe(json.loads(body))
        except (ValueError, AttributeError, TypeError):
            lines = [f"not a notification Bundle ({length} bytes)"]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        print("\n".join(lines), flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the one line per notification is the output."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:9000", help="host:port to listen on")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _Handler)
    print(f"listening on http://{host or '127.0.0.1'}:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
