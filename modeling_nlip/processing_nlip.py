# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP processor: an image processor and a tokenizer behind one `__call__`, saved and loaded as one object."""


from transformers import ProcessorMixin


class NLIPProcessor(ProcessorMixin):
    r"""
    Wraps any transformers image processor (CLIP, ViT, SigLIP, ...) and any tokenizer into one processor.

    `processor(images=..., text=..., padding=True, return_tensors="pt")` returns `pixel_values` and/or
    `input_ids`/`attention_mask`; `save_pretrained`/`from_pretrained` (and `AutoProcessor`) round-trip both parts.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)


__all__ = ["NLIPProcessor"]
