"""NLIPForPreTraining: the objective's terms, the contrastive hooks, masked-image reconstruction, and its checkpoint
loading into NLIPModel / NLIPForCaptioning (in process and through remote code)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.functional import cross_entropy, normalize
from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining

from modeling_nlip import NLIPForCaptioning, NLIPForPreTraining, NLIPModel, NLIPProcessor
from nlip_testing import tiny_decoder_config, tiny_image_processor, tiny_nlip_config, tiny_tokenizer
from trainers.losses import contrastive_loss, nitc_loss

CAPTIONS = ["a photo of a cat", "a dog on the grass", "a red car", "a tree"]
IR = dict(ir_decoder_hidden_size=16, ir_decoder_num_hidden_layers=1, ir_decoder_num_attention_heads=2)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_words=[",", "grass"])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer), itc_weight=2.0, lm_weight=0.5,
                              ir_weight=0.25, mask_ratio=0.75, **IR)
    return NLIPForPreTraining(config).eval()


@pytest.fixture(scope="module")
def inputs(tokenizer):
    torch.manual_seed(1)
    encoded = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    noise = torch.rand(4, 16)
    return {**encoded, "pixel_values": torch.randn(4, 3, 32, 32), "noise": noise}


@pytest.fixture(scope="module")
def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def test_loss_is_the_weighted_sum_of_its_terms(model, inputs, outputs):
    torch.testing.assert_close(outputs.loss, 2.0 * outputs.contrastive_loss + 0.5 * outputs.lm_loss + 0.25 * outputs.ir_loss)
    # Contrastive: CLIP's symmetric InfoNCE on the returned embeddings; per sample, trainers.losses' CE_i.
    logits = outputs.logits_per_image
    torch.testing.assert_close(logits, outputs.image_embeds @ outputs.text_embeds.T * model.logit_scale.exp())
    targets = torch.arange(4)
    torch.testing.assert_close(outputs.contrastive_loss, (cross_entropy(logits, targets) + cross_entropy(logits.T, targets)) / 2)
    expected = contrastive_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp(), reduction="none")
    torch.testing.assert_close(outputs.contrastive_per_sample_loss, expected)
    # LM: the captions themselves (padding ignored), as NLIPForCaptioning scores them with the same weights.
    captioner = model.captioner()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        lm = captioner(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"], labels=labels)
    torch.testing.assert_close(outputs.lm_loss, lm.loss)
    torch.testing.assert_close(outputs.lm_per_sample_loss, lm.per_sample_loss)
    torch.testing.assert_close(outputs.lm_logits, lm.logits)


def test_masked_image_reconstruction(model, inputs, outputs):
    mask = outputs.ir_mask
    assert mask.shape == (4, 16) and mask.sum(1).tolist() == [12.0] * 4  # 75 % of 16 patches
    kept = inputs["noise"].argsort(1)[:, :4]
    assert all(mask[i, kept[i]].sum() == 0 for i in range(4))  # the lowest-noise patches stay visible
    # MSE over the masked patches of per-patch normalised pixels.
    target = model.ir_decoder.patchify(inputs["pixel_values"])
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((outputs.ir_logits - target) ** 2).mean(-1)
    torch.testing.assert_close(outputs.ir_loss, (per_patch * mask).sum() / mask.sum())
    with torch.no_grad():
        again = model(**inputs)
        other = model(**{**inputs, "noise": torch.rand(4, 16)})
    torch.testing.assert_close(again.ir_loss, outputs.ir_loss)
    assert not torch.equal(other.ir_mask, outputs.ir_mask)
    with pytest.raises(ValueError, match="`noise` must have shape \\(4, 16\\)"):
        model(**{**inputs, "noise": torch.rand(4, 15)})


def test_reconstruction_decoder_only_with_ir_weight(tokenizer, inputs):
    model = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))).eval()
    assert model.ir_decoder is None and not any(k.startswith("ir_decoder.") for k in model.state_dict())
    with torch.no_grad():
        out = model(**inputs)
    assert out.ir_loss is None and out.ir_logits is None
    torch.testing.assert_close(out.loss, out.contrastive_loss + out.lm_loss)
    with pytest.raises(ValueError, match="patch-based image tower"):
        NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer), ir_weight=1.0,
                                            vision_config=dict(model_type="clip_vision_model", image_size=30, patch_size=8,
                                                               hidden_size=32, num_hidden_layers=1, num_attention_heads=4)))


def test_lm_term_is_skipped_with_zero_weight(tokenizer, inputs):
    model = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer), lm_weight=0.0)).eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.lm_loss is None and out.lm_logits is None
    torch.testing.assert_close(out.loss, out.contrastive_loss)


def test_caller_brings_the_contrastive_term(model, inputs, outputs, tokenizer):
    """`return_contrastive_loss=False` leaves the contrastive term to the caller (a noise-robust trainer): `loss` holds
    only the captioning term, and `weighted_loss` composes the full objective from the caller's term."""
    synthetic = tokenizer(["a cat", "a dog", "a car", "a tree"], padding=True, return_tensors="pt")
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0])
    with torch.no_grad():
        out = model(**inputs, return_contrastive_loss=False, synthetic_input_ids=synthetic["input_ids"],
                    synthetic_attention_mask=synthetic["attention_mask"])
        reference = model(**inputs)
        synthetic_embeds = normalize(model.get_text_features(**synthetic).pooler_output, dim=-1)
    assert out.contrastive_loss is None
    torch.testing.assert_close(out.image_embeds, outputs.image_embeds)
    torch.testing.assert_close(out.text_embeds, outputs.text_embeds)
    torch.testing.assert_close(out.synthetic_text_embeds, synthetic_embeds)
    torch.testing.assert_close(out.loss, model.weighted_loss(lm_loss=out.lm_loss, ir_loss=out.ir_loss))
    # nlip's NITC loss plugs in as is: zero noise is plain InfoNCE, and the objective is the model's own.
    nitc = nitc_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), torch.zeros(4))
    torch.testing.assert_close(nitc, reference.contrastive_loss)
    full = model.weighted_loss(contrastive_loss=nitc, lm_loss=out.lm_loss, ir_loss=out.ir_loss)
    torch.testing.assert_close(full, reference.loss)
    # Default with weights and synthetic captions: mean_i w_i · ½(CE(v_i, t_i) + CE(v_i, t̂_i)).
    with torch.no_grad():
        default = model(**inputs, sample_weights=weights, synthetic_input_ids=synthetic["input_ids"],
                        synthetic_attention_mask=synthetic["attention_mask"])
    scale = model.logit_scale.exp()
    real = contrastive_loss(outputs.image_embeds, outputs.text_embeds, scale, reduction="none")
    fake = contrastive_loss(outputs.image_embeds, synthetic_embeds, scale, reduction="none")
    torch.testing.assert_close(default.contrastive_loss, (weights * (real + fake) / 2).mean())


def test_lm_sample_weights_and_concepts(model, inputs, outputs):
    with torch.no_grad():
        weighted = model(**inputs, lm_sample_weights=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    counts = inputs["attention_mask"].sum(1) - 1
    per_sample = outputs.lm_per_sample_loss
    torch.testing.assert_close(weighted.lm_loss, (counts * per_sample * torch.tensor([1.0, 0, 1, 0])).sum() / counts.sum())
    concept_ids, concept_mask = torch.tensor([[0, 40], [41, 42], [0, 0], [43, 44]]), torch.tensor([[0, 1], [1, 1], [0, 0], [1, 1]])
    with torch.no_grad():
        prefixed = model(**inputs, concept_input_ids=concept_ids, concept_attention_mask=concept_mask)
    assert prefixed.lm_logits.shape[1] == 2 + inputs["input_ids"].shape[1]
    torch.testing.assert_close(prefixed.lm_per_sample_loss[2], per_sample[2], rtol=1e-5, atol=1e-6)  # empty prefix


def test_checkpoint_loads_into_every_head_with_identical_weights(model, inputs, outputs, tmp_path):
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_nlip.NLIPConfig",
        "AutoModel": "modeling_nlip.NLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_nlip.NLIPModel",
        "AutoModelForImageTextToText": "modeling_nlip_captioning.NLIPForCaptioning",
        "AutoModelForPreTraining": "modeling_nlip_pretraining.NLIPForPreTraining",
    }
    saved = model.state_dict()
    for auto_class, cls in ((AutoModel, NLIPModel), (AutoModelForImageTextToText, NLIPForCaptioning),
                            (AutoModelForPreTraining, NLIPForPreTraining)):
        head, info = auto_class.from_pretrained(tmp_path, output_loading_info=True)
        assert type(head) is cls
        assert not info["missing_keys"] and not info["mismatched_keys"], (cls.__name__, info)
        for name, tensor in head.state_dict().items():
            assert torch.equal(tensor, saved[name]), f"{cls.__name__}.{name} differs from the pre-training weights"
        if cls is NLIPForCaptioning:  # the heads' own outputs agree too
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            with torch.no_grad():
                lm = head.eval()(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                 attention_mask=inputs["attention_mask"], labels=labels)
            torch.testing.assert_close(lm.loss, outputs.lm_loss, rtol=0, atol=0)
            view = model.captioner()
            pixel_values = inputs["pixel_values"]
            assert head.generate(pixel_values=pixel_values, max_new_tokens=5).tolist() == view.generate(
                pixel_values=pixel_values, max_new_tokens=5).tolist()
        if cls is NLIPModel:
            with torch.no_grad():
                dual = head.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=inputs["pixel_values"])
            torch.testing.assert_close(dual.image_embeds, outputs.image_embeds, rtol=0, atol=0)
            torch.testing.assert_close(dual.logits_per_image, outputs.logits_per_image, rtol=0, atol=0)


def test_captioner_view_shares_parameters(model):
    view = model.captioner()
    assert view.vision_model is model.vision_model and view.text_decoder is model.text_decoder
    assert view.visual_projection is model.visual_projection and view.config is model.config
    assert view.device == model.device and not view.training


def test_pretraining_needs_both_modalities(model, inputs):
    with pytest.raises(ValueError, match="needs both `input_ids` \\(captions\\) and `pixel_values`"):
        model(input_ids=inputs["input_ids"])


def test_remote_code_loads_every_head_without_the_package(model, inputs, outputs, tmp_path, tokenizer):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer).save_pretrained(path)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    expected_caption = model.captioner().generate(pixel_values=inputs["pixel_values"], max_new_tokens=5)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None  # the package is not importable here
        sys.modules["trainers"] = None
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        kwargs = dict(trust_remote_code=True)
        pretraining = AutoModelForPreTraining.from_pretrained({str(path)!r}, **kwargs).eval()
        dual = AutoModel.from_pretrained({str(path)!r}, **kwargs).eval()
        captioner = AutoModelForImageTextToText.from_pretrained({str(path)!r}, **kwargs).eval()
        names = [type(m).__name__ for m in (pretraining, dual, captioner)]
        assert names == ["NLIPForPreTraining", "NLIPModel", "NLIPForCaptioning"], names
        assert all(type(m).__module__.startswith("transformers_modules") for m in (pretraining, dual, captioner))
        with torch.no_grad():
            loss = pretraining(**inputs).loss
            image_embeds = dual(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs["pixel_values"]).image_embeds
        caption = captioner.generate(pixel_values=inputs["pixel_values"], max_new_tokens=5)
        torch.save({{"loss": loss, "image_embeds": image_embeds, "caption": caption}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    # Another process may use another thread count and so another summation order: float32 rounding only.
    torch.testing.assert_close(remote["loss"], outputs.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(remote["image_embeds"], outputs.image_embeds, rtol=1e-6, atol=1e-7)
    assert remote["caption"].tolist() == expected_caption.tolist()
