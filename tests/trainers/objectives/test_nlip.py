"""`nlip`: the trainer's loss is NITC (balanced and paper forms) with the noise state's probabilities, and noise
completion writes, refreshes and feeds synthetic captions (from a pre-training model or a captioning checkpoint)."""

import math

import pytest
import torch

from modeling_nlip import NLIPForCaptioning
from nlip_testing import (
    embed_batch,
    method_trainer,
    processor,
    synthetic_pairs,
    tiny_decoder_config,
    tiny_model,
    tiny_nlip_config,
    tiny_pretraining_model,
    tiny_tokenizer,
    training_args,
)
from trainers.losses import nitc_loss
from trainers.trainer import NLIPTrainer


def test_nlip_loss_is_nitc_with_the_noise_probabilities(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    noise = torch.linspace(0.0, 0.9, 8)

    trainer = method_trainer(tmp_path, pairs, "nlip", nitc_strength=0.3)
    trainer.noise_state.noise_prob[:] = noise
    images, texts, scale = embed_batch(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), nitc_loss(images, texts, scale, noise, strength=0.3))
    trainer = method_trainer(tmp_path, pairs, "nlip", nitc_strength=0.3, nitc_form="paper")
    trainer.noise_state.noise_prob[:] = noise
    images, texts, scale = embed_batch(trainer.model, batch)
    expected = nitc_loss(images, texts, scale, noise, strength=0.3, form="paper")
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)
    assert not torch.allclose(expected, nitc_loss(images, texts, scale, noise, strength=0.3))


def test_noise_completion_with_pretraining_model(tmp_path):
    pairs = synthetic_pairs(16)
    args = training_args(tmp_path, method="nlip", noise_completion=True, completion_max_new_tokens=4,
                         per_device_train_batch_size=8, num_train_epochs=2, noise_warmup_epochs=1, logging_steps=1)
    trainer = NLIPTrainer(model=tiny_pretraining_model(), args=args, train_dataset=pairs, processing_class=processor())
    seen_synthetic = []
    nlip = trainer.objectives["nlip"]
    original = nlip.extra_inputs

    def spy(inputs, context):
        result = original(inputs, context)
        seen_synthetic.append(bool(result))
        return result

    nlip.extra_inputs = spy
    trainer.train()
    captions = nlip.synthetic_captions
    assert nlip.completion_epoch == 1
    assert len(captions) == 16 and all(isinstance(c, str) for c in captions)
    assert seen_synthetic == [False, False, True, True]  # epoch 0: warm-up, no captions yet
    logs = [entry for entry in trainer.state.log_history if "pretraining/lm_loss" in entry]
    assert logs and all(math.isfinite(entry["pretraining/lm_loss"]) for entry in logs)


def test_noise_completion_with_captioning_checkpoint(tmp_path):
    tokenizer = tiny_tokenizer()
    config = tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))
    torch.manual_seed(0)
    captioner_dir = tmp_path / "captioner"
    NLIPForCaptioning(config).save_pretrained(captioner_dir)
    processor().save_pretrained(captioner_dir)
    pairs = synthetic_pairs(8)
    args = training_args(tmp_path / "run", method="nlip", noise_completion=True, completion_model=str(captioner_dir),
                         completion_max_new_tokens=3, per_device_train_batch_size=8, num_train_epochs=1,
                         noise_warmup_epochs=0)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    captioner = trainer.objectives["nlip"].captioner
    assert isinstance(captioner, NLIPForCaptioning)
    trainer.train()
    captions = trainer.objectives["nlip"].synthetic_captions
    expected = captioner.caption([pairs[i]["image"] for i in range(8)], processor(), max_new_tokens=3)
    assert captions == expected


def test_noise_completion_needs_a_captioner(tmp_path):
    args = training_args(tmp_path, method="nlip", noise_completion=True)
    with pytest.raises(ValueError, match="noise_completion needs a captioner"):
        NLIPTrainer(model=tiny_model(), args=args, train_dataset=synthetic_pairs(4), processing_class=processor())
