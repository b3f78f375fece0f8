# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""Registers the NLIP classes with transformers' Auto classes and marks them for remote-code export."""


from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_nlip import NLIPConfig
from .modeling_nlip import NLIPModel
from .modeling_nlip_captioning import NLIPForCaptioning
from .modeling_nlip_pretraining import NLIPForPreTraining
from .processing_nlip import NLIPProcessor


def register_nlip() -> None:
    """Make `AutoConfig`/`AutoModel`/`AutoProcessor`/... resolve `model_type="nlip"`, and make saved checkpoints
    carry `auto_map` plus the modeling files so users without the package load them with `trust_remote_code=True`."""
    AutoConfig.register("nlip", NLIPConfig, exist_ok=True)
    AutoModel.register(NLIPConfig, NLIPModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(NLIPConfig, NLIPModel, exist_ok=True)
    AutoModelForImageTextToText.register(NLIPConfig, NLIPForCaptioning, exist_ok=True)
    AutoModelForPreTraining.register(NLIPConfig, NLIPForPreTraining, exist_ok=True)
    AutoProcessor.register(NLIPConfig, NLIPProcessor, exist_ok=True)

    NLIPConfig.register_for_auto_class()
    NLIPModel.register_for_auto_class("AutoModel")
    NLIPForCaptioning.register_for_auto_class("AutoModelForImageTextToText")
    NLIPForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    NLIPProcessor.register_for_auto_class("AutoProcessor")
