"""Smoke test of bench/feature_cache.py --quick: both runs complete, the figures are present and the cache does not
change the training."""

import json
import math

from nlip_testing import load_bench_script


def test_feature_cache_bench_quick(tmp_path):
    bench = load_bench_script("feature_cache")
    output = tmp_path / "feature_cache.json"
    report = bench.main(["--quick", "--pairs", "32", "--epochs", "2", "--batch-size", "16", "--threads", "1",
                         "--output", str(output)])
    assert json.loads(output.read_text()) == report
    assert report["pairs"] == 32 and len(report["epoch_seconds_cache"]) == len(report["epoch_seconds_no_cache"]) == 2
    for name in ("speedup_after_first_epoch", "speedup_fastest_epochs", "first_epoch_cache_overhead"):
        assert math.isfinite(report[name]) and report[name] > 0, name
    assert report["max_loss_difference"] < 1e-5
