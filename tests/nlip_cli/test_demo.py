"""The main demo at a smoke size: a reference on emoji, then `clip` and `nlip+srcl` with the reference prior on
noisy Tux Paint, through `nlip-train`; the summary holds measured, finite figures and says whether the margin is
significant."""

import json
import math

import pytest

from nlip_cli import demo


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_smoke_size(tmp_path, capsys):
    summary = demo.main(["--output_dir", str(tmp_path), "--epochs", "1", "--max_train_samples", "48", "--seeds", "0", "1"])
    assert set(summary["results"]) == {"clip", "nlip+srcl@reference"}
    for result in summary["results"].values():
        assert [run["seed"] for run in result["runs"]] == [0, 1]
        assert all(0 <= run["rsum"] <= 600 for run in result["runs"])
        assert math.isfinite(result["test_rsum"]["mean"]) and result["test_rsum"]["std"] >= 0
    margin = summary["results"]["nlip+srcl@reference"]["test_rsum"]["mean"] - summary["results"]["clip"]["test_rsum"]["mean"]
    assert summary["margin_rsum"] == pytest.approx(margin)
    assert summary["significant"] == (margin > max(r["test_rsum"]["std"] for r in summary["results"].values()))
    assert summary["recommended"] == "nlip+srcl@reference" and 0.0 <= summary["prior_noise_roc_auc"]["mean"] <= 1.0
    assert json.loads((tmp_path / "demo_summary.json").read_text())["seeds"] == [0, 1]
    printed = capsys.readouterr().out
    assert "nlip+srcl@reference  test rSum" in printed and "per seed (the same noise draw for both)" in printed
