"""Smoke test of `bench/robustness.py`: a `--quick` run follows the protocol (learning rate tuned on validation, every
seed tested at the chosen rate, both noise types) and its summary statistics are computed as documented."""

import json
import math
import os
import statistics

import pytest
import torch
from nlip_testing import load_bench_script

from trainers.data.real_datasets import DEBIAN_SOURCES


def needs_package(name):
    package, path = DEBIAN_SOURCES[name]
    return pytest.mark.skipif(
        not os.path.exists(path), reason=f"Debian package {package} not installed: apt-get install -y {package}"
    )


def numbers(value, path=""):
    """Every (path, number) of a JSON value (booleans are not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@needs_package("fashion_mnist")
def test_fashion_mnist_quick_run_follows_the_protocol(tmp_path):
    threads = torch.get_num_threads()
    argv = ["--setting", "fashion_mnist", "--quick", "--methods", "clip", "nlip", "--seeds", "0", "1", "--no-progress",
            "--output_dir", str(tmp_path)]
    try:
        results = load_bench_script("robustness").main(argv)
    finally:
        torch.set_num_threads(threads)
    output = tmp_path / "robustness_fashion_mnist.json"
    assert json.loads(output.read_text()) == results
    assert output.with_suffix(".png").stat().st_size > 0 and "| `nlip` |" in output.with_suffix(".md").read_text()
    assert results["non_finite_values"] == [] and all(math.isfinite(v) for _, v in numbers(results))
    budget = results["budget"]
    assert budget["num_train_pairs"] + budget["num_val_pairs"] == 96 and budget["learning_rates"] == [0.002, 0.004]
    # random 0 and 0.4, hard 0.4 (garment groups): 3 cells per method, each with both seeds.
    assert [(c["noise_type"], c["noise_ratio"], c["method"]) for c in results["cells"]] == [
        (t, r, m) for t, r in (("random", 0.0), ("random", 0.4), ("hard", 0.4)) for m in ("clip", "nlip")]
    tuning = {t["method"]: t for t in results["tuning"]}
    for method, record in tuning.items():  # chosen on validation at random noise 0.4, the best of the grid
        assert [g["learning_rate"] for g in record["grid"]] == [0.002, 0.004] and record["noise"] == "random 0.4"
        assert record["learning_rate"] == max(record["grid"], key=lambda g: g["val_headline"])["learning_rate"]
    for cell in results["cells"]:
        assert cell["error"] is None, cell["error"]
        assert cell["learning_rate"] == tuning[cell["method"]]["learning_rate"]
        assert [run["seed"] for run in cell["runs"]] == [0, 1]
        assert all(run["learning_rate"] == cell["learning_rate"] for run in cell["runs"])
        for run in cell["runs"]:
            assert 0.0 <= run["test"]["zero_shot"]["top1"] <= 100.0 and run["step_time_s"] > 0
            if cell["noise_ratio"] > 0:
                detection = run["noise_detection"]
                assert 0.0 <= detection["roc_auc"] <= 1.0 and 0.0 <= detection["semantic_roc_auc"] <= 1.0
    hard = [c for c in results["cells"] if c["noise_type"] == "hard"]
    assert hard and all(c["runs"][0]["noise_detection"]["true_noisy_fraction"] == pytest.approx(0.4, abs=0.02) for c in hard)
    # The summary: mean ± std over the seeds' test top-1, margins and their significance, retention.
    table = results["summary"]["random"]
    nlip_cell = next(c for c in results["cells"] if c["method"] == "nlip" and c["noise_ratio"] == 0.4 and c["noise_type"] == "random")
    values = [run["test"]["zero_shot"]["top1"] for run in nlip_cell["runs"]]
    summary = table["tables"]["headline"]["nlip"]["0.4"]
    assert summary["mean"] == pytest.approx(statistics.fmean(values)) and summary["std"] == pytest.approx(statistics.stdev(values))
    clip_summary = table["tables"]["headline"]["clip"]["0.4"]
    margin = table["margin_over_clip"]["nlip"]["0.4"]
    assert margin["margin"] == pytest.approx(summary["mean"] - clip_summary["mean"])
    assert margin["significant"] == (abs(margin["margin"]) > summary["std"] and abs(margin["margin"]) > clip_summary["std"])
    clean = table["tables"]["headline"]["nlip"]["0.0"]["mean"]
    assert table["retention"]["nlip"]["0.4"] == pytest.approx(summary["mean"] / clean)
    assert results["targets"]["best_method"] == "nlip"


def test_summary_statistics():
    module = load_bench_script("robustness")
    assert module.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert module.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert module.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}


def test_bad_arguments_are_rejected():
    module = load_bench_script("robustness")
    for argv in (
        ["--setting", "fashion_mnist", "--methods", "clip+nlip"],
        ["--setting", "fashion_mnist", "--methods", "nlip"],  # no clip baseline
        ["--setting", "fashion_mnist", "--methods", "clip", "nlip", "nlip"],
        ["--setting", "fashion_mnist", "--noise_ratios", "1.0"],
        ["--setting", "fashion_mnist", "--learning_rates", "0"],
        ["--setting", "fashion_mnist", "--epochs", "0"],
        ["--setting", "cifar"],
    ):
        with pytest.raises(SystemExit):
            module.parse_args(argv)
