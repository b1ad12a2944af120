"""``mhr serve --workers N``: N server processes, their listening sockets, and their shutdown.

uvicorn's own supervisor keeps the listening socket open in the parent until every worker
has exited, so after SIGTERM the kernel goes on accepting connections that nobody will ever
read, and resets them when the parent exits. Here the parent closes its copy as soon as the
stop begins (it never accepts; only the workers do), forwards the signal, and waits: the
socket then closes when the last worker closes it, after that worker has accepted what was
queued (service.app.http_server), and a connection attempt after that is refused. Where the
kernel migrates a closing socket's connections (service.app.listeners), each worker has a
socket of its own in one SO_REUSEPORT group instead, and the same holds per socket.

Beside the server processes runs one background process (service.app.background_process):
the audit integrator, the job workers and the kept totals' upkeep, which the server processes
then leave to it. A server or background process that dies while the service runs is
replaced; one that fails at start-up stops the service (it would fail the same way again). If
the supervisor itself dies, every process sees its pipe close and stops.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from uvicorn.config import STARTUP_FAILURE

from service.app.background_process import background_main
from service.app.http_server import server_config, worker_main
from service.app.listeners import open_listeners
from service.core.settings import Settings

log = logging.getLogger("mhr.supervisor")

# Beyond the drain and graceful periods, how long a worker may take to exit before it is killed.
EXIT_MARGIN_SECONDS = 10.0
RESPAWN_DELAY_SECONDS = 1.0


class Supervisor:
    def __init__(self, settings: Settings, *, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.config = server_config(settings, workers=workers)
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess] = []  # the server processes
        self.background: BaseProcess | None = None
        self.signals: list[int] = []
        self.listeners: list[socket.socket] = []
        self.parent_alive: Connection | None = None
        self._keep_alive: Connection | None = None  # the write end: closed only by our exit

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)

    def _spawn(self, index: int) -> BaseProcess:
        """Worker ``index``, on its own socket (or the one shared by all)."""
        assert self.listeners and self.parent_alive is not None
        process = self.context.Process(
            target=worker_main,
            kwargs={
                "config": self.config,
                "sockets": [self.listeners[index % len(self.listeners)]],
                "parent_alive": self.parent_alive,
                "drain_seconds": self.settings.drain_seconds,
                "log_level": self.settings.log_level,
                "background_in_server": False,
            },
            name="mhr-worker",
        )
        process.start()
        log.info("worker started", extra={"worker_pid": process.pid})
        return process

    def _spawn_background(self) -> BaseProcess:
        assert self.parent_alive is not None
        process = self.context.Process(
            target=background_main,
            kwargs={"parent_alive": self.parent_alive, "log_level": self.settings.log_level},
            name="mhr-background",
        )
        process.start()
        log.info("background process started", extra={"worker_pid": process.pid})
        return process

    def _processes(self) -> list[BaseProcess]:
        return [*self.workers, *([self.background] if self.background is not None else [])]

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.listeners = open_listeners(self.config, self.count)
        except OSError as exc:
            log.error("cannot listen", extra={"error": exc.strerror, "port": self.config.port})
            return STARTUP_FAILURE
        self.parent_alive, self._keep_alive = self.context.Pipe(duplex=False)
        self.background = self._spawn_background()
        self.workers = [self._spawn(index) for index in range(self.count)]
        while True:
            wait([p.sentinel for p in self._processes()], timeout=0.5)
            if self.signals:
                return self._stop(self.signals.pop(0))
            for process in self._processes():
                if process.exitcode is None:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error(f"{process.name} failed to start: stopping", extra={"worker_pid": process.pid})
                    self._stop(signal.SIGINT)
                    return STARTUP_FAILURE
                log.error(
                    f"{process.name} died: replacing it",
                    extra={"worker_pid": process.pid, "exit": process.exitcode},
                )
                time.sleep(RESPAWN_DELAY_SECONDS)
                if process is self.background:
                    self.background = self._spawn_background()
                else:
                    index = self.workers.index(process)
                    self.workers[index] = self._spawn(index)

    def _stop(self, sig: int) -> int:
        """Close the parent's copies of the sockets, pass the signal on, wait for the workers."""
        for listener in self.listeners:
            listener.close()
        drain = self.settings.drain_seconds if sig == signal.SIGTERM else 0.0
        log.info("stopping", extra={"signal": signal.Signals(sig).name, "drain_seconds": drain})
        self._forward(sig)
        deadline = time.monotonic() + drain + self.settings.graceful_shutdown_seconds + EXIT_MARGIN_SECONDS
        while any(p.exitcode is None for p in self._processes()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("workers did not stop in time: killing them")
                return self._kill()
            wait([p.sentinel for p in self._processes() if p.exitcode is None], timeout=min(remaining, 0.5))
            while self.signals:
                again = self.signals.pop(0)
                if again == signal.SIGINT and sig == signal.SIGINT:
                    log.warning("second interrupt: killing the workers")
                    return self._kill()
                if again == signal.SIGINT:  # Ctrl+C during a drain: skip the rest of it
                    sig = signal.SIGINT
                    self._forward(sig)
        codes = [p.exitcode for p in self._processes()]
        log.info("stopped", extra={"worker_exit_codes": codes})
        return 0 if all(code == 0 for code in codes) else 1

    def _forward(self, sig: int) -> None:
        for process in self._processes():
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(process.pid, sig)

    def _kill(self) -> int:
        for process in self._processes():
            if process.exitcode is None:
                process.kill()
        for process in self._processes():
            process.join(timeout=5)
        return 1


def serve_workers(settings: Settings, *, workers: int) -> int:
    return Supervisor(settings, workers=workers).run()
