"""The command line as run_clip.py / open_clip users expect it: per-model batch size and learning rate defaults,
arguments from a JSON/YAML file, --do_train / --do_eval honoured, *_results.json, --dataset_name for any `datasets`
source, LoRA flags, sample limits that limit what is built, string / integer / webdataset labels for zero-shot
evaluation (and a loud message without them), one beam setting, no per-epoch pin_memory warning on CPU."""

import io
import json
import logging
import os
import tarfile
import warnings

import datasets
import numpy as np
import pytest
from PIL import Image

from nlip_cli import audit, caption, evaluate, train
from nlip_cli.cli import read_args_file
from nlip_testing import add_file
from trainers.data.sources import DataArguments, load_pairs
from trainers.models import load_checkpoint
from trainers.data.real_datasets import DEBIAN_SOURCES, _seeded_split
from trainers.training_args import NLIPTrainingArguments

SHAPES = ("circle", "square", "triangle")
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--num_train_epochs", "1",
         "--per_device_train_batch_size", "8"]


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """A `DatasetDict.save_to_disk` folder with run_clip-style columns: image paths, a caption, a string label."""
    root = tmp_path_factory.mktemp("hf_dataset")
    splits = {}
    for split, size in (("train", 16), ("validation", 9)):
        paths, captions, labels = [], [], []
        for i in range(size):
            path = root / f"{split}_{i}.png"
            _image(i + 100 * (split == "validation")).save(path)
            shape = SHAPES[i % 3]
            paths.append(str(path))
            captions.append(f"a picture of a {shape}")
            labels.append(shape)
        splits[split] = datasets.Dataset.from_dict({"image_path": paths, "caption": captions, "shape": labels})
    datasets.DatasetDict(splits).save_to_disk(root / "saved")
    return root / "saved"


def test_training_defaults_per_model_unless_given(tmp_path):
    base = ["--dataset", "emoji", "--output_dir", str(tmp_path)]
    *_, args, given = train.parse_args_and_given([*base, "--model_size", "tiny"])
    assert (args.per_device_train_batch_size, args.learning_rate, args.per_device_eval_batch_size) == (64, 1e-3, 64)
    assert "learning_rate" not in given
    *_, args, _ = train.parse_args_and_given([*base, "--model_size", "small"])
    assert (args.per_device_train_batch_size, args.learning_rate) == (128, 5e-4)
    *_, args, _ = train.parse_args_and_given([*base, "--model_name_or_path", "some/checkpoint"])
    assert (args.per_device_train_batch_size, args.learning_rate) == (64, 5e-5)
    *_, args, given = train.parse_args_and_given([*base, "--model_size", "tiny", "--learning_rate", "3e-3",
                                                  "--per_device_train_batch_size", "16"])
    assert (args.per_device_train_batch_size, args.learning_rate, args.per_device_eval_batch_size) == (16, 3e-3, 16)
    assert {"learning_rate", "per_device_train_batch_size"} <= given


def test_arguments_from_yaml_and_json_files(tmp_path):
    (tmp_path / "args.yaml").write_text(
        f"dataset: emoji\nmodel_size: tiny\noutput_dir: {tmp_path / 'out'}\nlearning_rate: 2.0e-3\n"
        "method: nlip+srcl\nnoise_ratio: 0.25\nreport_to: none\n"
    )
    model_args, data_args, _, args, given = train.parse_args_and_given([str(tmp_path / "args.yaml")])
    assert (model_args.model_size, data_args.dataset, data_args.noise_ratio) == ("tiny", "emoji", 0.25)
    assert (args.method, args.learning_rate, args.per_device_train_batch_size) == ("nlip+srcl", 2e-3, 64)
    assert "learning_rate" in given and "per_device_train_batch_size" not in given
    # options after the file override it
    *_, args, _ = train.parse_args_and_given([str(tmp_path / "args.yaml"), "--learning_rate", "1e-4"])
    assert args.learning_rate == 1e-4
    (tmp_path / "args.json").write_text(json.dumps({"dataset": "emoji", "model_size": "tiny", "output_dir": str(tmp_path),
                                                    "per_device_train_batch_size": 12}))
    *_, args, _ = train.parse_args_and_given([str(tmp_path / "args.json")])
    assert (args.per_device_train_batch_size, args.learning_rate) == (12, 1e-3)
    (tmp_path / "bad.yaml").write_text("dataset: emoji\nmodel_sise: tiny\n")
    with pytest.raises(ValueError, match=r"unknown options \['model_sise'\]"):
        train.parse_args_and_given([str(tmp_path / "bad.yaml")])
    assert read_args_file(str(tmp_path / "args.json"))["per_device_train_batch_size"] == 12


@pytest.mark.slow
def test_dataset_name_train_eval_results_lora_and_do_eval(saved_dataset, tmp_path, caplog):
    data = ["--dataset_name", str(saved_dataset), "--image_column", "image_path", "--caption_column", "caption",
            "--label_column", "shape"]
    # 1. train + eval by default, from a save_to_disk folder; string labels give zero-shot accuracy
    report = train.main([*data, "--model_size", "tiny", "--output_dir", str(tmp_path / "full"), *QUIET])
    assert report["do_train"] and report["do_eval"] and report["num_train_pairs"] == 16
    assert "eval_zero_shot_top1" in report["eval_metrics"] and "eval_rsum" in report["eval_metrics"]
    for name in ("train_results.json", "eval_results.json", "all_results.json"):
        assert (tmp_path / "full" / name).is_file(), name
    results = json.loads((tmp_path / "full" / "all_results.json").read_text())
    assert results["train_samples"] == 16 and results["eval_samples"] == 9 and "eval_zero_shot_top1" in results
    card = (tmp_path / "full" / "README.md").read_text()
    assert "local `datasets` dataset `saved`" in card and "<your-username>/<repo-name>" in card

    # 2. LoRA, --do_train only: adapter saved apart, merged model in output_dir, no evaluation
    lora_dir = tmp_path / "lora"
    report = train.main([*data, "--model_name_or_path", str(tmp_path / "full"), "--output_dir", str(lora_dir),
                         "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--do_train", *QUIET])
    assert report["do_train"] and not report["do_eval"]
    assert (lora_dir / "lora_adapter" / "adapter_config.json").is_file()
    assert (lora_dir / "model.safetensors").is_file() and not (lora_dir / "adapter_config.json").exists()
    assert (lora_dir / "train_results.json").is_file() and not (lora_dir / "eval_results.json").exists()
    adapter = json.loads((lora_dir / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert load_checkpoint(str(lora_dir)).architecture == "NLIPModel"

    # 3. --do_eval only: evaluates the checkpoint, trains nothing
    eval_dir = tmp_path / "eval_only"
    caplog.set_level(logging.WARNING)
    report = train.main([*data[:6], "--model_name_or_path", str(lora_dir), "--output_dir", str(eval_dir), "--do_eval",
                         *QUIET])
    assert not report["do_train"] and report["do_eval"] and report["train_metrics"] == {}
    assert (eval_dir / "eval_results.json").is_file() and not (eval_dir / "train_results.json").exists()
    assert not (eval_dir / "model.safetensors").exists()
    # without --label_column the saved dataset has no 'label' column: zero-shot is skipped, loudly
    assert "eval_zero_shot_top1" not in report["eval_metrics"]
    assert any("Zero-shot classification is NOT evaluated" in r.message and "--label_column" in r.message
               for r in caplog.records)


def test_dataset_name_reads_a_local_folder_of_data_files(tmp_path):
    folder = tmp_path / "parquet_pairs"
    folder.mkdir()
    images = []
    for i in range(6):
        buffer = io.BytesIO()
        _image(i).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    table = datasets.Dataset.from_dict({"image": images, "text": [f"caption {i}" for i in range(6)],
                                        "label": [i % 2 for i in range(6)]},
                                       features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                                                   "label": datasets.Value("int64")}))
    table.to_parquet(str(folder / "train.parquet"))
    data = load_pairs(DataArguments(dataset_name=str(folder), class_names=["even", "odd"], max_train_samples=4))
    assert len(data.train) == 4 and data.eval is None and {"image", "text", "index"} <= set(data.train.column_names)
    assert data.train.features["label"].names == ["even", "odd"] and data.class_names == ["even", "odd"]
    with pytest.raises(ValueError, match="--dataset_config_name is the configuration of --dataset_name"):
        DataArguments(train_dir=str(folder), dataset_config_name="x")


def test_imagefolder_string_and_integer_labels_for_zero_shot(tmp_path, caplog):
    for kind, labels in (("strings", ["cat", "dog", "cat", "bird"]), ("ints", [2, 0, 1, 2])):
        root = tmp_path / kind
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
        for split in ("train", "test"):
            with open(root / split / "metadata.jsonl", "w") as metadata:
                for i, label in enumerate(labels):
                    _image(i).save(root / split / f"{i}.png")
                    metadata.write(json.dumps({"file_name": f"{i}.png", "text": f"photo {i}", "label": label}) + "\n")
    data = load_pairs(DataArguments(train_dir=str(tmp_path / "strings"), label_column="label"))
    assert data.label_column == "label" and data.class_names == ["bird", "cat", "dog"]
    assert data.eval["label"] == [1, 2, 1, 0] and data.train.features["label"] == data.eval.features["label"]
    auto = load_pairs(DataArguments(train_dir=str(tmp_path / "strings")))  # 'label' is found without the option
    assert auto.class_names == ["bird", "cat", "dog"] and auto.zero_shot_skipped is None
    named = load_pairs(DataArguments(train_dir=str(tmp_path / "ints"), class_names=["zero", "one", "two"]))
    assert named.class_names == ["zero", "one", "two"] and named.eval["label"] == [2, 0, 1, 2]
    caplog.set_level(logging.WARNING)
    unnamed = load_pairs(DataArguments(train_dir=str(tmp_path / "ints")))
    assert unnamed.class_names == ["0", "1", "2"] and any("--class_names" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="--class_names gives 2 names but the 'label' labels go up to id 2"):
        load_pairs(DataArguments(train_dir=str(tmp_path / "ints"), class_names=["zero", "one"]))
    with pytest.raises(ValueError, match="is the caption column"):
        load_pairs(DataArguments(train_dir=str(tmp_path / "ints"), label_column="text"))


def test_webdataset_labels_from_cls_files_and_json(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for i in range(6):
            buffer = io.BytesIO()
            _image(i).save(buffer, format="PNG")
            files = {"png": buffer.getvalue(), "txt": f"a photo {i}".encode(), "cls": str(i % 3).encode(),
                     "json": json.dumps({"caption": f"a photo {i}", "species": ["cat", "dog"][i % 2]}).encode()}
            for extension, payload in files.items():
                add_file(tar, f"{i:05d}.{extension}", payload)
    by_cls = load_pairs(DataArguments(train_shards=str(shards), eval_shards=str(shards), label_column="cls",
                                      class_names=["a", "b", "c"]))
    assert by_cls.class_names == ["a", "b", "c"] and by_cls.eval["cls"] == [0, 1, 2, 0, 1, 2]
    by_json = load_pairs(DataArguments(train_shards=str(shards), eval_shards=str(shards), label_column="species"))
    assert by_json.class_names == ["cat", "dog"] and by_json.eval["species"] == [0, 1, 0, 1, 0, 1]
    assert DataArguments(train_shards=str(shards / "*.tar")).name == "shards"  # not '*.tar' on a model card
    assert DataArguments(train_shards=str(shards / "*.tar")).hub_dataset_ids == []


def test_no_label_column_gives_a_reason():
    data = load_pairs(DataArguments(dataset="emoji", max_train_samples=4, max_eval_samples=4)) \
        if os.path.exists(DEBIAN_SOURCES["emoji"][1]) else None
    if data is None:
        pytest.skip("Debian package fonts-noto-color-emoji not installed")
    assert data.label_column is None and "emoji has no class labels" in data.zero_shot_skipped
    reasons = evaluate.applicable_tasks(type("C", (), {"encoder": object(), "captioner": None})(), data, data.eval)
    assert "pass --label_column" in reasons["zero_shot"]


def test_sample_limits_limit_what_is_built():
    items = list(range(100))
    assert {k: len(v) for k, v in _seeded_split(items, 0.2, 0, {"train": 5, "test": 0}).items()} == {"train": 5}
    assert {k: len(v) for k, v in _seeded_split(items, 0.2, 0, {"train": None, "test": 3}).items()} == {"train": 80, "test": 3}
    assert _seeded_split(items, 0.2, 0, 7)["test"] == _seeded_split(items, 0.2, 0, {"test": 7, "train": 0})["test"]


@pytest.mark.skipif(not os.path.exists(DEBIAN_SOURCES["fashion_mnist"][1]),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_eval_limit_builds_only_that(tmp_path):
    args = DataArguments(dataset="fashion_mnist", max_eval_samples=12, dataset_cache_dir=str(tmp_path))
    data = load_pairs(args, noise_split="eval", splits=("eval",))
    assert data.train is None and len(data.eval) == 12 and data.class_names[0].startswith("t-shirt")
    built = [datasets.load_from_disk(str(path)) for path in tmp_path.iterdir() if path.is_dir()]
    assert len(built) == 1 and list(built[0]) == ["test"] and len(built[0]["test"]) == 12
    both = load_pairs(DataArguments(dataset="fashion_mnist", max_train_samples=20, max_eval_samples=12,
                                    dataset_cache_dir=str(tmp_path)))
    assert len(both.train) == 20 and both.eval["text"] == data.eval["text"]


def test_one_beam_setting_across_commands():
    defaults = {module.__name__: {f.name: f.default for f in __import__("dataclasses").fields(cls)}
                for module, cls in ((caption, caption.CaptionArguments), (evaluate, evaluate.EvaluateArguments),
                                    (audit, audit.AuditArguments))}
    assert {d["num_beams"] for d in defaults.values()} == {evaluate.DEFAULT_NUM_BEAMS}
    assert {d["max_new_tokens"] for d in defaults.values()} == {evaluate.DEFAULT_MAX_NEW_TOKENS}


def test_no_pin_memory_warning_on_cpu(tmp_path):
    import torch

    from nlip_testing import processor, single_thread, synthetic_pairs, tiny_model
    from trainers.trainer import NLIPTrainer

    args = NLIPTrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, num_train_epochs=2,
                                 per_device_train_batch_size=8, save_strategy="no", use_cpu=True)
    assert args.dataloader_pin_memory is False
    if torch.cuda.is_available():
        assert NLIPTrainingArguments(output_dir=str(tmp_path), report_to="none").dataloader_pin_memory is True
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=synthetic_pairs(16), processing_class=processor())
    with single_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]
