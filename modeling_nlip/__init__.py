"""The NLIP model family: configuration, dual encoder, processor — registered with transformers' Auto classes."""

from .configuration_nlip import NLIPConfig
from .conversion_clip import convert_clip_processor, convert_clip_to_nlip
from .modeling_nlip import NLIPModel, NLIPOutput, NLIPPreTrainedModel
from .processing_nlip import NLIPProcessor
from .registration import register_nlip

register_nlip()

__all__ = [
    "NLIPConfig",
    "NLIPModel",
    "NLIPOutput",
    "NLIPPreTrainedModel",
    "NLIPProcessor",
    "convert_clip_processor",
    "convert_clip_to_nlip",
    "register_nlip",
]
