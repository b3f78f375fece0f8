# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP captioner: an image tower and a concept-conditioned causal text decoder with cross-attention to image tokens.

Concepts (object names, given or retrieved from the model's concept bank) enter the decoder as a prefix
`"cat, dog, tree, [BOS] a caption ... [EOS]"` that is excluded from the loss. Remote-code safe: imports only torch,
transformers and sibling files.
"""


from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .concept_bank import NLIPConceptBankMixin, concept_prefix_rows, left_pad, tokenize_concepts
from .configuration_nlip import NLIPConfig
from .modeling_nlip import NLIPModel, NLIPPreTrainedModel, build_tower, image_tokens, pool_tower_output, tower_hidden_size

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class NLIPCaptioningOutput(ModelOutput):
    """
    Output of [`NLIPForCaptioning`].

    Args:
        loss: captioning LM loss, the mean over all label tokens of the batch (see [`caption_lm_loss`]).
        per_sample_loss: `[batch]` mean LM loss over each sample's own label tokens (for noise estimation).
        logits: `[batch, prefix_length + sequence_length, vocab]` next-token logits over the concept prefix and the
            caption (the prefix comes first).
        cache: the decoder's cache (self- and cross-attention), an `EncoderDecoderCache`.
        hidden_states / attentions / cross_attentions: the decoder's, when requested.
        image_hidden_states: `[batch, image_tokens, decoder_hidden]` image tokens the decoder attends to; pass them
            back as `image_hidden_states` to skip the image tower.
        vision_model_output: the image tower's output (absent when `image_hidden_states` was given).
    """

    loss: torch.FloatTensor | None = None
    per_sample_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] if k != "vision_model_output" else self[k].to_tuple() for k in self.keys())


def caption_lm_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    sample_weights: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Next-token cross-entropy of a causal decoder. `labels` are aligned with the decoder inputs (the shift happens
    here) and `-100` marks positions without a target. With `ℓ_it` the loss of sample i's t-th target and `n_i` its
    number of targets:

    - `per_sample[i] = Σ_t ℓ_it / n_i` (0 for a sample without targets);
    - `loss = Σ_i w_i Σ_t ℓ_it / N`, `N = num_items_in_batch` (the Trainer's count over gradient accumulation) or else
      `Σ_i n_i`; `w_i = sample_weights[i]`, 1 by default.

    So by default `loss` is the mean over all tokens of the batch, `Σ_i n_i·per_sample[i] / Σ_i n_i` (a token-weighted
    mean of the per-sample means, as transformers' `ForCausalLMLoss`), not the plain mean of `per_sample`.
    Computed in float32.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    token_loss = nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    summed = token_loss.sum(dim=1)
    per_sample = summed / counts.clamp(min=1)
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=summed.dtype, device=summed.device)
        if sample_weights.shape != summed.shape:
            raise ValueError(f"`sample_weights` must have shape {tuple(summed.shape)}, got {tuple(sample_weights.shape)}.")
        summed = summed * sample_weights
    total = counts.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(total, torch.Tensor):
        total = total.to(summed.device)
    return summed.sum() / total, per_sample


class NLIPCaptioningPreTrainedModel(NLIPConceptBankMixin, NLIPPreTrainedModel):
    """
    Base of the NLIP heads that caption ([`NLIPForCaptioning`], [`NLIPForPreTraining`]): the image tower and
    projection under `NLIPModel`'s attribute names (`vision_model`, `visual_projection`), the concept bank, and the
    decoder (`text_decoder`, plus `enc_to_dec_proj` when the image and decoder widths differ). Equal names make one
    checkpoint load into every head.
    """

    # `NLIPModel`'s image path, reused as is: tower output whose `pooler_output` is the projected image embedding.
    get_image_features = NLIPModel.get_image_features

    def _init_vision_and_decoder(self, config: NLIPConfig) -> None:
        if config.decoder_config is None:
            raise ValueError(
                f"{type(self).__name__} needs NLIPConfig.decoder_config (a causal LM with cross-attention, e.g. "
                "`dict(model_type='bert', is_decoder=True, add_cross_attention=True)`)."
            )
        self.vision_model = build_tower(config.vision_config)
        config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        self.vision_model.config = config.vision_config
        vision_width = tower_hidden_size(self.vision_model)
        self.visual_projection = nn.Linear(vision_width, config.projection_dim, bias=False)
        try:
            self.text_decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        except ValueError as err:
            raise ValueError(
                f"NLIPConfig.decoder_config (model_type {config.decoder_config.model_type!r}) has no causal-LM class "
                "in transformers' AutoModelForCausalLM; use a decoder such as 'bert', 'roberta' or 'gpt2'."
            ) from err
        config.decoder_config._attn_implementation = self.text_decoder.config._attn_implementation
        self.text_decoder.config = config.decoder_config
        decoder_width = config.decoder_config.hidden_size
        self.enc_to_dec_proj = nn.Linear(vision_width, decoder_width) if vision_width != decoder_width else None

    def _special_token_id(self, name: str) -> int | None:
        value = getattr(getattr(self, "generation_config", None), name, None)  # NLIPForPreTraining does not generate
        if value is None:
            value = getattr(self.config.decoder_config, name, None)
        return value[0] if isinstance(value, (list, tuple)) else value

    def concept_prefix(
        self, concepts: Sequence[Sequence[str]] | None = None, token_ids: Sequence[Sequence[Sequence[int]]] | None = None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """
        Left-padded `(concept_input_ids, concept_attention_mask)` for `forward`/`generate`: from concept names in the
        bank's vocabulary, or from per-concept `token_ids` (`tokenize_concepts(tokenizer, names, separator)` each).
        At most `config.concept_max_length` tokens per example.
        """
        if (concepts is None) == (token_ids is None):
            raise ValueError("Pass exactly one of `concepts` (names) or `token_ids`.")
        if token_ids is None:
            token_ids = self.concept_token_ids_for(concepts)
        rows = concept_prefix_rows(token_ids, self.config.concept_max_length)
        return left_pad(rows, self._special_token_id("pad_token_id") or 0, device=self.device)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Matched per module: transformers skips custom-code modules without direct parameters (e.g. this model).
        super()._init_weights(module)
        self._init_concept_bank_weights(module)
        factor = self.config.initializer_factor
        if module is self.visual_projection or module is self.enc_to_dec_proj:
            init.normal_(module.weight, std=module.in_features**-0.5 * factor)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif module is getattr(self, "text_projection", None):
            init.normal_(module.weight, std=self.config.text_config.hidden_size**-0.5 * factor)
        elif module is self and getattr(self, "logit_scale", None) is not None:
            init.constant_(self.logit_scale, self.config.logit_scale_init_value)

    def get_output_embeddings(self) -> nn.Module:
        return self.text_decoder.get_output_embeddings()

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize every vocabulary-sized tower (the decoder, and the text encoder where there is one) and both configs'
        `vocab_size`: the family shares one tokenizer."""
        towers = [self.text_decoder] + ([self.text_model] if hasattr(self, "text_model") else [])
        for tower in towers:
            tower.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if new_num_tokens is not None or pad_to_multiple_of is not None:
            vocab_size = self.text_decoder.get_input_embeddings().weight.shape[0]
            self.config.decoder_config.vocab_size = self.config.text_config.vocab_size = self.vocab_size = vocab_size
        return self.get_input_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.text_decoder.set_output_embeddings(new_embeddings)

    def image_hidden_states(self, vision_last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The image tokens the decoder cross-attends to: the tower's last hidden states (a CNN's feature map
        `[batch, channels, height, width]` as `height * width` tokens), projected to its width."""
        vision_last_hidden_state = image_tokens(vision_last_hidden_state)
        if self.enc_to_dec_proj is None:
            return vision_last_hidden_state
        return self.enc_to_dec_proj(vision_last_hidden_state)

    def _decode(
        self,
        image_hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        concept_input_ids: torch.LongTensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sample_weights: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[ModelOutput, torch.Tensor | None, torch.Tensor | None]:
        """Run the decoder on `[concept prefix] + input_ids`; returns its output, the LM loss and per-sample losses."""
        if input_ids is None:
            raise ValueError("`input_ids` (the caption tokens, starting with the caption's BOS token) are required.")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(labels.shape)}.")
        prefix_length = 0
        if concept_input_ids is not None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("`concept_input_ids` can only be given on the first call, not with a filled cache.")
            prefix_length = concept_input_ids.shape[1]
            if concept_attention_mask is None:
                concept_attention_mask = torch.ones_like(concept_input_ids)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            input_ids = torch.cat([concept_input_ids, input_ids], dim=1)
            attention_mask = torch.cat([concept_attention_mask.to(attention_mask.dtype), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([torch.full_like(concept_input_ids, IGNORE_INDEX), labels], dim=1)
        if labels is not None:
            # The caption's first token (BOS) is given, never predicted, with or without a concept prefix.
            labels = labels.clone()
            labels[:, prefix_length] = IGNORE_INDEX
            use_cache = False
        if position_ids is None and attention_mask is not None:
            # Positions count real tokens only, so left-padded prefixes get the same positions as unpadded ones.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            # generate() hands decoder-only models a DynamicCache; cross-attention needs its own cache next to it.
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config.decoder_config))
        outputs = self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            encoder_hidden_states=image_hidden_states,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        loss = per_sample_loss = None
        if labels is not None:
            loss, per_sample_loss = caption_lm_loss(outputs.logits, labels, sample_weights, num_items_in_batch)
        return outputs, loss, per_sample_loss


class NLIPForCaptioning(NLIPCaptioningPreTrainedModel, GenerationMixin):
    """
    Concept-conditioned image captioner (NLIP's noise-completion captioner): the image tower of
    [`NLIPModel`] and a causal text decoder (default BERT, any transformers causal LM with cross-attention) that
    attends to the image tokens and reads the image's concepts as a prefix.

    `generate(pixel_values)` retrieves concepts from the model's concept bank when none are given (no bank: no
    prefix) and returns the caption tokens without the prefix; `caption(images, processor)` returns strings.
    """

    main_input_name = "pixel_values"
    # Weights of a pre-training checkpoint that this head does not use.
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"^ir_decoder\."]

    def __init__(self, config: NLIPConfig):
        super().__init__(config)
        self._init_vision_and_decoder(config)
        self._init_concept_bank()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_decoder.set_input_embeddings(value)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        concept_input_ids: torch.LongTensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sample_weights: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> NLIPCaptioningOutput:
        r"""
        Scores a caption (teacher forcing) for each image.

        input_ids / attention_mask (`[batch, length]`):
            Caption tokens as the tokenizer writes them (BOS first, right padding); the BOS is given, never predicted.
        labels (`[batch, length]`, *optional*):
            Targets aligned with `input_ids`, `-100` where there is none (padding). Gives `loss` and `per_sample_loss`
            (see [`caption_lm_loss`]).
        concept_input_ids / concept_attention_mask (`[batch, prefix_length]`, *optional*):
            Concept prefix (left padded, from `model.concept_prefix(...)` or `tokenize_concepts`), prepended to
            `input_ids` and excluded from the loss.
        image_hidden_states (*optional*):
            Image tokens from an earlier call (`outputs.image_hidden_states`) instead of `pixel_values`.
        sample_weights (`[batch]`, *optional*):
            Per-sample weights of the LM loss (e.g. clean probabilities, to train on likely-clean captions).
        """
        tower_kwargs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None}
        vision_outputs = None
        if image_hidden_states is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or the `image_hidden_states` of an earlier call).")
            vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
            image_hidden_states = self.image_hidden_states(vision_outputs.last_hidden_state)
        decoder_outputs, loss, per_sample_loss = self._decode(
            image_hidden_states,
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            concept_input_ids=concept_input_ids,
            concept_attention_mask=concept_attention_mask,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            sample_weights=sample_weights,
            **tower_kwargs,
            **kwargs,
        )
        return NLIPCaptioningOutput(
            loss=loss,
            per_sample_loss=per_sample_loss,
            logits=decoder_outputs.logits,
            cache=decoder_outputs.cache,
            hidden_states=decoder_outputs.hidden_states,
            attentions=decoder_outputs.attentions,
            cross_attentions=getattr(decoder_outputs, "cross_attentions", None),
            image_hidden_states=image_hidden_states,
            vision_model_output=vision_outputs,
        )

    def _prefix_rows(self, batch_size, concepts, concept_input_ids, concept_attention_mask, image_embeds):
        """Concept prefix of each example: given ids, given names, retrieved from the bank, or none."""
        if concept_input_ids is not None:
            mask = torch.ones_like(concept_input_ids) if concept_attention_mask is None else concept_attention_mask
            if concept_input_ids.shape[0] != batch_size or mask.shape != concept_input_ids.shape:
                raise ValueError(
                    f"`concept_input_ids`/`concept_attention_mask` must be [{batch_size}, prefix_length]; got "
                    f"{tuple(concept_input_ids.shape)} and {tuple(mask.shape)}."
                )
            return [[t for t, keep in zip(ids, m) if keep] for ids, m in zip(concept_input_ids.tolist(), mask.tolist())]
        if concepts is not None:
            if isinstance(concepts, str) or len(concepts) != batch_size:
                raise ValueError(f"`concepts` must hold one list of concept names per image ({batch_size}).")
            return concept_prefix_rows(self.concept_token_ids_for(concepts), self.config.concept_max_length)
        if self.has_concept_bank and self.config.num_concepts > 0:
            return self.retrieved_prefix_rows(image_embeds)
        return [[] for _ in range(batch_size)]

    def _prompt_rows(self, batch_size, input_ids, attention_mask) -> list[list[int]]:
        """Caption prompts (one for all images, or one per image): each starts with the caption BOS; a tokenizer's
        trailing end token is dropped."""
        bos = self._special_token_id("bos_token_id")
        if bos is None:
            raise ValueError(
                "Set `decoder_config.bos_token_id` (or `generation_config.bos_token_id`): the token that starts a "
                "caption, e.g. the tokenizer's BOS or [CLS]."
            )
        if input_ids is None:
            return [[bos] for _ in range(batch_size)]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if input_ids.shape[0] == 1 and batch_size > 1:  # one prompt for every image
            input_ids, mask = input_ids.expand(batch_size, -1), mask.expand(batch_size, -1)
        if input_ids.shape[0] != batch_size:
            raise ValueError(f"`input_ids` has {input_ids.shape[0]} rows for {batch_size} images (expected 1 or {batch_size}).")
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        rows = []
        for ids, keep in zip(input_ids.tolist(), mask.tolist()):
            row = [t for t, k in zip(ids, keep) if k]
            if row and row[-1] in eos:
                row = row[:-1]
            rows.append(row if row and row[0] == bos else [bos] + row)
        return rows

    def _fit_max_new_tokens(self, generate_kwargs: dict, input_length: int) -> None:
        """Keep `max_new_tokens`/`min_new_tokens` within the decoder's position embeddings (prefix + prompt included)."""
        limit = getattr(self.config.decoder_config, "max_position_embeddings", None)
        if limit is None:
            return
        room = limit - input_length
        if room < 1:
            raise ValueError(
                f"The concept prefix and prompt take {input_length} tokens, which fills the decoder's "
                f"max_position_embeddings ({limit}); lower `config.concept_max_length` or shorten the prompt."
            )
        for name in ("max_new_tokens", "min_new_tokens"):
            requested = generate_kwargs.get(name)
            if requested is not None and requested > room:
                logger.warning(f"{name}={requested} reduced to {room} to fit max_position_embeddings={limit}.")
                generate_kwargs[name] = room

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        concepts: Sequence[Sequence[str]] | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        concept_input_ids: torch.LongTensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        r"""
        Captions images with any `GenerationMixin` strategy (greedy, beam search, sampling; with or without KV cache).

        The image is encoded once; the decoder reads `[concept prefix][caption prompt]`, both left padded. Concepts are
        `concept_input_ids`, else `concepts` (names from the bank's vocabulary, `[]` for none), else the top
        `config.num_concepts` from the concept bank, else none. The prompt is `input_ids` (e.g. the processor's
        encoding of `"a photo of"`), else the caption's BOS token.

        Returns what `GenerationMixin.generate` returns, with the concept prefix removed from the sequences: each row
        is the (left-padded) prompt followed by the new tokens, so `processor.batch_decode(out, skip_special_tokens=True)`
        gives the captions.
        """
        if pixel_values is None:
            raise ValueError("`pixel_values` are required to caption images.")
        generate_kwargs.pop("token_type_ids", None)  # a processor's, for the prompt alone; the decoder input is rebuilt
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True)
        image_hidden_states = self.image_hidden_states(vision_outputs.last_hidden_state)
        batch_size = pixel_values.shape[0]
        image_embeds = None
        if concepts is None and concept_input_ids is None and self.has_concept_bank:
            image_embeds = self.visual_projection(pool_tower_output(vision_outputs, self.config.vision_pooling))
        prefix_rows = self._prefix_rows(batch_size, concepts, concept_input_ids, concept_attention_mask, image_embeds)
        pad = self._special_token_id("pad_token_id") or 0
        prefix_ids, prefix_mask = left_pad(prefix_rows, pad, device=pixel_values.device)
        prompt_ids, prompt_mask = left_pad(self._prompt_rows(batch_size, input_ids, attention_mask), pad, device=pixel_values.device)
        decoder_input_ids = torch.cat([prefix_ids, prompt_ids], dim=1)
        self._fit_max_new_tokens(generate_kwargs, decoder_input_ids.shape[1])
        outputs = super().generate(
            input_ids=decoder_input_ids,
            attention_mask=torch.cat([prefix_mask, prompt_mask], dim=1),
            image_hidden_states=image_hidden_states,
            **generate_kwargs,
        )
        prefix_length = prefix_ids.shape[1]
        if isinstance(outputs, torch.Tensor):
            return outputs[:, prefix_length:]
        outputs.sequences = outputs.sequences[:, prefix_length:]
        return outputs

    @torch.no_grad()
    def caption(
        self,
        images,
        processor,
        concepts: Sequence[Sequence[str]] | None = None,
        prompt: str | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """
        Caption PIL images / arrays with `processor` (an `NLIPProcessor`): returns one string per image (per returned
        sequence), without the concept prefix or special tokens. `concepts`: any names per image (tokenized here);
        default: retrieved from the concept bank. `prompt`: text the captions continue (e.g. `"a photo of"`).
        """
        tokenizer = processor.tokenizer
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        extra = {}
        if concepts is not None:
            token_ids = [tokenize_concepts(tokenizer, names, self.config.concept_separator) if names else [] for names in concepts]
            extra["concept_input_ids"], extra["concept_attention_mask"] = self.concept_prefix(token_ids=token_ids)
        if prompt is not None:
            encoded = tokenizer([prompt] * pixel_values.shape[0], return_tensors="pt")
            extra["input_ids"], extra["attention_mask"] = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        sequences = self.generate(pixel_values=pixel_values, **extra, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


__all__ = ["NLIPCaptioningOutput", "NLIPCaptioningPreTrainedModel", "NLIPForCaptioning", "caption_lm_loss"]
