"""``mhr serve --workers N``'s listening sockets (service.app.listeners)."""

from __future__ import annotations

import socket
import sys

import pytest
import uvicorn

from service.app.listeners import open_listeners

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="a SO_REUSEPORT group balances on Linux only")


def _config(port: int) -> uvicorn.Config:
    return uvicorn.Config("service.app.factory:create_asgi_app", host="127.0.0.1", port=port)


@linux_only
def test_each_worker_gets_its_own_socket_on_one_port() -> None:
    listeners = open_listeners(_config(0), 3)
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
    first = open_listeners(_config(0), 2)
    try:
        for listener in first:
            listener.listen(8)
        port = first[0].getsockname()[1]
        with pytest.raises(OSError) as refused:
            open_listeners(_config(port), 2)
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
