"""A process that runs the shared background work (service.app.background) and no HTTP server.

``mhr worker`` runs one in the foreground. ``mhr serve --workers N`` runs one beside its N server
processes (service.app.supervisor), whose event loops then answer requests only: a seal of the
audit log, a delivery or an export step used to run on the same event loop as up to eight
requests, and each request waited for it (W2's p99 at 16 connections went from ~60 ms to
~40 ms with the work moved out). The kernel's scheduler shares the cores between processes in
slices of a few milliseconds, where one event loop runs each task until it awaits.

It stops on SIGTERM or SIGINT (the jobs in hand get the graceful period), and when its
supervisor is gone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from multiprocessing.connection import Connection

from uvicorn.config import STARTUP_FAILURE

from security.keys import KeyProvider
from service.app.background import BackgroundWork
from service.app.logging_setup import configure_logging
from service.core.lifecycle import SHUTDOWN
from service.core.settings import Settings, load_settings
from service.keys.keyring_match import KeyringMismatch, check_and_record
from service.runtime.providers import build_runtime, close_runtime, open_keyring

log = logging.getLogger("mhr.jobs")


def run_background(
    settings: Settings, keys: KeyProvider, *, job_workers: int, parent_alive: Connection | None = None
) -> None:
    """Run until a stop signal (or, supervised, until the supervisor's end of the pipe closes)."""
    asyncio.run(_run(settings, keys, job_workers, parent_alive))


async def _run(
    settings: Settings, keys: KeyProvider, job_workers: int, parent_alive: Connection | None
) -> None:
    runtime = build_runtime(settings, keys=keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_alive is not None:

        def parent_gone() -> None:
            loop.remove_reader(parent_alive.fileno())
            log.error("the supervisor process is gone: stopping")
            stop.set()

        loop.add_reader(parent_alive.fileno(), parent_gone)
    try:
        await check_and_record(runtime.database, runtime.keys)
        background = BackgroundWork(runtime, job_workers=job_workers)
        background.start()
        log.info("background process started", extra={"job_workers": job_workers})
        await stop.wait()
        SHUTDOWN.begin("stopping")
        background.begin_stopping()
        log.info("background process stopping", extra={"grace_seconds": settings.graceful_shutdown_seconds})
        await background.stop(settings.graceful_shutdown_seconds)
    finally:
        await close_runtime(runtime)
    log.info("background process stopped")


def background_main(parent_alive: Connection, log_level: str) -> None:
    """The supervisor's background process: a fresh interpreter, with the server's settings."""
    configure_logging(log_level)
    try:
        settings = load_settings()
        keys = open_keyring(settings)
    except Exception as exc:  # the servers would fail the same way: the service stops
        log.error("the background process cannot start", extra={"error_type": type(exc).__name__})
        sys.exit(STARTUP_FAILURE)
    try:
        run_background(settings, keys, job_workers=max(1, settings.job_workers), parent_alive=parent_alive)
    except KeyringMismatch:
        log.error("the background process refuses the keyring: it is not the database's")
        sys.exit(STARTUP_FAILURE)
