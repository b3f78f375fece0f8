"""Model cards: metadata and numbers from the training summary, absent sections left out, round trip through ModelCard."""

import json
import re

import pytest
from huggingface_hub import ModelCard

from trainers.objectives import method_names
from trainers.model_card import TRAINING_SUMMARY_NAME, TrainingSummary, render_model_card, write_model_card

FULL = dict(
    model_name="nlip-tiny-fmnist",
    method="nlip+srcl",
    base_model="openai/clip-vit-base-patch32",
    noise_settings={"noise_rate": 0.4, "noise_estimation": "online", "unset_option": None},
    noise_statistics={"mean_noise_probability": 0.3817, "estimated_noisy_fraction": 0.4125, "roc_auc": 0.9342,
                      "gmm_means_gap": 0.25},
    datasets=["fashion_mnist", "tuxpaint-stamps"],
    evaluation_results={"fashion_mnist test": {"top1": 71.25, "top5": 97.5},
                        "tuxpaint-stamps": {"i2t_R@1": 12.5, "rsum": float("nan")}},
    training_hyperparameters={"learning_rate": 2e-7, "num_train_epochs": 5, "bf16": False},
)


def _section(content: str, heading: str) -> str:
    """The text under a `## heading`, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", content, re.S | re.M)
    assert match, f"no section {heading!r}"
    return match.group(1)


def test_full_card_metadata_and_numbers():
    card = render_model_card(repo_id="me/nlip-tiny-fmnist", **FULL)
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == "zero-shot-image-classification" and data.base_model == "openai/clip-vit-base-patch32"
    assert data.tags == ["nlip", "noisy-correspondence", "zero-shot-image-classification", "srcl", "custom_code"]
    assert data.datasets == ["fashion_mnist", "tuxpaint-stamps"]
    results = {(r.task_type, r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("zero-shot-image-classification", "fashion_mnist test", "top1"): 71.25,
                       ("zero-shot-image-classification", "fashion_mnist test", "top5"): 97.5,
                       ("image-text-retrieval", "tuxpaint-stamps", "i2t_R@1"): 12.5}  # NaN rsum left out

    text = card.content
    assert text.count("# nlip-tiny-fmnist\n") == 1 and "fine-tuned from `openai/clip-vit-base-patch32`" in text
    method = _section(text, "Training method")
    assert "Huang et al., AAAI 2023" in method and "Jiang et al., ACL 2023" in method and "Zhang et al." not in method
    assert "SRCL's weights re-weight the negatives" in method and "NPC" not in method
    noise = _section(text, "Noise")
    assert "| `noise_rate` | 0.4 |" in noise and "| `noise_estimation` | online |" in noise and "unset_option" not in noise
    assert "| Mean noise probability `ε` | 0.3817 |" in noise and "| Estimated noisy fraction (`ε > 0.5`) | 0.4125 |" in noise
    assert "| Noise-detection ROC-AUC vs. ground truth | 0.9342 |" in noise and "| `gmm_means_gap` | 0.25 |" in noise
    evaluation = _section(text, "Evaluation results")
    assert "| fashion_mnist test | `top1` | 71.25 |" in evaluation and "| tuxpaint-stamps | `i2t_R@1` | 12.5 |" in evaluation
    assert "rsum" not in evaluation and "| nan |" not in text.lower()
    assert "| `learning_rate` | 2e-07 |" in _section(text, "Training hyperparameters")
    loading = _section(text, "How to load")
    assert 'import modeling_nlip' in loading and 'AutoModel.from_pretrained("me/nlip-tiny-fmnist")' in loading
    assert 'AutoModel.from_pretrained("me/nlip-tiny-fmnist", trust_remote_code=True)' in loading
    assert 'pipeline("zero-shot-image-classification", model="me/nlip-tiny-fmnist", trust_remote_code=True)' in loading
    assert "NLIP paper's exact equations are not public" in _section(text, "Limitations")
    assert "NLIP: Noise-Robust Language-Image Pre-training" in _section(text, "References")


def test_minimal_card_omits_what_is_unknown():
    card = render_model_card(model_name="bare-model")
    text = card.content
    for heading in ("Noise", "Datasets", "Evaluation results", "Training hyperparameters", "References"):
        assert f"## {heading}\n" not in text
    assert "The training method was not recorded" in _section(text, "Training method")
    assert "fine-tuned from" not in text and "memorization effect" not in text
    assert card.data.eval_results is None and card.data.base_model is None and card.data.datasets is None


def test_captioner_card_and_npc_method():
    text = render_model_card(model_name="cap", method="npc", pipeline_tag="image-to-text").content
    assert "captioning model" in text and "AutoModelForImageTextToText.from_pretrained" in text
    assert "model.generate(" in text and "zero-shot-image-classification" not in text
    assert "Negative Pre-aware for Noisy Cross-modal Matching" in text and "memorization effect" in text
    assert "The components are combined" not in text and "NLIP paper's exact equations" not in text


def test_write_and_round_trip_through_model_card_load(tmp_path):
    path = write_model_card(tmp_path, repo_id="me/nlip-tiny-fmnist", **FULL)
    assert path == tmp_path / "README.md"
    loaded = ModelCard.load(path)
    original = render_model_card(repo_id="me/nlip-tiny-fmnist", **FULL)
    assert loaded.data.to_dict() == original.data.to_dict()
    assert loaded.text == original.text and str(loaded) == path.read_text()


def test_summary_json_round_trip_and_errors(tmp_path):
    summary = TrainingSummary(**FULL)
    path = summary.save(tmp_path)
    assert path.name == TRAINING_SUMMARY_NAME and json.loads(path.read_text())["method"] == "nlip+srcl"
    loaded = TrainingSummary.load(tmp_path)
    assert loaded.noise_statistics == FULL["noise_statistics"] and loaded.datasets == FULL["datasets"]

    path.write_text(json.dumps({"method": "nlip", "epochs": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        TrainingSummary.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        TrainingSummary.load(path)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(method="nlip+foo"), ValueError, r"has unknown name\(s\) \['foo'\]; valid methods are 'clip', or one or"),
        (dict(method="clip+srcl"), ValueError, "'clip' is the plain contrastive loss and cannot be combined"),
        (dict(method="srcl+srcl"), ValueError, "names a method twice"),
        (dict(pipeline_tag="text-generation"), ValueError, "pipeline_tag='text-generation': expected one of"),
        (dict(datasets="fashion_mnist"), TypeError, "datasets must be a list of non-empty strings"),
        (dict(noise_statistics={"roc_auc": "high"}), TypeError, r"noise_statistics\['roc_auc'\] must be a number"),
        (dict(evaluation_results={"fmnist": 71.0}), TypeError, r"evaluation_results\['fmnist'\] must be a dict"),
        (dict(training_hyperparameters=[1, 2]), TypeError, "training_hyperparameters must be a dict"),
    ],
)
def test_bad_summary_values_raise_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        render_model_card(**{**FULL, **overrides})


def test_method_components():
    assert method_names("NLIP + npc") == method_names("npc+nlip") == ["nlip", "npc"]
    with pytest.raises(ValueError, match="A model card needs a model_name"):
        TrainingSummary(method="nlip").to_model_card()


def test_card_says_what_the_checkpoint_is_and_shows_a_visible_placeholder():
    towers = {"vision": "`clip_vision_model` (2 layers, 32 hidden size, 32 px images, patch 8)",
              "text": "`bert` (6 layers, 384 hidden size)", "decoder": "`bert` (2 layers, 32 hidden size)"}
    card = render_model_card(model_name="out", method="nlip", architecture="NLIPForPreTraining", towers=towers,
                             dataset_description="the imagefolder `my_pairs` (image files with captions)")
    content = str(card)
    title = re.search(r"^# (.+)$", content, re.M).group(1)
    assert title == "NLIP pre-training checkpoint trained with `nlip`"  # not the bare output folder name
    assert "`NLIPForPreTraining`" in content and "dual encoder plus a concept-conditioned captioning decoder" in content
    assert "It was trained on the imagefolder `my_pairs`" in content and "*.tar" not in content
    for description in towers.values():
        assert description in content
    load = _section(content, "How to load")
    assert 'from_pretrained("<your-username>/<repo-name>"' in load and "is a placeholder" in load
    assert 'from_pretrained("out"' not in content
    assert "AutoModelForImageTextToText" in load  # the captioning head of a pre-training checkpoint
    pushed = str(render_model_card(repo_id="me/shapes-nlip", model_name="out", method="nlip",
                                   architecture="NLIPForPreTraining"))
    assert re.search(r"^# shapes-nlip$", pushed, re.M) and 'from_pretrained("me/shapes-nlip"' in pushed
    assert "is a placeholder" not in pushed and "<your-username>" not in pushed
    dual = str(render_model_card(model_name="out", architecture="NLIPModel"))
    assert "is a dual encoder" in dual and "captioning decoder" not in dual
    with pytest.raises(ValueError, match="architecture='BertModel'"):
        TrainingSummary(model_name="x", architecture="BertModel")


def test_describe_towers_of_a_config():
    from nlip_testing import tiny_decoder_config, tiny_nlip_config
    from trainers.model_card import describe_towers

    towers = describe_towers(tiny_nlip_config(decoder_config=tiny_decoder_config()))
    assert set(towers) == {"vision", "text", "decoder", "projection"}
    assert towers["vision"].startswith("`clip_vision_model` (") and "px images" in towers["vision"]
