"""`TrainingContext`: what an objective (`trainers.objectives`) may use of the run, instead of the trainer itself.

The trainer builds one context and hands it to every objective hook. It exposes the arguments, the training data,
the noise tracker, the models and optimizer, logging, and the few services the methods need: embedding, collating
training examples by dataset index, tokenising, and a no-grad pass over the training set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainSetPass:
    """Outputs of a no-grad pass over the training set (gathered; identical on every process)."""

    index: torch.Tensor
    losses: torch.Tensor
    image_features: torch.Tensor | None
    text_features: torch.Tensor | None


@dataclass
class TrainingContext:
    """The run as the objectives see it. The trainer fills the services; objectives only call them.

    Attributes:
        args: the run's `NLIPTrainingArguments`.
        noise: the run's `NoiseTracker` (None without a training set).
        train_dataset: the training data (a map-style `datasets.Dataset` unless streaming).
        processing_class: the processor (tokenizer and image processor).
        is_pretraining: the model is an `NLIPForPreTraining` (it captions as well).
        supplied: models the caller gave the trainer for the methods by name (`reference_model`, `captioner`).
        device: the training device.
        model: the (unwrapped) model being trained, when called.
        optimizer: the training optimizer, when called (None before training creates it).
        log: `log(dict)` writes a training log entry now; `track(name, value)` averages a value into the next log.
        autocast: the mixed-precision context of training.
        encode: `encode(model, images, texts, image_index=None, text_index=None)` — normalised embeddings of image
            and text batches in one forward (lists of tensors / `(input_ids, attention_mask)` pairs); with the parts'
            dataset indices a locked tower's outputs come from the feature cache.
        embed_images / embed_texts: no-grad friendly `get_image_features` / `get_text_features`, normalised.
        collate_examples: `collate_examples(index)` — the training examples of dataset indices, collated like a
            training batch and moved to the device.
        tokenize: `tokenize(texts)` — `(input_ids, attention_mask)` as the training collator tokenises captions.
        train_set_pass: `train_set_pass(epoch, features=...)` — `TrainSetPass` of the whole training set.
        show_progress: whether this process shows progress bars.
    """

    args: Any
    noise: Any
    train_dataset: Any
    processing_class: Any
    is_pretraining: bool
    supplied: dict[str, nn.Module | None]
    device: torch.device
    model: Callable[[], nn.Module]
    optimizer: Callable[[], torch.optim.Optimizer | None]
    log: Callable[[dict[str, float]], None]
    track: Callable[[str, torch.Tensor], None]
    autocast: Callable[[], contextlib.AbstractContextManager]
    encode: Callable[..., tuple[list[torch.Tensor], list[torch.Tensor]]]
    embed_images: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    embed_texts: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    collate_examples: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
    train_set_pass: Callable[..., TrainSetPass]
    show_progress: bool

    @contextlib.contextmanager
    def forked_rng(self) -> Iterator[None]:
        """Run side work (a state pass, caption generation) without moving the random generators the training loop
        (and its exact resume) depends on."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield
