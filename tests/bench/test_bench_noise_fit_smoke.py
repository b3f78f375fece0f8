"""Smoke test of `bench/noise_fit.py`: every fitting choice runs with its settings on the validation split only, and
the summary and the choice follow from the runs."""

import json
import statistics

import torch
from nlip_testing import load_bench_script
from test_bench_robustness_smoke import needs_package


@needs_package("fashion_mnist")
def test_fashion_mnist_quick_run_compares_the_fitting_choices(tmp_path, capsys):
    threads = torch.get_num_threads()
    argv = ["--settings", "fashion_mnist", "--quick", "--ratios", "0.4", "--seeds", "0", "1", "--no-progress",
            "--variants", "latest", "average 0.8", "first fit", "separation 2", "--output_dir", str(tmp_path)]
    try:
        results = load_bench_script("noise_fit").main(argv)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "noise_fit.json").read_text()) == results
    assert (tmp_path / "noise_fit.png").stat().st_size > 0
    (block,) = results["settings"]
    assert block["tuned_from"] == "the grid's middle learning rate" and block["learning_rate"] == 0.004
    assert f"no tuning of nlip in {tmp_path / 'robustness_fashion_mnist.json'}" in capsys.readouterr().err
    assert [(c["variant"], c["settings"]) for c in block["cells"]] == [
        ("latest", {}), ("average 0.8", {"noise_loss_momentum": 0.8}), ("first fit", {"gmm_refit_epochs": 2}),
        ("separation 2", {"noise_min_separation": 2.0}),
    ]
    for cell in block["cells"]:
        assert [r["seed"] for r in cell["runs"]] == [0, 1]
        for run in cell["runs"]:
            assert run["error"] is None and "test" not in run  # the test split is never evaluated
            assert run["method"] == "nlip" and run["method_settings"] == cell["settings"]
            # 2 epochs, the first one the warm-up: one fit, logged when it is used (the guard may discard it).
            separations = run["noise_separation_by_epoch"]
            assert len(run["noise_roc_auc_by_epoch"]) == len(separations) <= 1
            if cell["variant"] == "separation 2":
                assert all(value >= 2.0 for value in separations)
            else:
                assert len(separations) == 1
        assert cell["summary"]["separation_by_epoch"] == [
            [round(value, 3) for value in run["noise_separation_by_epoch"]] for run in cell["runs"]]
        values = [run["val"]["zero_shot"]["top1"] for run in cell["runs"]]
        assert cell["summary"]["val_headline"]["mean"] == statistics.fmean(values)
        logged = [run["noise_roc_auc_by_epoch"] for run in cell["runs"] if run["noise_roc_auc_by_epoch"]]
        assert cell["summary"]["roc_auc_by_epoch"] == ([statistics.fmean(roc[0] for roc in logged)] if logged else [])
    best = max(block["cells"], key=lambda c: c["summary"]["val_headline"]["mean"])
    assert block["best_on_validation"]["0.4"] == best["variant"]
    assert f"| 0.4 | **{best['variant']}** |" in (tmp_path / "noise_fit.md").read_text()
