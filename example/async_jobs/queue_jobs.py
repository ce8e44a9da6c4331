"""Submit now, fetch later, through Redis: ``JobQueue`` puts jobs on a Redis stream, the
units of a pool (``wkr-decentral-start wkr_serving.client.QueueWorker``) compute them on
a server and store the results, and any process fetches them later.

    python example/async_jobs/queue_jobs.py submit -redis_url redis://localhost:6379/0
    python example/async_jobs/queue_jobs.py fetch -redis_url redis://localhost:6379/0

``submit`` queues one job per flower and returns at once, writing the job ids to a file
(``-jobs``, default queue_jobs.jsonl); no pool needs to be running: the jobs wait in
Redis. ``fetch`` reads the file and prints each job's result once the pool has computed
it, waiting at most ``-wait`` seconds (it is told when results are written, it does not
poll). Results are kept in Redis for the units' ``-result_ttl`` (an hour by default).

Exit status: 0 every job has its answer (a result or an error), 1 some have none after
``-wait`` seconds or Redis could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis.exceptions import RedisError
from wkr_serving.client import JobQueue
from wkr_serving.client.errors import WKRTimeoutError

#: The flowers submitted when none are given: one of each species, and one unlike any.
FLOWERS = [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.7, 3.0, 5.2, 2.3],
           [9.0, 1.0, 9.0, 0.1]]
#: The iris worker's labels (its GET /label), by class index.
SPECIES = ["setosa", "versicolor", "virginica"]


def flower(text: str) -> list[float]:
    """``5.1,3.5,1.4,0.2`` -> ``[5.1, 3.5, 1.4, 0.2]``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def submit(jobs: JobQueue, args: argparse.Namespace) -> int:
    flowers = args.flower or FLOWERS
    ids = jobs.submit_many(flowers)  # one round trip to Redis
    with open(args.jobs, "w") as out:
        for job_id, x in zip(ids, flowers, strict=True):
            out.write(json.dumps({"job_id": job_id, "input": x}) + "\n")
            print(job_id, x)
    print(f"{len(ids)} job(s) queued on {args.queue!r}; their ids are in {args.jobs}")
    return 0


def fetch(jobs: JobQueue, args: argparse.Namespace) -> int:
    with open(args.jobs) as f:
        records = [json.loads(line) for line in f if line.strip()]
    try:
        results = jobs.wait([r["job_id"] for r in records], timeout=args.wait)
    except WKRTimeoutError as exc:
        stats = jobs.stats()
        print(f"{exc}; in the queue: {stats['queued']} waiting or in flight, "
              f"{stats['dead']} dead-lettered", file=sys.stderr)
        return 1
    for record, (ok, value, t_submit, t_done) in zip(records, results, strict=True):
        print(record["job_id"], record["input"], "->", describe(ok, value, t_submit, t_done))
    return 0


def describe(ok: bool, value: Any, t_submit: float | None, t_done: float | None) -> str:
    """A job's result (or its typed error) in one line."""
    if not ok:  # ModelError, BadInput, DeadLettered, JobCancelled...
        return f"error {type(value).__name__}: {value}"
    p = value["prediction"]
    best = max(range(len(p)), key=p.__getitem__)
    after = "" if t_submit is None or t_done is None else \
        f", computed {t_done - t_submit:.2f} s after it was queued"
    return (f"{SPECIES[best]} (p={p[best]:.3f}), outlier score {value['outlier_score']:.3f}"
            f"{' OUTLIER' if value['is_outlier'] else ''}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["submit", "fetch"])
    parser.add_argument("-redis_url", default="redis://localhost:6379/0",
                        help="the Redis of the pool")
    parser.add_argument("-queue", default="iris", help="the queue's name (the pool's -queue)")
    parser.add_argument("-jobs", default="queue_jobs.jsonl", help="where the job ids go")
    parser.add_argument("-flower", type=flower, action="append",
                        help="a flower to submit, e.g. 5.1,3.5,1.4,0.2 (repeatable; "
                             "default: four examples)")
    parser.add_argument("-wait", type=float, default=60.0,
                        help="fetch: seconds to wait for the results")
    args = parser.parse_args()
    try:
        with JobQueue(args.redis_url, args.queue, socket_timeout=10.0) as jobs:
            code = submit(jobs, args) if args.action == "submit" else fetch(jobs, args)
    except FileNotFoundError:
        sys.exit(f"queue_jobs.py: no file {args.jobs}: submit jobs first")
    except RedisError as exc:
        sys.exit(f"queue_jobs.py: Redis at {args.redis_url}: {exc}")
    sys.exit(code)


if __name__ == "__main__":
    main()
