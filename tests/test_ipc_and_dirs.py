"""What a server leaves in the system temp dir and in ``-model_dir`` (issue 10, findings 6
and 8).

- Its internal sockets are Linux abstract names (``ipc://@wkr-<pid>-...``): no socket
  file or directory while it runs, none after a SIGKILL of the whole tree.
- Its workers' scratch folder (``tmp_dir``) is in a directory of its own under the temp
  dir, removed at a clean stop; one left by a server killed with SIGKILL is removed by the
  next server that starts.
- A ``-model_dir`` that is not a directory is a one-line start-up error: nothing is
  created (before, the server made ``<model_dir>/tmp_wkr`` and started).

Servers are real: ``wkr-serving-start`` subprocesses (given their own ``TMPDIR``) and
in-process ``WKRServer``s (with ``tempfile.tempdir`` pointed at a test directory).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import zmq
from helpers import (
    START_LIMIT_S,
    STOP_LIMIT_S,
    TESTS_DIR,
    connect,
    gone,
    running_server,
    server_args,
    start_command,
    wait_until,
)
from wkr_serving.server import WKRServer
from wkr_serving.server.config import ConfigError, ServerConfig
from wkr_serving.server.process import ABSTRACT_NAME_MAX, Endpoints, bind_internal
from wkr_serving.server.scratch import ServerDirs, prepare_worker_dirs, remove_stale
from wkr_serving.server.supervisor import StartupError
from workers import EchoWorker, ScratchWorker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="abstract IPC names are Linux-only")

#: The name of a server's scratch directory in the temp dir, with its pid.
SCRATCH_NAME = re.compile(r"wkr-scratch-([0-9]+)-[0-9a-f]{8}")
#: The user a socket refuses in the peer-credential test (``nobody``).
OTHER_UID = 65534
#: Milliseconds a test socket waits for a message that should come.
RECV_MS = 3000
#: The first bytes of a ZMTP 3 greeting (signature), which both peers send at once.
ZMTP_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"


def wkr_entries(directory: Path) -> set[str]:
    """Names of the ``wkr-*`` entries of ``directory``."""
    return {p.name for p in directory.iterdir() if p.name.startswith("wkr-")}


def socket_files(directory: Path) -> list[Path]:
    """Every unix socket file under ``directory``."""
    return [p for p in directory.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]


def scratch_base(tmp_dir: str, systmp: Path, pid: int) -> Path:
    """The server directory holding the scratch folder ``tmp_dir``, checked to be
    ``<systmp>/wkr-scratch-<pid>-<hex>/tmp_wkr``."""
    path = Path(tmp_dir)
    assert path.name == "tmp_wkr" and path.parent.parent == systmp, tmp_dir
    match = SCRATCH_NAME.fullmatch(path.parent.name)
    assert match is not None and int(match.group(1)) == pid, tmp_dir
    return path.parent


def abstract_names_of(pid: int) -> list[str]:
    """The abstract socket names (in /proc/net/unix) of the server of supervisor ``pid``."""
    with open("/proc/net/unix", encoding="utf-8") as fh:
        return [line.split()[-1] for line in fh if f" @wkr-{pid}-" in line]


def dead_pid() -> int:
    """The pid of a process that has ended (run and reaped here)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def kill_tree(pid: int) -> list[int]:
    """SIGKILL the process ``pid`` (started by the test) and every descendant of it;
    return their pids once all are gone."""
    tree = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    for each in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)
    wait_until(lambda: all(gone(p) for p in tree), STOP_LIMIT_S, "the killed tree to end")
    return tree


# -- findings 6 and 8 with real servers --------------------------------------------------


def test_no_socket_files_and_a_killed_servers_scratch_goes_at_the_next_start(
        cli_server, tmp_path):
    """While it runs, the server's only entry in the temp dir is its scratch directory
    (the sockets are abstract names); kill -9 of the supervisor and its children leaves
    no socket and no name, only that scratch directory, which the next server removes."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {"TMPDIR": str(systmp)}
    first = cli_server(["workers.ScratchWorker", "-cpu", "-num_worker", "2"], env=env)
    with first.client() as client:
        where = client.encode("where")
    base = scratch_base(where["tmp_dir"], systmp, first.proc.pid)
    assert where["exists"]
    assert wkr_entries(systmp) == {base.name}
    assert socket_files(systmp) == []
    sockets = [c.laddr for c in psutil.Process(first.proc.pid).net_connections("unix")
               if c.laddr]
    assert sockets and all(a.startswith(f"@wkr-{first.proc.pid}-") for a in sockets), sockets
    assert abstract_names_of(first.proc.pid)

    kill_tree(first.proc.pid)
    wait_until(lambda: not abstract_names_of(first.proc.pid), STOP_LIMIT_S,
               "the kernel to release the killed server's socket names")
    assert wkr_entries(systmp) == {base.name}, "only the scratch directory may be left"
    assert socket_files(systmp) == []

    second = cli_server(["workers.ScratchWorker", "-cpu"], env=env)
    with second.client() as client:
        new_base = scratch_base(client.encode("where")["tmp_dir"], systmp, second.proc.pid)
    assert not base.exists(), "the killed server's scratch directory was not removed"
    assert wkr_entries(systmp) == {new_base.name}
    second.close()
    assert second.proc.returncode == 0, second.stderr()[-4000:]
    assert wkr_entries(systmp) == set(), "a clean stop left its scratch directory"


def test_a_killed_servers_http_state_goes_at_the_next_start(cli_server, tmp_path):
    """With an HTTP bridge, kill -9 of the tree also leaves the bridge's state directory
    (``wkr-http-<pid>-<hex>``); the next server removes it with the scratch directory."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {"TMPDIR": str(systmp)}
    first = cli_server(["workers.EchoWorker", "-cpu", "-http_port", "0"], env=env)
    assert first.http_port
    with first.client() as client:
        assert client.encode("x") == "x"
    http_dirs = {n for n in wkr_entries(systmp) if n.startswith(f"wkr-http-{first.proc.pid}-")}
    assert len(http_dirs) == 1, wkr_entries(systmp)

    kill_tree(first.proc.pid)
    assert http_dirs <= wkr_entries(systmp), "the killed server's state directory is gone"

    second = cli_server(["workers.EchoWorker", "-cpu"], env=env)
    with second.client() as client:
        assert client.encode("y") == "y"
    assert not any(n.startswith(f"wkr-{kind}-{first.proc.pid}-")
                   for n in wkr_entries(systmp) for kind in ("http", "scratch")), \
        wkr_entries(systmp)
    second.close()
    assert wkr_entries(systmp) == set()


def test_scratch_folder_is_outside_model_dir_and_goes_at_a_clean_stop(tmp_path, monkeypatch):
    """Every hook gets one tmp_dir, a folder that exists, in the server's own directory
    under the temp dir; the model directory is left untouched; a clean stop removes it."""
    systmp, model_dir = tmp_path / "systmp", tmp_path / "model"
    systmp.mkdir()
    model_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    args = server_args(model_dir, "-protocol", "obj", "-num_worker", "2", "-cpu")
    with running_server(args, ScratchWorker) as server:
        client = connect(server)
        try:
            where = client.encode("where")
        finally:
            client.close()
        base = scratch_base(where["tmp_dir"], systmp, os.getpid())
        assert where["env"] == where["model"] == where["tmp_dir"] and where["exists"]
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        assert list(model_dir.iterdir()) == [], "the server wrote into -model_dir"
    assert not base.exists(), "the scratch directory outlived a clean stop"
    assert wkr_entries(systmp) == set()


def test_missing_model_dir_is_a_one_line_start_error(tmp_path):
    """wkr-serving-start with a -model_dir that does not exist exits non-zero, saying so
    in one line that names the flag and the path, with no traceback, creating nothing."""
    systmp, missing = tmp_path / "systmp", tmp_path / "no" / "model"
    systmp.mkdir()
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [*start_command(), "workers.EchoWorker", "-model_dir", str(missing), "-port", "0",
             "-port_out", "0", "-bind", "127.0.0.1", "-cpu"], cwd=TESTS_DIR,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "TMPDIR": str(systmp)})
    try:
        # A server that started anyway logs "ready": fail then, rather than wait it out.
        wait_until(lambda: proc.poll() is not None or " ready: " in err_path.read_text(),
                   START_LIMIT_S, "the server to exit or be ready")
        assert proc.poll() is not None, "the server started without its -model_dir"
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    text = err_path.read_text()
    assert proc.returncode != 0
    assert "Traceback" not in text, text[-4000:]
    said = f"-model_dir {missing}: no such directory"
    assert [line for line in text.splitlines() if line.endswith(said)] == [
        f"wkr-serving-start: error: {said}"], text[-4000:]
    assert proc.returncode == 2  # a usage error, found before any process starts
    assert not (tmp_path / "no").exists(), "the missing -model_dir was created"
    assert wkr_entries(systmp) == set()


def test_model_dir_that_is_a_file_fails_wkrserver_start(tmp_path, monkeypatch):
    """From Python too: wait_ready raises StartupError naming the flag and the path."""
    systmp, model_file = tmp_path / "systmp", tmp_path / "model.bin"
    systmp.mkdir()
    model_file.write_bytes(b"weights")
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    server = WKRServer(server_args(model_file, "-cpu"), EchoWorker)
    server.start()
    try:
        with pytest.raises(StartupError, match=re.escape(f"-model_dir {model_file}: not a "
                                                         "directory")):
            server.wait_ready(START_LIMIT_S)
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()
    assert server.exit_code == 1
    assert model_file.read_bytes() == b"weights"
    assert wkr_entries(systmp) == set()


# -- the pieces, without a server -----------------------------------------------------------


def test_remove_stale_takes_only_dirs_of_dead_servers_of_this_user(tmp_path):
    """Exactly the names a server gives, real directories of this user, pid not running:
    everything else in the temp dir stays, including what a link points to."""
    dead, live = dead_pid(), os.getpid()
    stale = [tmp_path / f"wkr-scratch-{dead}-0123abcd", tmp_path / f"wkr-ipc-{dead}-89abcdef",
             tmp_path / f"wkr-http-{dead}-0123abcd"]
    for path in stale:
        (path / "tmp_wkr").mkdir(parents=True)
        (path / "tmp_wkr" / "cache.bin").write_bytes(b"x")
    kept = [tmp_path / name for name in (
        f"wkr-scratch-{live}-0123abcd",  # a running server's
        f"wkr-scratch-{dead}-0123abcd0", f"wkr-scratch-{dead}-0123ABCD",
        f"wkr-scratch-{dead}", f"wkr-http-{dead}-0123abc", f"wkr-{dead}-0123abcd",
        f"xwkr-scratch-{dead}-0123abcd", "wkr-scratch-0-0123abcd")]
    for path in kept:
        path.mkdir()
    a_file = tmp_path / f"wkr-scratch-{dead}-fedcba98"
    a_file.write_text("not a directory")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    link = tmp_path / f"wkr-scratch-{dead}-aaaaaaaa"
    link.symlink_to(target, target_is_directory=True)
    kept += [a_file, link, target]
    if os.getuid() == 0:  # another user's directory (root can make one)
        others = tmp_path / f"wkr-scratch-{dead}-bbbbbbbb"
        others.mkdir()
        os.chown(others, OTHER_UID, OTHER_UID)
        kept.append(others)

    assert sorted(remove_stale(str(tmp_path))) == sorted(str(p) for p in stale)
    assert not any(p.exists() for p in stale)
    assert all(os.path.lexists(p) for p in kept)
    assert (target / "precious").read_text() == "keep"


def test_server_dirs_relative_and_absolute_tmp_folder(tmp_path, monkeypatch):
    """A relative -tmp_folder is made in the server's own directory (removed at stop); an
    absolute one is used as is and never removed; one that climbs out is refused."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    dirs = ServerDirs.create(ServerConfig(model_dir=str(tmp_path), tmp_folder="cache/x"))
    try:
        (base,) = dirs.owned
        assert dirs.config.tmp_dir == os.path.join(base, "cache", "x")
        assert os.path.isdir(dirs.config.tmp_dir)
        assert dirs.endpoints.control.startswith(f"ipc://@wkr-{os.getpid()}-")
    finally:
        dirs.remove()
    assert wkr_entries(systmp) == set()

    mine = tmp_path / "my scratch"
    dirs = ServerDirs.create(ServerConfig(model_dir=str(tmp_path), tmp_folder=str(mine)))
    assert dirs.owned == () and dirs.config.tmp_dir == str(mine)
    prepare_worker_dirs(dirs.config)  # what a worker does before its hooks
    dirs.remove()
    assert mine.is_dir()
    for bad in ("..", "../elsewhere", "a/../../b", ""):
        with pytest.raises(ConfigError, match="-tmp_folder"):
            ServerConfig(tmp_folder=bad)


def test_socket_directory_where_there_is_no_abstract_namespace(tmp_path, monkeypatch):
    """The fallback of other platforms: socket files in a private wkr-ipc-<pid>-<hex>
    directory, removed with the scratch one."""
    from wkr_serving.server import scratch

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setattr(scratch, "ABSTRACT_IPC", False)
    dirs = ServerDirs.create(ServerConfig(model_dir=str(tmp_path)))
    ipc = Path(dirs.endpoints.control.removeprefix("ipc://")).parent
    assert re.fullmatch(rf"wkr-ipc-{os.getpid()}-[0-9a-f]{{8}}", ipc.name)
    assert stat.S_IMODE(ipc.stat().st_mode) == 0o700
    assert len(wkr_entries(systmp)) == 2
    dirs.remove()
    assert wkr_entries(systmp) == set()


def test_abstract_endpoints_are_unique_and_short():
    one, two = Endpoints.abstract(), Endpoints.abstract(pid=4_194_304)
    addresses = [*vars(one).values(), *vars(two).values()]
    assert len(set(addresses)) == len(addresses)
    assert all(len(a.removeprefix("ipc://@").encode()) <= ABSTRACT_NAME_MAX for a in addresses)
    assert one.control.startswith(f"ipc://@wkr-{os.getpid()}-")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_bind_internal_refuses_another_users_connection():
    """An abstract socket has no file permissions: bind_internal has the kernel's peer
    credentials checked, so a process of another user cannot send anything."""
    address = Endpoints.abstract().sink
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, RECV_MS)
    try:
        bind_internal(pull, address)
        for uid in (OTHER_UID, os.getuid()):
            send_as(uid, address, f"from {uid}".encode())
        assert pull.recv() == f"from {os.getuid()}".encode()
        pull.setsockopt(zmq.RCVTIMEO, 0)
        with pytest.raises(zmq.Again):
            pull.recv()
    finally:
        pull.close(0)
        context.term()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_internal_sockets_refuse_another_user(tmp_path):
    """Every internal socket of a running server closes a connection from another user
    at once (no ZMTP greeting), as a 0700 socket directory did before."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu")
    with running_server(args, EchoWorker) as server:
        endpoints = vars(server.supervisor.endpoints)
        greeted = {name: greeting_as(OTHER_UID, address)
                   for name, address in endpoints.items()}
        assert greeting_as(os.getuid(), endpoints["control"]), "the test cannot connect"
    assert not any(greeted.values()), f"another user was greeted by {greeted}"


def greeting_as(uid: int, address: str) -> bool:
    """Whether a process of ``uid`` connecting to the abstract ``address`` gets the first
    bytes of a ZMTP greeting (it is refused if the connection just closes)."""
    assert address.startswith("ipc://@")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(RECV_MS / 1000)
                sock.connect("\0" + address.removeprefix("ipc://@"))
                try:
                    sock.sendall(ZMTP_SIGNATURE)
                    first = sock.recv(len(ZMTP_SIGNATURE))
                except (BrokenPipeError, ConnectionResetError):  # closed on us: refused
                    first = b""
                code = 0 if first.startswith(b"\xff") else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"the connecting process failed ({code})"
    return code == 0


def send_as(uid: int, address: str, message: bytes) -> None:
    """Send ``message`` to ``address`` from a forked process running as ``uid``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setuid(uid)
            context = zmq.Context()
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(address)
            push.send(message)
            push.close()
            context.term()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
