"""benchmarks/chain.py on a tiny run: every row (bare echo, the bare four-process chain
with and without a spinning sink, wkr-serving with and without -busy_poll_us) passes its
check message and reports latency and caller CPU."""

from __future__ import annotations

import json
import os
import sys

from helpers import REPO_DIR

_BENCH_DIR = os.path.join(REPO_DIR, "benchmarks")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)  # spawned processes re-import chain by name

import chain  # noqa: E402

CALLS = 300


def test_chain_smoke(tmp_path):
    out = tmp_path / "chain.json"
    assert chain.main(["--calls", str(CALLS), "--rounds", "1", "--spin-us", "100",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"bare echo, 2 processes", "bare chain, 4 processes",
                         "bare chain, sink spins 100 us", "wkr-serving",
                         "wkr-serving -busy_poll_us 100"}
    for name, row in rows.items():
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], (name, row)
        assert row["caller_cpu_us"] > 0, (name, row)
        assert [r["calls"] for r in report["runs"][name]] == [CALLS], name
    assert (tmp_path / "chain.md").read_text().startswith("# A lone request")
