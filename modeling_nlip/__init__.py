"""The NLIP model family: configuration, dual encoder, processor — registered with transformers' Auto classes."""

from .concept_bank import NLIPConceptBankMixin, tokenize_concepts
from .concept_vocabulary import DEFAULT_CONCEPT_VOCABULARY
from .configuration_nlip import NLIPConfig
from .conversion_clip import convert_clip_processor, convert_clip_to_nlip
from .modeling_nlip import NLIPModel, NLIPOutput, NLIPPreTrainedModel
from .modeling_nlip_captioning import NLIPCaptioningOutput, NLIPForCaptioning, caption_lm_loss
from .modeling_nlip_pretraining import NLIPForPreTraining, NLIPForPreTrainingOutput
from .processing_nlip import NLIPProcessor, image_processor_from_timm_config
from .registration import register_nlip
from .version_check import TESTED_TRANSFORMERS, warn_if_untested_transformers

warn_if_untested_transformers()
register_nlip()

__all__ = [
    "DEFAULT_CONCEPT_VOCABULARY",
    "NLIPCaptioningOutput",
    "NLIPConceptBankMixin",
    "NLIPConfig",
    "NLIPForCaptioning",
    "NLIPForPreTraining",
    "NLIPForPreTrainingOutput",
    "NLIPModel",
    "NLIPOutput",
    "NLIPPreTrainedModel",
    "NLIPProcessor",
    "TESTED_TRANSFORMERS",
    "caption_lm_loss",
    "convert_clip_processor",
    "convert_clip_to_nlip",
    "image_processor_from_timm_config",
    "register_nlip",
    "tokenize_concepts",
    "warn_if_untested_transformers",
]
