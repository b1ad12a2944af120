"""Whether this process is shutting down, for the parts that must say so while it still serves.

Set by the server process on SIGTERM (service.app.http_server); read by ``/readyz`` (503 with the
reason, so that a load balancer steers new traffic away) and by the request layer (every
response then closes its connection, so that clients move to a replica that stays).
Process-wide on purpose: a signal is delivered to a process, not to a request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShutdownState:
    draining: bool = False
    reason: str = ""

    def begin(self, reason: str) -> None:
        if not self.draining:
            self.draining = True
            self.reason = reason

    def reset(self) -> None:
        """For tests that run several apps in one process."""
        self.draining = False
        self.reason = ""


SHUTDOWN = ShutdownState()
