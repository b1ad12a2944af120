"""``mhr serve --workers N``'s listening sockets (service.app.listeners)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import uvicorn

from service.app import listeners
from service.app.listeners import open_listeners

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="a SO_REUSEPORT group balances on Linux only")


def _config(port: int) -> uvicorn.Config:
    return uvicorn.Config("service.app.factory:create_asgi_app", host="127.0.0.1", port=port)


@linux_only
def test_each_worker_gets_its_own_socket_on_one_port() -> None:
    listeners = open_listeners(_config(0), 3, balanced=True)
    try:
        assert len({s.fileno() for s in listeners}) == 3
        assert len({s.getsockname()[1] for s in listeners}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in listeners)
        for listener in listeners:
            listener.listen(8)
        # Every socket of the group accepts: a connection reaches one of them.
        client = socket.create_connection(listeners[0].getsockname(), timeout=5)
        client.close()
    finally:
        for listener in listeners:
            listener.close()


@linux_only
def test_a_second_service_on_the_same_port_is_refused_not_given_a_share() -> None:
    first = open_listeners(_config(0), 2, balanced=True)
    try:
        for listener in first:
            listener.listen(8)
        port = first[0].getsockname()[1]
        with pytest.raises(OSError) as refused:
            open_listeners(_config(port), 2, balanced=True)
        assert refused.value.errno == 98  # EADDRINUSE, as a shared socket would be refused
    finally:
        for listener in first:
            listener.close()


def test_one_worker_has_one_socket_without_a_group() -> None:
    (listener,) = open_listeners(_config(0), 1)
    try:
        assert not listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        listener.close()


def test_without_migration_of_a_closing_sockets_connections_the_workers_share_one_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """net.ipv4.tcp_migrate_req = 0 (the default): a group would reset what the kernel was handing
    a worker's socket as it closed after its drain; one shared socket is closed once, last."""
    setting = tmp_path / "tcp_migrate_req"
    monkeypatch.setattr(listeners, "MIGRATE_REQUESTS", setting)
    for value, expected in (("0\n", False), ("1\n", sys.platform == "linux")):
        setting.write_text(value)
        assert listeners.kernel_balances_safely() is expected
    setting.unlink()
    assert listeners.kernel_balances_safely() is False  # an older kernel has no such setting
    (shared,) = open_listeners(_config(0), 2, balanced=False)
    shared.close()
