"""One server process: uvicorn, stopped in the order that a load balancer and its clients need.

On SIGTERM:
1. drain: for ``drain_seconds`` the process keeps serving, but ``/readyz`` answers 503 with the
   reason and every response closes its connection, so the load balancer and keep-alive
   clients move elsewhere;
2. stop accepting: what the kernel has already queued is accepted, then the listening socket
   is closed in the same step, so a new connection is refused, never accepted and then reset;
   connections just accepted get a moment to send their first request;
3. in-flight requests finish (up to ``timeout_graceful_shutdown``), then the application's
   shutdown runs (audit writer drained) and the process exits 0.

SIGINT (Ctrl+C) skips step 1. Unsupervised, a second SIGINT abandons in-flight requests.
With several workers (service.app.supervisor) every worker does this on its own socket copy,
and the supervisor has closed its copy first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.app.logging_setup import configure_logging
from service.core.lifecycle import SHUTDOWN
from service.core.settings import Settings

log = logging.getLogger("mhr.server")

# How long a connection accepted just before the listening socket closed may take to send its
# request. One that sends nothing by then is closed unanswered, as any idle connection is.
FIRST_REQUEST_GRACE_SECONDS = 1.0


def server_config(settings: Settings, *, workers: int) -> uvicorn.Config:
    return uvicorn.Config(
        "service.app.factory:create_asgi_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        # Logging is ours (JSON, no exception text), set up in every process: see logging_setup.
        log_config=None,
        proxy_headers=True,
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_seconds),
    )


def accept_queued(listener: socket.socket) -> list[socket.socket]:
    """Every connection the kernel has completed but nobody accepted yet (non-blocking)."""
    accepted: list[socket.socket] = []
    listener.setblocking(False)
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except ConnectionAbortedError:
            continue
        except OSError:  # out of descriptors: what is left is reset with the socket
            log.warning("could not accept every queued connection before closing")
            return accepted
        connection.setblocking(False)
        accepted.append(connection)


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, *, drain_seconds: float, parent_alive: Connection | None = None
    ) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        # Supervised: readable (EOF) when the supervisor is gone; the worker then stops.
        self.parent_alive = parent_alive
        self._stop_at: float | None = None
        self._announced = False

    # Signal handler: only sets state; the main loop acts on it.
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        stop_at = now + self.drain_seconds if sig == signal.SIGTERM else now
        if self._stop_at is None:
            SHUTDOWN.begin("shutting down: draining connections")
            self._stop_at = stop_at
        else:
            if sig == signal.SIGINT and self.should_exit and self.parent_alive is None:
                self.force_exit = True  # a second Ctrl+C: abandon in-flight requests
            self._stop_at = min(self._stop_at, stop_at)

    def stop_now(self) -> None:
        self.handle_exit(signal.SIGINT, None)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.parent_alive is not None:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.parent_alive.fileno(), self._parent_gone)

    def _parent_gone(self) -> None:
        assert self.parent_alive is not None
        asyncio.get_running_loop().remove_reader(self.parent_alive.fileno())
        log.error("the supervisor process is gone: stopping")
        self.stop_now()

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and not self._announced:
            self._announced = True
            remaining = max(0.0, self._stop_at - time.monotonic())
            log.info("draining", extra={"drain_seconds": round(remaining, 3)})
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        # One synchronous step, no await. The event loop's watcher goes first (closing its
        # socket object), then what the kernel queued is accepted on a duplicate descriptor that
        # is closed straight after: a connection can be queued and then reset only in the
        # microseconds between those two system calls (in the last process holding the socket).
        spares = [listener.dup() for listener in sockets or ()]
        for server in self.servers:
            server.close()
        for listener in sockets or ():
            listener.close()
        late: list[socket.socket] = []
        for spare in spares:
            late.extend(accept_queued(spare))
            spare.close()
        log.info("stopped accepting connections", extra={"accepted_at_close": len(late)})
        for connection in late:
            await loop.connect_accepted_socket(self._protocol, sock=connection)
        await self._let_new_connections_start()

        # Idle keep-alive connections close now; busy ones after their response.
        for protocol in list(self.server_state.connections):
            protocol.shutdown()
        try:
            await asyncio.wait_for(self._in_flight_done(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            log.error(
                "graceful shutdown limit reached: cancelling requests",
                extra={"cancelled": len(self.server_state.tasks)},
            )
            for task in self.server_state.tasks:
                task.cancel(msg="graceful shutdown limit exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _protocol(self) -> asyncio.Protocol:
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol

    async def _let_new_connections_start(self) -> None:
        """Wait (briefly) until every connection that has not sent a request yet has started one:
        uvicorn's shutdown would close those unanswered, with their request already sent."""
        deadline = time.monotonic() + FIRST_REQUEST_GRACE_SECONDS
        # uvicorn signals neither event: poll its connection set.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            getattr(protocol, "cycle", None) is None for protocol in self.server_state.connections
        ):
            await asyncio.sleep(0.01)

    async def _in_flight_done(self) -> None:
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for server in self.servers:
            await server.wait_closed()


def serve_in_process(settings: Settings) -> int:
    """One server process (``--workers 1``), bound here so that shutdown owns the socket."""
    config = server_config(settings, workers=1)
    listener = config.bind_socket()
    server = DrainingServer(config, drain_seconds=settings.drain_seconds)
    server.run(sockets=[listener])
    return 0 if server.started else STARTUP_FAILURE


def worker_main(
    config: uvicorn.Config,
    sockets: list[socket.socket],
    parent_alive: Connection,
    drain_seconds: float,
    log_level: str,
    background_in_server: bool = True,
) -> None:
    """A supervised worker: a fresh interpreter, so logging is configured here first.

    ``background_in_server`` False: the supervisor runs a background process, and this
    worker's app (built by uvicorn's factory, from the environment) runs only its own part."""
    configure_logging(log_level)
    if not background_in_server:
        os.environ["MHR_BACKGROUND_IN_SERVER"] = "false"
    server = DrainingServer(config, drain_seconds=drain_seconds, parent_alive=parent_alive)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)
