"""Tiny, offline building blocks shared by the tests: a word-level tokenizer and a 32-px image processor."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

BASE_WORDS = (
    "a an the of photo picture image this is in on with and at by for to from it its some small large "
    "t-shirt top trouser pullover dress coat sandal shirt sneaker bag ankle boot "
    "cat dog bird car tree house person man woman child red green blue black white "
    "astronaut coffee rocket camera chelsea horse clock flower fruit ball chair table"
).split()


def tiny_tokenizer(extra_words: list[str] | None = None, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: ids 0-3 are [PAD] [BOS] [EOS] [UNK], then `BASE_WORDS` + `extra_words`."""
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
