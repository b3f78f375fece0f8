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
            Config of the image encoder (any transformers vision model, default `clip_vision_model`, patch 16).
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

    def __post_init__(self, **kwargs):
        for name in ("vision_config", "text_config", "decoder_config"):
            sub_config = getattr(self, name)
            if isinstance(sub_config, dict) and sub_config.get("model_type") not in (None, *CONFIG_MAPPING.keys()):
                raise ValueError(
                    f"NLIPConfig.{name} has unknown model_type {sub_config['model_type']!r}; expected a transformers "
                    f"model type such as 'clip_vision_model', 'vit', 'siglip_vision_model', 'clip_text_model', 'bert'."
                )
            if sub_config is not None and not isinstance(sub_config, (dict, PreTrainedConfig)):
                raise TypeError(f"NLIPConfig.{name} must be a dict or a PreTrainedConfig, got {type(sub_config).__name__}.")
        if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
            raise ValueError(f"NLIPConfig.projection_dim must be a positive integer, got {self.projection_dim!r}.")
        for name in ("vision_pooling", "text_pooling"):
            if getattr(self, name) not in POOLING_MODES:
                raise ValueError(f"NLIPConfig.{name} must be one of {POOLING_MODES}, got {getattr(self, name)!r}.")
        super().__post_init__(**kwargs)
        if self.decoder_config is not None and not getattr(self.decoder_config, "add_cross_attention", False):
            raise ValueError(
                "NLIPConfig.decoder_config must describe a decoder with cross-attention to image tokens: set "
                "`is_decoder=True, add_cross_attention=True` in it."
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
