"""The test suite's own port helpers (tests/helpers.py): ports that cannot be taken by
another process between a pick and a bind, which matters when several test runs share
a machine.

- ``reserved_ports``: held by a socket that never listens: refused, and not bindable.
- ``start_on_free_ports``: a program that must be given numbers is started again on new
  ports when it finds one taken (shown with a real redis-server), a bounded number of
  times.
- ``CLIServer``: ``-port 0``, the ports read back from the server's own log, from this
  run's lines only when ``-log_dir`` is shared with an earlier run.
"""

from __future__ import annotations

import errno
import socket

import pytest
import zmq
from helpers import (
    PORT_ATTEMPTS,
    CLIServer,
    PortInUse,
    port_refused,
    reserved_ports,
    start_on_free_ports,
)
from redis_server import RedisServer, redis_server_path


def test_a_reserved_port_refuses_connections_and_cannot_be_bound():
    with reserved_ports(2) as ports:
        assert len(set(ports)) == 2
        context = zmq.Context()
        try:
            for port in ports:
                assert port_refused(port)
                router = context.socket(zmq.ROUTER)  # as a server's -port binds it
                router.setsockopt(zmq.LINGER, 0)
                with pytest.raises(zmq.ZMQError) as info:
                    router.bind(f"tcp://127.0.0.1:{port}")
                router.close(0)
                assert info.value.errno == errno.EADDRINUSE
        finally:
            context.term()


def test_start_on_free_ports_gives_up_after_a_bounded_number_of_attempts():
    tried: list[list[int]] = []

    def always_taken(ports: list[int]) -> None:
        tried.append(ports)
        raise PortInUse(f"port {ports[0]}")

    with pytest.raises(AssertionError, match=f"{PORT_ATTEMPTS} starts in a row"):
        start_on_free_ports(2, always_taken)
    assert len(tried) == PORT_ATTEMPTS
    assert all(len(set(ports)) == 2 for ports in tried)


def test_redis_server_starts_again_on_another_port_when_its_port_was_taken(tmp_path):
    """Another process binds the first port picked before redis-server does: that start
    fails with PortInUse (not a PING answered by the other process), the next one, on a
    new port, serves."""
    assert redis_server_path() is not None, "redis-server is not installed"
    squatters: list[socket.socket] = []
    servers: list[RedisServer] = []

    def start(ports: list[int]) -> RedisServer:
        if not squatters:
            squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis does
            squatter.bind(("127.0.0.1", ports[0]))
            squatter.listen(1)
            squatters.append(squatter)
        server = RedisServer(tmp_path / f"redis{len(servers)}", port=ports[0])
        servers.append(server)
        return server

    try:
        server = start_on_free_ports(1, start)
        assert servers == [server], "the start on the taken port must fail"
        assert server.port != squatters[0].getsockname()[1]
        with server.client() as client:
            assert client.ping()
    finally:
        for server in servers:
            server.stop()
        for squatter in squatters:
            squatter.close()


def test_cli_server_reads_its_ports_from_this_runs_log(tmp_path):
    """Two servers in turn with one -log_dir: the second's ports come from its own
    ready line, not from the first's earlier in the same file (whose ports are closed:
    a client of them would never connect)."""
    log_dir = str(tmp_path / "logs")
    servers = []
    for name in ("first", "second"):
        server = CLIServer(["workers.EchoWorker", "-cpu", "-log_dir", log_dir], tmp_path,
                           name=name)
        servers.append(server)
        try:
            args = server.proc.args
            assert args[args.index("-port") + 1] == args[args.index("-port_out") + 1] == "0"
            with server.client() as client:
                assert client.server_status["supervisor_pid"] == server.proc.pid
                assert client.encode(name) == name
        finally:
            server.close()
    assert servers[1].log_path is not None
    assert servers[1].log_path.read_text().count(" ready: port ") == 2
