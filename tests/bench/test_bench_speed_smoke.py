"""Smoke test of `bench/speed.py`: a `--quick` run, in float32 and with `--bf16` (bf16 autocast also runs on CPU),
produces a complete JSON summary of finite positive figures."""

import json
import math

import pytest
import torch
from nlip_testing import load_bench_script


# Every figure the benchmark reports, by section; all must be finite and > 0.
FIGURES = {
    "training": ["clip_samples_per_s", "nlip_samples_per_s", "ratio", "ratio_of_best_times"],
    "zero_shot_inference": ["clip_images_per_s", "nlip_images_per_s", "ratio", "ratio_of_best_times"],
    "captioning": [
        "nlip_tokens_per_s",
        "blip_tokens_per_s",
        "ratio",
        "nlip_no_cache_tokens_per_s",
        "kv_cache_speedup",
        "ratio_of_best_times",
    ],
    "flops": [
        "matmul_flops_per_s",
        "matmul_best_flops_per_s",
        "training_step_flops",
        "training_step_s",
        "achieved_flops_per_s",
        "fraction_of_peak",
    ],
}
METHODS = ["nlip", "srcl", "srcl_reference", "npc", "nlip+srcl", "nlip+srcl_prior"]


def assert_positive_finite(value, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} = {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{where} = {value!r} is not a positive finite number"


@pytest.fixture(scope="module", params=[False, True], ids=["float32", "bf16"])
def quick_run(request, tmp_path_factory):
    output = tmp_path_factory.mktemp("speed") / "speed.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--threads", "1", "--repetitions", "2", "--no-progress", "--output", str(output)]
        results = load_bench_script("speed").main(argv + ["--bf16"] * request.param)
    finally:
        torch.set_num_threads(threads)
    return results, output


def test_quick_run_reports_every_figure(quick_run):
    results, _ = quick_run
    sections = {"machine", "sizes", "timing", "training", "method_overhead", "zero_shot_inference", "captioning"}
    assert sections | {"flops", "total_seconds", "command"} <= set(results)
    for section, keys in FIGURES.items():
        for key in keys:
            assert_positive_finite(results[section].get(key), f"{section}.{key}")
    overhead = results["method_overhead"]
    assert overhead["measured_through"] == "NLIPTrainer.training_step"
    assert sorted(overhead["ratio_vs_clip"]) == sorted(METHODS)
    for method in METHODS:
        assert_positive_finite(overhead["ratio_vs_clip"][method], f"method_overhead.ratio_vs_clip.{method}")
        assert_positive_finite(overhead["median_step_s"][method], f"method_overhead.median_step_s.{method}")
        assert_positive_finite(overhead["ratio_vs_clip_of_best_times"][method], f"ratio_of_best_times.{method}")
        assert overhead["met"][method] == (overhead["ratio_vs_clip"][method] <= float(overhead["targets"][method][3:]))
    assert_positive_finite(overhead["median_step_s"]["clip"], "method_overhead.median_step_s.clip")
    assert_positive_finite(overhead["npc_memory_fetch_s"], "method_overhead.npc_memory_fetch_s")


def test_ratios_are_ratios_of_the_reported_figures(quick_run):
    results, _ = quick_run
    training = results["training"]
    assert training["ratio"] == pytest.approx(
        training["nlip_samples_per_s"] / training["clip_samples_per_s"], rel=2e-3
    )
    assert training["met"] == (training["ratio"] >= 1.0)
    captioning = results["captioning"]
    assert captioning["ratio"] == pytest.approx(
        captioning["nlip_tokens_per_s"] / captioning["blip_tokens_per_s"], rel=2e-3
    )
    sizes = results["sizes"]
    assert captioning["new_tokens_per_call"] == sizes["caption_batch_size"] * sizes["max_new_tokens"]
    flops = results["flops"]
    assert flops["fraction_of_peak"] == pytest.approx(
        flops["achieved_flops_per_s"] / flops["matmul_flops_per_s"], rel=2e-3
    )


def test_same_size_models_and_recorded_settings(quick_run):
    results, output = quick_run
    assert results["training"]["parameter_count"]["equal"] is True
    assert results["training"]["parameter_count"]["clip"] == results["training"]["parameter_count"]["nlip"] > 0
    assert results["machine"]["torch_num_threads"] == 1
    assert results["preset"] == "quick" and results["timing"]["repetitions"] == 2
    bf16 = "--bf16" in results["command"].split()
    assert results["machine"]["device"] == "cpu"
    assert results["machine"]["dtype"] == ("bfloat16 autocast" if bf16 else "float32")
    assert results["flops"]["matmul_dtype"] == ("bfloat16" if bf16 else "float32")
    assert json.loads(output.read_text()) == results
    assert output.with_suffix(".png").stat().st_size > 0


def test_verdict_judges_the_reported_ratio():
    """A ratio that prints as the target meets it (1.05004 is reported as 1.05), one just above does not."""
    verdict = load_bench_script("speed")._verdict
    assert verdict("nlip", 1.05004) == {"target": "<= 1.05", "met": True}
    assert verdict("nlip", 1.051)["met"] is False
    assert verdict("training_samples_per_s", 0.99996)["met"] is True
    assert verdict("training_samples_per_s", 0.999)["met"] is False


def test_bad_arguments_are_rejected(capsys):
    speed = load_bench_script("speed")
    cases = ((["--threads", "0"], "--threads must be >= 1, got 0"), (["--warmup", "-1"], "--warmup must be >= 0"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            speed.parse_args(argv)
        assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_rejected(monkeypatch, capsys):
    speed = load_bench_script("speed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cuda", "--bf16"])
    assert "--device cuda needs a CUDA GPU; torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.parametrize("bf16", [False, True])
def test_method_steps_run_the_forward_in_the_requested_precision(bf16, tmp_path):
    """The method steps bypass `Trainer.train()`, so the benchmark must itself prepare each model for autocast."""
    speed = load_bench_script("speed")
    execution = speed.Execution(device="cpu", bf16=bf16)
    model = speed.build_nlip(speed.QUICK_SIZES)
    methods = speed.TrainerSteps(model, speed.QUICK_SIZES, execution, torch.Generator().manual_seed(0), tmp_path)
    trainer = methods.trainers["nlip"]
    assert (trainer.args.bf16, trainer.args.use_cpu) == (bf16, True)
    dtypes = []
    layer = trainer.model.vision_model.encoder.layers[0].mlp.fc1
    layer.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    methods.step(trainer)
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32]
    assert trainer.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
