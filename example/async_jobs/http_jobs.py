"""Submit now, fetch later, over HTTP: the bridge's ``POST /jobs`` and ``GET /jobs/<id>``.

    python example/async_jobs/http_jobs.py submit -url http://localhost:8080
    python example/async_jobs/http_jobs.py fetch -url http://localhost:8080

``submit`` posts one job per flower and returns at once, writing the job ids to a file
(``-jobs``, default http_jobs.jsonl); ``fetch``, run at any later time (within the
bridge's ``-http_jobs_ttl``, 300 s by default), reads that file and prints each job's
result, asking again for the jobs still pending for at most ``-wait`` seconds. Only the
standard library is used: any HTTP client does the same.

Exit status: 0 every job has its answer (a result or an error), 1 some are still
pending after ``-wait`` seconds or the bridge could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

#: The flowers submitted when none are given: one of each species, and one unlike any.
FLOWERS = [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.7, 3.0, 5.2, 2.3],
           [9.0, 1.0, 9.0, 0.1]]
#: Seconds one HTTP call may take.
CALL_TIMEOUT_S = 30.0


def flower(text: str) -> list[float]:
    """``5.1,3.5,1.4,0.2`` -> ``[5.1, 3.5, 1.4, 0.2]``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def call(args: argparse.Namespace, method: str, path: str, body: Any = None,
         ) -> tuple[int, Any]:
    """One HTTP call to the bridge: ``(status, decoded JSON answer)``; the error
    statuses' answers too (the bridge answers them in JSON)."""
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.url.rstrip("/") + path, data, headers,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def submit(args: argparse.Namespace) -> int:
    flowers = args.flower or FLOWERS
    with open(args.jobs, "w") as out:
        for x in flowers:
            status, answer = call(args, "POST", "/jobs", {"data": x})
            if status != 202:
                print(f"POST /jobs refused {x}: {status} {answer}", file=sys.stderr)
                return 1
            out.write(json.dumps({"job_id": answer["job_id"], "input": x}) + "\n")
            print(answer["job_id"], x)
    print(f"{len(flowers)} job(s) submitted; their ids are in {args.jobs}")
    return 0


def fetch(args: argparse.Namespace) -> int:
    with open(args.jobs) as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    _, labels = call(args, "GET", "/label")  # {"0": "setosa", ...}
    deadline = time.monotonic() + args.wait
    pause = threading.Event()
    waiting = list(jobs)
    delay = 0.05
    while True:
        still = []
        for job in waiting:
            status, answer = call(args, "GET", f"/jobs/{job['job_id']}")
            if status == 200 and answer["status"] == "pending":
                still.append(job)
            else:
                print(job["job_id"], job["input"], "->", describe(status, answer, labels))
        waiting = still
        if not waiting:
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"{len(waiting)} of {len(jobs)} job(s) still pending after {args.wait} s",
                  file=sys.stderr)
            return 1
        pause.wait(min(delay, left))  # bounded: the bridge has no push for jobs
        delay = min(delay * 2, 1.0)


def describe(status: int, answer: Any, labels: dict[str, str]) -> str:
    """A job's answer in one line."""
    if status == 200 and answer["status"] == "done":
        result = answer["data"]
        p = result["prediction"]
        best = max(range(len(p)), key=p.__getitem__)
        return (f"{labels[str(best)]} (p={p[best]:.3f}), outlier score "
                f"{result['outlier_score']:.3f}{' OUTLIER' if result['is_outlier'] else ''}")
    if status == 200:  # "error": the job ran and failed
        return f"error {answer['error_type']}: {answer['error_message']}"
    return f"HTTP {status}: {answer.get('error_type')}: {answer.get('error_message')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["submit", "fetch"])
    parser.add_argument("-url", default="http://localhost:8080", help="the HTTP bridge")
    parser.add_argument("-jobs", default="http_jobs.jsonl", help="where the job ids go")
    parser.add_argument("-flower", type=flower, action="append",
                        help="a flower to submit, e.g. 5.1,3.5,1.4,0.2 (repeatable; "
                             "default: four examples)")
    parser.add_argument("-wait", type=float, default=30.0,
                        help="fetch: seconds to wait for pending jobs")
    parser.add_argument("-token", default=None, help="the bridge's -http_token, if any")
    args = parser.parse_args()
    try:
        sys.exit(submit(args) if args.action == "submit" else fetch(args))
    except FileNotFoundError:
        sys.exit(f"http_jobs.py: no file {args.jobs}: submit jobs first")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        sys.exit(f"http_jobs.py: cannot reach {args.url}: {exc}")


if __name__ == "__main__":
    main()
