"""benchmarks/soak.py on a tiny run: a real wkr-serving-start server, 3,000 requests at
concurrency 64; the report must have the RSS of every server process and exact counts."""

from __future__ import annotations

import json
import os
import sys

from helpers import REPO_DIR

_BENCH_DIR = os.path.join(REPO_DIR, "benchmarks")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)  # spawned load processes re-import soak by name

import soak  # noqa: E402

REQUESTS = 3000


def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(["--requests", str(REQUESTS), "--warmup-requests", "640",
                    "--interval", "0.5", "--max-seconds", "60", "--out", str(out)])
    report = json.loads(out.read_text())
    assert (tmp_path / "soak.md").read_text().startswith("# wkr-serving soak")

    processes = report["processes"]
    assert {"supervisor", "ventilator", "sink", "worker-0"} <= set(processes)
    pids = {p["pid"] for p in processes.values()}
    assert len(pids) == len(processes)  # one role per process
    for role, p in processes.items():
        for key in ("rss_idle_mib", "rss_start_mib", "rss_end_mib"):
            assert p[key] and p[key] > 0, (role, key)
        assert p["growth_mib"] is not None, role

    totals = report["totals"]
    assert totals["sent"] == totals["received"] == REQUESTS
    assert totals["errors"] == totals["lost"] == totals["wrong_ids"] == 0
    assert totals["mismatches"] == 0 and totals["checked"] > 0
    assert totals["server"]["num_requests"] == totals["server"]["num_results"] == REQUESTS
    assert sum(iv["requests"] for iv in report["intervals"]) == REQUESTS
    assert all(set(iv["rss_mib"]) == set(processes) for iv in report["intervals"])
    assert report["verdict"]["correct"], report["checks"]
    assert rc == (0 if report["verdict"]["all_ok"] else 1)
