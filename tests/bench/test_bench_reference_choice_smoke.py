"""`bench/reference_choice.py`: its arguments are checked, the prior's noise detection is measured per seed on the
training split's injected noise, and the table shows every candidate."""

import statistics

import pytest
from nlip_testing import load_bench_script, processor, synthetic_pairs, tiny_model


def test_candidates_must_be_other_known_datasets(capsys):
    module = load_bench_script("reference_choice")
    args = module.parse_args(["--candidates", "emoji", "emoji openclipart"])
    assert args.setting == "pretrained_tuxpaint" and args.candidates == [("emoji",), ("emoji", "openclipart")]
    for candidates, message in ((["tuxpaint emoji"], "tuxpaint is the setting's own dataset"),
                                (["emoji clipart"], "unknown ones ['clipart']")):
        with pytest.raises(SystemExit):
            module.parse_args(["--candidates", *candidates])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.parse_args(["--ratios", "1.0"])
    assert "--ratios must lie in (0, 1)" in capsys.readouterr().err


def test_prior_detection_scores_each_seeds_noise_draw():
    module = load_bench_script("reference_choice")
    setting = module.robustness.SETTINGS["pretrained_tuxpaint"]
    detection = module.prior_detection(tiny_model(), processor(), synthetic_pairs(40).remove_columns("is_noisy"), setting, 0.5, [0, 1, 2])
    assert len(detection["roc_auc"]) == 3 and all(0.0 <= auc <= 1.0 for auc in detection["roc_auc"])
    assert detection["mean"] == pytest.approx(statistics.fmean(detection["roc_auc"]))
    assert detection["std"] == pytest.approx(statistics.stdev(detection["roc_auc"]))
    # Another noise draw marks other pairs: the seeds' figures are not one repeated value.
    assert len(set(detection["roc_auc"])) > 1
    row = {"reference_datasets": ["emoji", "openclipart"], "num_train_pairs": 7400, "num_near_duplicates_removed": 17,
           "val_headline": 190.0, "test_headline": 195.0, "train_time_s": 300.0, "prior_detection": {"0.5": detection}}
    table = module.markdown({"setting": "pretrained_tuxpaint", "current": ["emoji"],
                             "chosen_on_validation": ["emoji", "openclipart"], "candidates": [row]})
    assert "| emoji + openclipart | 7400 | 17 | 190.0 | 195.0 |" in table and "prior ROC-AUC @0.5" in table
