"""transformers' own `ModelTesterMixin` run against `NLIPForCaptioning` and `NLIPForPreTraining`.

Generation tests: the transformers sdist has no `tests/generation/test_utils.py`, so `hf_common` provides only a stub
`GenerationTesterMixin`; the generation behaviours (greedy/beam/sampling, cache equality, padded batches) are tested in
`test_captioning.py` instead.
"""

import random
import unittest

import numpy as np
import torch

from hf_common import require_hf_test_utils
from modeling_nlip import NLIPConfig, NLIPForCaptioning, NLIPForPreTraining
from nlip_testing import BOS_ID, tiny_decoder_config, tiny_text_config, tiny_tokenizer, tiny_vision_config

hf = require_hf_test_utils()

GPT2_DECODER = dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                    is_decoder=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)


class NLIPCaptioningModelTester:
    """Tiny NLIP config with a decoder, plus image + caption (+ concept prefix) inputs for the common tests."""

    def __init__(self, parent, batch_size=3, seq_length=7, decoder_overrides=None, with_concepts=False, **config_kwargs):
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vision_config, self.text_config = tiny_vision_config(), tiny_text_config()
        self.decoder_config = {**tiny_decoder_config(), **(decoder_overrides or {})}
        self.vocab_size = len(tiny_tokenizer())
        self.num_hidden_layers, self.num_attention_heads, self.hidden_size = 2, 4, 32
        self.image_size, self.patch_size = self.vision_config["image_size"], self.vision_config["patch_size"]
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.with_concepts = with_concepts
        self.prefix_length = 4 if with_concepts else 0
        self.encoder_seq_length = self.key_length = self.prefix_length + seq_length  # decoder self-attention sizes
        self.config_kwargs = config_kwargs
        self.is_training = True

    def get_config(self):
        return NLIPConfig(vision_config=self.vision_config, text_config=self.text_config,
                          decoder_config=self.decoder_config, projection_dim=16, **self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids = hf.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4, rng=random) + 4
        input_ids[:, 0] = BOS_ID
        attention_mask = torch.ones_like(input_ids)
        for row, length in enumerate(np.random.randint(2, self.seq_length + 1, size=self.batch_size)):
            attention_mask[row, length:] = 0  # right padding, as the tokenizer pads captions
        pixel_values = hf.floats_tensor([self.batch_size, 3, self.image_size, self.image_size], rng=random)
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_concepts:
            # Low ids: the resize tests shrink the vocabulary and clamp only `input_ids`.
            concept_ids = hf.ids_tensor([self.batch_size, self.prefix_length], 16, rng=random) + 4
            concept_mask = torch.ones_like(concept_ids)
            concept_mask[0, :3] = 0  # left-padded prefixes of different lengths
            concept_mask[1, :1] = 0
            inputs.update(concept_input_ids=concept_ids, concept_attention_mask=concept_mask)
        return self.get_config(), inputs


class NLIPForCaptioningTest(hf.ModelTesterMixin, unittest.TestCase):
    """The default BERT decoder, with left-padded concept prefixes of different lengths in every forward."""

    all_model_classes = (NLIPForCaptioning,)
    # The stub GenerationTesterMixin runs no test; generation is covered by test_captioning.py (see module docstring).
    all_generative_model_classes = ()
    additional_model_inputs = ["input_ids", "attention_mask"]
    _is_composite = True
    # `visual_projection` and the image tower's pooler serve concept retrieval only; the LM loss does not reach them.
    test_all_params_have_gradient = False

    def get_model_tester(self):
        return NLIPCaptioningModelTester(self, with_concepts=True)

    def setUp(self):
        self.model_tester = self.get_model_tester()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:  # the captioner's LM targets: the caption ids, -100 on padding
            inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return inputs

    def test_caption_loss_and_shapes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = NLIPForCaptioning(config).eval()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        with torch.no_grad():
            outputs = model(**inputs, labels=labels)
        prefix = inputs["concept_input_ids"].shape[1] if "concept_input_ids" in inputs else 0
        self.assertEqual(outputs.logits.shape, (3, prefix + self.model_tester.seq_length, self.model_tester.vocab_size))
        self.assertEqual(outputs.per_sample_loss.shape, (3,))
        self.assertTrue(torch.isfinite(outputs.loss))


class NLIPForCaptioningGPT2Test(NLIPForCaptioningTest):
    """Same suite with a GPT-2 decoder of another width (48), which exercises `enc_to_dec_proj`, and no concepts."""

    def get_model_tester(self):
        return NLIPCaptioningModelTester(self, decoder_overrides={**GPT2_DECODER, "vocab_size": len(tiny_tokenizer())})


class NLIPForPreTrainingTest(hf.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (NLIPForPreTraining,)
    additional_model_inputs = ["pixel_values", "noise"]
    _is_composite = True

    def setUp(self):
        self.model_tester = NLIPCaptioningModelTester(
            self, ir_weight=0.5, ir_decoder_hidden_size=16, ir_decoder_num_hidden_layers=1, ir_decoder_num_attention_heads=2
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if "noise" not in inputs:  # fixed masking noise: the reconstruction term masks patches at random otherwise
            batch_size = inputs["pixel_values"].shape[0]
            inputs["noise"] = torch.linspace(0, 1, self.model_tester.num_patches).repeat(batch_size, 1)
        # Losses (and per-sample contrastive losses) depend on the whole batch: only for the training tests.
        inputs["return_loss"] = return_labels
        return inputs

    def test_pretraining_loss_is_the_weighted_sum(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = NLIPForPreTraining(config).eval()
        with torch.no_grad():
            outputs = model(**self._prepare_for_class(inputs, NLIPForPreTraining, return_labels=True))
        expected = outputs.contrastive_loss + outputs.lm_loss + 0.5 * outputs.ir_loss
        torch.testing.assert_close(outputs.loss, expected)

    @unittest.skip(reason="NLIPForPreTrainingOutput has no top-level hidden_states; the towers' are in *_model_output")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="NLIPForPreTrainingOutput has no top-level attentions; the towers' are in *_model_output")
    def test_attention_outputs(self):
        pass

    @unittest.skip(reason="NLIPForPreTrainingOutput has no top-level hidden_states/attentions to retain gradients on")
    def test_retain_grad_hidden_states_attentions(self):
        pass


if __name__ == "__main__":
    unittest.main()
