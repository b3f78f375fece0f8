"""LoRA fine-tuning (peft) through NLIPTrainer: only the adapters train, they save and load, and merging them into the
base weights gives the adapted model's outputs."""

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel

from modeling_nlip import NLIPModel
from nlip_testing import processor, single_thread, synthetic_pairs, tiny_model, training_args
from trainers.data.collator import ImageTextCollator
from trainers.trainer import NLIPTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    return out.image_embeds, out.text_embeds


def test_lora_fine_tuning(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    base = NLIPModel.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["visual_projection", "text_projection"])
    model = get_peft_model(base, config)
    frozen = {name: param.clone() for name, param in model.named_parameters() if not param.requires_grad}
    trainable = {name: param.clone() for name, param in model.named_parameters() if param.requires_grad}
    assert any("lora_" in name for name in trainable) and "base_model.model.logit_scale" in frozen

    pairs = synthetic_pairs(32)
    args = training_args(tmp_path / "run", method="nlip+srcl", per_device_train_batch_size=8, num_train_epochs=2,
                         noise_warmup_epochs=1, learning_rate=1e-2)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=pairs, processing_class=processor())
    trainer.train()
    assert trainer.noise_state.num_fits == 2 and trainer.noise_state.noise_prob.max() > 0
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen weight {name} changed"
    moved = [name for name, param in model.named_parameters() if name in trainable and not torch.equal(param, trainable[name])]
    assert any("lora_B" in name for name in moved) and any("modules_to_save" in name for name in moved)

    trainer.save_model(str(adapter_dir))
    assert os.path.isfile(adapter_dir / "adapter_config.json") and os.path.isfile(adapter_dir / "adapter_model.safetensors")
    assert not os.path.isfile(adapter_dir / "model.safetensors")

    batch = ImageTextCollator(processor(), caption_choice="first")([pairs[i] for i in range(8)])
    adapted = _outputs(model, batch)
    assert not torch.allclose(adapted[0], _outputs(NLIPModel.from_pretrained(base_dir), batch)[0], atol=1e-4)
    reloaded = PeftModel.from_pretrained(NLIPModel.from_pretrained(base_dir), adapter_dir)
    for got, expected in zip(_outputs(reloaded, batch), adapted):
        torch.testing.assert_close(got, expected)
    auto_loaded = AutoModel.from_pretrained(adapter_dir)  # base (from adapter_config's base path) + adapter
    for got, expected in zip(_outputs(auto_loaded, batch), adapted):
        torch.testing.assert_close(got, expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, NLIPModel) and not any("lora_" in name for name, _ in merged.named_parameters())
    for got, expected in zip(_outputs(merged, batch), adapted):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
