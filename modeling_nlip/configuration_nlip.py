# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP configuration: one config for the dual encoder, the captioner and the pre-training model."""


from typing import ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
POOLING_MODES = ("pooler", "mean", "cls")


class NLIPConfig(PreTrainedConfig):
    r"""
    Configuration of the NLIP model family ([`NLIPModel`], [`NLIPForCaptioning`], [`NLIPForPreTraining`]).

    The towers are existing transformers backbones chosen by `model_type` (the `VisionTextDualEncoderModel`
    pattern), so pretrained ViT / CLIP / SigLIP / ViT-MAE image encoders and CLIP / BERT / MiniLM / RoBERTa text
    encoders can be plugged in. The default is a CLIP ViT-B/16 image tower and a CLIP text transformer.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the image encoder (any transformers vision model, default `clip_vision_model`, patch 16), or
            `{"model_type": "timm_wrapper", "architecture": ...}` for any timm backbone (`TimmWrapperModel`; a CNN's
            `[B, C, H, W]` feature map becomes `H*W` image tokens, its timm head pooling the `pooler` output).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text encoder (any transformers text encoder, default `clip_text_model`).
        decoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the captioning decoder: a causal LM that supports cross-attention. Only the captioning
            and pre-training heads use it; `None` for a pure dual encoder.
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the shared image-text embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the learned log inverse temperature (CLIP's log(1/0.07)).
        vision_pooling / text_pooling (`str`, *optional*, defaults to `"pooler"`):
            How a tower's output becomes one vector: `"pooler"` uses the backbone's `pooler_output` (CLIP: class /
            end-of-text token), `"mean"` averages the (unpadded) last hidden states — the right choice for
            sentence-transformers towers such as MiniLM — and `"cls"` takes the first token.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Scale of the projection-layer initialisation.
        concept_vocabulary (`list[str]`, *optional*):
            Names in the model's concept bank (set by `build_concept_bank`; the bank's embeddings are a weight of the
            checkpoint, sized from this list when a checkpoint is loaded). `None`: no bank.
        concept_token_ids (`list[list[int]]`, *optional*):
            Token ids of each vocabulary entry followed by `concept_separator` (set by `build_concept_bank`), so the
            captioner can build its concept prefix without a tokenizer.
        concept_prompt_template (`str`, *optional*, defaults to `"a photo of a {}"`):
            Prompt whose text embedding represents a concept in the bank; `{}` is replaced by the concept name.
        concept_separator (`str`, *optional*, defaults to `","`):
            Text appended to each concept in the captioner's prefix (`"cat, dog, [BOS] caption ..."`).
        num_concepts (`int`, *optional*, defaults to 5):
            How many concepts the captioner retrieves per image when none are given (0: caption without concepts).
        concept_max_length (`int`, *optional*, defaults to 32):
            Most tokens in a concept prefix; the lowest-ranked concepts that do not fit are dropped whole.
        itc_weight / lm_weight / ir_weight (`float`, *optional*, defaults to 1.0 / 1.0 / 0.0):
            Weights of the contrastive, captioning-LM and masked-image-reconstruction terms of [`NLIPForPreTraining`]'s
            objective. `ir_weight > 0` adds the reconstruction decoder.
        mask_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of image patches masked for the reconstruction term (MAE's default).
        ir_decoder_hidden_size / ir_decoder_num_hidden_layers / ir_decoder_num_attention_heads (`int`, *optional*):
            Size of the ViT-MAE-style reconstruction decoder (defaults 512 / 8 / 16, MAE's).
        ir_norm_pix_loss (`bool`, *optional*, defaults to `True`):
            Reconstruct per-patch normalised pixels (MAE's `norm_pix_loss`).
    """

    model_type = "nlip"
    sub_configs_defaults: ClassVar = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", init_kwargs={"patch_size": 16}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_text_model"),
        "decoder_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="bert",
            init_kwargs={"is_decoder": True, "add_cross_attention": True},
            optional=True,
        ),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    decoder_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    vision_pooling: Literal["pooler", "mean", "cls"] = "pooler"
    text_pooling: Literal["pooler", "mean", "cls"] = "pooler"
    initializer_factor: float = 1.0
    concept_vocabulary: list[str] | None = None
    concept_token_ids: list[list[int]] | None = None
    concept_prompt_template: str = "a photo of a {}"
    concept_separator: str = ","
    num_concepts: int = 5
    concept_max_length: int = 32
    itc_weight: float = 1.0
    lm_weight: float = 1.0
    ir_weight: float = 0.0
    mask_ratio: float = 0.75
    ir_decoder_hidden_size: int = 512
    ir_decoder_num_hidden_layers: int = 8
    ir_decoder_num_attention_heads: int = 16
    ir_norm_pix_loss: bool = True

    def __post_init__(self, **kwargs):
        for name in ("vision_config", "text_config", "decoder_config"):
            sub_config = getattr(self, name)
            if isinstance(sub_config, dict) and sub_config.get("model_type") not in (None, *CONFIG_MAPPING.keys()):
                raise ValueError(
                    f"NLIPConfig.{name} has unknown model_type {sub_config['model_type']!r}; expected a transformers "
                    "model type such as 'clip_vision_model', 'vit', 'siglip_vision_model', 'timm_wrapper', "
                    "'clip_text_model', 'bert'."
                )
            if sub_config is not None and not isinstance(sub_config, (dict, PreTrainedConfig)):
                raise TypeError(f"NLIPConfig.{name} must be a dict or a PreTrainedConfig, got {type(sub_config).__name__}.")
        if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
            raise ValueError(f"NLIPConfig.projection_dim must be a positive integer, got {self.projection_dim!r}.")
        for name in ("vision_pooling", "text_pooling"):
            if getattr(self, name) not in POOLING_MODES:
                raise ValueError(f"NLIPConfig.{name} must be one of {POOLING_MODES}, got {getattr(self, name)!r}.")
        self._validate_concept_settings()
        self._validate_objective_settings()
        super().__post_init__(**kwargs)
        if self.decoder_config is not None and not getattr(self.decoder_config, "add_cross_attention", False):
            raise ValueError(
                "NLIPConfig.decoder_config must describe a decoder with cross-attention to image tokens: set "
                "`is_decoder=True, add_cross_attention=True` in it."
            )

    def _validate_concept_settings(self) -> None:
        template = self.concept_prompt_template
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"NLIPConfig.concept_prompt_template must be a string with exactly one '{{}}' for the concept name, got "
                f"{template!r}."
            )
        if not isinstance(self.concept_separator, str):
            raise TypeError(f"NLIPConfig.concept_separator must be a string, got {type(self.concept_separator).__name__}.")
        for name in ("num_concepts", "concept_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_concepts" else 1):
                expected = "a non-negative" if name == "num_concepts" else "a positive"
                raise ValueError(f"NLIPConfig.{name} must be {expected} integer, got {value!r}.")
        vocabulary, token_ids = self.concept_vocabulary, self.concept_token_ids
        if vocabulary is not None:
            if not isinstance(vocabulary, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in vocabulary):
                raise ValueError("NLIPConfig.concept_vocabulary must be a list of non-empty strings (concept names).")
            if len(set(vocabulary)) != len(vocabulary):
                duplicates = sorted({c for c in vocabulary if vocabulary.count(c) > 1})
                raise ValueError(f"NLIPConfig.concept_vocabulary has duplicate names: {duplicates[:10]}.")
            self.concept_vocabulary = list(vocabulary)
        if token_ids is not None:
            if vocabulary is None or len(token_ids) != len(vocabulary):
                raise ValueError(
                    "NLIPConfig.concept_token_ids must hold one token-id list per concept_vocabulary entry; got "
                    f"{len(token_ids)} lists for {0 if vocabulary is None else len(vocabulary)} concepts."
                )
            if not all(isinstance(ids, (list, tuple)) and ids and all(isinstance(i, int) for i in ids) for ids in token_ids):
                raise ValueError("NLIPConfig.concept_token_ids must be a list of non-empty lists of integer token ids.")
            self.concept_token_ids = [list(ids) for ids in token_ids]

    def _validate_objective_settings(self) -> None:
        for name in ("itc_weight", "lm_weight", "ir_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"NLIPConfig.{name} must be a non-negative number, got {value!r}.")
        if not isinstance(self.mask_ratio, (int, float)) or not 0 < self.mask_ratio < 1:
            raise ValueError(f"NLIPConfig.mask_ratio must lie strictly between 0 and 1, got {self.mask_ratio!r}.")
        for name in ("ir_decoder_hidden_size", "ir_decoder_num_hidden_layers", "ir_decoder_num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NLIPConfig.{name} must be a positive integer, got {value!r}.")
        if self.ir_decoder_hidden_size % self.ir_decoder_num_attention_heads:
            raise ValueError(
                f"NLIPConfig.ir_decoder_hidden_size ({self.ir_decoder_hidden_size}) must be divisible by "
                f"ir_decoder_num_attention_heads ({self.ir_decoder_num_attention_heads})."
            )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The captioning decoder's config when `decoder=True` (generation sizes its cache with it), else the text encoder's."""
        if decoder and not encoder and self.decoder_config is not None:
            return self.decoder_config
        return self.text_config

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs
    ) -> "NLIPConfig":
        """Build an [`NLIPConfig`] from the configs of two (pretrained) towers."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


__all__ = ["NLIPConfig"]
