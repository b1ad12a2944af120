"""A real rest-hook receiver for delivery tests: an HTTP server on a free port, in a thread.

It records every POST it answered (headers and the parsed notification Bundle), and can be taken
down (its socket closed: connections are refused, as for a receiver that is offline) and brought
back up on the same port, or told to answer with an error status.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    bundle: dict[str, Any]

    @property
    def status(self) -> dict[str, Any]:
        """The SubscriptionStatus Parameters (the Bundle's first entry)."""
        resource: dict[str, Any] = self.bundle["entry"][0]["resource"]
        return resource

    def parameter(self, name: str) -> Any:
        for parameter in self.status.get("parameter", []):
            if parameter["name"] == name:
                return parameter
        return None

    @property
    def notification_type(self) -> str:
        return str(self.parameter("type")["valueCode"])

    @property
    def event_numbers(self) -> list[int]:
        numbers = []
        for parameter in self.status.get("parameter", []):
            if parameter["name"] != "notification-event":
                continue
            for part in parameter["part"]:
                if part["name"] == "event-number":
                    numbers.append(int(part.get("valueString") or part.get("valueInteger64") or 0))
        return numbers

    @property
    def focus_references(self) -> list[str]:
        found = []
        for parameter in self.status.get("parameter", []):
            if parameter["name"] != "notification-event":
                continue
            for part in parameter["part"]:
                if part["name"] == "focus":
                    found.append(str(part["valueReference"]["reference"]))
        return found


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer_status = 200
        self.holding = threading.Event()
        self.holding.set()  # set: answer at once; cleared: hold every answer until set again
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status = receiver.answer_status
                if 200 <= status < 300:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    with receiver._lock:
                        receiver.received.append(Received(self.path, headers, json.loads(body)))
                    # Holding: the notification arrived, its answer waits (a sender killed now
                    # never learns that it was received).
                    receiver.holding.wait()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Close the listening socket: connections to the port are refused until ``up``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def notifications(self, notification_type: str = "event-notification") -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.notification_type == notification_type]

    def event_numbers(self) -> list[int]:
        return [n for r in self.notifications() for n in r.event_numbers]

    def wait_for(self, predicate: Callable[[Receiver], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; received {self.summary()}"
            time.sleep(0.05)

    def summary(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            return [(r.notification_type, r.event_numbers) for r in self.received]


@contextmanager
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    started.up()
    try:
        yield started
    finally:
        started.down()
