"""Tiny, offline building blocks shared by the tests: a word-level tokenizer and a 32-px image processor."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast


# The tests folder and the repository root (tests live in sub-folders mirroring the source tree).
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# EOS is not id 2: CLIP text towers treat eos_token_id == 2 as "legacy" and pool at argmax(input_ids).
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

BASE_WORDS = (
    "a an the of photo picture image this is in on with and at by for to from it its some small large "
    "t-shirt top trouser pullover dress coat sandal shirt sneaker bag ankle boot "
    "cat dog bird car tree house person man woman child red green blue black white "
    "astronaut coffee rocket camera chelsea horse clock flower fruit ball chair table"
).split()


def tiny_tokenizer(extra_words: list[str] | None = None, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: ids 0-3 are [PAD] [UNK] [BOS] [EOS], then `BASE_WORDS` + `extra_words`."""
    words = list(dict.fromkeys(BASE_WORDS + [w for text in (extra_words or []) for w in re.findall(r"[\w'-]+|[^\w\s]", text.lower())]))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=model_max_length,
    )


def tiny_image_processor(size: int = 32) -> CLIPImageProcessorPil:
    """A CLIP image processor that resizes and centre-crops to `size` px (CLIP mean/std normalisation)."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_vision_config(**overrides) -> dict:
    """A 2-layer, 32-dim CLIP ViT over 32-px images with 8-px patches."""
    config = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4)
    return {**config, **overrides}


def tiny_text_config(tokenizer=None, **overrides) -> dict:
    """A 2-layer, 32-dim CLIP text transformer sized for `tokenizer` (default: `tiny_tokenizer()`)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = dict(model_type="clip_text_model", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return {**config, **overrides}


def tiny_nlip_config(tokenizer=None, **overrides):
    """An `NLIPConfig` with tiny CLIP towers and a 16-dim joint space."""
    from modeling_nlip import NLIPConfig

    kwargs = dict(vision_config=tiny_vision_config(), text_config=tiny_text_config(tokenizer), projection_dim=16)
    return NLIPConfig(**{**kwargs, **overrides})


def tiny_processor(tokenizer=None):
    """An `NLIPProcessor` with the tiny image processor and tokenizer."""
    from modeling_nlip import NLIPProcessor

    return NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer or tiny_tokenizer())


def tiny_decoder_config(tokenizer=None, **overrides) -> dict:
    """A 2-layer, 32-dim BERT causal decoder with cross-attention, sized for `tokenizer` (default: `tiny_tokenizer()`)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return {**config, **overrides}


def save_tiny_dual_checkpoint(path) -> str:
    """Save a seeded tiny `NLIPModel` and its processor into `path` (a checkpoint the scripts can load); returns it."""
    import torch

    from modeling_nlip import NLIPModel

    torch.manual_seed(0)
    NLIPModel(tiny_nlip_config()).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return str(path)
