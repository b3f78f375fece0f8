"""Locking towers LiT-style: `freeze_towers`, eval mode kept through `model.train()`, `unfreeze_last_n`, the trainer
and CLI flags."""

import pytest
import torch
from transformers import TimmWrapperConfig

from modeling_nlip import NLIPConfig, NLIPForPreTraining, NLIPModel
from nlip_testing import (
    processor,
    single_thread,
    synthetic_pairs,
    tiny_decoder_config,
    tiny_model,
    tiny_nlip_config,
    tiny_text_config,
    tiny_tokenizer,
    training_args,
)
from trainers.trainer import NLIPTrainer

pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def timm_model(architecture: str = "test_efficientnet") -> NLIPModel:
    torch.manual_seed(0)
    vision = TimmWrapperConfig.from_dict({"architecture": architecture, "num_classes": 0}).to_dict()
    return NLIPModel(NLIPConfig(vision_config=vision, text_config=tiny_text_config(), projection_dim=16))


def trainable(module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def test_freeze_vision_tower_locks_it_and_keeps_it_in_eval_mode():
    model = tiny_model()
    locked = model.freeze_towers(vision=True)
    assert locked == [f"vision_model.{name}" for name, _ in model.vision_model.named_parameters()]
    assert trainable(model.vision_model) == []
    assert len(trainable(model.text_model)) == len(list(model.text_model.parameters()))
    assert set(trainable(model)) >= {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    assert model.frozen_tower_names() == ["vision_model"]
    model.train()
    assert model.training and model.text_model.training and model.visual_projection.training
    assert not model.vision_model.training
    assert not any(m.training for m in model.vision_model.modules())
    model.eval()
    model.train(True)
    assert not model.vision_model.training


def test_freeze_both_towers_trains_only_the_heads():
    model = tiny_model()
    model.freeze_towers(vision=True, text=True)
    assert sorted(trainable(model)) == ["logit_scale", "text_projection.weight", "visual_projection.weight"]
    assert model.frozen_tower_names() == ["vision_model", "text_model"]


def test_unfreeze_last_n_on_transformer_towers():
    model = tiny_model()
    model.freeze_towers(vision=True, text=True, unfreeze_last_n=1)
    vision = trainable(model.vision_model)
    assert vision and all(n.startswith(("encoder.layers.1.", "post_layernorm.")) for n in vision)
    assert "post_layernorm.weight" in vision
    text = trainable(model.text_model)
    assert text and all(n.startswith(("encoder.layers.1.", "final_layer_norm.")) for n in text)
    assert model.frozen_tower_names() == []
    model.train()
    layers = model.vision_model.encoder.layers
    assert layers[1].training and not layers[0].training
    assert not model.vision_model.embeddings.training


def test_unfreeze_last_n_on_a_timm_cnn_unlocks_its_last_stage_and_head():
    model = timm_model()
    model.freeze_towers(vision=True, unfreeze_last_n=1)
    names = trainable(model.vision_model)
    last_stage = len(model.vision_model.timm_model.blocks) - 1
    assert names and all(n.startswith((f"timm_model.blocks.{last_stage}.", "timm_model.conv_head.", "timm_model.bn2."))
                         for n in names)
    assert "timm_model.conv_head.weight" in names and "timm_model.bn2.weight" in names
    model.train()
    assert not model.vision_model.timm_model.conv_stem.training and not model.vision_model.timm_model.bn1.training
    assert model.vision_model.timm_model.blocks[last_stage].training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vision=True, unfreeze_last_n=3), r"`unfreeze_last_n`=3 exceeds the 2 blocks of the vision_model tower"),
        (dict(vision=True, unfreeze_last_n=-1), "must be a non-negative integer"),
    ],
)
def test_freeze_towers_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().freeze_towers(**kwargs)


def test_frozen_batch_norm_statistics_do_not_move_in_training():
    model = timm_model()
    model.freeze_towers(vision=True)
    bn = model.vision_model.timm_model.bn1
    before = bn.running_mean.clone()
    model.train()
    tokenizer = tiny_tokenizer()
    batch = tokenizer(["a cat", "a dog"], padding=True, return_tensors="pt")
    model(pixel_values=torch.randn(2, 3, 64, 64) * 3 + 1, return_loss=True, **batch).loss.backward()
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    assert model.vision_model.timm_model.conv_stem.weight.grad is None
    assert model.visual_projection.weight.grad is not None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(unfreeze_last_n=1), "no tower is locked"),
        (dict(freeze_vision_tower=True, frozen_feature_cache="gpu"), "`frozen_feature_cache` must be one of"),
        (dict(feature_cache_dir="x"), "only used with frozen_feature_cache='disk'"),
        (dict(freeze_vision_tower=True, unfreeze_last_n=-2), "`unfreeze_last_n` must be an integer >= 0"),
    ],
)
def test_training_arguments_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, **overrides)


def test_disk_cache_dir_defaults_into_output_dir(tmp_path):
    args = training_args(tmp_path, freeze_vision_tower=True, frozen_feature_cache="disk")
    assert args.feature_cache_dir == str(tmp_path / "feature_cache")


def test_trainer_trains_only_unlocked_parameters(tmp_path):
    model = tiny_model()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = []
    model.vision_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    args = training_args(tmp_path, num_train_epochs=2, freeze_vision_tower=True, frozen_feature_cache="none",
                         per_device_train_batch_size=16)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=synthetic_pairs(48), processing_class=processor())
    trainer.train()
    assert modes and not any(modes)  # the locked tower ran in eval mode at every training step
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name.startswith("vision_model."):
            torch.testing.assert_close(p, start[name], rtol=0, atol=0)
    assert not torch.equal(model.visual_projection.weight, start["visual_projection.weight"])
    assert trainer.training_summary().training_hyperparameters["locked_towers"] == "vision (LiT-style)"
    assert not torch.equal(model.text_model.encoder.layers[0].mlp.fc1.weight,
                           start["text_model.encoder.layers.0.mlp.fc1.weight"])


def test_trainer_rejects_locking_a_model_without_freeze_towers(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, patch_size=8),
                                text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=99), projection_dim=16))
    with pytest.raises(TypeError, match="need an NLIP model \\(with `freeze_towers`\\); got CLIPModel"):
        NLIPTrainer(model=clip, args=training_args(tmp_path, freeze_vision_tower=True),
                    train_dataset=synthetic_pairs(8), processing_class=processor())


def test_pretraining_model_locks_towers_without_a_cache(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer)))
    args = training_args(tmp_path, freeze_vision_tower=True, freeze_text_tower=True, max_steps=1)
    with caplog.at_level("INFO", logger="trainers.feature_cache"):
        trainer = NLIPTrainer(model=model, args=args, train_dataset=synthetic_pairs(16), processing_class=processor())
    assert trainer.feature_caches == {}
    assert "Locked towers are not cached for NLIPForPreTraining" in caplog.text
    assert trainable(model.vision_model) == [] and trainable(model.text_model) == []
    assert trainable(model.text_decoder)
    trainer.train()


def test_cli_flags_reach_the_training_arguments():
    from nlip_cli.train import parse_args

    _, _, args = parse_args([
        "--dataset", "fashion_mnist", "--model_size", "tiny", "--output_dir", "out", "--freeze_vision_tower",
        "--freeze_text_tower", "--unfreeze_last_n", "1", "--frozen_feature_cache", "none", "--report_to", "none",
    ])
    assert (args.freeze_vision_tower, args.freeze_text_tower, args.unfreeze_last_n) == (True, True, 1)
    assert args.frozen_feature_cache == "none"


def test_captioner_view_keeps_the_locked_tower_in_eval_mode():
    tokenizer = tiny_tokenizer()
    model = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer)))
    model.freeze_towers(vision=True)
    captioner = model.train().captioner()
    assert captioner.training and captioner.text_decoder.training
    assert not model.vision_model.training and not captioner.vision_model.training
