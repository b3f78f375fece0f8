# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""The concept bank: concept names, their prompted text embeddings, retrieval, and the captioner's prefix.

The bank lives on the model: its embeddings are the persistent buffer `concept_embeds` (`[n_concepts, projection_dim]`,
saved in the checkpoint's weights) and its names and token ids live in the config (`concept_vocabulary`,
`concept_token_ids`), so `from_pretrained` knows the buffer's size from the config before it loads the weights, and the
captioner can write its concept prefix without a tokenizer.

Remote-code safe: imports only torch, transformers and sibling files.
"""


from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm  # a dependency of transformers
from transformers import initialization as init

from .concept_vocabulary import DEFAULT_CONCEPT_VOCABULARY

TEXT_TOWER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_concepts(tokenizer, names: Sequence[str], separator: str) -> list[list[int]]:
    """Token ids of `f"{name}{separator}"` for each name, without special tokens: one prefix piece per concept."""
    if isinstance(names, str):
        raise TypeError("`names` must be a list of concept names, got a single string.")
    encoded = tokenizer([f"{name}{separator}" for name in names], add_special_tokens=False)["input_ids"]
    empty = [name for name, ids in zip(names, encoded) if not ids]
    if empty:
        raise ValueError(f"The tokenizer produced no tokens for the concept(s) {empty[:5]}.")
    return [list(ids) for ids in encoded]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stack token-id lists into `(input_ids, attention_mask)`, padded on the LEFT (what causal decoding needs)."""
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long, device=device)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def concept_prefix_rows(concept_token_ids: Sequence[Sequence[Sequence[int]]], max_length: int) -> list[list[int]]:
    """One prefix per example: its concepts' token ids in rank order, at most `max_length` tokens. A concept that does
    not fit is dropped whole, together with the lower-ranked ones after it."""
    rows = []
    for concepts in concept_token_ids:
        row: list[int] = []
        for ids in concepts:
            if len(row) + len(ids) > max_length:
                break
            row.extend(ids)
        rows.append(row)
    return rows


class NLIPConceptBankMixin:
    """
    Gives an NLIP head a concept bank: `build_concept_bank` embeds a vocabulary with the model's text tower,
    `retrieve_concepts` ranks it for images. The head calls `_init_concept_bank()` in `__init__` (before `post_init`)
    and needs `get_image_features` (and `get_text_features` to build the bank itself).
    """

    concept_embeds: torch.Tensor | None

    def _init_concept_bank(self) -> None:
        """Register the bank buffer, sized from `config.concept_vocabulary` (so checkpoints load into it), or `None`."""
        vocabulary = self.config.concept_vocabulary
        embeds = torch.zeros(len(vocabulary), self.config.projection_dim) if vocabulary else None
        self.register_buffer("concept_embeds", embeds, persistent=True)

    def _init_concept_bank_weights(self, module: nn.Module) -> None:
        """Part of `_init_weights`: an un-loaded bank starts as zeros (an empty bank retrieves nothing useful)."""
        if module is self and self.concept_embeds is not None:
            init.zeros_(self.concept_embeds)

    @property
    def has_concept_bank(self) -> bool:
        """Whether a concept bank has been built or loaded."""
        return self.concept_embeds is not None and bool(self.config.concept_vocabulary)

    @property
    def concept_vocabulary(self) -> list[str]:
        """The bank's concept names, in the order of its embedding rows (empty without a bank)."""
        return list(self.config.concept_vocabulary or [])

    @torch.no_grad()
    def build_concept_bank(
        self,
        vocabulary: Sequence[str] | None = None,
        processor=None,
        batch_size: int = 256,
        show_progress: bool = True,
        text_encoder: nn.Module | None = None,
    ) -> torch.Tensor:
        """
        Embed `vocabulary` (default: `DEFAULT_CONCEPT_VOCABULARY`, COCO + common objects) as
        `config.concept_prompt_template.format(name)` with the text tower, L2-normalise and store it as the bank.

        Args:
            vocabulary: unique, non-empty concept names.
            processor: an `NLIPProcessor` (or a bare tokenizer) matching the text tower.
            batch_size: prompts per text-tower forward pass.
            show_progress: show a tqdm bar over the batches.
            text_encoder: a model with `get_text_features` in the same embedding space; defaults to this model (heads
                without a text tower, such as `NLIPForCaptioning`, need one, e.g. the `NLIPModel` it was trained with).

        Returns the bank, `[len(vocabulary), projection_dim]`. The names and their prefix token ids go into the config.
        """
        vocabulary = list(DEFAULT_CONCEPT_VOCABULARY if vocabulary is None else vocabulary)
        if not vocabulary or not all(isinstance(name, str) and name.strip() for name in vocabulary):
            raise ValueError("`vocabulary` must be a non-empty list of non-empty concept names (strings).")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("`vocabulary` has duplicate concept names; pass each name once.")
        if processor is None:
            raise ValueError("`processor` is required: an NLIPProcessor or tokenizer matching the model's text tower.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        tokenizer = getattr(processor, "tokenizer", processor)
        encoder = self if text_encoder is None else text_encoder
        if not hasattr(encoder, "get_text_features"):
            raise TypeError(
                f"{type(self).__name__} has no text tower to embed concepts with: pass `text_encoder=` (an NLIPModel "
                "sharing this model's embedding space), or build the bank on NLIPModel / NLIPForPreTraining and load "
                "its checkpoint into this head."
            )
        template = self.config.concept_prompt_template
        starts = tqdm(range(0, len(vocabulary), batch_size), desc="Embedding concepts", unit="batch", disable=not show_progress)
        was_training = encoder.training
        encoder.eval()
        device = next(encoder.parameters()).device
        chunks = []
        try:
            for start in starts:
                prompts = [template.format(name) for name in vocabulary[start : start + batch_size]]
                batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items() if k in TEXT_TOWER_INPUTS}
                features = encoder.get_text_features(**batch).pooler_output
                chunks.append(nn.functional.normalize(features.float(), dim=-1))
        finally:
            encoder.train(was_training)
        bank = torch.cat(chunks)
        if bank.shape[1] != self.config.projection_dim:
            raise ValueError(
                f"`text_encoder` embeds into {bank.shape[1]} dimensions but this model's projection_dim is "
                f"{self.config.projection_dim}."
            )
        reference = next(self.parameters())
        self.concept_embeds = bank.to(device=reference.device, dtype=reference.dtype)
        self.config.concept_vocabulary = vocabulary
        self.config.concept_token_ids = tokenize_concepts(tokenizer, vocabulary, self.config.concept_separator)
        return self.concept_embeds

    def _require_concept_bank(self) -> None:
        if not self.has_concept_bank:
            raise ValueError(
                f"This {type(self).__name__} has no concept bank: call `build_concept_bank(vocabulary, processor)` "
                "first (or load a checkpoint that has one)."
            )

    def _top_concepts(self, image_embeds: torch.Tensor, top_k: int) -> tuple[torch.LongTensor, torch.Tensor]:
        """Indices and cosine similarities of the `top_k` bank entries closest to each (projected) image embedding."""
        self._require_concept_bank()
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
        image_embeds = nn.functional.normalize(image_embeds.float(), dim=-1)
        scores = image_embeds @ self.concept_embeds.float().T
        scores, indices = scores.topk(min(top_k, scores.shape[1]), dim=-1)
        return indices, scores

    @torch.no_grad()
    def retrieve_concepts(
        self, pixel_values: torch.FloatTensor, top_k: int | None = None
    ) -> tuple[list[list[str]], torch.Tensor]:
        """
        The `top_k` (default `config.num_concepts`) concepts of each image by cosine similarity between its image
        embedding and the bank. Returns `(names, scores)`: names `[batch][top_k]` in decreasing similarity, and the
        similarities as a `[batch, top_k]` tensor.
        """
        top_k = self.config.num_concepts if top_k is None else top_k
        self._require_concept_bank()
        image_embeds = self.get_image_features(pixel_values=pixel_values).pooler_output
        indices, scores = self._top_concepts(image_embeds, top_k)
        vocabulary = self.config.concept_vocabulary
        return [[vocabulary[i] for i in row] for row in indices.tolist()], scores

    def retrieved_prefix_rows(self, image_embeds: torch.Tensor) -> list[list[int]]:
        """Concept prefix token ids of each image: its top `config.num_concepts` bank entries, in rank order."""
        indices, _ = self._top_concepts(image_embeds, self.config.num_concepts)
        token_ids = self.config.concept_token_ids
        return concept_prefix_rows([[token_ids[i] for i in row] for row in indices.tolist()], self.config.concept_max_length)

    def concept_token_ids_for(self, concepts: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """Token ids of named concepts, looked up in the bank's vocabulary (no tokenizer needed)."""
        vocabulary, token_ids = self.config.concept_vocabulary, self.config.concept_token_ids
        index = {name: i for i, name in enumerate(vocabulary or [])} if token_ids is not None else {}
        unknown = sorted({name for names in concepts for name in names if name not in index})
        if unknown:
            raise ValueError(
                f"Concept(s) {unknown[:5]} are not in this model's tokenized concept vocabulary; pass "
                "`concept_input_ids` built with `tokenize_concepts`, or use `model.caption(images, processor, "
                "concepts=...)`, which tokenizes them."
            )
        return [[token_ids[index[name]] for name in names] for names in concepts]


__all__ = ["NLIPConceptBankMixin", "concept_prefix_rows", "left_pad", "tokenize_concepts"]
