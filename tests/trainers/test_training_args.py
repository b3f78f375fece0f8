import contextlib
import io

import pytest
from transformers import HfArgumentParser

from trainers.training_args import NLIPTrainingArguments, parse_method


def make(tmp_path, **kwargs):
    return NLIPTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    "method, expected",
    [("clip", set()), ("nlip", {"nlip"}), ("nlip+srcl", {"nlip", "srcl"}), ("NPC + nlip", {"npc", "nlip"}),
     ("npc+nlip+srcl", {"npc", "nlip", "srcl"}), ("rcl", {"rcl"}), ("rcl+npc", {"rcl", "npc"})],
)
def test_parse_method(method, expected):
    assert parse_method(method) == expected


@pytest.mark.parametrize(
    "method, message",
    [
        ("nlp", r"unknown name\(s\) \['nlp'\]; valid methods are 'clip', or one or more of 'nlip', 'npc', 'srcl'"),
        ("clip+srcl", "'clip' is the plain contrastive loss and cannot be combined"),
        ("nlip+nlip", "names a method twice"),
        ("rcl+nlip", "'rcl' replaces the contrastive loss with the complementary one, so it combines only with 'npc'"),
        ("srcl+rcl", "combines only with 'npc'"),
        ("", "`method` must be"),
    ],
)
def test_invalid_method(tmp_path, method, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, method=method)


def test_defaults(tmp_path):
    args = make(tmp_path)
    assert args.method == "clip" and args.methods == frozenset()
    assert args.remove_unused_columns is False
    assert args.nitc_strength == 0.1 and args.noise_estimation_mode == "online" and args.noise_warmup_epochs == 1
    assert args.srcl_alpha_start == 0.0 and args.srcl_alpha_end == 0.0 and args.srcl_weight_temperature == 0.1
    assert args.npc_clean_threshold == 0.9
    assert args.npc_clean_set == "evidence" and args.npc_min_clean_fraction == 0.1 and args.rcl_infonce_weight == 0.5
    assert args.nitc_form == "balanced" and args.noise_max_noisy_fraction == 0.9 and args.noise_loss_momentum == 0.0


def test_srcl_alpha_schedule(tmp_path):
    args = make(tmp_path, method="srcl", srcl_reference_model="some/reference")
    assert args.srcl_alpha_start == 1.0  # default with a reference model
    assert [args.srcl_alpha(step, 5) for step in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    args = make(tmp_path, method="srcl", srcl_reference_model="ref", srcl_alpha_start=0.4, srcl_alpha_end=0.2)
    assert args.srcl_alpha(0, 3) == 0.4 and args.srcl_alpha(2, 3) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="srcl", srcl_alpha_start=0.5), r"`srcl_alpha_start`=0.5 mixes in a reference model.*srcl_reference_model` is None"),
        (dict(method="srcl", srcl_alpha_end=0.1), "`srcl_alpha_end`=0.1 mixes in a reference model"),
        (dict(method="srcl", srcl_reference_model="r", srcl_alpha_start=1.5), r"`srcl_alpha_start` must be in \[0, 1\]"),
        (dict(method="nlip", srcl_reference_model="r"), "`srcl_reference_model` is only used by method 'srcl'"),
        (dict(method="srcl", srcl_weight_temperature=0.0), "`srcl_weight_temperature`"),
        (dict(noise_estimation_mode="batch"), r"`noise_estimation_mode` must be one of \('online', 'pass'\)"),
        (dict(noise_warmup_epochs=-1), "`noise_warmup_epochs` must be an integer >= 0"),
        (dict(gmm_refit_epochs=0), "`gmm_refit_epochs` must be an integer >= 1"),
        (dict(gmm_max_fit_samples=5), "`gmm_max_fit_samples` must be an integer >= 10"),
        (dict(nitc_strength=-0.1), "`nitc_strength`"),
        (dict(nitc_form="mean"), r"`nitc_form` must be one of \('balanced', 'paper'\); got 'mean'"),
        (dict(noise_max_noisy_fraction=0.0), r"`noise_max_noisy_fraction` must be in \(0, 1\]"),
        (dict(noise_loss_momentum=1.0), r"`noise_loss_momentum` must be in \[0, 1\); got 1.0"),
        (dict(noise_min_separation=-0.5), r"`noise_min_separation` must be >= 0; got -0.5"),
        (dict(npc_clean_threshold=1.0), r"`npc_clean_threshold` must be in \(0, 1\)"),
        (dict(npc_min_clean_fraction=1.0), r"`npc_min_clean_fraction` must be in \[0, 1\); got 1.0"),
        (dict(rcl_infonce_weight=-1.0), r"`rcl_infonce_weight` \(β\) must be >= 0; got -1.0"),
        (dict(npc_clean_set="loss"), r"`npc_clean_set` must be one of \('evidence', 'posterior'\); got 'loss'"),
        (dict(method="npc", noise_warmup_epochs=0), "method 'npc' with `noise_warmup_epochs=0`.*noise_estimation_mode='pass'"),
        (dict(method="clip", noise_completion=True), "`noise_completion=True` feeds synthetic captions to NLIP's loss"),
        (dict(method="nlip", completion_model="captioner"), "`completion_model` is set but `noise_completion` is False"),
        (dict(completion_max_new_tokens=0), "`completion_max_new_tokens`"),
        (dict(remove_unused_columns=True), "remove_unused_columns=False"),
    ],
)
def test_validation_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


def test_npc_fine_tuning_settings_are_valid(tmp_path):
    args = make(tmp_path, method="npc+nlip", noise_warmup_epochs=0, noise_estimation_mode="pass")
    assert args.methods == {"npc", "nlip"}


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(NLIPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "nlip+srcl", "--nitc_strength", "0.3", "--noise_completion",
         "--use_cpu", "--report_to", "none"]
    )
    assert args.methods == {"nlip", "srcl"} and args.nitc_strength == 0.3 and args.noise_completion
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--help"])
    text = " ".join(help_text.getvalue().split())
    for phrase in ("NLIP's NITC loss", "Epochs of plain contrastive training before the first noise estimate",
                   "rebuild the memory bank", "mixing weight"):
        assert phrase in text
