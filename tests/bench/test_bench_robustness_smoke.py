"""Smoke test of `bench/robustness.py`: a `--quick` run follows the protocol (learning rate tuned on validation, every
seed tested at the chosen rate, both noise types) and its summary statistics are computed as documented."""

import json
import math
import os
import statistics

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from nlip_testing import load_bench_script, processor, synthetic_pairs, tiny_model

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
    assert not (tmp_path / "robustness_fashion_mnist.partial.json").exists()  # the finished runs' record while running
    assert output.with_suffix(".png").stat().st_size > 0 and "| `nlip` |" in output.with_suffix(".md").read_text()
    assert results["non_finite_values"] == [] and all(math.isfinite(v) for _, v in numbers(results))
    budget = results["budget"]
    assert budget["num_train_pairs"] + budget["num_val_pairs"] == 96 and budget["learning_rates"] == [0.002, 0.004]
    # random 0 and 0.4, hard 0.8 (garment groups; the setting's one hard level): 3 cells per method, each with both seeds.
    assert [(c["noise_type"], c["noise_ratio"], c["method"]) for c in results["cells"]] == [
        (t, r, m) for t, r in (("random", 0.0), ("random", 0.4), ("hard", 0.8)) for m in ("clip", "nlip")]
    module = load_bench_script("robustness")
    tuning = {t["method"]: t for t in results["tuning"]}
    for method, record in tuning.items():  # chosen on validation at random noise 0.4, the best of the grid
        stage1, stage2 = record["grid"][:2], record["grid"][2:]
        assert [(g["learning_rate"], g["method_settings"]) for g in stage1] == [(0.002, {}), (0.004, {})]
        assert record["noise"] == "random 0.4"
        best_lr = max(stage1, key=lambda g: g["val_headline"])["learning_rate"]
        assert [(g["learning_rate"], g["method_settings"]) for g in stage2] == module.method_candidates(method, best_lr, (0.002, 0.004))
        chosen = max(record["grid"], key=lambda g: g["val_headline"])
        assert (record["learning_rate"], record["method_settings"]) == (chosen["learning_rate"], chosen["method_settings"])
    assert tuning["nlip"]["grid"][2]["method_settings"] == {"nitc_strength": 0.3}
    for cell in results["cells"]:
        assert cell["error"] is None, cell["error"]
        assert cell["learning_rate"] == tuning[cell["method"]]["learning_rate"]
        assert cell["method_settings"] == tuning[cell["method"]]["method_settings"]
        assert [run["seed"] for run in cell["runs"]] == [0, 1]
        assert all((run["learning_rate"], run["method_settings"]) == (cell["learning_rate"], cell["method_settings"])
                   for run in cell["runs"])
        for run in cell["runs"]:
            assert 0.0 <= run["test"]["zero_shot"]["top1"] <= 100.0 and run["step_time_s"] > 0
            if cell["noise_ratio"] > 0:
                detection = run["noise_detection"]
                assert 0.0 <= detection["roc_auc"] <= 1.0 and 0.0 <= detection["semantic_roc_auc"] <= 1.0
    hard = [c for c in results["cells"] if c["noise_type"] == "hard"]
    assert hard and all(c["runs"][0]["noise_detection"]["true_noisy_fraction"] == pytest.approx(0.8, abs=0.02) for c in hard)
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
    clip_cell = next(c for c in results["cells"] if c["method"] == "clip" and c["noise_ratio"] == 0.4 and c["noise_type"] == "random")
    gaps = [run["test"]["zero_shot"]["top1"] - base["test"]["zero_shot"]["top1"]
            for run, base in zip(nlip_cell["runs"], clip_cell["runs"], strict=True)]
    assert margin["paired"]["mean"] == pytest.approx(statistics.fmean(gaps))
    assert margin["paired"]["std"] == pytest.approx(statistics.stdev(gaps))
    # --render recomputes the summary from the JSON alone and writes the same table.
    table = output.with_suffix(".md").read_text()
    output.with_suffix(".md").unlink()
    rendered = module.main([*argv, "--render"])
    assert rendered["summary"] == results["summary"] and output.with_suffix(".md").read_text() == table
    # --rerun trains one method again into the table: the other method's runs are kept as they were.
    with pytest.raises(SystemExit, match=r"was run with seeds = \[0, 1\], this run has \[0\]; rerun the whole table"):
        module.main([*argv[:6], "--seeds", "0", "--no-progress", "--output_dir", str(tmp_path), "--rerun", "nlip"])
    try:
        rerun = module.main([*argv, "--rerun", "nlip"])
        # With --combination_start components, a combination rerun into the table starts from its components'
        # tunings there (nlip's; srcl has none).
        combined = module.main([*argv, "--rerun", "nlip+srcl", "--combination_start", "components"])
    finally:
        torch.set_num_threads(threads)
    assert rerun["methods"] == ["clip", "nlip"] and rerun["command"] == results["command"]
    assert [c for c in rerun["cells"] if c["method"] == "clip"] == [c for c in results["cells"] if c["method"] == "clip"]
    assert [t["method"] for t in rerun["tuning"]] == ["clip", "nlip"] and rerun["tuning"][0] == results["tuning"][0]
    new_nlip = [c for c in rerun["cells"] if c["method"] == "nlip"]
    assert len(new_nlip) == 3 and new_nlip != [c for c in results["cells"] if c["method"] == "nlip"]
    assert [(r["methods"], r["command"].split("--rerun ")[1]) for r in rerun["reruns"]] == [(["nlip"], "nlip")]
    assert rerun["summary"] == module.summarise(module.resolve_setting(module.parse_args(argv)), rerun["cells"], ["clip", "nlip"])
    assert all(c.get("invocation", 0) == (1 if c["method"] == "nlip" else 0) for c in rerun["cells"])
    # nlip was trained by another command than clip: its step time is not compared with clip's.
    assert set(rerun["summary"]["random"]["step_time_vs_clip"]["nlip"].values()) == {None}
    assert rerun["summary"]["random"]["step_time_vs_clip"]["clip"]["0.4"] == 1.0
    assert combined["methods"] == ["clip", "nlip", "nlip+srcl"] and combined["tuning"][:2] == rerun["tuning"]
    start = combined["tuning"][2]["start"]
    assert start == rerun["tuning"][1]["method_settings"]
    assert [g["method_settings"] for g in combined["tuning"][2]["grid"][:2]] == [start, start]
    markdown = output.with_suffix(".md").read_text()
    assert "Rerun: `python bench/robustness.py" in markdown
    assert ("- `nlip+srcl` (stage 1 with its components' tuned" in markdown) == bool(start)
    assert combined["budget"]["combination_start"] == "components" and rerun["budget"]["combination_start"] == "defaults"
    # Refused before anything trains: training nlip again would leave nlip+srcl tuned from a stale start, and a table's
    # combinations are all tuned by one rule.
    with pytest.raises(SystemExit, match=r"nlip\+srcl started from the tunings of components this run trains again"):
        module.main([*argv, "--rerun", "nlip", "--combination_start", "components"])
    with pytest.raises(SystemExit, match=r"tuned nlip\+srcl with --combination_start components; rerun them too"):
        module.main([*argv, "--rerun", "nlip"])


def test_summary_statistics():
    module = load_bench_script("robustness")
    assert module.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert module.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert module.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}


def test_bad_arguments_are_rejected():
    module = load_bench_script("robustness")
    for argv in (
        ["--setting", "fashion_mnist", "--methods", "clip+nlip"],
        ["--setting", "fashion_mnist", "--methods", "clip", "nlip@oracle"],
        ["--setting", "fashion_mnist", "--methods", "nlip"],  # no clip baseline
        ["--setting", "fashion_mnist", "--methods", "clip", "nlip", "nlip"],
        ["--setting", "fashion_mnist", "--noise_ratios", "1.0"],
        ["--setting", "fashion_mnist", "--learning_rates", "0"],
        ["--setting", "fashion_mnist", "--epochs", "0"],
        ["--setting", "cifar"],
        ["--setting", "fashion_mnist", "--rerun", "nlip", "--render"],
        ["--setting", "fashion_mnist", "--resume", "--render"],
    ):
        with pytest.raises(SystemExit):
            module.parse_args(argv)


def test_every_method_gets_the_same_tuning_budget():
    """Stage 2: two candidates each, the method's own settings first (the prior's weight only where the method reads
    the noise estimate), learning-rate refinements for a method without settings; combinations take turns."""
    candidates = load_bench_script("robustness").method_candidates
    assert candidates("clip", 1e-3) == [(5e-4, {}), (2e-3, {})] == candidates("clip", 1e-3, (3e-4, 1e-3, 3e-3))
    # A grid that steps by 2 already holds the halved (or doubled) rate: the midpoint is tried instead, never a repeat.
    assert candidates("clip", 4e-3, (1e-3, 2e-3, 4e-3)) == [(pytest.approx(4e-3 / math.sqrt(2)), {}), (8e-3, {})]
    assert candidates("clip", 1e-3, (1e-3, 2e-3, 4e-3)) == [(5e-4, {}), (pytest.approx(1e-3 * math.sqrt(2)), {})]
    assert candidates("rcl", 1e-3, (1e-3, 2e-3, 4e-3)) == [(1e-3, {"rcl_infonce_weight": 0.2}),
                                                           (1e-3, {"rcl_infonce_weight": 1.0})]
    assert candidates("npc", 1e-3) == [(1e-3, {"npc_clean_threshold": 0.7}), (1e-3, {"npc_clean_threshold": 0.5})]
    assert candidates("nlip+srcl", 1e-3) == [(1e-3, {"nitc_strength": 0.3}), (1e-3, {"srcl_weight_temperature": 0.2})]
    assert candidates("nlip@reference", 1e-3) == [(1e-3, {"noise_prior_weight": 1.0}), (1e-3, {"nitc_strength": 0.3})]
    assert candidates("srcl@reference", 1e-3) == candidates("srcl", 1e-3)
    # A neighbour-agreement prior tries more neighbours in the second slot.
    assert candidates("nlip@snapshot-neighbours", 1e-3) == [(1e-3, {"noise_prior_weight": 1.0}),
                                                            (1e-3, {"noise_prior_neighbours": 50})]
    # On top of a combination's start (its components' tunings), skipping the alternatives the start already holds.
    start = {"nitc_strength": 0.3, "srcl_weight_temperature": 0.2}
    assert candidates("nlip+srcl", 1e-3, (), start) == [(1e-3, {**start, "noise_warmup_epochs": 2}),
                                                        (1e-3, {**start, "srcl_weight_temperature": 0.05})]
    assert candidates("nlip+srcl@reference", 1e-3, (), start) == [(1e-3, {**start, "noise_prior_weight": 1.0}),
                                                                  (1e-3, {**start, "noise_warmup_epochs": 2})]


def test_a_combination_starts_from_its_components_tunings():
    """Single methods are tuned first; a combination's stage 1 uses each component's tuned settings (without a
    prior), merged; a component the table has not tuned contributes its defaults."""
    module = load_bench_script("robustness")
    assert module.components("nlip+srcl@reference") == ["nlip", "srcl"] and module.components("clip") == ["clip"]
    assert module.tuning_order(["nlip+srcl", "clip", "nlip+srcl@reference", "srcl@reference"]) == [
        "clip", "srcl@reference", "nlip+srcl", "nlip+srcl@reference"]
    tunings = {"nlip": {"method_settings": {"nitc_strength": 0.3}},
               "srcl": {"method_settings": {"srcl_weight_temperature": 0.2}},
               "nlip@reference": {"method_settings": {"noise_prior_weight": 1.0}}}
    both = {"nitc_strength": 0.3, "srcl_weight_temperature": 0.2}
    assert module.inherited_settings("nlip+srcl", tunings) == both
    assert module.inherited_settings("nlip+srcl@reference", tunings) == both
    assert module.inherited_settings("npc+srcl", tunings) == {"srcl_weight_temperature": 0.2}
    assert module.inherited_settings("nlip", tunings) == {} == module.inherited_settings("nlip@reference", tunings)


def test_locked_tower_evaluation_reuses_tower_outputs():
    """With locked towers, evaluation computes a split's pooled tower outputs once and then applies only the projections:
    the same retrieval figures as the full pass, for a model with other projections too; a changed split (other
    captions: another datasets fingerprint) gets its own outputs."""
    module = load_bench_script("robustness")
    data = synthetic_pairs(12)
    pairs = module.ImageTextData(name="synthetic", train=data, eval=data)
    first, second = tiny_model(seed=0), tiny_model(seed=0)
    torch.nn.init.normal_(second.visual_projection.weight)
    module.LOCKED_TOWER_OUTPUTS.clear()
    figures = []
    for model in (first, second):
        cached = module.evaluate(model, processor(), data, pairs, locked_towers=True)["retrieval"]
        assert cached == pytest.approx(module.evaluate(model, processor(), data, pairs)["retrieval"])
        figures.append(cached)
    assert figures[0] != figures[1]  # the second model's own projection was applied
    assert list(module.LOCKED_TOWER_OUTPUTS) == [data._fingerprint]
    shuffled = data.map(lambda row, i: {"text": data[(i + 1) % 12]["text"]}, with_indices=True)
    module.evaluate(first, processor(), shuffled, pairs, locked_towers=True)
    assert len(module.LOCKED_TOWER_OUTPUTS) == 2


def test_reference_pairs_lose_the_near_duplicates_of_the_settings_images():
    """The honest reference never sees a picture of the setting: a copy of one (twice the size, RGBA) is removed from
    the reference's pairs and counted; distinct pictures are kept."""
    module = load_bench_script("robustness")
    rng = np.random.default_rng(0)
    # Smooth random pictures (a 4x4 random field upsampled to 32 px), like clip art rather than pixel noise.
    pictures = [PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), PIL.Image.BILINEAR)
                for _ in range(8)]
    copy = pictures[2].resize((64, 64)).convert("RGBA")

    def pairs(images):
        return datasets.Dataset.from_dict({"image": images, "text": [f"picture {i}" for i in range(len(images))]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "text": datasets.Value("string")}))

    setting_images = pairs(pictures[:3])
    candidates = pairs([pictures[3], pictures[4], copy, pictures[5]])
    signatures = module.image_signatures(candidates)
    assert signatures.shape == (4, 32 * 32 * 3) and np.allclose(np.linalg.norm(signatures, axis=1), 1.0)
    assert float(signatures[2] @ module.image_signatures(setting_images)[2]) > 0.95
    assert float(np.abs(signatures[[0, 1, 3]] @ module.image_signatures(setting_images).T).max()) < 0.9
    kept, removed = module.without_near_duplicates(candidates, [setting_images.select([0, 1]), setting_images.select([2])])
    assert removed == 1 and list(kept["text"]) == ["picture 0", "picture 1", "picture 3"]
    assert module.without_near_duplicates(candidates, [setting_images.select([0, 1])])[1] == 0


def test_clean_only_ceiling_trains_clip_on_the_intact_pairs_for_the_same_steps():
    """`clip@clean_only` keeps exactly the pairs whose caption is their own (the injected mask), drops the noise
    columns (nothing left to detect), keeps the optimizer steps of a run on every pair, and never counts as the
    best method in the targets."""
    module = load_bench_script("robustness")
    from trainers.noise.injection import inject_caption_noise

    setting = module.SETTINGS["pretrained_tuxpaint"]
    noisy = inject_caption_noise(synthetic_pairs(100).remove_columns("is_noisy"), 0.6, seed=0)
    kept, steps = module.clean_only(noisy, setting)
    assert sorted(kept["index"]) == [i for i, is_noisy in zip(noisy["index"], noisy["is_noisy"]) if not is_noisy]
    assert len(kept) == 40 and {"is_noisy", "caption_source"}.isdisjoint(kept.column_names)
    assert steps == {"max_steps": math.ceil(100 / setting.batch_size) * setting.epochs} == {"max_steps": 20}
    clean = synthetic_pairs(10).remove_columns("is_noisy")
    assert module.clean_only(clean, setting)[0] is clean
    assert module.split_method(module.CLEAN_ONLY) == ("clip", None)
    assert module.split_method("nlip+srcl@snapshot") == ("nlip+srcl", "snapshot")
    assert module.split_method("nlip@oracle") == ("nlip@oracle", None)  # not a prior: --methods rejects it
    assert module.split_method("npc@reference") == ("npc", "reference") and module.split_method("npc") == ("npc", None)
    assert module.split_method("nlip@snapshot-neighbours") == ("nlip", "snapshot")
    assert module.scores_by_neighbours("nlip@reference-neighbours") and not module.scores_by_neighbours("nlip@snapshot")
    assert module.split_method("nlip-neighbours") == ("nlip-neighbours", None)
    assert not module.scores_by_neighbours("nlip-neighbours")
    fashion = module.SETTINGS["fashion_mnist"]
    assert module.prior_overrides("nlip", fashion) == {} == module.prior_overrides(module.CLEAN_ONLY, fashion)
    assert module.prior_overrides("npc@reference", fashion) == {"noise_prior": "reference"}
    assert module.prior_overrides("nlip@snapshot-neighbours", fashion) == {
        "noise_prior": "reference", "noise_prior_epoch": fashion.noise_warmup_epochs, "noise_prior_neighbours": 20}
    assert module.parse_args(["--setting", "fashion_mnist", "--methods", "clip", module.CLEAN_ONLY]).methods[1] == module.CLEAN_ONLY

    def cell(method, mean):
        return {"mean": mean, "std": 0.1, "n": 3}

    ratios = ["0.0", "0.4", "0.6", "0.8"]
    headline = {m: {r: cell(m, v) for r in ratios} for m, v in (("clip", 50.0), ("nlip", 55.0), (module.CLEAN_ONLY, 70.0))}
    margins = {m: {r: {"margin": headline[m][r]["mean"] - 50.0, "significant": m != "clip", "paired": None}
                   for r in ratios} for m in headline}
    summary = {"random": {"ratios": [0.0, 0.4, 0.6, 0.8], "tables": {"headline": headline, "noise_roc_auc": {}},
                          "margin_over_clip": margins,
                          "retention": {m: {r: 1.0 for r in ratios} for m in headline}}}
    assert module.targets(summary, ["clip", "nlip", module.CLEAN_ONLY])["best_method"] == "nlip"


@needs_package("fashion_mnist")
def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """`--resume` keeps the tunings and cells a killed run finished (from its partial JSON), trains only the rest, and
    refuses another command's partial run."""
    threads = torch.get_num_threads()
    module = load_bench_script("robustness")
    argv = ["--setting", "fashion_mnist", "--quick", "--methods", "clip", "--seeds", "0", "--noise_types", "random",
            "--no-progress", "--output_dir", str(tmp_path)]
    partial = tmp_path / "robustness_fashion_mnist.partial.json"
    trained = []
    run_cell = module.run_cell

    def killed_after_one_cell(*args, **kwargs):
        if trained:
            raise KeyboardInterrupt
        trained.append(args[2:5])
        return run_cell(*args, **kwargs)

    monkeypatch.setattr(module, "run_cell", killed_after_one_cell)
    try:
        with pytest.raises(KeyboardInterrupt):
            module.main(argv)
        saved = json.loads(partial.read_text())
        assert [t["method"] for t in saved["tuning"]] == ["clip"] and "best_run" in saved["tuning"][0]
        assert [(c["noise_ratio"], c["method"]) for c in saved["cells"]] == [(0.0, "clip")] and saved["wall_time_s"] > 0
        with pytest.raises(SystemExit, match=r"was run with --seeds \[0\], this command has \[0, 1\]; resume with the same"):
            module.main([*argv[:6], "0", "1", *argv[7:], "--resume"])

        def not_again(*args, **kwargs):
            raise AssertionError("a finished tuning was trained again")

        monkeypatch.setattr(module, "tune", not_again)
        trained.clear()
        monkeypatch.setattr(module, "run_cell", lambda *args, **kwargs: trained.append(args[2:5]) or run_cell(*args, **kwargs))
        results = module.main([*argv, "--resume"])
    finally:
        torch.set_num_threads(threads)
    assert trained == [("random", 0.4, "clip")]  # only the cell the killed run had not finished
    assert results["cells"][0] == saved["cells"][0] and [c["noise_ratio"] for c in results["cells"]] == [0.0, 0.4]
    assert results["tuning"] == [{k: v for k, v in saved["tuning"][0].items() if k != "best_run"}]
    assert results["resumed"] is True and "--resume" not in results["command"]
    assert results["total_wall_time_s"] >= saved["wall_time_s"]
    assert not partial.exists()
    with pytest.raises(SystemExit, match=r"--resume: .*partial\.json does not exist \(nothing to resume"):
        module.main([*argv, "--resume"])
