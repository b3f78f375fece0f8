# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""Convert transformers `CLIPModel` checkpoints into `NLIPModel` ones with identical embeddings.

This is the path for fine-tuning a pretrained CLIP (e.g. `openai/clip-vit-base-patch32`) on noisy pairs with the
nlip methods. NLIPModel composes the same CLIP vision/text towers under the same parameter names, so the weights
carry over one to one.
"""

import torch
from transformers import CLIPModel, CLIPProcessor

from .configuration_nlip import NLIPConfig
from .modeling_nlip import NLIPModel
from .processing_nlip import NLIPProcessor


def convert_clip_to_nlip(clip_model: CLIPModel) -> NLIPModel:
    """Return an `NLIPModel` holding `clip_model`'s towers, projections and logit scale (strict weight copy)."""
    if not isinstance(clip_model, CLIPModel):
        raise TypeError(f"convert_clip_to_nlip expects a transformers CLIPModel, got {type(clip_model).__name__}.")
    clip_config = clip_model.config
    config = NLIPConfig(
        vision_config=clip_config.vision_config.to_dict(),
        text_config=clip_config.text_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=float(clip_config.logit_scale_init_value),
    )
    model = NLIPModel(config).to(dtype=clip_model.dtype)
    model.load_state_dict(clip_model.state_dict(), strict=True)
    return model.eval()


def convert_clip_processor(clip_processor: CLIPProcessor) -> NLIPProcessor:
    """Wrap a CLIP processor's image processor and tokenizer into an `NLIPProcessor`."""
    return NLIPProcessor(image_processor=clip_processor.image_processor, tokenizer=clip_processor.tokenizer)


@torch.no_grad()
def embedding_parity(clip_model: CLIPModel, nlip_model: NLIPModel, inputs: dict) -> dict[str, float]:
    """Max absolute difference between the two models' image and text embeddings on the same `inputs`."""
    clip_out = clip_model.eval()(**inputs)
    nlip_out = nlip_model.eval()(**inputs)
    return {
        "image_embeds_max_abs_diff": (clip_out.image_embeds - nlip_out.image_embeds).abs().max().item(),
        "text_embeds_max_abs_diff": (clip_out.text_embeds - nlip_out.text_embeds).abs().max().item(),
    }


__all__ = ["convert_clip_to_nlip", "convert_clip_processor", "embedding_parity"]
