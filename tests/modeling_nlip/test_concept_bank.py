"""Concept bank: building, retrieval, prefix formatting, save/load, default vocabulary, and concept mining."""

import pytest
import torch
from torch.nn.functional import normalize

from modeling_nlip import (
    DEFAULT_CONCEPT_VOCABULARY,
    NLIPConfig,
    NLIPForCaptioning,
    NLIPForPreTraining,
    NLIPModel,
    NLIPProcessor,
    tokenize_concepts,
)
from modeling_nlip.concept_bank import concept_prefix_rows, left_pad
from nlip_testing import PAD_ID, tiny_decoder_config, tiny_image_processor, tiny_nlip_config, tiny_tokenizer

VOCABULARY = ["cat", "dog", "car", "tree", "ankle boot"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_words=[","])


@pytest.fixture(scope="module")
def processor(tokenizer):
    return NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def pretraining(tokenizer, processor):
    torch.manual_seed(0)
    model = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))).eval()
    model.build_concept_bank(VOCABULARY, processor, batch_size=2, show_progress=False)
    return model


def test_bank_holds_normalised_prompt_embeddings_of_the_text_tower(pretraining, processor):
    prompts = [f"a photo of a {name}" for name in VOCABULARY]
    with torch.no_grad():
        expected = normalize(pretraining.get_text_features(**processor.tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output, dim=-1)
    torch.testing.assert_close(pretraining.concept_embeds, expected, atol=1e-6, rtol=1e-5)
    assert pretraining.config.concept_vocabulary == VOCABULARY == pretraining.concept_vocabulary
    assert pretraining.config.concept_token_ids == tokenize_concepts(processor.tokenizer, VOCABULARY, ",")
    assert pretraining.has_concept_bank


def test_bank_does_not_depend_on_batch_size_or_training_mode(pretraining, processor, tokenizer):
    model = NLIPForPreTraining(pretraining.config)
    model.load_state_dict(pretraining.state_dict())
    model.train()  # dropout must not leak into the bank
    bank = model.build_concept_bank(VOCABULARY, processor, batch_size=len(VOCABULARY), show_progress=False)
    assert model.training, "build_concept_bank restores the training mode"
    torch.testing.assert_close(bank, pretraining.concept_embeds, atol=1e-6, rtol=1e-5)


def test_prompt_template_comes_from_the_config(pretraining, processor):
    config = NLIPConfig.from_dict({**pretraining.config.to_dict(), "concept_prompt_template": "{}"})
    model = NLIPForPreTraining(config).eval()
    model.load_state_dict(pretraining.state_dict())
    model.build_concept_bank(["cat"], processor, show_progress=False)
    with torch.no_grad():
        bare = normalize(model.get_text_features(**processor.tokenizer(["cat"], return_tensors="pt")).pooler_output, dim=-1)
    torch.testing.assert_close(model.concept_embeds, bare, atol=1e-6, rtol=1e-5)


def test_retrieval_known_answer(pretraining):
    """Bank rows built from the images' own embeddings, permuted: each image must retrieve its own concept first."""
    torch.manual_seed(1)
    pixel_values = torch.randn(3, 3, 32, 32)
    model = NLIPForPreTraining(pretraining.config).eval()
    model.load_state_dict(pretraining.state_dict())
    with torch.no_grad():
        image_embeds = normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    # vocabulary: cat dog car tree "ankle boot" -> image 0 is "car", image 1 "ankle boot", image 2 "cat".
    bank = torch.stack([image_embeds[2], -image_embeds[0], image_embeds[0], -image_embeds[1], image_embeds[1]])
    model.concept_embeds = bank
    names, scores = model.retrieve_concepts(pixel_values, top_k=2)
    assert [row[0] for row in names] == ["car", "ankle boot", "cat"]
    torch.testing.assert_close(scores[:, 0], torch.ones(3), atol=1e-5, rtol=0)
    assert scores.shape == (3, 2) and bool((scores[:, 0] >= scores[:, 1]).all())
    expected_second = (image_embeds @ bank.T).topk(2).values[:, 1]
    torch.testing.assert_close(scores[:, 1], expected_second, atol=1e-5, rtol=0)
    all_names, _ = model.retrieve_concepts(pixel_values, top_k=50)  # clamped to the vocabulary
    assert all(sorted(row) == sorted(VOCABULARY) for row in all_names)
    default_k, _ = model.retrieve_concepts(pixel_values)
    assert len(default_k[0]) == min(model.config.num_concepts, len(VOCABULARY))


def test_bank_saves_and_loads_into_every_head(pretraining, tmp_path):
    pretraining.save_pretrained(tmp_path)
    for cls in (NLIPForPreTraining, NLIPForCaptioning):
        model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]
        torch.testing.assert_close(model.concept_embeds, pretraining.concept_embeds, rtol=0, atol=0)
        assert model.concept_vocabulary == VOCABULARY
        assert model.config.concept_token_ids == pretraining.config.concept_token_ids
    pixel_values = torch.randn(2, 3, 32, 32)
    assert model.retrieve_concepts(pixel_values, 3)[0] == pretraining.retrieve_concepts(pixel_values, 3)[0]


def test_model_without_bank_has_no_bank_weight(tmp_path, tokenizer):
    model = NLIPForCaptioning(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer)))
    assert model.concept_embeds is None and not model.has_concept_bank and model.concept_vocabulary == []
    assert "concept_embeds" not in model.state_dict()
    with pytest.raises(ValueError, match="has no concept bank: call `build_concept_bank"):
        model.retrieve_concepts(torch.randn(1, 3, 32, 32))


def test_captioner_builds_its_bank_with_a_given_text_encoder(pretraining, processor, tmp_path):
    pretraining.save_pretrained(tmp_path)
    captioner = NLIPForCaptioning.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="has no text tower to embed concepts with: pass `text_encoder=`"):
        captioner.build_concept_bank(["cat"], processor)
    dual_encoder = NLIPModel.from_pretrained(tmp_path)
    captioner.build_concept_bank(VOCABULARY, processor, text_encoder=dual_encoder, show_progress=False)
    torch.testing.assert_close(captioner.concept_embeds, pretraining.concept_embeds, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "vocabulary, kwargs, error, message",
    [
        ([], {}, ValueError, "non-empty list of non-empty concept names"),
        (["cat", " "], {}, ValueError, "non-empty list of non-empty concept names"),
        (["cat", "cat"], {}, ValueError, "duplicate concept names"),
        (["cat"], {"processor": None}, ValueError, "`processor` is required"),
        (["cat"], {"batch_size": 0}, ValueError, "`batch_size` must be a positive integer"),
    ],
)
def test_build_errors(pretraining, processor, vocabulary, kwargs, error, message):
    with pytest.raises(error, match=message):
        pretraining.build_concept_bank(vocabulary, **{"processor": processor, **kwargs})


def test_retrieve_top_k_must_be_positive(pretraining):
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        pretraining.retrieve_concepts(torch.randn(1, 3, 32, 32), top_k=0)


def test_prefix_formatting(tokenizer):
    ids = tokenize_concepts(tokenizer, ["cat", "ankle boot"], ",")
    comma = tokenizer.convert_tokens_to_ids(",")
    assert ids == [[tokenizer.convert_tokens_to_ids("cat"), comma],
                   [tokenizer.convert_tokens_to_ids("ankle"), tokenizer.convert_tokens_to_ids("boot"), comma]]
    # Concepts are kept whole: "ankle boot," (3 tokens) does not fit after "cat," in 4 tokens, nor does anything after it.
    assert concept_prefix_rows([ids + [ids[0]], [], [ids[1]]], max_length=4) == [ids[0], [], ids[1]]
    input_ids, mask = left_pad([[5, 6], [], [7]], pad_token_id=PAD_ID)
    assert input_ids.tolist() == [[5, 6], [0, 0], [0, 7]] and mask.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert left_pad([[], []], PAD_ID)[0].shape == (2, 0)
    with pytest.raises(TypeError, match="list of concept names, got a single string"):
        tokenize_concepts(tokenizer, "cat", ",")


def test_default_vocabulary():
    assert len(DEFAULT_CONCEPT_VOCABULARY) >= 300
    assert len(set(DEFAULT_CONCEPT_VOCABULARY)) == len(DEFAULT_CONCEPT_VOCABULARY)
    assert DEFAULT_CONCEPT_VOCABULARY[:3] == ("person", "bicycle", "car") and "toothbrush" in DEFAULT_CONCEPT_VOCABULARY
    assert all(name == name.strip().lower() and name for name in DEFAULT_CONCEPT_VOCABULARY)
    assert NLIPConfig(concept_vocabulary=list(DEFAULT_CONCEPT_VOCABULARY)).concept_vocabulary[79] == "toothbrush"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concept_prompt_template="a photo"), "exactly one '{}'"),
        (dict(num_concepts=-1), "num_concepts must be a non-negative integer"),
        (dict(concept_max_length=0), "concept_max_length must be a positive integer"),
        (dict(concept_vocabulary=["cat", "cat"]), "duplicate names: \\['cat'\\]"),
        (dict(concept_vocabulary=["cat", ""]), "list of non-empty strings"),
        (dict(concept_vocabulary=["cat"], concept_token_ids=[[1], [2]]), "one token-id list per concept_vocabulary entry"),
        (dict(concept_vocabulary=["cat"], concept_token_ids=[[]]), "non-empty lists of integer token ids"),
        (dict(itc_weight=-0.1), "itc_weight must be a non-negative number"),
        (dict(mask_ratio=0.0), "mask_ratio must lie strictly between 0 and 1"),
        (dict(ir_decoder_hidden_size=30, ir_decoder_num_attention_heads=4), "must be divisible by"),
    ],
)
def test_concept_and_objective_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NLIPConfig(**kwargs)


def test_pretraining_forward_retrieves_the_prefix_it_will_caption_with(pretraining, tokenizer):
    """`retrieve_concepts=True` prefixes each caption with the image's top bank concepts: the same logits and LM loss
    as passing that prefix explicitly; without the flag (or a bank) there is no prefix."""
    torch.manual_seed(2)
    pixel_values = torch.randn(3, 3, 32, 32)
    batch = tokenizer(["a photo of a cat", "a dog", "a red car"], padding=True, return_tensors="pt")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values)
    with torch.no_grad():
        retrieved = pretraining(**inputs, retrieve_concepts=True)
        names, _ = pretraining.retrieve_concepts(pixel_values)
        prefix_ids, prefix_mask = pretraining.concept_prefix(concepts=names)
        explicit = pretraining(**inputs, concept_input_ids=prefix_ids, concept_attention_mask=prefix_mask)
        plain = pretraining(**inputs)
    assert prefix_ids.shape[1] > 0
    assert retrieved.lm_logits.shape[1] == batch["input_ids"].shape[1] + prefix_ids.shape[1]
    torch.testing.assert_close(retrieved.lm_logits, explicit.lm_logits)
    torch.testing.assert_close(retrieved.lm_loss, explicit.lm_loss)
    assert plain.lm_logits.shape[1] == batch["input_ids"].shape[1]
    without_bank = NLIPForPreTraining(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))).eval()
    with torch.no_grad():
        assert without_bank(**inputs, retrieve_concepts=True).lm_logits.shape[1] == batch["input_ids"].shape[1]
