"""End to end on real data, in a temporary directory: nlip-train (tiny preset, Fashion-MNIST subset with 40 % injected
caption noise, method nlip) -> nlip-eval -> nlip-caption (a tiny NLIPForPreTraining, trained in a subprocess that
pushes it to a local Hub with --push_to_hub) -> nlip-audit -> nlip-push. The scripts' `main(argv)` run in-process
where the Hub is not involved."""

import json
import os
import textwrap
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from hub_server import local_hub, run_python  # noqa: F401  (local_hub is a fixture)
from nlip_cli import audit, caption, evaluate, train
from trainers.data.real_datasets import DEBIAN_SOURCES, load_fashion_mnist
from nlip_testing import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(DEBIAN_SOURCES["fashion_mnist"][1]),
        reason="Debian package dataset-fashion-mnist not installed: apt-get install -y --no-install-recommends "
        "dataset-fashion-mnist",
    ),
]

NUM_TRAIN, NUM_EVAL, NOISE = 300, 100, 0.4
DATA = ["--dataset", "fashion_mnist", "--max_train_samples", str(NUM_TRAIN), "--max_eval_samples", str(NUM_EVAL),
        "--noise_ratio", str(NOISE)]
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_strategy", "epoch"]
# Measured with these settings: 0.75 of the top 60 pairs are truly noisy (audit ROC-AUC 0.70); chance is 0.40.
TOP_K, MIN_NOISY_IN_TOP_K = 60, 0.55


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def dual_model(workdir):
    """A tiny NLIPModel trained with method nlip on 300 Fashion-MNIST pairs, 40 % of them noisy."""
    output = workdir / "dual"
    report = train.main([*DATA, "--model_size", "tiny", "--method", "nlip", "--num_train_epochs", "4",
                         "--noise_warmup_epochs", "3", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
                         "--warmup_steps", "0", "--seed", "1", "--output_dir", str(output), *QUIET])
    return output, report


@pytest.fixture(scope="module")
def captioner(workdir, local_hub):
    """A tiny NLIPForPreTraining trained from the command line, pushed to the local Hub by --push_to_hub."""
    output = workdir / "pretraining"
    argv = [*DATA, "--model_size", "tiny", "--model_type", "pretraining", "--method", "nlip", "--num_train_epochs", "2",
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--output_dir", str(output), *QUIET,
            "--push_to_hub", "--hub_model_id", "nlip-tester/tiny-captioner"]
    code = f"import sys; from nlip_cli.train import main; main({argv!r})"
    env = local_hub.env(workdir / "hf_home_train")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    run_python(code, env)
    return output


def test_train_writes_a_complete_output_dir(dual_model):
    output, report = dual_model
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md",
                 "nlip_training_summary.json", "nlip_noise_state.safetensors", "modeling_nlip.py"):
        assert (output / name).is_file(), name
    assert report["num_train_pairs"] == NUM_TRAIN and report["model_class"] == "NLIPModel"
    assert report["noise_statistics"]["num_fits"] >= 1 and 0 <= report["noise_statistics"]["roc_auc"] <= 1
    assert report["eval_metrics"]["eval_zero_shot_top1"] > 10.0  # above chance (10 classes) on the clean test split
    summary = json.loads((output / "nlip_training_summary.json").read_text())
    assert summary["method"] == "nlip" and summary["datasets"] == ["fashion_mnist"]
    assert summary["noise_settings"]["injected_noisy_fraction"] == pytest.approx(NOISE)
    assert set(summary["evaluation_results"]["evaluation"]) >= {"i2t_R@1", "t2i_R@10", "rsum", "zero_shot_top1"}


def test_evaluate_reports_every_applicable_task(dual_model, workdir):
    output, _ = dual_model
    result_file = workdir / "eval.json"
    report = evaluate.main(["--model_name_or_path", str(output), *DATA, "--split", "train", "--output_json",
                            str(result_file), "--disable_tqdm"])
    results = report["results"]
    assert set(results) == {"retrieval", "zero_shot", "noise_detection", "noise_detection_training_state"}
    assert set(results["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum"}
    assert results["noise_detection"]["true_noisy_fraction"] == pytest.approx(NOISE)
    assert results["noise_detection"]["roc_auc"] > 0.55
    assert json.loads(result_file.read_text())["results"] == json.loads(json.dumps(results))
    test_report = evaluate.main(["--model_name_or_path", str(output), *DATA[:6], "--disable_tqdm"])
    assert test_report["split"] == "eval" and test_report["num_pairs"] == NUM_EVAL
    assert set(test_report["results"]) == {"retrieval", "zero_shot"}


def test_caption_a_folder(captioner, workdir, local_hub):
    images = workdir / "images"
    (images / "nested").mkdir(parents=True)
    test_split = load_fashion_mnist(max_samples_per_split=NUM_TRAIN)["test"]
    for i in range(5):
        test_split[i]["image"].convert("RGB").save(images / ("nested" if i % 2 else "") / f"{i}.{'JPG' if i % 2 else 'png'}")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    output_file = workdir / "captions.jsonl"
    report = caption.main(["--model_name_or_path", str(captioner), "--image_dir", str(images), "--output_file",
                           str(output_file), "--num_beams", "2", "--max_new_tokens", "8", "--batch_size", "2",
                           "--disable_tqdm", "--quiet"])
    assert report["num_images"] == 6 and report["num_captioned"] == 5 and report["skipped"] == ["corrupt.png"]
    records = [json.loads(line) for line in output_file.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == ["0.png", "2.png", "4.png", "corrupt.png", "nested/1.JPG", "nested/3.JPG"]
    captioned = [r for r in records if r["error"] is None]
    assert all(r["caption"] and len(r["concepts"]) == 5 for r in captioned)
    vocabulary = json.loads((captioner / "config.json").read_text())["concept_vocabulary"]
    assert {c["concept"] for r in captioned for c in r["concepts"]} <= set(vocabulary)
    csv_report = caption.main(["--model_name_or_path", str(captioner), "--image_dir", str(images / "nested"),
                               "--output_file", str(workdir / "captions.csv"), "--disable_tqdm", "--quiet"])
    assert csv_report["num_captioned"] == 2
    assert (workdir / "captions.csv").read_text().splitlines()[0] == "file,caption,concepts,error"

    # --push_to_hub pushed the captioner: weights, processor, remote code and model card are on the Hub.
    files = json.loads(run_python(
        "import json; from huggingface_hub import HfApi; "
        "print(json.dumps(HfApi().list_repo_files('nlip-tester/tiny-captioner')))",
        local_hub.env(workdir / "hf_home_list"),
    ).strip().splitlines()[-1])
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "modeling_nlip_pretraining.py"} <= set(files)


class ReportParser(HTMLParser):
    """Collects the table rows of the audit report: each row's cell texts and image sources."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append({"cells": [], "images": []})
        elif tag == "td":
            self._cell = []
        elif tag == "img" and self.rows:
            self.rows[-1]["images"].append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_audit_ranks_injected_noise_first(dual_model, captioner, workdir):
    output, _ = dual_model
    audit_dir = workdir / "audit"
    result = audit.main(["--model_name_or_path", str(output), *DATA, "--output_dir", str(audit_dir),
                         "--captioner_name_or_path", str(captioner), "--report_rows", str(TOP_K),
                         "--suggest_threshold", "0", "--max_suggestions", "20", "--max_new_tokens", "8", "--disable_tqdm"])
    summary = result["summary"]
    assert summary["pairs_scored"] == NUM_TRAIN and summary["true_noisy_fraction"] == pytest.approx(NOISE)
    assert summary["roc_auc"] > 0.55
    table = pd.read_parquet(audit_dir / "audit.parquet")
    assert len(table) == NUM_TRAIN and table["noise_prob"].is_monotonic_decreasing
    noisy_in_top_k = table["is_noisy"].head(TOP_K).mean()
    assert noisy_in_top_k == pytest.approx(summary[f"noisy_fraction_in_top_{TOP_K}"])
    assert noisy_in_top_k >= MIN_NOISY_IN_TOP_K, noisy_in_top_k
    assert table["suggested_caption"].head(20).notna().all() and table["suggested_caption"].notna().sum() == 20

    html = (audit_dir / "audit_report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(html)
    parser.close()
    header, *rows = parser.rows
    assert len(rows) == TOP_K and all(len(row["images"]) == 1 for row in rows)
    assert all(row["images"][0].startswith("data:image/png;base64,") for row in rows)
    assert [row["cells"][0] for row in rows] == [str(rank) for rank in range(1, TOP_K + 1)]
    assert [row["cells"][2] for row in rows] == list(table["caption"].head(TOP_K))
    truth_column = [row["cells"][-2] for row in rows]
    assert truth_column == ["noisy" if noisy else "clean" for noisy in table["is_noisy"].head(TOP_K)]
    assert f"{summary['roc_auc']:.3f}" in html and "pairs scored" in html


def test_push_the_trained_model(dual_model, workdir, local_hub):
    output, _ = dual_model
    code = textwrap.dedent(f"""
        import json
        from huggingface_hub import HfApi
        from nlip_cli.push import main
        report = main(["--checkpoint_dir", {str(output)!r}, "--repo_id", "nlip-tester/tiny-nlip-fmnist"])
        readme = open(HfApi().hf_hub_download("nlip-tester/tiny-nlip-fmnist", "README.md")).read()
        print(json.dumps({{"report": report, "files": HfApi().list_repo_files("nlip-tester/tiny-nlip-fmnist"),
                          "readme": readme}}))
    """)
    env = local_hub.env(workdir / "hf_home_push")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = json.loads(run_python(code, env).strip().splitlines()[-1])
    # nlip-train's generated card is re-rendered with the repo id (a hand-written README would be kept)
    assert result["report"]["model_card"] == "rendered from nlip_training_summary.json"
    assert 'from_pretrained("nlip-tester/tiny-nlip-fmnist"' in result["readme"] and "<your-username>" not in result["readme"]
    assert {"model.safetensors", "nlip_training_summary.json", "nlip_noise_state.safetensors", "tokenizer.json",
            "configuration_nlip.py"} <= set(result["files"])
    assert "nlip" in result["readme"] and "fashion_mnist" in result["readme"]


def test_noise_injection_is_reproducible_across_scripts(workdir):
    """train, evaluate and audit see the same noisy pairs for the same options (what the noise metrics rely on)."""
    from trainers.data.sources import DataArguments, load_pairs

    args = DataArguments(dataset="fashion_mnist", max_train_samples=NUM_TRAIN, max_eval_samples=NUM_EVAL, noise_ratio=NOISE)
    first, second = load_pairs(args).train, load_pairs(args).train
    assert first["is_noisy"] == second["is_noisy"] and first["text"] == second["text"]
    assert np.mean(first["is_noisy"]) == pytest.approx(NOISE)
