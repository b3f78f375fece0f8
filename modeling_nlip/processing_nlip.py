# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP processor: an image processor and a tokenizer behind one `__call__`, saved and loaded as one object."""


import math
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil, ProcessorMixin
from transformers.image_utils import PILImageResampling

# timm's `interpolation` names -> PIL resampling filters (timm's "random" trains with a random one; bicubic in eval).
TIMM_INTERPOLATION = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
    "box": PILImageResampling.BOX,
    "hamming": PILImageResampling.HAMMING,
    "random": PILImageResampling.BICUBIC,
}
TIMM_DEFAULT_CROP_PCT = 0.875


def image_processor_from_timm_config(pretrained_cfg: dict[str, Any]) -> CLIPImageProcessorPil:
    """
    The image processor of a timm model's `pretrained_cfg` (its `config.json`'s `pretrained_cfg`, or
    `timm_model.pretrained_cfg`) as a transformers `CLIPImageProcessorPil`, which needs neither timm nor the Hub.

    It reproduces timm's evaluation transform (`timm.data.create_transform(**resolve_data_config(...))`): resize to
    `floor(size / crop_pct)` (the shortest edge for `crop_mode="center"`, both edges for `"squash"`) with the
    checkpoint's interpolation, center-crop `input_size`, scale to [0, 1] and normalise with its `mean` / `std`.
    The pixels are identical when the crop's margins are even (e.g. 224 px at crop_pct 0.875 on a 3:2 photo); with
    an odd margin the crop may sit one pixel apart (timm rounds the offset, transformers floors it).
    """
    if not isinstance(pretrained_cfg, dict) or "input_size" not in pretrained_cfg:
        raise ValueError(
            "A timm pretrained_cfg with at least `input_size` is needed to build the image processor; got "
            f"{pretrained_cfg!r}."
        )
    _, height, width = pretrained_cfg["input_size"]
    crop_pct = pretrained_cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
    crop_mode = pretrained_cfg.get("crop_mode") or "center"
    interpolation = pretrained_cfg.get("interpolation") or "bicubic"
    if interpolation not in TIMM_INTERPOLATION:
        raise ValueError(f"Unsupported timm interpolation {interpolation!r}; expected one of {sorted(TIMM_INTERPOLATION)}.")
    if crop_mode == "center":
        if height != width:
            raise ValueError(
                f"timm crop_mode 'center' with a non-square input_size {height}x{width} resizes keeping the aspect "
                "ratio to a non-square target, which CLIPImageProcessor cannot express; build the processor by hand."
            )
        size = {"shortest_edge": math.floor(height / crop_pct)}
    elif crop_mode == "squash":
        size = {"height": math.floor(height / crop_pct), "width": math.floor(width / crop_pct)}
    else:
        raise ValueError(f"Unsupported timm crop_mode {crop_mode!r}: expected 'center' or 'squash'.")
    return CLIPImageProcessorPil(
        size=size,
        crop_size={"height": height, "width": width},
        resample=TIMM_INTERPOLATION[interpolation],
        image_mean=list(pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(pretrained_cfg.get("std", (0.229, 0.224, 0.225))),
        do_center_crop=True,
        do_convert_rgb=True,
    )


class NLIPProcessor(ProcessorMixin):
    r"""
    Wraps any transformers image processor (CLIP, ViT, SigLIP, ...) and any tokenizer into one processor.

    `processor(images=..., text=..., padding=True, return_tensors="pt")` returns `pixel_values` and/or
    `input_ids`/`attention_mask`; `save_pretrained`/`from_pretrained` (and `AutoProcessor`) round-trip both parts.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **tokenizer_kwargs
    ) -> "NLIPProcessor":
        """The processor matching `NLIPModel.from_vision_text_pretrained` on the same two towers: the vision tower's
        image processor (for a timm checkpoint, `image_processor_from_timm_config` of its `pretrained_cfg`, so neither
        timm's transforms nor the Hub are needed) and the text tower's tokenizer (`tokenizer_kwargs` go to it)."""
        config = AutoConfig.from_pretrained(vision_model_name_or_path)
        if config.model_type == "timm_wrapper":
            image_processor = image_processor_from_timm_config(getattr(config, "pretrained_cfg", None))
        else:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **tokenizer_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)


__all__ = ["NLIPProcessor", "image_processor_from_timm_config"]
