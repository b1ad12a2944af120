"""The listening sockets of ``mhr serve --workers N``: one per worker, in one SO_REUSEPORT
group, where the kernel hands a closing socket's connections to the others; else one shared.

With one socket shared by every worker, the worker whose event loop wakes first accepts every
connection queued at that moment (uvloop, like asyncio, accepts until the queue is empty). A
client that opens its keep-alive connections together (a load balancer's pool, wrk) is then
served by one worker while the other idles: W2 (16 connections, 2 workers) ran some rounds at
370-500 req/s with one worker idle, against 740-780 when the connections happened to split.
With a socket per worker in one SO_REUSEPORT group, the kernel hashes each new connection to
one of them, so the connections spread over the workers whatever their timing.

The supervisor holds every socket for the life of the service: a replaced worker takes over its
predecessor's socket, and connections the kernel queued on it meanwhile wait for the new worker
rather than being reset.

A group needs ``net.ipv4.tcp_migrate_req = 1`` (Linux 5.14 and later). Without it, a socket
that closes while the others still listen resets the connections the kernel was handing it at
that moment: a worker stopping after its drain accepts what is queued and closes, and a
connection that arrives in between is lost (seen once in 12,480 in the drain test). With one
shared socket only the last worker's close has that window, so that is the fallback.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn

MIGRATE_REQUESTS = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def kernel_balances_safely() -> bool:
    """Linux balances a SO_REUSEPORT group (other systems accept the option but not the
    balancing), and migrates a closing member's connections to the others."""
    if not (sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")):
        return False
    try:
        return MIGRATE_REQUESTS.read_text().strip() == "1"
    except OSError:  # an older kernel: no migration
        return False


def open_listeners(
    config: uvicorn.Config, count: int, *, balanced: bool | None = None
) -> list[socket.socket]:
    """``count`` sockets bound to the configured address, one per worker; or one, shared by all,
    where the kernel would not balance a group safely (``balanced`` None: ask it), or for a Unix
    socket or an inherited descriptor."""
    if balanced is None:
        balanced = kernel_balances_safely()
    if not balanced or count < 2 or config.uds is not None or config.fd is not None:
        return [config.bind_socket()]
    family = socket.AF_INET6 if config.host and ":" in config.host else socket.AF_INET
    port = config.port
    if port:
        _refuse_if_taken(family, config.host, port)
    listeners: list[socket.socket] = []
    try:
        for _ in range(count):
            listener = socket.socket(family=family)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((config.host, port))
            port = listener.getsockname()[1]  # port 0: the others join the port the first got
            listener.set_inheritable(True)
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _refuse_if_taken(family: socket.AddressFamily, host: str, port: int) -> None:
    """A group admits any socket of the same user that sets the option, a second ``mhr serve``
    included, which would then silently take a share of this one's connections. Binding once
    without the option first fails as a shared socket would: address already in use."""
    probe = socket.socket(family=family)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    finally:
        probe.close()
