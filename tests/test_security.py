"""Security (issue 3, point 7): CurveZMQ encryption and client keys on the public ports,
the ``wkr-serving-keygen`` CLI, the ``terminate`` command's token / same-host rule, and
pickle only on explicit opt-in (both sides).

Real servers on 127.0.0.1; nothing is ever sent to another address (the non-loopback
cases of the same-host rule are unit tests of the ventilator's own functions). Whether
traffic is really encrypted is checked with a loopback TCP relay that records the bytes
it forwards, as anyone on the path could.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import selectors
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from helpers import (
    STOP_LIMIT_S,
    connect,
    gone,
    running_server,
    server_args,
    wait_idle,
    wait_until,
)
from wkr_serving.client import (
    AsyncWKRClient,
    BadInput,
    ClientUsageError,
    ConnectTimeout,
    ProtocolError,
    ShuttingDown,
    Unauthorized,
    WKRClient,
)
from wkr_serving.client import protocol as P
from wkr_serving.client.access import is_local
from wkr_serving.client.base import ClientOptions, request_frames
from wkr_serving.client.keys import load_key_pair, load_public_key
from wkr_serving.server import StartupError, WKRServer
from wkr_serving.server.config import ConfigError, ServerConfig, load_config
from wkr_serving.server.process import Endpoints
from wkr_serving.server.security import main_keygen
from wkr_serving.server.ventilator import Ventilator
from workers import ControlledWorker, EchoWorker, FractionWorker, Opaque

#: connect_timeout (ms) of clients that must be refused: small, so a refusal is quick.
REFUSED_CONNECT_MS = 1500
#: How long a refused client may take to give up, beyond its connect_timeout (a busy box).
REFUSAL_SLACK_S = 5.0
#: How long a socket that must get nothing is watched (ms).
SILENCE_MS = 1500


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    dir: Path
    allowed: Path  # a -curve_client_keys directory listing only client-a

    def public(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.dir / f"{name}.key_secret")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    """Key pairs made with the keygen entry point: server, client-a (listed), stranger."""
    root = tmp_path_factory.mktemp("curve_keys")
    for name in ("server", "client-a", "stranger"):
        assert main_keygen([str(root), name]) == 0
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(root / "client-a.key", allowed / "client-a.key")
    return Keys(root, allowed)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _run_keygen(*argv: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("wkr-serving-keygen")
    assert exe is not None, "the wkr-serving-keygen console script is not installed"
    return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=60,
                          check=False)


def test_keygen_cli_writes_a_private_key_pair_and_never_overwrites(tmp_path):
    target = tmp_path / "made" / "here"  # created, parents included
    done = _run_keygen(str(target), "srv")
    assert done.returncode == 0, done.stderr
    public, secret = target / "srv.key", target / "srv.key_secret"
    assert str(public) in done.stdout and str(secret) in done.stdout
    assert sorted(os.listdir(target)) == ["srv.key", "srv.key_secret"], "temp files left"
    assert _mode(secret) == 0o600
    assert _mode(public) == 0o644
    pair = load_key_pair(secret)
    assert load_public_key(str(public)) == pair[0]
    assert zmq.curve_public(pair[1]) == pair[0], "the two files must hold one key pair"
    assert "secret-key" not in public.read_text()
    # The server's allow-list loader (zmq.auth) reads the public file.
    assert zmq.auth.load_certificates(str(target)) == {pair[0]: True}

    again = _run_keygen(str(target), "srv")
    assert again.returncode == 2 and "-force" in again.stderr
    assert load_key_pair(secret) == pair, "an existing key pair was overwritten"

    forced = _run_keygen(str(target), "srv", "-force")
    assert forced.returncode == 0, forced.stderr
    new_pair = load_key_pair(secret)
    assert new_pair != pair and load_public_key(str(public)) == new_pair[0]
    assert _mode(secret) == 0o600
    assert sorted(os.listdir(target)) == ["srv.key", "srv.key_secret"]


def test_keygen_function_refuses_partial_overwrites_and_odd_names(tmp_path, capsys):
    assert main_keygen([str(tmp_path), "client-1"]) == 0
    first = load_key_pair(tmp_path / "client-1.key_secret")
    os.remove(tmp_path / "client-1.key_secret")  # one file left is enough to refuse
    assert main_keygen([str(tmp_path), "client-1"]) == 2
    assert "exists" in capsys.readouterr().err
    assert load_public_key(str(tmp_path / "client-1.key")) == first[0]
    assert main_keygen([str(tmp_path), "client-1", "-force"]) == 0
    assert load_key_pair(tmp_path / "client-1.key_secret")[0] != first[0]
    for name in ("../escape", "a/b", ""):
        assert main_keygen([str(tmp_path), name]) == 2
    assert not (tmp_path.parent / "escape.key").exists()
    assert sorted(os.listdir(tmp_path)) == ["client-1.key", "client-1.key_secret"]


@pytest.mark.parametrize("form", ["path", "pathlib", "z85-str", "z85-bytes", "secret-file"])
def test_client_accepts_the_server_key_in_every_form(keys, form):
    expected = load_public_key(keys.public("server"))
    value: Any = {"path": keys.public("server"), "pathlib": Path(keys.public("server")),
                  "z85-str": expected.decode(), "z85-bytes": expected,
                  "secret-file": keys.secret("server")}[form]
    options = ClientOptions("127.0.0.1", 1, 2, "obj", None, 1000, 1000, value)
    assert options.curve is not None
    server_key, public, secret = options.curve
    assert server_key == expected
    assert zmq.curve_public(secret) == public, "the ephemeral pair must be a real pair"
    listed = ClientOptions("127.0.0.1", 1, 2, "obj", None, 1000, 1000, value,
                           keys.secret("client-a"))
    assert listed.curve == (expected, *load_key_pair(keys.secret("client-a")))


@pytest.mark.parametrize("server_key, client_key, why", [
    (None, "SECRET", "needs server_public_key"),
    ("~" * 40, None, "Z85"),
    ("/no/such/dir/server.key", None, "cannot read"),
    ("NOPE", None, "cannot read"),
    ("SERVER", "PUBLIC-ONLY", "no secret key"),
    ("NOT-A-KEY-FILE", None, "cannot read|not a CurveZMQ key"),
], ids=["client-key-alone", "bad-z85", "missing-file", "short-text", "public-as-client-key",
        "not-a-key-file"])
def test_bad_key_options_are_client_usage_errors(keys, tmp_path, server_key, client_key, why):
    junk = tmp_path / "junk.txt"
    junk.write_text("public-key = \"not a key\"\n")
    names = {"SECRET": keys.secret("client-a"), "SERVER": keys.public("server"),
             "PUBLIC-ONLY": keys.public("client-a"), "NOT-A-KEY-FILE": str(junk)}
    with pytest.raises(ClientUsageError, match=why):
        WKRClient("127.0.0.1", 1, 2, ignore_all_checks=True,
                  server_public_key=names.get(server_key, server_key),
                  client_key=names.get(client_key, client_key))


# -- CURVE servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curve_server(keys, tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker behind CURVE, any client key allowed."""
    args = server_args(tmp_path_factory.mktemp("curve_model"), "-cpu", "-num_worker", "1",
                       "-graceful_timeout", "3", "-curve_secret_key", keys.secret("server"))
    with running_server(args, EchoWorker) as server:
        yield server


@pytest.fixture(scope="module")
def listed_server(keys, tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker behind CURVE, only client-a's key allowed (-curve_client_keys)."""
    args = server_args(tmp_path_factory.mktemp("listed_model"), "-cpu", "-num_worker", "1",
                       "-graceful_timeout", "3", "-curve_secret_key", keys.secret("server"),
                       "-curve_client_keys", str(keys.allowed))
    with running_server(args, EchoWorker) as server:
        yield server


def assert_refused(server: WKRServer, **kwargs: Any) -> None:
    """A client made with ``kwargs`` gets no result: its handshake ends in ConnectTimeout
    within its (small) connect_timeout, plus slack for a busy machine."""
    kwargs.setdefault("connect_timeout", REFUSED_CONNECT_MS)
    started = time.monotonic()
    with pytest.raises(ConnectTimeout):
        client = connect(server, **kwargs)
        try:
            client.encode("must not be computed")
        finally:
            client.close()
    took = time.monotonic() - started
    assert took < kwargs["connect_timeout"] / 1000.0 + REFUSAL_SLACK_S, took


def test_curve_client_with_the_server_key_round_trips(curve_server, keys, client_factory):
    by_file = client_factory(curve_server, server_public_key=keys.public("server"))
    assert by_file.encode({"a": [1, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}
    z85_text = load_public_key(keys.public("server")).decode()
    by_text = client_factory(curve_server, server_public_key=z85_text,
                             client_key=keys.secret("stranger"))  # any key is allowed here
    assert by_text.encode_batch(list(range(9))) == list(range(9))
    status = by_text.server_status
    assert status["config"]["curve_secret_key"] == keys.secret("server")
    assert status["config"]["curve_client_keys"] is None


@pytest.mark.parametrize("how", ["no-key", "no-key-lazy", "wrong-server-key", "random-key"])
def test_curve_server_gives_nothing_to_a_client_without_its_key(curve_server, keys,
                                                                client_factory, how):
    kwargs: dict[str, Any] = {
        "no-key": {},
        "no-key-lazy": {"ignore_all_checks": True},  # handshake at the first request
        "wrong-server-key": {"server_public_key": keys.public("client-a")},
        "random-key": {"server_public_key": zmq.curve_keypair()[0]},
    }[how]
    assert_refused(curve_server, **kwargs)
    good = client_factory(curve_server, server_public_key=keys.public("server"))
    assert good.encode(f"served after {how}") == f"served after {how}"


def test_plain_zeromq_socket_gets_nothing_from_a_curve_server(curve_server, keys,
                                                              client_factory):
    """A bare DEALER speaking the wire protocol without CURVE: its HELLO and REQUEST never
    reach the server, and nothing comes back."""
    good = client_factory(curve_server, server_public_key=keys.public("server"))
    before = wait_idle(good)
    context = zmq.Context()
    try:
        sockets = []
        for port in (curve_server.port, curve_server.port_out):
            s = context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"plain-intruder")
            s.connect(f"tcp://127.0.0.1:{port}")
            sockets.append(s)
        to_vent, from_sink = sockets
        from_sink.send(P.pack([P.PROTOCOL_VERSION, P.HELLO, 0]), zmq.NOBLOCK)
        to_vent.send_multipart([P.pack([P.PROTOCOL_VERSION, P.REQUEST, 1, 5000, [0]]),
                                P.pack("plain request")], zmq.NOBLOCK)
        to_vent.send(P.pack([P.PROTOCOL_VERSION, P.COMMAND, 2, 5000, "terminate", None]),
                     zmq.NOBLOCK)
        assert from_sink.poll(SILENCE_MS) == 0, "a plain socket got an answer"
        assert to_vent.poll(0) == 0
    finally:
        context.destroy(0)
    after = good.server_status
    assert after["num_requests"] == before["num_requests"]
    assert after["num_rejected"] == before["num_rejected"]
    assert good.encode("still serving") == "still serving"


def test_listed_client_key_gets_in_and_others_do_not(listed_server, keys, client_factory):
    listed = client_factory(listed_server, server_public_key=keys.public("server"),
                            client_key=keys.secret("client-a"))
    assert listed.encode([1, "two"]) == [1, "two"]
    assert_refused(listed_server, server_public_key=keys.public("server"),
                   client_key=keys.secret("stranger"))
    assert_refused(listed_server, server_public_key=keys.public("server"))  # ephemeral
    assert_refused(listed_server)  # no CURVE at all
    assert listed.encode("still served") == "still served"
    config = listed.server_status["config"]
    assert config["curve_client_keys"] == str(keys.allowed)


class TcpTap:
    """A loopback TCP relay that forwards connections to ``target_port`` and records every
    byte it forwards, both ways: what anyone on the path could read."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self._captured = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-tap", daemon=True)
        self._thread.start()

    @property
    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the TCP relay did not stop"

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        opened: list[socket.socket] = [self.listener]
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.data is None:
                        self._accept(selector, opened)
                    else:
                        self._forward(selector, key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            for s in opened:
                s.close()
            selector.close()

    def _accept(self, selector: selectors.BaseSelector, opened: list[socket.socket]) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        conn.settimeout(10)
        opened += [conn, upstream]
        selector.register(conn, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, conn)

    def _forward(self, selector: selectors.BaseSelector, source: socket.socket,
                 peer: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                with self._lock:
                    self._captured += data
                peer.sendall(data)
                return
        except OSError:
            pass
        for s in (source, peer):  # one side closed: close the pair
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(s)
            s.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain-control", "curve"])
def test_curve_traffic_does_not_show_the_payload(request, keys, encrypted):
    """Requests and results pass through a recording relay: without CURVE the payload is
    there in clear (the control), with CURVE it is not."""
    server = request.getfixturevalue("curve_server" if encrypted else "obj_server")
    curve = {"server_public_key": keys.public("server")} if encrypted else {}
    marker = f"wkr-secret-marker-{uuid.uuid4().hex}"
    taps = [TcpTap(server.port), TcpTap(server.port_out)]
    try:
        with WKRClient("127.0.0.1", taps[0].port, taps[1].port, protocol="obj",
                       timeout=20_000, connect_timeout=10_000, **curve) as client:
            assert client.encode(marker) == marker
            assert client.encode_batch([{"k": marker}, marker]) == [{"k": marker}, marker]
    finally:
        for tap in taps:
            tap.close()
    mechanism = (b"CURVE" if encrypted else b"NULL").ljust(20, b"\0")  # ZMTP greeting
    for tap, direction in zip(taps, ("requests", "results"), strict=True):
        seen = tap.captured
        assert mechanism in seen, f"the relay did not see the ZMTP {direction} stream"
        assert (marker.encode() in seen) is not encrypted, \
            f"payload {'visible' if encrypted else 'not seen'} in the {direction} stream"


def test_internal_sockets_are_abstract_names_without_files(curve_server):
    """The roles talk over Linux abstract unix sockets: no file to leave behind or to
    open up by a umask; another user's connection is refused by uid (see
    tests/test_ipc_and_dirs.py)."""
    endpoints = vars(curve_server.supervisor.endpoints)
    assert all(e.startswith(f"ipc://@wkr-{os.getpid()}-") for e in endpoints.values()), endpoints
    assert len(set(endpoints.values())) == len(endpoints)


@pytest.mark.parametrize("option, why", [
    ("bad-client-dir", "curve_client_keys"),
    ("public-as-secret", "secret"),
])
def test_bad_curve_server_options_stop_the_start(keys, tmp_path, option, why):
    extra = {"bad-client-dir": ["-curve_secret_key", keys.secret("server"),
                                "-curve_client_keys", str(tmp_path / "missing")],
             "public-as-secret": ["-curve_secret_key", keys.public("server")]}[option]
    server = WKRServer(server_args(tmp_path, "-cpu", *extra), EchoWorker)
    try:
        with pytest.raises(StartupError, match=why):
            server.start()
            server.wait_ready(60)
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive() and server.exit_code == 1


def test_curve_client_keys_without_a_server_key_is_a_config_error(keys):
    with pytest.raises(ConfigError, match="curve_secret_key"):
        ServerConfig(curve_client_keys=str(keys.allowed))


# -- terminate: token and same-host rule -----------------------------------------------------


@pytest.mark.parametrize("peer, local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    (None, False), ("10.0.0.1", False), ("192.168.1.5", False), ("::ffff:10.0.0.1", False),
    ("2001:db8::1", False), ("0.0.0.0", False), ("garbage", False), ("", False),
])
def test_is_local(peer, local):
    assert is_local(peer) is local


def _ventilator(**config: Any) -> Ventilator:
    """A ventilator object, not started: its authorization rule is plain logic."""
    return Ventilator(ServerConfig(**config), Endpoints.in_dir("/nonexistent"), 0.0)


def test_authorize_without_token_accepts_this_host_only():
    vent = _ventilator()
    for peer in ("127.0.0.1", "::1"):
        assert vent._authorize({"token": None}, peer) is None
    assert vent._authorize({"token": None}, None) is not None  # address unknown: refused
    refusal = vent._authorize({"token": "anything"}, "192.168.1.5")
    assert refusal is not None and "-auth_token" in refusal and "192.168.1.5" in refusal


def test_authorize_with_token_needs_it_from_everywhere():
    vent = _ventilator(auth_token="s3cret-token")
    for peer in ("127.0.0.1", "10.0.0.1"):
        assert vent._authorize({"token": "s3cret-token"}, peer) is None
        for args in ({"token": None}, {"token": "s3cret"}, {"token": "s3cret-token "},
                     {"token": 123}, {}, None, "s3cret-token", ["s3cret-token"]):
            refusal = vent._authorize(args, peer)
            assert refusal is not None and "-auth_token" in refusal, (args, peer)
            assert "s3cret-token" not in refusal


def test_auth_token_from_the_environment_is_never_shown():
    config, worker = load_config(["workers.EchoWorker"], environ={"WKR_AUTH_TOKEN": "env-tok"})
    assert worker == "workers.EchoWorker"
    assert config.auth_token == "env-tok"
    assert config.as_dict(redact=True)["auth_token"] == "<redacted>"
    assert config.as_dict()["auth_token"] == "env-tok"
    override, _ = load_config(["workers.EchoWorker", "-auth_token", "cli-tok"],
                              environ={"WKR_AUTH_TOKEN": "env-tok"})
    assert override.auth_token == "cli-tok"
    assert load_config(["workers.EchoWorker"], environ={})[0].auth_token is None
    assert load_config(["workers.EchoWorker"], environ={})[0].as_dict(True)["auth_token"] is None
    with pytest.raises(ConfigError, match="auth_token"):
        load_config(["workers.EchoWorker", "-auth_token", ""], environ={})
    pickle_on, _ = load_config(["workers.EchoWorker"], environ={"WKR_ALLOW_PICKLE": "yes"})
    assert pickle_on.allow_pickle is True
    assert load_config(["workers.EchoWorker"], environ={})[0].allow_pickle is False


def _block_item(tmp_path: Path, value: Any) -> tuple[dict[str, Any], Path, Path]:
    started, release = tmp_path / f"started-{value}", tmp_path / f"release-{value}"
    item = {"cmd": "block", "started": str(started), "release": str(release), "value": value}
    return item, started, release


def test_terminate_needs_the_token_then_drains_and_exits_cleanly(tmp_path):
    token = f"tok-{uuid.uuid4().hex}"
    log_dir = tmp_path / "logs"
    graceful = 20.0
    args = server_args(tmp_path, "-cpu", "-num_worker", "1", "-auth_token", token,
                       "-graceful_timeout", str(graceful), "-log_dir", str(log_dir))
    item, started, release = _block_item(tmp_path, 7)
    try:
        with running_server(args, ControlledWorker) as server, connect(server) as client, \
                connect(server) as admin:
            for wrong in (None, "", "wrong", token[:-1], token + "x"):
                with pytest.raises(Unauthorized, match="-auth_token"):
                    admin.terminate(wrong)
            status = admin.server_status  # readable without the token
            assert status["config"]["auth_token"] == "<redacted>"
            assert token not in repr(status)
            assert status["draining"] is False
            assert client.encode("still serving") == "still serving"
            pids = [status["ventilator_pid"], *(w["pid"] for w in status["workers"])]

            client.encode(item, blocking=False)  # in flight while the server drains
            wait_until(started.exists, 20, "the worker to start the blocking request")
            reply = admin.terminate(token)
            assert reply == {"stopping": True, "supervisor_pid": os.getpid()}
            wait_until(lambda: admin.server_status["draining"], 20, "the server to drain")
            with pytest.raises(ShuttingDown):
                admin.encode("too late")
            assert server.is_alive()
            release.touch()
            results = client.fetch_all()
            assert results == [{"pid": pids[1], "value": 7, "released": True}]
            server.join(graceful)
            assert not server.is_alive(), "the server did not stop within -graceful_timeout"
            assert server.exit_code == 0
            assert server.supervisor.stop_reason == "terminate command"
        wait_until(lambda: all(gone(p) for p in pids), STOP_LIMIT_S, "the roles to exit")
    finally:
        release.touch()
    log = (log_dir / "WKRServer.log").read_text()
    assert "refused terminate from 127.0.0.1" in log
    assert "terminate command from 127.0.0.1" in log
    assert token not in log and token not in (log_dir / "WKRServer.err").read_text()


def test_terminate_without_a_token_is_accepted_from_this_host(tmp_path):
    log_dir = tmp_path / "logs"
    args = server_args(tmp_path, "-cpu", "-num_worker", "1", "-graceful_timeout", "5",
                       "-log_dir", str(log_dir))
    with running_server(args, EchoWorker) as server, connect(server) as client:
        assert client.server_status["config"]["auth_token"] is None
        assert client.encode("before") == "before"
        # A token the server does not have is ignored: only the peer address counts.
        reply = client.terminate("unused")
        assert reply["stopping"] is True and reply["supervisor_pid"] == os.getpid()
        server.join(STOP_LIMIT_S)
        assert not server.is_alive() and server.exit_code == 0
    # The ventilator read the real peer address (an unreadable one would count as local).
    assert "terminate command from 127.0.0.1" in (log_dir / "WKRServer.log").read_text()


# -- pickle ---------------------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """Its pickle creates a file when loaded: proof of whether anything was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def pickle_server(tmp_path_factory) -> Iterator[WKRServer]:
    """FractionWorker (echo; {"fraction": [n, d]} -> Fraction) with -allow_pickle."""
    args = server_args(tmp_path_factory.mktemp("pickle_model"), "-cpu", "-num_worker", "1",
                       "-graceful_timeout", "3", "-allow_pickle")
    with running_server(args, FractionWorker) as server:
        yield server


def test_client_without_allow_pickle_refuses_to_send_a_pickle(obj_server, client_factory):
    client = client_factory(obj_server)
    before = wait_idle(client)["num_requests"]
    for value in (Fraction(1, 3), Opaque("x")):
        with pytest.raises(ProtocolError, match="cannot encode"):
            client.encode(value)
    with pytest.raises(ProtocolError, match="cannot encode"):
        client.encode_batch(["fine", Opaque(2)])
    assert client.status["num_request"] == 0, "nothing may be sent"
    assert client.server_status["num_requests"] == before
    assert client.encode("plain") == "plain"


def test_server_without_allow_pickle_refuses_pickled_items(obj_server, client_factory,
                                                           tmp_path):
    client = client_factory(obj_server, allow_pickle=True)
    before = wait_idle(client)
    evidence = tmp_path / "unpickled"
    for value in (Fraction(1, 3), Opaque({"a": 1}), RunsCodeWhenUnpickled(str(evidence))):
        with pytest.raises(BadInput, match="-allow_pickle"):
            client.encode(value)
    with pytest.raises(BadInput, match="-allow_pickle"):
        client.encode_batch(["fine", Opaque(2), 3])
    assert not evidence.exists(), "the server unpickled a client's bytes"
    assert client.encode({"plain": [1, 2]}) == {"plain": [1, 2]}
    after = client.server_status
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert [w["restarts"] for w in after["workers"]] == [w["restarts"]
                                                         for w in before["workers"]]
    assert after["config"]["allow_pickle"] is False


def test_pickle_round_trips_when_both_sides_opt_in(pickle_server, client_factory):
    client = client_factory(pickle_server, allow_pickle=True)
    assert client.encode(Fraction(1, 3)) == Fraction(1, 3)
    back = client.encode(Opaque({"a": [1, 2]}))
    assert isinstance(back, Opaque) and back == Opaque({"a": [1, 2]})
    assert client.encode({"fraction": [2, 6]}) == Fraction(1, 3)  # a pickled result
    assert client.encode_batch(["plain", Fraction(3, 4), {"fraction": [1, 2]}]) == [
        "plain", Fraction(3, 4), Fraction(1, 2)]
    assert client.server_status["config"]["allow_pickle"] is True
    # Only what msgpack cannot encode is pickled.
    frames = request_frames(1, 0, ["plain", {"n": 1}, Fraction(1, 2)], "obj", True)
    assert P.unpack_header(frames[0])[4] == [P.MSGPACK_ITEM, P.MSGPACK_ITEM, P.PICKLE_ITEM]
    assert pickle.loads(frames[3]) == Fraction(1, 2)


def test_client_without_allow_pickle_refuses_a_pickled_result(pickle_server, client_factory):
    """The server pickles a result msgpack cannot carry; a client that did not opt in must
    fail that request with an error instead of unpickling (or hanging until its timeout)."""
    client = client_factory(pickle_server, timeout=10_000)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="allow_pickle"):
        client.encode({"fraction": [1, 3]})
    assert time.monotonic() - started < 5.0, "the refusal must not wait for the timeout"
    assert client.encode("plain") == "plain"
    assert client.encode_batch(["a", {"b": 1}]) == ["a", {"b": 1}]


def test_decode_refuses_a_pickle_without_running_it(tmp_path):
    evidence = tmp_path / "ran"
    data = pickle.dumps(RunsCodeWhenUnpickled(str(evidence)))
    with pytest.raises(ProtocolError, match="pickle"):
        P.decode_item(P.PICKLE_ITEM, data)
    assert not evidence.exists()
    P.decode_item(P.PICKLE_ITEM, data, allow_pickle=True).close()
    assert evidence.exists(), "control: with allow_pickle the same bytes do run code"


# -- the asyncio client has the same options ------------------------------------------------


def _run_async(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _async_client(server: WKRServer, **kwargs: Any) -> AsyncWKRClient:
    kwargs.setdefault("timeout", 20_000)
    kwargs.setdefault("connect_timeout", 10_000)
    return AsyncWKRClient("127.0.0.1", server.port, server.port_out, protocol="obj", **kwargs)


def test_async_client_with_keys_and_pickle(curve_server, pickle_server, keys):
    async def main() -> tuple[Any, Any]:
        async with _async_client(curve_server, server_public_key=keys.public("server"),
                                 client_key=keys.secret("client-a")) as client:
            curve = await client.encode_batch([{"x": 1}, "y"])
        async with _async_client(pickle_server, allow_pickle=True) as client:
            pickled = [await client.encode(Fraction(2, 3)),
                       await client.encode({"fraction": [1, 4]})]
        return curve, pickled

    assert _run_async(main()) == ([{"x": 1}, "y"], [Fraction(2, 3), Fraction(1, 4)])


@pytest.mark.parametrize("how", ["no-key", "wrong-server-key"])
def test_async_client_without_the_server_key_is_refused(curve_server, keys, how):
    kwargs = {} if how == "no-key" else {"server_public_key": keys.public("stranger")}

    async def main() -> None:
        client = _async_client(curve_server, connect_timeout=REFUSED_CONNECT_MS, **kwargs)
        try:
            await client.encode("must not be computed")
        finally:
            await client.close()

    started = time.monotonic()
    with pytest.raises(ConnectTimeout):
        _run_async(main())
    assert time.monotonic() - started < REFUSED_CONNECT_MS / 1000.0 + REFUSAL_SLACK_S


def test_async_client_without_allow_pickle_refuses_a_pickled_result(pickle_server):
    async def main() -> Any:
        async with _async_client(pickle_server, timeout=10_000) as client:
            started = time.monotonic()
            with pytest.raises(ProtocolError, match="allow_pickle"):
                await client.encode({"fraction": [1, 3]})
            assert time.monotonic() - started < 5.0, "the refusal must not wait for the timeout"
            return await client.encode("plain")

    assert _run_async(main()) == "plain"
