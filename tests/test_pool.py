"""The decentralized pool (issue 8, Part B points 1-3): ``wkr-decentral-start`` with the
seed's own flags and ``-remote_servers`` forms, supervision of its units (restart after
kill -9, errors counted, off_model on a clean stop, bounded stop), the control commands
(each request its own reply, clean timeouts, token / same-host rule, hostile frames),
status over the control port and over HTTP (/status, /health, /metrics), events.

Real processes on 127.0.0.1: a real WKR server (numpy EchoWorker), real pools started
with the installed CLI, real sockets. Units are in tests/pool_units.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import msgpack
import pytest
import zmq
from helpers import port_refused, reserved_ports, wait_until
from poolhelp import CLIPool, pool_command, servers_arg
from prometheus_client.parser import text_string_to_metric_families
from wkr_serving.client.access import authorize
from wkr_serving.client.pool_config import PoolConfig, PoolConfigError, parse_remote_servers
from wkr_serving.client.pool_control import PoolControl, PoolRefused

# -- -remote_servers -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('[["127.0.0.1", 8996, 8998]]', (("127.0.0.1", 8996, 8998),)),
    ("[[10.40.34.16, 8068, 8069], [10.40.34.14, 8068, 8069]]",
     (("10.40.34.16", 8068, 8069), ("10.40.34.14", 8068, 8069))),
    ("[[10.40.34.16,8068,8069],[host-b,1,2]]", (("10.40.34.16", 8068, 8069),
                                                ("host-b", 1, 2))),
    ("[[::1, 7000, 7001]]", (("::1", 7000, 7001),)),
    ("[['localhost', 5, 6]]", (("localhost", 5, 6),)),
])
def test_remote_servers_json_and_the_seeds_unquoted_form(text, expected):
    assert parse_remote_servers(text) == expected


@pytest.mark.parametrize("text", [
    "", "[]", "[[a, 1]]", "[[a, 1, 1]]", "[[a, 1, 70000]]", "[[a, 1, 2], [a, 1, 2]]",
    "[[a, 1, 2]] junk", "[[a, 1, 2], junk]", '[["a", "x", 2]]', '{"a": 1}', "[[, 1, 2]]",
    '[[1, 2, 3]]',
])
def test_bad_remote_servers_are_refused_with_the_reason(text):
    with pytest.raises(PoolConfigError, match="remote_servers"):
        parse_remote_servers(text)


def test_pool_config_checks_its_values():
    with pytest.raises(PoolConfigError, match="port_out"):
        PoolConfig("x.Y", "[[a, 1, 2]]", port=5, port_out=5)
    with pytest.raises(PoolConfigError, match="num_client"):
        PoolConfig("x.Y", "[[a, 1, 2]]", num_client=-1)
    config = PoolConfig("x.Y", "[[a, 1, 2]]", auth_token="s3cret",
                        unit_options={"redis_password": "p", "queue": "q"})
    shown = config.as_dict()
    assert shown["auth_token"] == "<redacted>"
    assert shown["unit_options"] == {"redis_password": "<redacted>", "queue": "q"}


@pytest.mark.parametrize("token, args, peer, allowed", [
    (None, {}, "127.0.0.1", True), (None, {}, "::1", True), (None, {}, "10.0.0.1", False),
    (None, {}, None, False), ("s3cret", {}, "127.0.0.1", False),
    ("s3cret", {"token": "s3cret"}, "10.0.0.1", True),
    ("s3cret", {"token": "wrong"}, "127.0.0.1", False), ("s3cret", {"token": 5}, None, False),
])
def test_pool_commands_need_the_token_or_this_host(token, args, peer, allowed):
    assert (authorize(token, args, peer, "pool") is None) is allowed


# -- a running pool ----------------------------------------------------------------------------


def _http(pool: CLIPool, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pool.http_port}{path}",
                                    timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, http.client.HTTPException):  # refused or closed unanswered
        return 0, b""


def test_seed_flags_unquoted_servers_status_cli_and_http(pools, numpy_server, tmp_path):
    unquoted = f"[[127.0.0.1, {numpy_server.port}, {numpy_server.port_out}]]".split()
    assert len(unquoted) == 3  # the shell splits the seed's form into words
    pool = pools("pool_units.Echo", "-num_client", "2", "-remote_servers", *unquoted,
                 "-log_dir", str(tmp_path / "logs"))
    status = pool.wait_running(2)
    assert status["servers"][0]["server"] == \
        f"127.0.0.1:{numpy_server.port}/{numpy_server.port_out}"
    wait_until(lambda: all(u["counters"].get("done", 0) > 0 for u in pool.status()["units"]),
               30, "both units to have done work")

    done = pool.cli("status")
    assert done.returncode == 0, done.stderr
    assert "2/2 unit(s) running" in done.stdout and "reachable" in done.stdout
    as_json = json.loads(pool.cli("status", "-json").stdout)
    assert as_json["state"] == "running" and len(as_json["units"]) == 2

    code, body = _http(pool, "/status")
    assert code == 200 and json.loads(body)["units_running"] == 2
    assert _http(pool, "/health")[0] == 200
    assert _http(pool, "/health/ready")[0] == 200
    assert _http(pool, "/nowhere")[0] == 404
    wait_until(lambda: json.loads(_http(pool, "/status")[1])["servers"][0]["reachable"],
               30, "the server to be probed reachable")
    code, body = _http(pool, "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    done_samples = [s for s in families["wkr_pool_unit_events"].samples
                    if s.labels.get("name") == "done"]
    assert len(done_samples) == 2 and all(s.value > 0 for s in done_samples)
    assert [s.value for s in families["wkr_pool_server_reachable"].samples] == [1.0]
    assert os.path.exists(tmp_path / "logs" / "WKRDecentralize.log")


def test_a_killed_unit_is_restarted_and_says_why(pools, numpy_server):
    pool = pools("pool_units.Echo", "-num_client", "2", "-remote_servers",
                 servers_arg(numpy_server), "-restart_backoff", "0.1")
    status = pool.wait_running(2)
    victim = status["units"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    status = pool.wait_status(
        lambda s: s["units"][0]["restarts"] == 1 and s["units"][0]["state"] == "running"
        and s["units"][0]["pid"] != victim["pid"], "the killed unit to be restarted")
    assert "SIGKILL" in status["units"][0]["last_error"]
    assert status["units"][1]["restarts"] == 0 and status["units_running"] == 2


def test_do_work_exceptions_are_logged_counted_and_the_loop_goes_on(pools, numpy_server):
    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server),
                 "-fail_every", "3")
    status = pool.wait_status(lambda s: s["errors"] >= 3 and s["units"] and
                              s["units"][0]["counters"].get("done", 0) >= 6,
                              "errors and successes to accumulate")
    unit = status["units"][0]
    assert unit["state"] == "running" and unit["restarts"] == 0
    assert unit["last_error"].startswith("ValueError: planned failure")
    log = pool.stderr()
    assert "Traceback" in log and "planned failure" in log


def test_terminate_stops_cleanly_and_off_model_runs_in_every_unit(pools, numpy_server,
                                                                  tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    pool = pools("pool_units.Echo", "-num_client", "3", "-remote_servers",
                 servers_arg(numpy_server), "-marker_dir", str(markers))
    pool.wait_running(3)
    done = pool.cli("terminate", "-timeout", "30")
    assert done.returncode == 0, done.stderr
    assert "the pool has stopped" in done.stdout
    assert pool.wait_exit() == 0
    assert len(os.listdir(markers)) == 3  # off_model ran in each unit
    assert port_refused(pool.port) and port_refused(pool.http_port)


def test_sigterm_stops_the_pool_like_terminate(pools, numpy_server, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server),
                 "-marker_dir", str(markers))
    pool.wait_running(1)
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.wait_exit() == 0
    assert len(os.listdir(markers)) == 1


def test_a_unit_that_ignores_the_stop_is_killed_after_graceful_timeout(pools, numpy_server):
    pool = pools("pool_units.Stubborn", "-num_client", "2", "-remote_servers",
                 servers_arg(numpy_server), "-graceful_timeout", "1")
    pids = [u["pid"] for u in pool.wait_running(2)["units"]]
    start = time.monotonic()
    done = pool.cli("terminate", "-timeout", "30")
    assert done.returncode == 0, done.stderr
    assert pool.wait_exit() == 0
    took = time.monotonic() - start
    assert took < 1 + 10, took  # graceful_timeout, then SIGKILL (bounded, generous)
    assert "did not stop within 1.0s: killing" in pool.stderr()
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_unit_whose_get_model_fails_is_retried_with_backoff(pools):
    with reserved_ports(2) as (dead_port, dead_out):
        pool = pools("pool_units.NoModel", "-remote_servers",
                     f'[["127.0.0.1", {dead_port}, {dead_out}]]', "-restart_backoff", "0.05",
                     "-max_restart_backoff", "0.4")
        status = pool.wait_status(lambda s: s["restarts"] >= 3, "repeated restarts")
        unit = status["units"][0]
        assert "RuntimeError: cannot reach 127.0.0.1" in unit["last_error"]
        assert unit["state"] in ("backoff", "starting", "boot_failed")
        pool.wait_status(lambda s: s["servers"][0]["reachable"] is False,
                         "the dead server to be probed unreachable")
        assert pool.proc.poll() is None  # the pool itself stays up
        assert "get_model failed" in pool.stderr()


def test_switch_idle_and_restart(pools, numpy_server, obj_server, tmp_path):
    events = _subscriber()
    pool = pools("pool_units.Echo", "-num_client", "2", "-remote_servers",
                 servers_arg(numpy_server))
    events.connect(f"tcp://127.0.0.1:{pool.port_out}")
    first = pool.wait_running(2)

    done = pool.cli("switch", "-num_client", "1")
    assert done.returncode == 0, done.stderr
    assert "switched: 1 unit(s)" in done.stdout
    pool.wait_running(1)

    # Another server list: units of the old server stop, new ones start (unquoted form).
    other = f"[[127.0.0.1, {numpy_server.port}, {numpy_server.port_out}], " \
            f"[localhost, {numpy_server.port}, {numpy_server.port_out}]]"
    done = pool.cli("switch", "-num_client", "2", "-remote_servers", *other.split())
    assert done.returncode == 0, done.stderr
    status = pool.wait_running(4)
    assert sorted({u["server"] for u in status["units"]}) == sorted(
        [f"127.0.0.1:{numpy_server.port}/{numpy_server.port_out}",
         f"localhost:{numpy_server.port}/{numpy_server.port_out}"])

    done = pool.cli("idle")
    assert done.returncode == 0, done.stderr
    status = pool.wait_status(lambda s: s["state"] == "idle" and not s["units"],
                              "the pool to be idle")
    assert _http(pool, "/health/ready")[0] == 503

    done = pool.cli("restart")
    assert done.returncode == 0, done.stderr
    status = pool.wait_running(4)
    old_pids = {u["pid"] for u in first["units"]}
    assert not old_pids & {u["pid"] for u in status["units"]}

    wanted = {"unit_started", "unit_ready", "switched", "idle", "unit_exited", "restarting"}
    assert wanted <= {e["event"] for e in _events(events, wanted)}
    events.close(0)


def _subscriber() -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    return sub


def _events(sub: zmq.Socket, wanted: set[str], limit: float = 10.0) -> list[dict]:
    """Events received until every name in ``wanted`` was seen, at most ``limit`` s."""
    seen: list[dict] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not wanted <= {e["event"] for e in seen}:
        if sub.poll(100):
            seen.append(json.loads(sub.recv()))
    return seen


def test_commands_that_change_the_pool_need_its_token_when_it_has_one(pools, numpy_server):
    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server),
                 env={"WKR_AUTH_TOKEN": "s3cret"})
    pool.wait_running(1)
    assert pool.cli("status").returncode == 0  # read-only: no token needed
    for command in ("idle", "restart", "terminate"):
        refused = _no_token(pool, command)
        assert refused.returncode == 2, refused.stdout
        assert "Unauthorized" in refused.stderr and "-auth_token" in refused.stderr
    refused = pool.cli("switch", "-num_client", "2", "-token", "wrong")
    assert refused.returncode == 2 and "Unauthorized" in refused.stderr
    assert pool.status()["units_wanted"] == 1
    done = pool.cli("switch", "-num_client", "2", "-token", "s3cret")
    assert done.returncode == 0, done.stderr
    pool.wait_running(2)
    with pool.control(token="s3cret") as control:
        assert control.call("terminate")["stopping"] is True
    assert pool.wait_exit() == 0


def _no_token(pool: CLIPool, command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WKR_AUTH_TOKEN"}
    return subprocess.run(
        [*pool_command(command), "-ip", "127.0.0.1", "-port", str(pool.port)],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_control_commands_against_a_pool_that_is_gone_time_out_cleanly():
    with reserved_ports(1) as (port,):
        for command in ("status", "idle", "restart", "terminate", "switch"):
            extra = ["-num_client", "1"] if command == "switch" else []
            start = time.monotonic()
            done = subprocess.run(
                [*pool_command(command), "-ip", "127.0.0.1", "-port", str(port), "-timeout",
                 "0.5", *extra], capture_output=True, text=True, timeout=60,
                stdin=subprocess.DEVNULL)
            took = time.monotonic() - start
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert "no answer from the pool" in done.stderr
            assert "Traceback" not in done.stderr
            assert took < 10, took


def test_hostile_control_frames_get_an_error_and_the_pool_keeps_answering(pools,
                                                                          numpy_server):
    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server))
    pool.wait_running(1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{pool.port}")
    cases = [b"", b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"cmd": "status"}),
             msgpack.packb({"id": "x", "cmd": "status"}),
             msgpack.packb({"id": 7, "cmd": "rm -rf"}),
             msgpack.packb({"id": 8, "cmd": "status", "args": [1]}),
             msgpack.packb({"id": 9, "cmd": "switch", "args": {"num_client": "many"}}),
             msgpack.packb({"id": 10, "cmd": "switch", "args": {"remote_servers": "[[x]]"}}),
             msgpack.packb({"id": 11, "cmd": "switch", "args": {"bogus": 1}}),
             msgpack.packb({"id": 12, "cmd": ["status"]}),
             msgpack.packb({"id": 13, "cmd": "switch", "args": {"num_client": True}})]
    for frame in cases:
        sock.send(frame)
        assert sock.poll(10_000), f"no reply to {frame!r}"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["ok"] is False and reply["error"] == "BadRequest", (frame, reply)
    sock.send_multipart([b"two", b"frames"])  # not a command: ignored, nothing to answer
    sock.send(b"x" * (2 << 20))  # beyond the size limit: the connection is dropped
    sock.close(0)
    status = pool.status()
    assert status["units_wanted"] == 1 and pool.proc.poll() is None


def test_a_start_error_is_clear(tmp_path):
    cases = [
        (["pool_units.Missing", "-remote_servers", "[[a, 1, 2]]"], "cannot load"),
        (["no_such_module.X", "-remote_servers", "[[a, 1, 2]]"], "cannot load"),
        (["pool_units.Echo", "-remote_servers", "[[a, 1]]"], "remote_servers"),
        (["pool_units.Echo", "-remote_servers", "[[a, 1, 2]]", "-bogus", "1"],
         "unrecognized arguments: -bogus"),
        (["wkr_serving.client.QueueWorker", "-remote_servers", "[[a, 1, 2]]", "-prefetch",
          "0"], "argument -prefetch: must be greater than 0"),
        (["wkr_serving.client.QueueWorker", "-remote_servers", "[[a, 1, 2]]",
          "-claim_after", "-1"], "argument -claim_after: must be greater than 0"),
    ]
    for args, message in cases:
        done = subprocess.run([*pool_command(), *args], capture_output=True, text=True,
                              timeout=60, cwd=os.path.dirname(__file__),
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_units_own_options_are_in_the_help():
    done = subprocess.run([*pool_command(), "pool_units.Echo", "--help"],
                          capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(__file__), stdin=subprocess.DEVNULL)
    assert done.returncode == 0
    assert "-remote_servers" in done.stdout and "-marker_dir" in done.stdout


def test_control_call_refusal_is_typed(pools, numpy_server):
    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server),
                 "-auth_token", "s3cret")
    pool.wait_running(1)
    with pool.control() as control, pytest.raises(PoolRefused) as info:
        control.call("idle")
    assert info.value.kind == "Unauthorized"


def test_a_pool_of_more_than_max_units_is_refused():
    from wkr_serving.client.pool_config import MAX_UNITS

    with pytest.raises(PoolConfigError, match="unit processes"):
        PoolConfig("x.Y", "[[a, 1, 2], [b, 1, 2]]", num_client=MAX_UNITS // 2 + 1)


def test_wkr_decentralize_central_in_a_program_with_parsed_args(numpy_server, tmp_path):
    """The seed's way: parse the start arguments, then WKRDecentralizeCentral(cls, args)
    with start()/join() (here as a context manager, which starts and stops it)."""
    from pool_units import Echo
    from wkr_serving.client import WKRDecentralizeCentral
    from wkr_serving.client.pool_cli import build_start_parser

    markers = tmp_path / "markers"
    markers.mkdir()
    args = build_start_parser(Echo).parse_args(
        ["pool_units.Echo", "-port", "0", "-port_out", "0", "-bind", "127.0.0.1",
         "-num_client", "2", "-remote_servers",
         *f"[[127.0.0.1, {numpy_server.port}, {numpy_server.port_out}]]".split(),
         "-marker_dir", str(markers)])
    with WKRDecentralizeCentral(Echo, args) as pool:
        assert pool.port and pool.port_out and pool.port != pool.port_out
        with PoolControl("127.0.0.1", pool.port, 10.0) as control:
            wait_until(lambda: control.call("status")["units_running"] == 2, 60,
                       "2 units running")
        assert pool.central.config.unit_options == {"marker_dir": str(markers),
                                                    "fail_every": 0}
    assert not pool.is_alive() and pool.exit_code == 0
    assert len(os.listdir(markers)) == 2


def test_a_unit_removed_then_wanted_again_while_stopping_comes_back(pools, numpy_server):
    pool = pools("pool_units.Stubborn", "-num_client", "2", "-remote_servers",
                 servers_arg(numpy_server), "-graceful_timeout", "2")
    pool.wait_running(2)
    with pool.control() as control:
        control.call("switch", num_client=1)  # unit 1 stops (killed after 2 s)
        control.call("switch", num_client=2)  # and is wanted again meanwhile
    status = pool.wait_running(2)
    assert len(status["units"]) == 2


def test_idle_http_connections_cannot_hold_the_status_port(pools, numpy_server):
    """More idle connections than the pool's HTTP server serves at once: the extra ones
    are closed at once, the idle ones are cut after the read timeout, and /status
    answers again without the pool or its units noticing."""
    import socket

    from wkr_serving.client.pool_http import MAX_CONNECTIONS, READ_TIMEOUT_S

    pool = pools("pool_units.Echo", "-remote_servers", servers_arg(numpy_server))
    pool.wait_running(1)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 16):
            conn = socket.create_connection(("127.0.0.1", pool.http_port), timeout=10)
            conn.sendall(b"GET /sta")  # never finishes its request line
            idle.append(conn)
        start = time.monotonic()
        wait_until(lambda: _http(pool, "/status")[0] == 200, READ_TIMEOUT_S + 20,
                   "/status to answer once the idle connections are cut")
        assert time.monotonic() - start < READ_TIMEOUT_S + 20
        closed = 0
        for conn in idle:  # every idle connection was closed by the server
            conn.settimeout(10)
            try:
                closed += conn.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(idle)
    finally:
        for conn in idle:
            conn.close()
    assert pool.status()["units_running"] == 1 and pool.proc.poll() is None
