"""wkr-serving-make and the run scripts it prints, run for real with dash and bash.

Each test generates a script in its tmp_path for a real server on free 127.0.0.1
ports (a start that finds one taken meanwhile is made again on new ones, see
``started``) and drives it with ``sh script start|stop|stopf|restart|status`` as a user
would, once with ``dash`` (Debian's sh) and once with ``bash``; the processes are
checked with psutil. Whatever a test started is killed at the end by the pids its
scripts recorded (only their own sessions).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    PORT_IN_USE,
    REPO_DIR,
    TESTS_DIR,
    PortInUse,
    free_ports,
    gone,
    start_on_free_ports,
)
from wkr_serving.client import WKRClient
from wkr_serving.server.config import ServerConfig, load_config
from wkr_serving.server.runscript import (
    KINDS,
    SERVER_KIND,
    get_kind,
    kill_tree,
    main_helper,
    main_make,
    register_kind,
    session_members,
)

#: Seconds one script command may take (a start waits for the server to be ready).
SCRIPT_LIMIT_S = 120
#: A value no shell may expand or split: quotes, $, backticks, ;, a newline, globbing.
NASTY = "it's a \"dir\" $HOME `echo hi` $(echo no) ;|& *?\\ \n second line"
#: The shells every generated script must run under: POSIX dash (Debian's sh) and bash.
SHELLS = ["dash", "bash"]
#: The command of the seed's Getting Started page, verbatim (before ``-name``).
PAGE_ARGS = ["server.Worker", "-model_dir", "/path/to/model", "-model_name", "model.hdf5",
             "-port_in", "8996", "-port_out", "8998", "-http_port", "8900", "-num_worker",
             "2", "-batch_size", "1", "-device_map", "-1", "-gpu_memory_fraction", "0.25",
             "-log_dir", "/tmp/log_dir"]


def tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"the {name} entry point is not installed (pip install -e .)"
    return exe


@pytest.fixture(params=SHELLS)
def shell(request) -> str:
    """Each script test runs once per shell."""
    return tool(request.param)


def ports(numbers: list[int] | None = None) -> list[str]:
    """``-port``/``-port_out`` flags: ``numbers``, else two distinct free ports (enough
    for a script that is only generated; one that is started goes through ``started``)."""
    port, port_out = numbers or free_ports(2)
    return ["-port", str(port), "-port_out", str(port_out)]


def server_args(model_dir: Path | str, *extra: str, numbers: list[int] | None = None,
                ) -> list[str]:
    """wkr-serving-start options of a small, quick-to-stop test service."""
    return [*ports(numbers), "-bind", "127.0.0.1", "-cpu", "-num_worker", "1",
            "-graceful_timeout", "2", "-model_dir", str(model_dir), *extra]


def make(args: list[str], cwd: str | Path = TESTS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("wkr-serving-make"), *args], capture_output=True, text=True,
                          cwd=str(cwd), timeout=SCRIPT_LIMIT_S, stdin=subprocess.DEVNULL)


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def dump_helper_call(script_text: str, shell: str, tmp_path: Path, command: str = "status",
                     cwd: Path | None = None, script_path: str | None = None,
                     ) -> list[str]:
    """The argument vector a generated script hands to its helper, read back through
    ``shell`` itself: the script runs with ``PYTHON`` swapped for a program that prints
    its arguments NUL-separated (the interpreter is the only line changed)."""
    dumper = tmp_path / "dump-args"
    dumper.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    dumper.chmod(0o755)
    text, n = re.subn(r"(?m)^PYTHON=.*$", "PYTHON=" + shlex.quote(str(dumper)), script_text)
    assert n == 1, "the script names its interpreter on one PYTHON= line"
    path = tmp_path / "dump_script.sh"
    path.write_text(text)
    out = subprocess.run([shell, script_path or str(path), command], capture_output=True,
                         timeout=30, cwd=str(cwd or tmp_path), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout.decode().split("\0")[:-1]


def service_args_of(call: list[str]) -> list[str]:
    """The service's arguments in a helper call: everything after the first ``--``."""
    return call[call.index("--") + 1:]


class Script:
    """A generated run script and what its runs started."""

    def __init__(self, path: Path, args: list[str], pid_dir: Path, name: str, shell: str):
        self.path = path
        self.args = args
        self.name = name
        self.shell = shell
        self.pid_file = pid_dir / f"{name}.pid"
        self.log_file = pid_dir / "logs" / "std.log"
        self.port = int(arg_value(args, "-port"))
        self.port_out = int(arg_value(args, "-port_out"))
        self.leaders: set[int] = set()  # every pid a start reported, for the cleanup

    def run(self, command: str, cwd: str | Path | None = None,
            ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([self.shell, str(self.path), command], capture_output=True,
                             text=True, timeout=SCRIPT_LIMIT_S, stdin=subprocess.DEVNULL,
                             cwd=str(cwd or self.path.parent))
        self.leaders |= {int(p) for p in re.findall(r"started pid (\d+)", out.stdout)}
        return out

    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def client(self, **kwargs) -> WKRClient:
        kwargs.setdefault("timeout", 10_000)
        kwargs.setdefault("connect_timeout", 10_000)
        return WKRClient("127.0.0.1", self.port, self.port_out, **kwargs)

    def tree(self) -> list[int]:
        """The service's live processes: its leader and every descendant."""
        leader = psutil.Process(self.pid())
        return [leader.pid, *(c.pid for c in leader.children(recursive=True))]


def explain(out: subprocess.CompletedProcess[str]) -> str:
    return f"rc={out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"


@pytest.fixture
def scripts(tmp_path, shell) -> Iterator:
    """Make run scripts (run with ``shell``); at the end kill whatever their starts left
    (by recorded pid)."""
    made: list[Script] = []

    def generate(args: list[str], name: str = "svc", cwd: str = TESTS_DIR,
                 pid_dir: Path | None = None) -> Script:
        extra = ["-dir", str(pid_dir)] if pid_dir is not None else []
        out = make([*args, "-name", name, *extra], cwd=cwd)
        assert out.returncode == 0, explain(out)
        path = tmp_path / f"run_{name}.sh"
        path.write_text(out.stdout)
        script = Script(path, args, pid_dir or tmp_path, name, shell)
        made.append(script)
        return script

    yield generate
    for script in made:
        for pid in script.leaders:
            kill_tree(pid)


def started(make_script: Callable[[list[int]], Script],
            prepare: Callable[[Script], None] | None = None, cwd: Path | None = None,
            ) -> tuple[Script, subprocess.CompletedProcess[str]]:
    """``make_script(ports)`` for two free ports, ``prepare(script)``, then its start (in
    ``cwd``): the script and the start's output. A run script must be given port numbers (its
    readiness probe dials them), and another process may take one before the server
    binds it: a start that failed saying so ("is already in use" in the log tail it
    prints) is made and started again on new ports (``helpers.start_on_free_ports``)."""
    def attempt(numbers: list[int]) -> tuple[Script, subprocess.CompletedProcess[str]]:
        script = make_script(numbers)
        if prepare is not None:
            prepare(script)
        out = script.run("start", cwd=cwd)
        if out.returncode != 0 and PORT_IN_USE.search(out.stderr):
            raise PortInUse(explain(out))
        return script, out

    return start_on_free_ports(2, attempt)


# -- the generated text ---------------------------------------------------------------------


def test_make_prints_a_posix_script_that_dash_and_bash_parse(tmp_path):
    out = make(["workers.EchoWorker", *server_args(tmp_path / NASTY), "-model_name", NASTY,
                "-name", "syntax", "-client_key", str(tmp_path / "a key")])
    assert out.returncode == 0, explain(out)
    assert out.stdout.startswith("#!/bin/sh\n")
    for bashism in ("pipefail", "BASH_SOURCE", "[@]", "=(", "[[", "local ", "function "):
        assert bashism not in out.stdout, f"{bashism!r} is not POSIX sh"
    script = tmp_path / "run_syntax.sh"
    script.write_text(out.stdout)
    for shell in SHELLS:
        syntax = subprocess.run([tool(shell), "-n", str(script)], capture_output=True,
                                text=True, timeout=30)
        assert syntax.returncode == 0, (shell, syntax.stderr)


def test_script_hands_every_argument_to_the_helper_verbatim(tmp_path, shell):
    """Every argument, however nasty, reaches the helper as typed (nothing expanded,
    split or executed), after the helper's own options."""
    args = ["workers.EchoWorker", *server_args(tmp_path / NASTY), "-model_name", NASTY,
            "-tmp_folder", "-leading dash is a value", "-auth_token", "$(touch pwned)"]
    out = make([*args, "-name", "quoting", "-client_key", str(tmp_path / NASTY)])
    assert out.returncode == 0, explain(out)
    call = dump_helper_call(out.stdout, shell, tmp_path)
    assert call[:3] == ["-m", "wkr_serving.server.runscript", "status"]
    assert service_args_of(call) == args
    assert call[call.index("--kind") + 1] == "server"
    assert call[call.index("--client-key") + 1] == str(tmp_path / NASTY)
    assert call[call.index("--name") + 1] == "quoting"
    assert not (tmp_path / "hi").exists() and not (tmp_path / "pwned").exists()
    assert "no\n" not in out.stdout


def test_script_keeps_its_files_next_to_itself_wherever_it_is_run_from(tmp_path, shell):
    """Without -dir, NAME.pid and logs/std.log go in the script's own directory, found
    from $0 (``sh run_script.sh`` as the page runs it, or a path from elsewhere)."""
    home = tmp_path / "service home"
    elsewhere = tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    out = make(["workers.EchoWorker", *server_args(tmp_path), "-name", "where"])
    assert out.returncode == 0, explain(out)
    # dump_helper_call writes the script as home/dump_script.sh
    for cwd, path in ((home, "dump_script.sh"), (elsewhere, "../service home/dump_script.sh"),
                      (elsewhere, str(home / "dump_script.sh"))):
        call = dump_helper_call(out.stdout, shell, home, cwd=cwd, script_path=path)
        assert call[call.index("--pid-file") + 1] == str(home / "where.pid"), (cwd, path)
        assert call[call.index("--log-file") + 1] == str(home / "logs" / "std.log")


def test_usage_error_touches_nothing(tmp_path, shell):
    out = make(["workers.EchoWorker", *server_args(tmp_path), "-name", "usage"])
    script = tmp_path / "run_usage.sh"
    script.write_text(out.stdout)
    usage = subprocess.run([shell, str(script), "bogus"], capture_output=True, text=True,
                           timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    assert not (tmp_path / "logs").exists(), "a usage error must not touch anything"


# -- every wkr-serving-start flag passes through wkr-serving-make -----------------------


def sample_value(f: dataclasses.Field) -> list[str]:
    """A valid value, other than the default, for the flag of config field ``f``."""
    kind = f.metadata["kind"]
    if kind is bool:
        return []
    if f.metadata.get("nargs") == "+":
        return ["-1", "0"]
    if f.metadata.get("nargs") == "?":  # an optional value (-cors [ORIGINS])
        return ["https://a.example,http://b.example:8080"]
    if "choices" in f.metadata:
        return [f.metadata["choices"][-1]]
    if kind is int:
        return [str((f.default or 0) + 1)]
    if kind is float:
        return [str(f.default / 2 if 0 < f.default <= 1 else f.default + 1)]
    return ["it's -h $HOME `x`"]


#: Settings that need another setting (or a make option) to be valid.
PREREQUISITES = {"log_predictions": ["-log_dir", "/tmp/log dir"],
                 "curve_client_keys": ["-curve_secret_key", "/keys/server.key_secret"]}
MAKE_EXTRA = {"curve_client_keys": ["-client_key", "/keys/probe.key_secret"]}
FLAGS = [(f, flag) for f in dataclasses.fields(ServerConfig)
         for flag in (f"-{f.name}", *f.metadata["aliases"])]


@pytest.mark.parametrize("field,flag", FLAGS, ids=[flag for _, flag in FLAGS])
def test_every_start_flag_passes_through_make_unchanged(field, flag, tmp_path, capsys):
    """For each field of ServerConfig (and each alias of its flag), generated from the
    config itself: wkr-serving-make takes the flag with its value, the script hands it
    to the helper unchanged and in order, and it sets that field (nothing was eaten:
    ``-http_port`` is not ``-h ttp_port``)."""
    value = sample_value(field)
    service = ["workers.EchoWorker", "-port", "7001", "-port_out", "7002", "-model_dir",
               "/m", flag, *value, *PREREQUISITES.get(field.name, [])]
    # The make options sit between the service's own arguments.
    argv = [*service[:3], "-name", "flags", *MAKE_EXTRA.get(field.name, []), *service[3:]]
    code = main_make(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    passed = service_args_of(dump_helper_call(out.out, "dash", tmp_path))
    assert passed == service
    config, spec = load_config(passed, environ={})
    assert spec == "workers.EchoWorker"
    default = ServerConfig()
    got = getattr(config, field.name)
    if field.metadata["kind"] is bool:
        assert got is True
    elif field.name == "protocol":
        assert got == "numpy"  # the page's "npy"
    else:
        assert got != getattr(default, field.name), f"{flag} was not taken"


def test_the_getting_started_make_command_verbatim(tmp_path):
    """The seed page's command, -http_port and all, makes a script (it failed with
    "argument -h/--help: ignored explicit argument 'ttp_port'")."""
    out = make([*PAGE_ARGS, "-name", "YOUR_PRODUCTION_SERVICE_NAME"], cwd=tmp_path)
    assert out.returncode == 0, explain(out)
    for shell in SHELLS:
        call = dump_helper_call(out.stdout, tool(shell), tmp_path, command="start")
        assert service_args_of(call) == PAGE_ARGS
        assert call[call.index("--pid-file") + 1] == str(
            tmp_path / "YOUR_PRODUCTION_SERVICE_NAME.pid")
        assert call[call.index("--log-file") + 1] == str(tmp_path / "logs" / "std.log")
        assert call[call.index("--cwd") + 1] == str(tmp_path)


def test_make_help_is_its_own(capsys):
    assert main_make(["--help"]) == 0
    text = capsys.readouterr().out
    assert "-name NAME" in text and "wkr-serving-start" in text and "--help" in text


# -- kinds of service -----------------------------------------------------------------------


def test_another_kind_is_one_registration_and_one_call(tmp_path, capsys):
    """A kind other than the server reuses the generator: its name and the module that
    registers it reach the helper; main_make of that kind is one call."""
    toy = register_kind(dataclasses.replace(
        SERVER_KIND, name="toy", make_command="toy-make", title="toy service",
        registered_in="tests_toy_kind"))
    try:
        assert get_kind("toy") is toy and KINDS["server"] is SERVER_KIND
        code = main_make(["workers.EchoWorker", *ports(), "-name", "toy1"], kind="toy")
        out = capsys.readouterr()
        assert code == 0, out.err
        assert 'Run script of the toy service "toy1", made by toy-make' in out.out
        call = dump_helper_call(out.out, "dash", tmp_path)
        assert call[call.index("--kind") + 1] == "toy"
        assert call[call.index("--kind-module") + 1] == "tests_toy_kind"
    finally:
        del KINDS["toy"]


def test_helper_refuses_an_unknown_kind(tmp_path, capsys):
    code = main_helper(["status", "--kind", "nope", "--name", "x", "--pid-file",
                        str(tmp_path / "x.pid"), "--log-file", str(tmp_path / "l"), "--cwd",
                        str(tmp_path), "--", "workers.EchoWorker"])
    assert code == 2
    assert "unknown kind of service 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["workers.EchoWorker", "-port", "7001", "-port_out", "7002"], "-name"),
    (["workers.EchoWorker", "-port", "0", "-port_out", "7002", "-name", "x"], "-port"),
    (["workers.EchoWorker", "-port", "7001", "-port_out", "7002", "-batch_size", "0",
      "-name", "x"], "batch_size"),
    (["workers.EchoWorker", "-port", "7001", "-port_out", "7002", "-name", "../x"],
     "-name"),
    (["-port", "7001", "-port_out", "7002", "-name", "x"], "worker_class"),
    (["workers.EchoWorker", "-no_such_flag", "1", "-name", "x"], "no_such_flag"),
], ids=["no-name", "port-0", "bad-option", "bad-name", "no-worker", "unknown-flag"])
def test_make_refuses_bad_arguments(args, needle):
    out = make(args)
    assert out.returncode == 2, explain(out)
    assert out.stdout == "", "nothing may be printed where the script would go"
    assert needle in out.stderr


def test_start_refuse_status_stop(scripts, tmp_path):
    """The whole life of one service: start over a stale pid file, a second start is
    refused, status, graceful stop (every process gone), status and stop when stopped."""
    def stale_pid_file(script: Script) -> None:  # as left by a crash
        dead = subprocess.Popen(["true"])
        dead.wait(30)
        script.pid_file.write_text(f"{dead.pid}\n")

    script, out = started(
        lambda numbers: scripts(["workers.EchoWorker", *server_args(tmp_path, numbers=numbers)]),
        stale_pid_file)
    assert out.returncode == 0, explain(out)
    assert "stale pid file" in out.stdout and "is running" in out.stdout
    pid = script.pid()
    assert pid in script.leaders and os.getsid(pid) == pid, "its own session"
    assert script.log_file.exists()
    with script.client() as client:
        assert client.server_status["ready"] is True
        assert client.server_status["supervisor_pid"] == pid
        assert client.encode({"via": "script"}) == {"via": "script"}
        tree = script.tree()
        assert len(tree) >= 4, "supervisor, ventilator, sink and a worker"

        again = script.run("start")
        assert again.returncode != 0, explain(again)
        assert "already running" in again.stderr
        assert script.pid() == pid and script.tree() == tree
        assert client.encode(2) == 2, "the refused start must not disturb the server"

    status = script.run("status")
    assert status.returncode == 0, explain(status)
    assert f"is running (pid {pid})" in status.stdout and "ready" in status.stdout

    stop = script.run("stop")
    assert stop.returncode == 0, explain(stop)
    assert all(gone(p) for p in tree), "stop returns once every process has exited"
    assert session_members(pid) == []
    assert not script.pid_file.exists()
    assert "stopped cleanly" in script.log_file.read_text()

    status = script.run("status")
    assert status.returncode == 3, explain(status)
    assert "not running" in status.stdout
    again = script.run("stop")
    assert again.returncode == 0 and "not running" in again.stdout, explain(again)


def test_restart_then_stopf_kills_exactly_this_service_tree(scripts, tmp_path):
    """restart replaces the process tree; stopf kills all of it at once and nothing
    else: not a second service of the same kind, not an unrelated process."""
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)
    for model_dir in ("a", "b"):  # a -model_dir must exist
        (tmp_path / model_dir).mkdir()
    try:
        first, out = started(lambda numbers: scripts(
            ["workers.EchoWorker", *server_args(tmp_path / "a", numbers=numbers)],
            name="first"))
        assert out.returncode == 0, explain(out)
        other, out = started(lambda numbers: scripts(
            ["workers.EchoWorker", *server_args(tmp_path / "b", numbers=numbers)],
            name="other"))
        assert out.returncode == 0, explain(out)
        old_tree = first.tree()

        # The same ports again (what a restart keeps): only this short window between
        # the stop and the new bind is left to chance.
        out = first.run("restart")
        assert out.returncode == 0, explain(out)
        assert "stopped" in out.stdout and "is running" in out.stdout
        assert all(gone(p) for p in old_tree)
        tree = first.tree()
        assert not set(tree) & set(old_tree)
        with first.client() as client:
            assert client.encode("after restart") == "after restart"
        other_tree = other.tree()

        out = first.run("stopf")
        assert out.returncode == 0, explain(out)
        assert "killed" in out.stdout
        assert all(gone(p) for p in tree), [p for p in tree if not gone(p)]
        assert not first.pid_file.exists()
        assert session_members(tree[0]) == []

        assert bystander.poll() is None, "an unrelated process was touched"
        assert not any(gone(p) for p in other_tree), "the other service was touched"
        with other.client() as client:
            assert client.encode("still here") == "still here"
        out = other.run("stop")
        assert out.returncode == 0, explain(out)
    finally:
        bystander.kill()
        bystander.wait(30)


def test_failing_start_exits_non_zero_with_the_log_tail(scripts, tmp_path):
    script, out = started(lambda numbers: scripts(
        ["workers.FailingLoadWorker", *server_args(tmp_path, numbers=numbers)]))
    assert out.returncode != 0, explain(out)
    assert "FAILED" in out.stderr and "boom-load" in out.stderr, explain(out)
    assert not script.pid_file.exists()
    (pid,) = script.leaders
    assert gone(pid) and session_members(pid) == [], "nothing of it may be left running"
    status = script.run("status")
    assert status.returncode == 3, explain(status)


def test_arguments_reach_the_server_verbatim_from_any_directory(scripts, tmp_path):
    """A nasty model_dir (quotes, $HOME, backticks, a newline) reaches the server as
    typed; the dir/file.Class worker path resolves from where the script was made, even
    when the script runs elsewhere; -dir holds the pid file and logs."""
    model_dir = tmp_path / NASTY
    model_dir.mkdir()
    state = tmp_path / "state"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    def nasty(numbers: list[int]) -> Script:
        args = ["example/noop_worker.Worker",
                *server_args(model_dir, "-model_name", NASTY, numbers=numbers)]
        return scripts(args, name="nasty", cwd=REPO_DIR, pid_dir=state)

    script, out = started(nasty, cwd=elsewhere)
    assert out.returncode == 0, explain(out)
    assert script.pid_file.exists() and script.log_file.exists()
    assert script.pid_file.parent == state
    with script.client() as client:
        config = client.server_status["config"]
        assert config["model_dir"] == str(model_dir)
        assert config["model_name"] == NASTY
        assert client.encode([1, 2]) == [1, 2]
    assert not (elsewhere / "hi").exists()
    out = script.run("stop", cwd=elsewhere)
    assert out.returncode == 0, explain(out)
    assert not script.pid_file.exists()


def test_curve_service_is_probed_with_keys_and_stopped_by_terminate(scripts, tmp_path):
    """A server that admits only listed CURVE clients: the script's readiness probe and
    status use -client_key; wkr-serving-terminate needs the keys too, and a service it
    stopped shows as not running (stale pid file) in status."""
    keygen = tool("wkr-serving-keygen")
    for directory, name in ((tmp_path / "server_keys", "server"),
                            (tmp_path / "client_keys", "probe")):
        subprocess.run([keygen, str(directory), name], check=True, capture_output=True,
                       timeout=30)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "client_keys" / "probe.key", allowed)

    def args(numbers: list[int] | None = None) -> list[str]:
        return ["workers.EchoWorker", *server_args(
            tmp_path, "-curve_secret_key", str(tmp_path / "server_keys" / "server.key_secret"),
            "-curve_client_keys", str(allowed), numbers=numbers)]

    refused = make([*args(), "-name", "curve"])
    assert refused.returncode == 2 and "-client_key" in refused.stderr, explain(refused)

    client_key = str(tmp_path / "client_keys" / "probe.key_secret")
    script, out = started(lambda numbers: scripts([*args(numbers), "-client_key", client_key],
                                                  name="curve"))
    assert out.returncode == 0, explain(out)
    status = script.run("status")
    assert status.returncode == 0 and "ready" in status.stdout, explain(status)
    pid = script.pid()

    base = ["-ip", "127.0.0.1", "-port", str(script.port), "-port_out", str(script.port_out)]
    terminate = tool("wkr-serving-terminate")
    # Without keys the handshake cannot complete (the connection is dropped, or never
    # answered): a refusal with a hint, and the server keeps running.
    no_keys = subprocess.run([terminate, *base, "-timeout", "3"], capture_output=True,
                             text=True, timeout=SCRIPT_LIMIT_S)
    assert no_keys.returncode == 2 and "-server_public_key" in no_keys.stderr, \
        explain(no_keys)
    assert not gone(pid)
    stopped = subprocess.run(
        [terminate, *base, "-timeout", "30",
         "-server_public_key", str(tmp_path / "server_keys" / "server.key"),
         "-client_key", client_key], capture_output=True, text=True, timeout=SCRIPT_LIMIT_S)
    assert stopped.returncode == 0, explain(stopped)
    assert gone(pid) and session_members(pid) == []
    status = script.run("status")
    assert status.returncode == 3 and "stale pid file" in status.stdout, explain(status)
