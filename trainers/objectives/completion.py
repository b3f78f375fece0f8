"""NLIP noise completion's caption refresh: a concept-conditioned captioner writes a synthetic
caption for every training image; the trainer stores them by dataset index and feeds them to NITC as a second,
noise-weighted positive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..data.pairs import decode_image, to_rgb
from ..distributed import gather_objects, is_distributed


logger = logging.getLogger(__name__)


def load_captioner(completion_model: str | None, model: nn.Module) -> nn.Module:
    """The captioner of noise completion: the `NLIPForCaptioning` checkpoint at `completion_model`, else `model`
    itself when it captions (an `NLIPForPreTraining`, through its weight-sharing `captioner()` view)."""
    if completion_model is not None:
        return AutoModelForImageTextToText.from_pretrained(completion_model)
    if hasattr(model, "captioner"):
        return model
    raise ValueError(
        "noise_completion needs a captioner: set `completion_model` to an NLIPForCaptioning checkpoint, pass "
        f"`captioner=` to NLIPTrainer, or train an NLIPForPreTraining (got a {type(model).__name__})."
    )


def load_captioner_processor(completion_model: str | None, default: Any) -> Any:
    """The processor saved with the `completion_model` checkpoint when there is one, else `default`."""
    if completion_model is None:
        return default
    try:
        return AutoProcessor.from_pretrained(completion_model)
    except (OSError, ValueError, KeyError):
        logger.info("No processor in %s; captions are written with the trainer's processor.", completion_model)
        return default


@torch.no_grad()
def generate_synthetic_captions(
    captioner: nn.Module,
    dataset,
    processor: Any,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 20,
    autocast: Callable[[], Any] | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[int, str]:
    """Caption every image of `dataset` (`image` and `index` columns) and return `{index: caption}`.

    `captioner` is an `NLIPForCaptioning` or a model with a `captioner()` view (`NLIPForPreTraining`); captions come
    from its `caption(images, processor, ...)` (greedy unless `generate_kwargs` say otherwise). Under data parallelism
    each process captions every `world_size`-th row and the captions are gathered, so every process returns all of
    them. The captioner runs in eval mode; its training flag is restored afterwards.
    """
    model = captioner.captioner() if hasattr(captioner, "captioner") else captioner
    if not hasattr(model, "caption"):
        raise TypeError(f"The captioner must have a `caption(images, processor)` method; got {type(model).__name__}.")
    rank = torch.distributed.get_rank() if is_distributed() else 0
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    rows = list(range(rank, len(dataset), world_size))
    images_only = dataset.select_columns(["image", "index"])
    was_training = captioner.training
    captioner.eval()
    model.eval()
    captions: list[tuple[int, str]] = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="Synthetic captions", disable=not progress):
            batch = images_only[rows[start : start + batch_size]]
            images = []
            for value in batch["image"]:
                image, reason, detail = decode_image(value)
                if image is None:
                    raise ValueError(f"Cannot caption a training image: {reason} ({detail}).")
                images.append(to_rgb(image))
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                texts = model.caption(images, processor, max_new_tokens=max_new_tokens, **generate_kwargs)
            captions.extend(zip((int(i) for i in batch["index"]), texts))
    finally:
        captioner.train(was_training)
        model.train(was_training)
    return dict(gather_objects(captions))
