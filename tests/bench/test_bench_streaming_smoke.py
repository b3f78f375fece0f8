"""Smoke test of `bench/streaming.py`: a tiny run (small shards, one repeat) writes a complete JSON summary of finite
positive figures, local and over the loopback HTTP server."""

import json
import math
import subprocess
import sys

from nlip_testing import REPO_ROOT


BENCH = REPO_ROOT / "bench" / "streaming.py"


def test_streaming_benchmark_smoke(tmp_path):
    output = tmp_path / "streaming.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--pairs", "64", "--throughput-shard-samples", "32", "--batch-size", "8",
         "--repeats", "1", "--ttfb-shard-samples", "10", "20", "--threads", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(output.read_text())
    for where in ("local", "http"):
        figures = summary["throughput"][where]
        assert figures["pairs"] == 64
        assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("pairs_per_s", "read_only_samples_per_s"))
    assert [row["samples_per_shard"] for row in summary["time_to_first_batch"]] == [10, 20]
    for row in summary["time_to_first_batch"]:
        for key in ("local_rank0_s", "local_rank1_header_scan_s", "local_rank1_sidecar_s", "http_rank0_s",
                    "http_rank1_streamed_count_s", "http_rank1_sidecar_s", "local_old_full_read_of_shard0_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
