"""Switching the served model with no request lost (WKRClient.switch_model).

One new worker at a time loads the new model while the others serve; then an old one
finishes its batch and retires. Every request is answered, by exactly one model, and
a new model that fails to load leaves the old one serving.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import connect, running_server, server_args, wait_idle, wait_until
from switch_workers import FactorWorker
from wkr_serving.client import BadInput, SwitchFailed, Unauthorized
from wkr_serving.server.worker import WorkerProcess

#: Bounds of the load kept up during a switch: requests per thread, and seconds.
MAX_CALLS = 20_000
LOAD_LIMIT_S = 120.0


def write_models(tmp_path: Any) -> None:
    (tmp_path / "a.txt").write_text("10")
    (tmp_path / "b.txt").write_text("20")


class Load:
    """Threads calling ``encode_batch`` (sizes 1..7, so requests split over batches of 3)
    until stopped; every answer is kept with the model each item came from."""

    def __init__(self, server: Any, threads: int = 3) -> None:
        self.server = server
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.answers: list[tuple[float, list[Any]]] = []  # (time answered, result)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(LOAD_LIMIT_S)
        assert not any(t.is_alive() for t in self.threads)

    def _run(self, k: int) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        with connect(self.server, timeout=30_000) as client:
            for n in range(MAX_CALLS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                size = 1 + (n + k) % 7
                try:
                    result = client.encode_batch(list(range(1, size + 1)))
                except BaseException as exc:  # every failure is a test failure
                    with self.lock:
                        self.errors.append(exc)
                    return
                with self.lock:
                    self.answers.append((time.monotonic(), result))

    def count(self) -> int:
        with self.lock:
            return len(self.answers)


def switch_in_background(server: Any, model_name: str, version: str,
                         ) -> tuple[threading.Thread, dict[str, Any]]:
    """Ask for a switch from another thread and client; the outcome dict gets its
    ``result`` or ``error`` when it ends."""
    outcome: dict[str, Any] = {}

    def switch() -> None:
        with connect(server, timeout=120_000) as other:
            try:
                outcome["result"] = other.switch_model(model_name=model_name,
                                                       version=version, timeout=120_000)
            except BaseException as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=switch)
    thread.start()
    return thread, outcome


def versions_of(result: list[Any]) -> set[str]:
    return {version for _, version in result}


def test_switch_under_load_loses_nothing(tmp_path):
    write_models(tmp_path)
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "3", "-cpu",
                       "-model_name", "a.txt", "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        meta = client.metadata()
        assert (meta["model_name"], meta["model_version"], meta["epoch"]) == ("a.txt", "v1", 0)
        assert meta["metadata"]["factor"] == 10 and meta["switch"] is None
        most = 0

        def count_workers() -> int:
            return sum(1 for c in list(server.supervisor.children.values())
                       if isinstance(c.role, WorkerProcess) and c.process.is_alive())

        with Load(server) as load:
            wait_until(lambda: load.count() >= 50, 60, "load before the switch")
            watching = threading.Event()

            def watch() -> None:
                nonlocal most
                while not watching.is_set():
                    most = max(most, count_workers())
                    watching.wait(0.01)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                result = client.switch_model(model_name="b.txt", version="v2", timeout=120_000)
            finally:
                watching.set()
                watcher.join(10)
            switched_at = time.monotonic()
            seen = load.count()
            wait_until(lambda: load.count() >= seen + 50, 60, "load after the switch")
        assert load.errors == [], load.errors[:3]
        assert result["model_version"] == "v2" and result["epoch"] == 1
        assert result["previous"]["model_version"] == "v1" and result["workers"] == 2
        assert most <= 3, f"{most} worker processes at once (2 workers, one extra)"
        for _, answer in load.answers:  # each request: one model, the right values
            (version,) = versions_of(answer)
            factor = 10 if version == "v1" else 20
            assert [v for v, _ in answer] == [factor * x for x in range(1, len(answer) + 1)]
        before = [a for t, a in load.answers if t < switched_at]
        after = [a for t, a in load.answers if t > switched_at]
        assert versions_of(before[0]) == {"v1"}
        assert after and all(versions_of(a) == {"v2"} for a in after)
        status = wait_idle(client)
        assert status["model"] == {"name": "b.txt", "version": "v2", "dir": str(tmp_path),
                                   "epoch": 1}
        assert status["switch"]["state"] == "done"
        assert status["switch"]["switched"] == 2 == status["switch"]["total"]
        assert [row["model_version"] for row in status["workers"]] == ["v2", "v2"]
        assert status["num_errors"] == {}, status["num_errors"]
        meta = client.metadata()
        assert meta["metadata"]["factor"] == 20 and meta["model_version"] == "v2"
        assert client.encode(2) == [40, "v2"]


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(tmp_path):
    write_models(tmp_path)
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "3", "-cpu",
                       "-model_name", "a.txt", "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        with Load(server, threads=2) as load:
            wait_until(lambda: load.count() >= 20, 60, "load before the switch")
            with pytest.raises(SwitchFailed) as info:
                client.switch_model(model_name="missing.txt", version="v2", timeout=120_000)
            seen = load.count()
            wait_until(lambda: load.count() >= seen + 20, 60, "load after the failed switch")
        assert "FileNotFoundError" in info.value.message, info.value.message
        assert "missing.txt" in info.value.message
        assert load.errors == [], load.errors[:3]
        assert all(versions_of(a) == {"v1"} for _, a in load.answers)
        assert server.is_alive() and server.supervisor.failure is None
        status = wait_idle(client)
        assert status["switch"]["state"] == "failed"
        assert "missing.txt" in status["switch"]["error"]
        assert status["model"]["version"] == "v1" and status["model"]["epoch"] == 0
        assert [row["model_version"] for row in status["workers"]] == ["v1", "v1"]
        assert [row["restarts"] for row in status["workers"]] == [0, 0]
        # ... and a later switch to a good model works.
        assert client.switch_model(model_name="b.txt", version="v3")["model_version"] == "v3"
        assert client.encode(1) == [20, "v3"]


def test_switch_arguments_and_authorisation(tmp_path):
    write_models(tmp_path)
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-model_name", "a.txt",
                       "-auth_token", "s3cret")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        with pytest.raises(Unauthorized):
            client.switch_model(model_name="b.txt")
        with pytest.raises(Unauthorized):
            client.switch_model(model_name="b.txt", token="wrong")
        with pytest.raises(BadInput, match="not a directory"):
            client.switch_model(model_dir=str(tmp_path / "nowhere"), token="s3cret")
        with pytest.raises(BadInput, match="model_name must be a non-empty string"):
            client._command("switch_model", {"model_name": 5, "token": "s3cret"})
        assert client.encode(3) == [30, None]
        done = client.switch_model(model_name="b.txt", token="s3cret")
        # version None keeps the current one (none here)
        assert (done["model_name"], done["model_version"]) == ("b.txt", None)
        assert client.encode(3) == [60, None]


def test_a_failure_after_some_workers_switched_switches_them_back(tmp_path):
    """The first new worker loads, the second fails: the caller gets the error, and the
    worker already switched is switched back, so one model serves again."""
    write_models(tmp_path)
    (tmp_path / "flaky.txt").write_text("flaky 30")
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "3", "-cpu",
                       "-model_name", "a.txt", "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        with Load(server, threads=2) as load:
            wait_until(lambda: load.count() >= 20, 60, "load before the switch")
            with pytest.raises(SwitchFailed) as info:
                client.switch_model(model_name="flaky.txt", version="v2", timeout=120_000)
            assert "load 2 of" in info.value.message and "switched back" in info.value.message

            def rolled_back() -> bool:
                switch = client.server_status["switch"]
                return switch["rollback"] and switch["state"] == "done"

            wait_until(rolled_back, 120, "the switch back to v1")
            seen = load.count()
            wait_until(lambda: load.count() >= seen + 20, 60, "load after the switch back")
        assert load.errors == [], load.errors[:3]
        for _, answer in load.answers:
            (version,) = versions_of(answer)
            factor = {"v1": 10, "v2": 30}[version]
            assert [v for v, _ in answer] == [factor * x for x in range(1, len(answer) + 1)]
        status = wait_idle(client)
        assert [row["model_version"] for row in status["workers"]] == ["v1", "v1"]
        assert status["model"]["version"] == "v1" and status["model"]["name"] == "a.txt"
        assert server.supervisor.failure is None
        assert client.encode(1) == [10, "v1"]


def test_kill_9_of_an_old_worker_while_the_new_model_loads(tmp_path):
    """An old worker dies (kill -9) under load while its replacement loads: what it held
    is retried, the switch completes, nothing fails."""
    write_models(tmp_path)
    (tmp_path / "slow.txt").write_text("gate 40")
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "3", "-cpu",
                       "-model_name", "a.txt", "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        with Load(server) as load:
            wait_until(lambda: load.count() >= 20, 60, "load before the switch")
            thread, outcome = switch_in_background(server, "slow.txt", "v2")
            loading = wait_until(lambda: [c for c in list(server.supervisor.children.values())
                                          if c.switching and c.process.pid], 60,
                                 "a worker loading the new model")
            victim = next(c for c in server.supervisor.children.values()
                          if isinstance(c.role, WorkerProcess) and c.role.epoch == 0
                          and c.role.identity != loading[0].replaces)
            victim.process.kill()
            seen = load.count()
            wait_until(lambda: load.count() >= seen + 20, 60, "load after the kill")
            (tmp_path / "slow.txt.release").write_text("")
            thread.join(120)
            assert not thread.is_alive()
        assert "error" not in outcome, outcome
        assert outcome["result"]["model_version"] == "v2"
        assert load.errors == [], load.errors[:3]
        assert all(len(versions_of(a)) == 1 for _, a in load.answers)
        status = wait_idle(client)
        assert [row["model_version"] for row in status["workers"]] == ["v2", "v2"]
        assert client.encode(1) == [40, "v2"]


def test_recycling_during_a_switch(tmp_path):
    """-max_requests recycles workers while a switch runs: one replacement at a time,
    nothing fails, and the switch ends with every worker on the new model."""
    write_models(tmp_path)
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "3", "-cpu",
                       "-model_name", "a.txt", "-model_version", "v1",
                       "-max_requests", "40", "-max_requests_jitter", "5")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        with Load(server) as load:
            wait_until(lambda: load.count() >= 50, 60, "load before the switch")
            result = client.switch_model(model_name="b.txt", version="v2", timeout=120_000)
            seen = load.count()
            wait_until(lambda: load.count() >= seen + 100, 60, "load after the switch")
        assert result["model_version"] == "v2"
        assert load.errors == [], load.errors[:3]
        assert all(len(versions_of(a)) == 1 for _, a in load.answers)
        status = wait_idle(client)
        assert {row["model_version"] for row in status["workers"]} == {"v2"}


def test_prediction_log_names_the_model(tmp_path):
    write_models(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-model_name", "a.txt",
                       "-model_version", "v1", "-log_dir", str(logs), "-log_predictions")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        client.encode(1, request_id="before")
        client.switch_model(model_name="b.txt", version="v2")
        client.encode(1, request_id="after")
    import json

    lines = [json.loads(line) for line in
             (logs / "WKRServer.predictions.jsonl").read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert (by_id["before"]["model"], by_id["before"]["model_version"]) == ("a.txt", "v1")
    assert (by_id["after"]["model"], by_id["after"]["model_version"]) == ("b.txt", "v2")
    assert by_id["after"]["output"] != by_id["before"]["output"]


def test_switch_command_line(tmp_path):
    import subprocess
    import sys

    write_models(tmp_path)
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-model_name", "a.txt",
                       "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        where = ["-ip", "127.0.0.1", "-port", str(server.port), "-port_out",
                 str(server.port_out)]

        def run(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "wkr_serving.client.switch_cli",
                                   *where, *extra], capture_output=True, text=True,
                                  timeout=120)

        done = run("-model_name", "b.txt", "-version", "v2")
        assert done.returncode == 0, done.stderr
        import json

        assert json.loads(done.stdout)["model_version"] == "v2"
        assert client.encode(1) == [20, "v2"]
        failed = run("-model_name", "missing.txt", "-version", "v3")
        assert failed.returncode == 1 and "missing.txt" in failed.stderr, failed.stderr
        assert client.encode(1) == [20, "v2"]
        usage = run()
        assert usage.returncode == 2 and "nothing to switch" in usage.stderr


def test_one_switch_at_a_time_and_a_ventilator_crash_during_one(tmp_path):
    """While a switch runs, another is refused at once (SwitchFailed). The ventilator
    dying meanwhile fails the waiting caller (ConnectionLost) but not the switch, which
    completes; the restarted ventilator knows the new model."""
    from wkr_serving.client import ConnectionLost

    write_models(tmp_path)
    (tmp_path / "slow.txt").write_text("gate 50")
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-model_name", "a.txt",
                       "-model_version", "v1")
    with running_server(args, FactorWorker) as server, connect(server) as client:
        thread, outcome = switch_in_background(server, "slow.txt", "v2")
        wait_until(lambda: [c for c in list(server.supervisor.children.values())
                            if c.switching], 60, "a worker loading the new model")
        with pytest.raises(SwitchFailed, match="under way"):
            client.switch_model(model_name="b.txt", version="v3")
        assert client.encode(1) == [10, "v1"]  # the old model serves meanwhile
        server.supervisor.children["ventilator"].process.kill()
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), ConnectionLost), outcome
        (tmp_path / "slow.txt.release").write_text("")

        def switched() -> bool:
            try:
                return client.metadata()["model_version"] == "v2"
            except ConnectionLost:
                return False

        wait_until(switched, 60, "the switch to end after the ventilator restarted")
        assert client.encode(1) == [50, "v2"]
        status = wait_idle(client)
        assert status["switch"]["state"] == "done" and status["ventilator_generation"] == 1
