"""timm image towers (`TimmWrapperModel`): config, CNN feature maps as image tokens, pooling, save / load, remote code,
the zero-shot pipeline, `from_vision_text_pretrained` on a timm folder, and the processor from timm's pretrained_cfg."""

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
from transformers import AutoModel, AutoProcessor, CLIPTextModel, TimmWrapperConfig, TimmWrapperModel, pipeline
from transformers.image_utils import PILImageResampling

from modeling_nlip import (
    NLIPConfig,
    NLIPForCaptioning,
    NLIPForPreTraining,
    NLIPModel,
    NLIPProcessor,
    image_processor_from_timm_config,
)
from modeling_nlip.modeling_nlip import image_tokens, tower_hidden_size
from nlip_testing import tiny_decoder_config, tiny_text_config, tiny_tokenizer

timm = pytest.importorskip("timm")

# timm's own tiny test architectures (a few hundred thousand parameters): a CNN and a ViT.
CNN, VIT = "test_efficientnet", "test_vit"
PRETRAINED_CFG = {
    "input_size": [3, 64, 64], "interpolation": "bilinear", "crop_pct": 0.8, "crop_mode": "center",
    "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
}


def timm_vision_config(architecture: str = CNN, **extra) -> dict:
    return TimmWrapperConfig.from_dict({"architecture": architecture, "num_classes": 0, **extra}).to_dict()


def timm_nlip_config(architecture: str = CNN, decoder: bool = False, **overrides) -> NLIPConfig:
    tokenizer = tiny_tokenizer()
    kwargs = dict(
        vision_config=timm_vision_config(architecture, pretrained_cfg=PRETRAINED_CFG),
        text_config=tiny_text_config(tokenizer),
        projection_dim=16,
        decoder_config=tiny_decoder_config(tokenizer) if decoder else None,
    )
    return NLIPConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee()), Image.fromarray(skdata.astronaut())]


@pytest.fixture(scope="module")
def processor():
    return NLIPProcessor(image_processor=image_processor_from_timm_config(PRETRAINED_CFG), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def inputs(processor, images):
    return processor(images=images, text=["a photo of a cat", "a cup of coffee", "an astronaut"], padding=True,
                     return_tensors="pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor, inputs):
    torch.manual_seed(0)
    model = NLIPModel(timm_nlip_config()).eval()
    path = tmp_path_factory.mktemp("nlip-timm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    with torch.no_grad():
        outputs = model(**inputs)
    return path, model, outputs


def test_config_accepts_a_timm_wrapper_vision_config():
    config = timm_nlip_config()
    assert config.vision_config.model_type == "timm_wrapper"
    assert config.vision_config.architecture == CNN
    reloaded = NLIPConfig.from_dict(config.to_dict())
    assert reloaded.vision_config.architecture == CNN
    assert reloaded.vision_config.pretrained_cfg["crop_pct"] == 0.8


def test_image_tokens_flatten_a_feature_map_row_major():
    feature_map = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    tokens = image_tokens(feature_map)
    assert tokens.shape == (2, 8, 3)
    # token (h, w) of image b holds the C channels at that position
    torch.testing.assert_close(tokens[1, 1 * 4 + 2], feature_map[1, :, 1, 2])
    sequence = torch.randn(2, 5, 7)
    assert image_tokens(sequence) is sequence


def test_cnn_tower_pools_its_feature_map(inputs):
    torch.manual_seed(0)
    model = NLIPModel(timm_nlip_config()).eval()
    timm_model = model.vision_model.timm_model
    assert model.vision_embed_dim == tower_hidden_size(model.vision_model) == timm_model.num_features == 256
    assert model.visual_projection.in_features == 256
    with torch.no_grad():
        outputs = model(**inputs)
        feature_map = timm_model.forward_features(inputs["pixel_values"])
    assert outputs.vision_model_output.last_hidden_state.shape == (3, 256, 2, 2)
    # "pooler" is timm's own head pooling (global average for this architecture)
    expected = model.visual_projection(feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(outputs.vision_model_output.pooler_output, expected, rtol=1e-5, atol=1e-5)
    assert outputs.image_embeds.shape == (3, 16)
    torch.testing.assert_close(outputs.image_embeds.norm(dim=-1), torch.ones(3))

    mean_model = NLIPModel(timm_nlip_config(vision_pooling="mean")).eval()
    mean_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mean_model(**inputs).image_embeds, outputs.image_embeds, rtol=1e-5, atol=1e-5)


def test_cnn_tower_rejects_cls_pooling(inputs):
    model = NLIPModel(timm_nlip_config(vision_pooling="cls")).eval()
    with pytest.raises(ValueError, match="A CNN image tower has no class token"):
        model.get_image_features(pixel_values=inputs["pixel_values"])


def test_timm_vit_tower_with_cls_pooling(inputs):
    torch.manual_seed(0)
    model = NLIPModel(timm_nlip_config(VIT, vision_pooling="cls")).eval()
    assert model.vision_embed_dim == 64
    with torch.no_grad():
        outputs = model(**inputs)
    tokens = outputs.vision_model_output.last_hidden_state
    assert tokens.dim() == 3 and tokens.shape[-1] == 64
    torch.testing.assert_close(outputs.vision_model_output.pooler_output, model.visual_projection(tokens[:, 0]))


def test_save_and_from_pretrained_round_trip(checkpoint, inputs):
    path, _, outputs = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "timm_wrapper"
    assert config["vision_config"]["architecture"] == CNN
    for model in (NLIPModel.from_pretrained(path), AutoModel.from_pretrained(path)):
        assert isinstance(model, NLIPModel) and isinstance(model.vision_model, TimmWrapperModel)
        with torch.no_grad():
            reloaded = model.eval()(**inputs)
        torch.testing.assert_close(reloaded.image_embeds, outputs.image_embeds, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.text_embeds, outputs.text_embeds, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(path)
    assert list(processor.image_processor.image_mean) == PRETRAINED_CFG["mean"]
    reloaded_pixels = processor(images=[Image.fromarray(skdata.chelsea())], return_tensors="pt")["pixel_values"]
    # With torchvision installed the reloaded processor is the torchvision-backed CLIPImageProcessor: its resize may
    # round a pixel one 8-bit level differently from PIL's.
    difference = (reloaded_pixels - inputs["pixel_values"][:1]).abs()
    assert difference.max() < 0.05 and difference.mean() < 1e-4


def test_remote_code_loads_a_timm_tower_without_the_package(checkpoint, inputs, tmp_path):
    path, _, outputs = checkpoint
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None
        sys.modules["trainers"] = None
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model.vision_model).__name__ == "TimmWrapperModel"
        with torch.no_grad():
            out = model(**torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save(out.image_embeds, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Another process may use another thread count and so another summation order: float32 rounding only.
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), outputs.image_embeds, rtol=1e-5, atol=1e-6)


def test_zero_shot_pipeline_with_a_timm_tower(checkpoint, images, processor):
    path, model, _ = checkpoint
    labels = ["cat", "coffee", "astronaut"]
    results = pipeline("zero-shot-image-classification", model=str(path))(images[:1], candidate_labels=labels)
    inputs = processor(images=images[:1], text=[f"This is a photo of {label}." for label in labels], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in results[0]}
    np.testing.assert_allclose([by_label[label] for label in labels], probs.numpy(), atol=1e-5)


def test_from_vision_text_pretrained_with_a_timm_folder(tmp_path, images):
    torch.manual_seed(0)
    timm_config = TimmWrapperConfig.from_dict({"architecture": CNN, "num_classes": 0, "pretrained_cfg": PRETRAINED_CFG})
    tower = TimmWrapperModel(timm_config).eval()
    tower.save_pretrained(tmp_path / "vision")
    tokenizer = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextModel.config_class(**{k: v for k, v in tiny_text_config(tokenizer).items() if k != "model_type"}))
    text.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")

    model = NLIPModel.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"), projection_dim=16)
    assert isinstance(model.vision_model, TimmWrapperModel) and model.vision_embed_dim == 256
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value, rtol=0, atol=0)

    processor = NLIPProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"))
    image_processor = processor.image_processor
    assert image_processor.size == {"shortest_edge": 80}  # floor(64 / 0.8)
    assert image_processor.crop_size == {"height": 64, "width": 64}
    assert image_processor.resample == PILImageResampling.BILINEAR
    assert list(image_processor.image_mean) == PRETRAINED_CFG["mean"]
    assert list(image_processor.image_std) == PRETRAINED_CFG["std"]
    batch = processor(images=images[:2], text=["a cat", "a cup"], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model.eval()(**batch)
        expected = tower(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(outputs.vision_model_output.pooler_output, model.visual_projection(expected))


@pytest.mark.parametrize(
    "cfg",
    [
        {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        {"input_size": (3, 96, 96), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
         "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
        {"input_size": (3, 128, 128), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    ],
)
def test_image_processor_reproduces_timm_eval_transform(cfg):
    """The same pixels as `timm.data.create_transform` (timm's own eval preprocessing) on a real photo."""
    image = Image.fromarray(skdata.chelsea())
    transform = timm.data.create_transform(**timm.data.resolve_data_config(cfg))
    expected = transform(image).unsqueeze(0)
    got = image_processor_from_timm_config(cfg)(images=[image], return_tensors="pt")["pixel_values"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"input_size": (3, 64, 64), "crop_mode": "border"}, "Unsupported timm crop_mode 'border'"),
        ({"input_size": (3, 64, 64), "interpolation": "area"}, "Unsupported timm interpolation 'area'"),
        ({"input_size": (3, 64, 96)}, "non-square input_size 64x96"),
        ({"mean": (0.5,)}, "at least `input_size`"),
    ],
)
def test_image_processor_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        image_processor_from_timm_config(cfg)


def test_captioning_and_pretraining_cross_attend_to_the_feature_map(inputs, tmp_path):
    torch.manual_seed(0)
    config = timm_nlip_config(decoder=True)
    model = NLIPForPreTraining(config)
    outputs = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    attention_mask=inputs["attention_mask"])
    assert torch.isfinite(outputs.loss) and outputs.lm_loss is not None
    outputs.loss.backward()
    assert model.vision_model.timm_model.conv_stem.weight.grad.abs().sum() > 0
    assert model.enc_to_dec_proj.in_features == 256 and model.enc_to_dec_proj.out_features == 32
    model.eval()  # batch norm: batch statistics in train mode, running ones in eval mode
    with torch.no_grad():
        feature_map = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        tokens = model.image_hidden_states(feature_map)
    assert tokens.shape == (3, 4, 32)  # 2x2 feature map -> 4 tokens of the decoder's width
    torch.testing.assert_close(tokens, model.enc_to_dec_proj(image_tokens(feature_map)))

    model.save_pretrained(tmp_path)
    captioner = NLIPForCaptioning.from_pretrained(tmp_path).eval()
    sequences = captioner.generate(pixel_values=inputs["pixel_values"], max_new_tokens=4)
    assert sequences.shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(
            captioner.image_hidden_states(captioner.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state),
            tokens,
        )


def test_masked_image_reconstruction_needs_a_patch_tower():
    with pytest.raises(ValueError, match="needs a patch-based image tower"):
        NLIPForPreTraining(timm_nlip_config(decoder=True, ir_weight=1.0))
