"""transformers' own `ModelTesterMixin` and `ConfigTester` run against `NLIPModel` (modelled on `CLIPModelTest`).

Two tower pairings: CLIP vision + CLIP text (the default), and CLIP vision + BERT text with mean pooling.

The testers draw their random inputs from Python's `random` module (`rng=random`), which the mixin's `set_seed(42)`
seeds; transformers' default is a module-level `random.Random()` that nothing seeds, so the tolerance-bound
comparisons (eager vs SDPA in fp16/bf16) would see different inputs on every run and fail at random.
"""

import random
import unittest

import numpy as np
import torch
from transformers import AutoConfig

from hf_common import require_hf_test_utils
from modeling_nlip import NLIPConfig, NLIPModel
from nlip_testing import tiny_text_config, tiny_vision_config

hf = require_hf_test_utils()


class NLIPVisionTowerTester:
    """Pixel inputs for the tiny CLIP vision tower (2 layers, 32-dim, 32-px images, patch 8)."""

    def __init__(self, parent, batch_size=3):
        self.parent = parent
        self.config = tiny_vision_config()
        self.batch_size = batch_size
        self.num_hidden_layers = self.config["num_hidden_layers"]
        self.hidden_size = self.config["hidden_size"]
        self.image_size, self.patch_size = self.config["image_size"], self.config["patch_size"]
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1  # patches + [CLS]

    def prepare_config_and_inputs_for_common(self):
        pixel_values = hf.floats_tensor([self.batch_size, 3, self.image_size, self.image_size], rng=random)
        return AutoConfig.for_model(**self.config), {"pixel_values": pixel_values}


class NLIPTextTowerTester:
    """Token inputs for a tiny text tower (2 layers, 32-dim): CLIP text by default, or any `model_type`."""

    def __init__(self, parent, batch_size=3, seq_length=7, **config_overrides):
        self.parent = parent
        self.config = tiny_text_config(**config_overrides)
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size = self.config["vocab_size"]
        self.num_hidden_layers = self.config["num_hidden_layers"]
        self.hidden_size = self.config["hidden_size"]

    def prepare_config_and_inputs_for_common(self):
        input_ids = hf.ids_tensor([self.batch_size, self.seq_length], self.vocab_size, rng=random)
        attention_mask = torch.ones_like(input_ids)
        for row, length in enumerate(np.random.randint(2, self.seq_length + 1, size=self.batch_size)):
            attention_mask[row, length:] = 0  # right padding, as the CLIP tokenizer pads
        return AutoConfig.for_model(**self.config), {"input_ids": input_ids, "attention_mask": attention_mask}


class NLIPModelTester:
    """`CLIPModelTester` for NLIP: one tester per tower plus the joint `NLIPConfig`."""

    def __init__(self, parent, text_kwargs=None, projection_dim=16, **config_kwargs):
        self.parent = parent
        self.text_model_tester = NLIPTextTowerTester(parent, **(text_kwargs or {}))
        self.vision_model_tester = NLIPVisionTowerTester(parent)
        self.text_config, self.vision_config = self.text_model_tester.config, self.vision_model_tester.config
        self.batch_size = self.text_model_tester.batch_size
        self.projection_dim = projection_dim
        self.config_kwargs = config_kwargs
        self.is_training = True

    def get_config(self):
        return NLIPConfig(
            vision_config=self.vision_config,
            text_config=self.text_config,
            projection_dim=self.projection_dim,
            **self.config_kwargs,
        )

    def prepare_config_and_inputs_for_common(self):
        _, text_inputs = self.text_model_tester.prepare_config_and_inputs_for_common()
        _, vision_inputs = self.vision_model_tester.prepare_config_and_inputs_for_common()
        return self.get_config(), {**text_inputs, **vision_inputs, "return_loss": True}

    def create_and_check_model(self, config, inputs):
        model = NLIPModel(config).eval()
        with torch.no_grad():
            outputs = model(**inputs)
        n_texts, n_images = inputs["input_ids"].shape[0], inputs["pixel_values"].shape[0]
        self.parent.assertEqual(outputs.logits_per_image.shape, (n_images, n_texts))
        self.parent.assertEqual(outputs.logits_per_text.shape, (n_texts, n_images))
        self.parent.assertEqual(outputs.image_embeds.shape, (n_images, self.projection_dim))
        self.parent.assertEqual(outputs.text_embeds.shape, (n_texts, self.projection_dim))
        torch.testing.assert_close(outputs.image_embeds.norm(dim=-1), torch.ones(n_images))
        self.parent.assertTrue(torch.isfinite(outputs.loss) and outputs.loss.ndim == 0)


class NLIPModelTest(hf.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (NLIPModel,)
    additional_model_inputs = ["pixel_values"]  # the SDPA/eager comparison feeds main input + these
    _is_composite = True

    def get_model_tester(self):
        return NLIPModelTester(self)

    def setUp(self):
        self.model_tester = self.get_model_tester()
        self.config_tester = hf.ConfigTester(
            self, config_class=NLIPConfig, has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs_for_common())

    def test_initialization(self):
        """Near-zero init ranges give near-zero weights, except `logit_scale` = log(1/0.07) and LayerNorm (CLIP's check)."""
        config = hf._config_zero_init(self.model_tester.get_config())
        model = NLIPModel(config)
        for name, param in model.named_parameters():
            if name == "logit_scale":
                self.assertAlmostEqual(param.item(), np.log(1 / 0.07), delta=1e-3)
            else:
                self.assertIn(((param.data.mean() * 1e9).round() / 1e9).item(), [0.0, 1.0], msg=name)

    @unittest.skip(reason="NLIPOutput has no top-level hidden_states; per tower via test_get_*_features_hidden_states")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="NLIPOutput has no top-level attentions; per tower via test_get_*_features_attentions")
    def test_attention_outputs(self):
        pass

    @unittest.skip(reason="NLIPOutput has no top-level hidden_states/attentions to retain gradients on")
    def test_retain_grad_hidden_states_attentions(self):
        pass


class NLIPBertTextModelTest(NLIPModelTest):
    """Same suite with a BERT text tower (token_type_ids, mean pooling: the sentence-transformers setup)."""

    def get_model_tester(self):
        bert = dict(model_type="bert", max_position_embeddings=16, type_vocab_size=2)
        return NLIPModelTester(self, text_kwargs=bert, text_pooling="mean")

