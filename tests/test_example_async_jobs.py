"""example/async_jobs end to end: the README's commands, ports aside, against a real iris
server, a real redis-server and a real pool: jobs submitted over HTTP (/jobs) and through
Redis (JobQueue, drained by QueueWorker units), fetched later by another process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    README_COMMAND_LIMIT_S,
    REPO_DIR,
    CLIServer,
    http_call,
    readme_commands,
    run,
    wait_until,
)

README = os.path.join(REPO_DIR, "example", "async_jobs", "README.rst")
TRAIN = "python example/iris/train.py --out models"
#: What fetch prints for the four default flowers, in order.
SPECIES = ["setosa", "versicolor", "virginica", "versicolor"]
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Served:
    work: Path  # the README's current directory: example/ (a link), models/, job files
    server: CLIServer
    commands: list[str]

    def command(self, start: str, contains: str = "") -> list[str]:
        found = [c for c in self.commands if c.startswith(start) and contains in c]
        assert found, f"the README has no command starting with {start!r} with {contains!r}"
        return found

    def args(self, command: str, redis_port: int | None = None) -> list[str]:
        """``command`` as arguments, with the README's ports replaced by the test's."""
        command = command.replace("localhost:8080", f"127.0.0.1:{self.server.http_port}")
        command = re.sub(r"\b5555\b", str(self.server.port), command)
        command = re.sub(r"\b5556\b", str(self.server.port_out), command)
        if redis_port is not None:
            command = command.replace("localhost:6379", f"127.0.0.1:{redis_port}")
        return shlex.split(command)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """The iris models (trained as the README says, in this process) and the README's
    server, in a directory where ``example`` is a link to the repository's."""
    work = tmp_path_factory.mktemp("async_jobs")
    (work / "example").symlink_to(os.path.join(REPO_DIR, "example"))
    commands = readme_commands(README)
    assert [c for c in commands if c.startswith("python example/iris")] == [TRAIN]
    spec = importlib.util.spec_from_file_location(
        "iris_train", os.path.join(REPO_DIR, "example", "iris", "train.py"))
    assert spec is not None and spec.loader is not None
    iris_dir = os.path.join(REPO_DIR, "example", "iris")
    if iris_dir not in sys.path:
        sys.path.insert(0, iris_dir)  # train.py imports iris_model
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.train(str(work / "models"))
    (serve,) = [c for c in commands if c.startswith("wkr-serving-start")]
    args = shlex.split(serve)[1:]
    args[args.index("-http_port") + 1] = "0"  # any free port (CLIServer: the others too)
    server = CLIServer(args, work / "models", cwd=str(work))
    try:
        server.client().close()  # ready: every worker has loaded the model
        yield Served(work, server, commands)
    finally:
        server.close()


def fetched(output: str) -> list[tuple[str, str]]:
    """``(job id, what it says)`` for each ``<id> <flower> -> <result>`` line."""
    found = [re.match(r"^(\S+) \[.*?\] -> (.*)$", line) for line in output.splitlines()]
    return [(m.group(1), m.group(2)) for m in found if m]


def check_default_flowers(output: str, ids: list[str]) -> None:
    answers = fetched(output)
    assert [job_id for job_id, _ in answers] == ids
    for (_, said), species in zip(answers, SPECIES, strict=True):
        assert said.startswith(f"{species} (p="), said
    assert [said.split(",")[1].endswith("OUTLIER") for _, said in answers] == \
        [False, False, False, True]


def job_ids(path: Path) -> list[str]:
    ids = [json.loads(line)["job_id"] for line in path.read_text().splitlines()]
    assert all(JOB_ID.match(i) for i in ids), ids
    return ids


def test_http_jobs(served):
    (submit,) = served.command("python example/async_jobs/http_jobs.py submit")
    (fetch,) = served.command("python example/async_jobs/http_jobs.py fetch")
    out = run(served.args(submit), served.work)
    assert "4 job(s) submitted; their ids are in http_jobs.jsonl" in out
    ids = job_ids(served.work / "http_jobs.jsonl")
    assert len(set(ids)) == 4
    check_default_flowers(run(served.args(fetch), served.work), ids)
    # The bridge keeps them: fetched again, the same answers.
    status, _, job = http_call(served.server, f"/jobs/{ids[2]}")
    assert status == 200 and job["status"] == "done" and job["job_id"] == ids[2]
    assert set(job["data"]) == {"prediction", "is_outlier", "outlier_score"}

    # A flower the model refuses fails its own job only.
    extra = ["-jobs", "mixed.jsonl", "-flower", "1,2,3", "-flower", "6.7,3.0,5.2,2.3"]
    run([*served.args(submit), *extra], served.work)
    answers = fetched(run([*served.args(fetch), *extra], served.work))
    assert answers[0][1].startswith("error model_error: ValueError: an iris input is 4 "
                                    "numbers"), answers
    assert answers[1][1].startswith("virginica (p=")


def test_http_jobs_curl(served):
    post, get = served.command("curl -s localhost:8080/jobs")
    answer = json.loads(run(served.args(post), served.work))
    assert JOB_ID.match(answer["job_id"])
    args = [re.sub(r"/jobs/\S+$", f"/jobs/{answer['job_id']}", a)
            for a in served.args(get)]

    def done():
        job = json.loads(run(args, served.work))
        return job if job["status"] != "pending" else None

    job = wait_until(done, 30, "the curl job to finish", interval=0.05)
    assert job["status"] == "done" and job["job_id"] == answer["job_id"]
    assert job["data"]["prediction"].index(max(job["data"]["prediction"])) == 2


def test_queue_jobs(served, redis_server, pools):
    (redis,) = served.command("redis-server")
    assert redis == "redis-server --port 6379 --bind 127.0.0.1 --appendonly yes"
    assert redis_server.appendonly  # the fixture's: the same, on a free port
    (submit,) = served.command("python example/async_jobs/queue_jobs.py submit")
    early, late = served.command("python example/async_jobs/queue_jobs.py fetch")
    port = redis_server.port

    out = run(served.args(submit, port), served.work)
    assert "4 job(s) queued on 'iris'; their ids are in queue_jobs.jsonl" in out
    ids = job_ids(served.work / "queue_jobs.jsonl")
    # Also a job the model refuses, in a file of its own.
    extra = ["-jobs", "bad.jsonl", "-flower", "1,2,3"]
    run([*served.args(submit, port), *extra], served.work)

    # No pool yet: the jobs wait in Redis, and a fetch finds none (bounded by -wait 1).
    early_args = served.args(early, port)
    assert early_args[-2:] == ["-wait", "1"]
    waited = subprocess.run([sys.executable, *early_args[1:]], cwd=served.work,
                            capture_output=True, text=True, timeout=README_COMMAND_LIMIT_S)
    assert waited.returncode == 1, waited.stderr
    assert "4 of 4 jobs of queue 'iris' have no result after 1.0 s" in waited.stderr
    assert "in the queue: 5 waiting or in flight, 0 dead-lettered" in waited.stderr

    (pool_command,) = served.command("wkr-decentral-start")
    pool_args = served.args(pool_command, port)
    assert pool_args[1] == "wkr_serving.client.QueueWorker"
    pool = pools(pool_args[1], *pool_args[2:], cwd=str(served.work))
    pool.wait_running(2)

    out = run(served.args(late, port), served.work)
    check_default_flowers(out, ids)
    assert all("s after it was queued" in said for _, said in fetched(out))
    (bad,) = fetched(run([*served.args(late, port), *extra], served.work))
    assert bad[1].startswith("error ModelError: ValueError: an iris input is 4 numbers")

    def counted(status, name):
        return sum(u["counters"].get(name, 0) for u in status["units"])

    pool.wait_status(lambda s: (counted(s, "jobs_done"), counted(s, "jobs_failed")) == (4, 1),
                     "the units to count 4 jobs done and 1 failed", limit=20)
