"""nlip training recipes: noise-robust losses, noise estimation, data, metrics, and `NLIPTrainer`."""

from .data.collator import ImageTextCollator
from .data.pairs import SkipReport, load_imagefolder_pairs, load_webdataset_pairs, prepare_pairs
from .feature_cache import FeatureCache
from .noise.loss_bank import LossBank
from .losses import (
    Contribution,
    combine_contributions,
    complementary_contrastive_loss,
    contrastive_logits,
    contrastive_loss,
    nitc_loss,
    npc_confidence,
    srcl_negative_weights,
    srcl_weight_pair,
)
from .noise.memory_bank import MemoryBank, build_memory_bank
from .evaluation.metrics import captioning_metrics, noise_detection_metrics, retrieval_metrics, zero_shot_accuracy
from .noise.estimation import CleanProbabilityEstimator, NoiseEstimate
from .noise.injection import inject_caption_noise, truncate_captions
from .noise.state import NoiseState
from .noise.tracker import NoiseTracker
from .objectives import Objective, register_objective
from .trainer import NLIPTrainer
from .training_args import NLIPTrainingArguments

__all__ = [
    "CleanProbabilityEstimator",
    "FeatureCache",
    "ImageTextCollator",
    "LossBank",
    "MemoryBank",
    "NLIPTrainer",
    "NLIPTrainingArguments",
    "Contribution",
    "NoiseEstimate",
    "NoiseState",
    "NoiseTracker",
    "Objective",
    "SkipReport",
    "build_memory_bank",
    "captioning_metrics",
    "combine_contributions",
    "complementary_contrastive_loss",
    "contrastive_logits",
    "contrastive_loss",
    "inject_caption_noise",
    "load_imagefolder_pairs",
    "load_webdataset_pairs",
    "nitc_loss",
    "noise_detection_metrics",
    "npc_confidence",
    "prepare_pairs",
    "retrieval_metrics",
    "register_objective",
    "srcl_negative_weights",
    "srcl_weight_pair",
    "truncate_captions",
    "zero_shot_accuracy",
]
