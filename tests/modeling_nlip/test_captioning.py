"""NLIPForCaptioning: LM loss, concept prefix, generation (greedy/beam/sampling, cache, padded batches), save/load,
remote code, the image-text-to-text pipeline, and a real Fashion-MNIST captioner (slow)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import AutoModelForImageTextToText, pipeline
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_nlip import NLIPForCaptioning, NLIPProcessor, caption_lm_loss, tokenize_concepts
from nlip_testing import BOS_ID, tiny_decoder_config, tiny_image_processor, tiny_nlip_config, tiny_tokenizer

CAPTIONS = ["a photo of a cat", "a dog", "a red car on the road by a tree"]
CONCEPTS = [["cat"], ["ankle boot", "dog", "red car"], []]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_words=[",", "road"])


@pytest.fixture(scope="module")
def processor(tokenizer):
    return NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return NLIPForCaptioning(tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))).eval()


@pytest.fixture(scope="module")
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32) * 3


@pytest.fixture(scope="module")
def batch(tokenizer):
    encoded = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {**encoded, "labels": labels}


@pytest.fixture(scope="module")
def concept_prefix(model, tokenizer):
    token_ids = [tokenize_concepts(tokenizer, names, ",") if names else [] for names in CONCEPTS]
    return token_ids, model.concept_prefix(token_ids=token_ids)


def test_per_sample_loss_and_the_batch_mean(model, pixel_values, batch):
    with torch.no_grad():
        out = model(pixel_values=pixel_values, **batch)
    # Targets: every caption token after the BOS, up to its EOS (padding is -100).
    counts = batch["attention_mask"].sum(1) - 1
    assert counts.tolist() == [6, 3, 10]
    torch.testing.assert_close(out.loss, (counts * out.per_sample_loss).sum() / counts.sum(), rtol=1e-6, atol=0)
    assert not torch.allclose(out.loss, out.per_sample_loss.mean())  # token mean, not the mean of per-sample means
    # The same number as transformers' causal-LM loss.
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, batch["labels"], vocab_size=out.logits.shape[-1]))
    for i in range(3):  # each per-sample loss is that caption's own token mean
        length = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            alone = model(pixel_values=pixel_values[i : i + 1], input_ids=batch["input_ids"][i : i + 1, :length],
                          labels=batch["labels"][i : i + 1, :length])
        torch.testing.assert_close(alone.loss, out.per_sample_loss[i], rtol=1e-5, atol=1e-6)
    # Trainer's gradient-accumulation normaliser and per-sample weights.
    weighted, _ = caption_lm_loss(out.logits, batch["labels"], sample_weights=torch.tensor([1.0, 0.0, 2.0]), num_items_in_batch=30)
    torch.testing.assert_close(weighted, (6 * out.per_sample_loss[0] + 2 * 10 * out.per_sample_loss[2]) / 30)
    with pytest.raises(ValueError, match="`sample_weights` must have shape \\(3,\\)"):
        caption_lm_loss(out.logits, batch["labels"], sample_weights=torch.ones(2))


def test_concept_prefix_is_conditioning_not_target(model, pixel_values, batch, concept_prefix):
    _, (concept_ids, concept_mask) = concept_prefix
    assert concept_mask.tolist()[0] == [0] * 6 + [1, 1] and concept_mask[2].sum() == 0  # left padded
    with torch.no_grad():
        out = model(pixel_values=pixel_values, **batch, concept_input_ids=concept_ids, concept_attention_mask=concept_mask)
        plain = model(pixel_values=pixel_values, **batch)
    prefix = concept_ids.shape[1]
    assert out.logits.shape == (3, prefix + batch["input_ids"].shape[1], model.config.decoder_config.vocab_size)
    full_labels = torch.cat([torch.full_like(concept_ids, -100), batch["labels"]], dim=1)
    full_labels[:, prefix] = -100  # the caption's BOS is given, not predicted
    expected, expected_per_sample = caption_lm_loss(out.logits, full_labels)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.per_sample_loss, expected_per_sample)
    # The image without concepts (row 2, all padding) scores exactly as without any prefix.
    torch.testing.assert_close(out.per_sample_loss[2], plain.per_sample_loss[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.per_sample_loss[:2], plain.per_sample_loss[:2])  # the concepts are seen


def test_padded_batches_equal_one_by_one(model, pixel_values, batch, concept_prefix):
    token_ids, (concept_ids, concept_mask) = concept_prefix
    kwargs = dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    batched = model.generate(pixel_values=pixel_values, concept_input_ids=concept_ids, concept_attention_mask=concept_mask, **kwargs)
    with torch.no_grad():
        scored = model(pixel_values=pixel_values, **batch, concept_input_ids=concept_ids, concept_attention_mask=concept_mask)
    for i in range(3):
        ids_i, mask_i = model.concept_prefix(token_ids=[token_ids[i]])
        alone = model.generate(pixel_values=pixel_values[i : i + 1], concept_input_ids=ids_i, concept_attention_mask=mask_i, **kwargs)
        assert alone.sequences[0].tolist() == batched.sequences[i].tolist()
        for step_batched, step_alone in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_batched[i], step_alone[0], rtol=1e-4, atol=1e-4)
        length = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            scored_alone = model(pixel_values=pixel_values[i : i + 1], input_ids=batch["input_ids"][i : i + 1, :length],
                                 labels=batch["labels"][i : i + 1, :length], concept_input_ids=ids_i, concept_attention_mask=mask_i)
        torch.testing.assert_close(scored_alone.loss, scored.per_sample_loss[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=0, temperature=1.5)])
def test_same_tokens_with_and_without_kv_cache(model, pixel_values, concept_prefix, strategy):
    _, (concept_ids, concept_mask) = concept_prefix
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(model.generate(pixel_values=pixel_values, concept_input_ids=concept_ids, concept_attention_mask=concept_mask,
                                   max_new_tokens=10, use_cache=use_cache, **strategy))
    assert runs[0].tolist() == runs[1].tolist()


GPT2_DECODER = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                    is_decoder=True, pad_token_id=0, bos_token_id=BOS_ID)


@pytest.mark.parametrize("decoder", ["bert", "gpt2"])
def test_cache_round_trip_matches_full_forward(tokenizer, pixel_values, concept_prefix, decoder):
    """The decoder's cache under transformers' current cache API: the prefill returns an `EncoderDecoderCache` (self- and
    cross-attention), and one cached decode step gives the logits of a full forward over the whole sequence. Also the
    generate() round trip with the cache on and off, for both decoder families (the 5.24 `cache` rename broke both)."""
    from transformers.cache_utils import EncoderDecoderCache

    torch.manual_seed(0)
    overrides = GPT2_DECODER | {"vocab_size": len(tokenizer)} if decoder == "gpt2" else {}
    config = tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer) if decoder == "bert" else overrides)
    model = NLIPForCaptioning(config).eval()
    _, (concept_ids, concept_mask) = concept_prefix
    ids = tokenizer(CAPTIONS, padding=True, return_tensors="pt")["input_ids"][:, :4]
    with torch.no_grad():
        prefill = model(pixel_values=pixel_values, input_ids=ids[:, :3], concept_input_ids=concept_ids,
                        concept_attention_mask=concept_mask, use_cache=True)
        assert isinstance(prefill.cache, EncoderDecoderCache)
        assert prefill.cache.get_seq_length() == concept_ids.shape[1] + 3
        mask = torch.cat([concept_mask, torch.ones_like(ids)], dim=1)
        step = model(image_hidden_states=prefill.image_hidden_states, input_ids=ids[:, 3:], attention_mask=mask,
                     cache=prefill.cache, use_cache=True)
        full = model(pixel_values=pixel_values, input_ids=ids, concept_input_ids=concept_ids,
                     concept_attention_mask=concept_mask)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
    runs = [model.generate(pixel_values=pixel_values, concept_input_ids=concept_ids, concept_attention_mask=concept_mask,
                           max_new_tokens=6, use_cache=use_cache).tolist() for use_cache in (True, False)]
    assert runs[0] == runs[1]


def test_beam_search_and_greedy_shapes(model, pixel_values):
    greedy = model.generate(pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6)
    beams = model.generate(pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=4, num_return_sequences=2,
                           output_scores=True, return_dict_in_generate=True)
    assert greedy.shape == (3, 7) and beams.sequences.shape == (6, 7)
    assert (greedy[:, 0] == BOS_ID).all() and (beams.sequences[:, 0] == BOS_ID).all()
    assert beams.sequences_scores.shape == (6,)
    assert bool((beams.sequences_scores[0::2] >= beams.sequences_scores[1::2]).all())  # best beam first per image


def test_sampling_is_reproducible_with_a_seed(model, pixel_values):
    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(pixel_values=pixel_values, do_sample=True, top_k=0, temperature=2.0, max_new_tokens=12).tolist()

    assert sample(7) == sample(7)
    assert any(sample(seed) != sample(7) for seed in range(8, 12))


def test_generate_retrieves_concepts_from_the_bank(model, pixel_values, tokenizer):
    vocabulary = ["cat", "dog", "red car", "tree"]
    config = model.config.to_dict() | {"concept_vocabulary": vocabulary,
                                       "concept_token_ids": tokenize_concepts(tokenizer, vocabulary, ","), "num_concepts": 2}
    with_bank = NLIPForCaptioning(type(model.config).from_dict(config)).eval()
    with_bank.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(4)
    with_bank.concept_embeds = torch.nn.functional.normalize(torch.randn(4, model.config.projection_dim), dim=-1)
    names, _ = with_bank.retrieve_concepts(pixel_values)
    assert len({tuple(n) for n in names}) > 1, "the constructed bank should rank concepts differently per image"
    auto = with_bank.generate(pixel_values=pixel_values, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    given = with_bank.generate(pixel_values=pixel_values, concepts=names, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    none = with_bank.generate(pixel_values=pixel_values, concepts=[[]] * 3, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert auto.sequences.tolist() == given.sequences.tolist()
    torch.testing.assert_close(auto.scores[0], given.scores[0])
    assert not torch.allclose(auto.scores[0], none.scores[0])
    # Without a bank there is no prefix.
    plain = model.generate(pixel_values=pixel_values, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(plain.scores[0], model.generate(pixel_values=pixel_values, concepts=[[]] * 3, max_new_tokens=8,
                                                               output_scores=True, return_dict_in_generate=True).scores[0])
    with pytest.raises(ValueError, match="not in this model's tokenized concept vocabulary"):
        with_bank.generate(pixel_values=pixel_values, concepts=[["cat"], ["unicorn"], []])
    with pytest.raises(ValueError, match="one list of concept names per image \\(3\\)"):
        with_bank.generate(pixel_values=pixel_values, concepts=[["cat"]])


def test_prompts_and_the_caption_helper(model, processor, tokenizer):
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee())]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    prompt = processor(text=["a photo of"], return_tensors="pt")  # [BOS] a photo of [EOS]: one prompt for all images
    out = model.generate(pixel_values=pixel_values, **prompt, max_new_tokens=4)
    prompt_ids = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    assert out.shape == (2, 1 + len(prompt_ids) + 4)
    assert all(row[: 1 + len(prompt_ids)] == [BOS_ID, *prompt_ids] for row in out.tolist())  # EOS of the prompt dropped
    texts = model.caption(images, processor, prompt="a photo of", max_new_tokens=4)
    assert texts == [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert all(text.startswith("a photo of") for text in texts)
    # Arbitrary concept names are tokenized by the helper.
    with_concepts = model.caption(images, processor, concepts=[["astronaut"], ["coffee", "cat"]], max_new_tokens=4)
    ids, mask = model.concept_prefix(token_ids=[tokenize_concepts(tokenizer, ["astronaut"], ","),
                                                tokenize_concepts(tokenizer, ["coffee", "cat"], ",")])
    expected = model.generate(pixel_values=pixel_values, concept_input_ids=ids, concept_attention_mask=mask, max_new_tokens=4)
    assert with_concepts == [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]


def test_max_new_tokens_fit_the_position_embeddings(model, pixel_values, concept_prefix):
    _, (concept_ids, concept_mask) = concept_prefix
    out = model.generate(pixel_values=pixel_values, concept_input_ids=concept_ids, concept_attention_mask=concept_mask,
                         max_new_tokens=500, min_new_tokens=500)
    assert concept_ids.shape[1] + out.shape[1] == model.config.decoder_config.max_position_embeddings


def test_generate_and_forward_errors(model, pixel_values, batch):
    with pytest.raises(ValueError, match="`pixel_values` are required"):
        model.generate(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="Pass `pixel_values` \\(or the `image_hidden_states`"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="take 71 tokens, which fills the decoder's max_position_embeddings \\(64\\)"):
        model.generate(pixel_values=pixel_values, concept_input_ids=torch.full((3, 70), 5))
    with pytest.raises(ValueError, match="`input_ids` has 2 rows for 3 images"):
        model.generate(pixel_values=pixel_values, input_ids=batch["input_ids"][:2])
    with pytest.raises(ValueError, match="`labels` must have the shape of `input_ids` \\(3, 11\\), got \\(3, 10\\)"):
        model(pixel_values=pixel_values, input_ids=batch["input_ids"], labels=batch["labels"][:, :-1])
    with pytest.raises(ValueError, match="needs NLIPConfig.decoder_config"):
        NLIPForCaptioning(tiny_nlip_config())
    with pytest.raises(ValueError, match="no causal-LM class"):
        NLIPForCaptioning(tiny_nlip_config(decoder_config=dict(model_type="clip_text_model", is_decoder=True, add_cross_attention=True)))
    no_bos = NLIPForCaptioning(tiny_nlip_config(decoder_config=tiny_decoder_config(bos_token_id=None)))
    with pytest.raises(ValueError, match="Set `decoder_config.bos_token_id`"):
        no_bos.generate(pixel_values=pixel_values)


def test_image_tokens_are_reused(model, pixel_values, batch):
    with torch.no_grad():
        first = model(pixel_values=pixel_values, **batch)
        again = model(image_hidden_states=first.image_hidden_states, **batch)
    torch.testing.assert_close(again.logits, first.logits)
    assert first.image_hidden_states.shape == (3, 17, 32) and again.vision_model_output is None


def test_save_load_and_attention_dispatch(model, processor, pixel_values, tmp_path):
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_nlip_captioning.NLIPForCaptioning"
    assert {"modeling_nlip_captioning.py", "concept_bank.py", "concept_vocabulary.py", "modeling_nlip.py"} <= set(os.listdir(tmp_path))
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(reloaded, NLIPForCaptioning) and not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.eval()
    assert reloaded.generate(pixel_values=pixel_values, max_new_tokens=6).tolist() == model.generate(pixel_values=pixel_values, max_new_tokens=6).tolist()
    eager = NLIPForCaptioning.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.text_decoder.config._attn_implementation == eager.vision_model.config._attn_implementation == "eager"
    assert reloaded.text_decoder.config._attn_implementation == "sdpa"


def test_remote_code_loads_without_the_package(model, pixel_values, processor, tmp_path):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = model.generate(pixel_values=pixel_values, max_new_tokens=6, num_beams=2)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None  # the package is not importable here
        sys.modules["trainers"] = None
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model).__name__ == "NLIPForCaptioning" and type(processor).__name__ == "NLIPProcessor"
        out = model.generate(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r}), max_new_tokens=6, num_beams=2)
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "out.pt").tolist() == expected.tolist()


def test_image_text_to_text_pipeline(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.chelsea())]
    captioner = pipeline("image-text-to-text", model=str(tmp_path))
    expected = model.caption(images, processor, max_new_tokens=5)
    results = [captioner(image, text="", max_new_tokens=5) for image in images]
    assert [r[0]["generated_text"] for r in results] == expected
    prompted = captioner(images[0], text="a photo of", max_new_tokens=5)[0]
    assert prompted["generated_text"] == model.caption(images[:1], processor, prompt="a photo of", max_new_tokens=5)[0]
    assert prompted["input_text"] == "a photo of"
    new_only = captioner(images[0], text="a photo of", max_new_tokens=5, return_full_text=False)[0]["generated_text"]
    assert prompted["generated_text"] == "a photo of" + new_only


FASHION_WORDS = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine threads make a run many times
    slower: train single-threaded, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_fashion_mnist_captioner_names_the_class(one_thread):
    """Done-when: a tiny captioner trained a few hundred steps on real Fashion-MNIST captions names most test items.

    Captions are the dataset's ("a photo of a {class}", 4 templates); the tiny word-level tokenizer splits hyphens, so
    class 0 ("T-shirt/top") is written "top". Chance is 10 %.
    """
    real_datasets = pytest.importorskip("trainers.data.real_datasets")
    torch.manual_seed(0)
    data = real_datasets.load_fashion_mnist(max_samples_per_split=3000)  # cached under ~/.cache/nlip/datasets
    tokenizer = tiny_tokenizer(model_max_length=12)
    processor = NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)

    def encode(split, n):
        rows = data[split][:n]
        texts = [text.replace("t-shirt", "top") for text in rows["text"]]
        pixels = processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")["pixel_values"]
        return pixels, tokenizer(texts, padding=True, return_tensors="pt"), rows["label"]

    train_pixels, train_text, _ = encode("train", 3000)
    test_pixels, _, test_labels = encode("test", 200)
    config = tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer, hidden_size=64, intermediate_size=128))
    model = NLIPForCaptioning(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    labels = train_text["input_ids"].masked_fill(train_text["attention_mask"] == 0, -100)
    start, steps, batch_size = time.monotonic(), 300, 64
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(train_pixels), (batch_size,))
        loss = model(pixel_values=train_pixels[idx], input_ids=train_text["input_ids"][idx],
                     attention_mask=train_text["attention_mask"][idx], labels=labels[idx]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    generated = model.generate(pixel_values=test_pixels, max_new_tokens=8)
    captions = tokenizer.batch_decode(generated, skip_special_tokens=True)
    hits = [re.search(rf"\b{FASHION_WORDS[label]}\b", caption) is not None for caption, label in zip(captions, test_labels)]
    accuracy = float(np.mean(hits))
    print(f"fashion-mnist captioner: {accuracy:.1%} of {len(hits)} test captions name the class "
          f"({steps} steps, {time.monotonic() - start:.0f}s); e.g. {captions[:3]}")
    assert accuracy >= 0.5, captions[:10]
