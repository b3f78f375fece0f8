"""`NLIPTrainer`: a `transformers.Trainer` that trains CLIP-contract image-text models with noise-robust objectives.

The trainer names no method. The methods of `args.method` are `trainers.objectives.Objective`s; every training step

- asks the objectives for extra inputs (NLIP's synthetic captions, NPC's memory entries) and embeds them with the
  batch in one forward, a fully locked tower's outputs coming from its feature cache (`trainers.feature_cache`);
- gathers the batch's features over processes **with gradient** (the negatives are the global batch) and records each
  pair's plain InfoNCE loss `CE_i` in the noise tracker by dataset `index` (every process holds the same bank);
- combines the objectives' contributions with `trainers.losses.combine_contributions`; an `NLIPForPreTraining` adds
  its own captioning (and reconstruction) terms (`weighted_loss`).

One callback (`trainers.callbacks.TrainingScheduleCallback`) runs the epoch- and step-level work in a fixed order; the
noise state and every objective's state are saved into each checkpoint and restored by `resume_from_checkpoint`.
`freeze_vision_tower` / `freeze_text_tower` lock towers LiT-style; pushes to the Hub carry the remote-code files from
the first push and a model card written by `trainers.model_card`.

Gradient accumulation: the loss of a micro-batch is its mean over the (global) micro-batch and the Trainer divides it
by the number of accumulation steps (`loss_is_scaled_for_ga = False`), so an accumulated update is the mean of the
micro-batch losses. For a contrastive loss that is **not** the loss of one batch of `GA ×` the size: the negatives of
a pair are the other pairs of its own micro-batch (across processes), never those of other micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, Trainer
from transformers.dynamic_module_utils import custom_object_save
from transformers.trainer_utils import get_last_checkpoint

from .callbacks import TrainingScheduleCallback
from .data.batch_skips import BatchSkips
from .data.collator import ImageTextCollator
from .context import TrainingContext, TrainSetPass
from .data.pairs import SkipReport, dataset_rows, images_left_encoded
from .distributed import all_gather_with_grad, gather_sizes, gather_state
from .evaluation.embeddings import compute_embeddings, embedding_tensor
from .feature_cache import FeatureCache, lock_towers, locked_tower_output
from .data.fingerprint import data_fingerprint, describe_change
from .losses import Contribution, combine_contributions, contrastive_loss
from .model_card import TrainingSummary, describe_towers, last_evaluation, training_hyperparameters
from .noise.state import NoiseState, read_metadata
from .noise.tracker import NoiseTracker
from .objectives import (
    SYNTHETIC_TEXTS,
    EncodedBatch,
    EncodedExtra,
    ExtraPairs,
    ExtraTexts,
    build_objectives,
    load_objective_state,
    save_objective_state,
)
from .noise.reference_prior import ReferencePrior
from .training_args import NLIPTrainingArguments


logger = logging.getLogger(__name__)

# The batch keys a CLIP-contract model's forward takes.
_MODEL_INPUTS = ("input_ids", "pixel_values", "attention_mask")


@dataclass
class NLIPLossOutput:
    """What `compute_loss(..., return_outputs=True)` returns next to the loss (all gathered over processes).

    Attributes:
        per_sample: detached plain InfoNCE `CE_i` of the global batch (what the loss bank records).
        index: dataset indices of the global batch.
        image_embeds, text_embeds: the global batch's normalised embeddings (with gradient).
        contributions: each objective's `Contribution` by method name (NLIP's `noise_prob`, NPC's `sample_weights`
            and memory loss, SRCL's `negative_weights`).
    """

    per_sample: torch.Tensor
    index: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    contributions: dict[str, Contribution]


class NLIPTrainer(Trainer):
    """`Trainer` for the NLIP model family (and any model with `CLIPModel`'s forward contract) with the objectives of
    `args.method` (`clip`, `nlip`, `npc`, `srcl`, `rcl` or a `+` combination; see `trainers.objectives`).

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for `Trainer`.
            `args` must be `NLIPTrainingArguments`. The datasets hold `image`, `text` and a unique int `index` per
            example (`trainers.data.pairs`); an `is_noisy` column, when present, is the ground truth the logged noise-detection
            ROC-AUC is measured against. `data_collator` defaults to `ImageTextCollator(processing_class)`.
        reference_model: SRCL's frozen reference model (default: loaded from `args.srcl_reference_model`).
        captioner: noise completion's captioner (default: loaded from `args.completion_model`, else the model itself
            when it is an `NLIPForPreTraining`, through its weight-sharing `captioner()` view).
        skip_report: the pairs skipped while loading the data (`trainers.data.pairs` loaders' reports), for the summary.
        prior_model: the frozen reference model of `noise_prior="reference"` (default: `args.noise_prior_model`, else
            the model before its first step).

    Attributes:
        objectives: the run's `Objective`s by method name.
        noise: the `NoiseTracker` (its `state` is also `noise_state`).
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: NLIPTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        reference_model: nn.Module | None = None,
        captioner: nn.Module | None = None,
        skip_report: SkipReport | None = None,
        prior_model: nn.Module | None = None,
        **kwargs,
    ):
        if args is None:
            args = NLIPTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, NLIPTrainingArguments):
            raise TypeError(f"`args` must be NLIPTrainingArguments; got {type(args).__name__}.")
        if isinstance(train_dataset, datasets.IterableDataset) and args.accelerator_config.dispatch_batches is None:
            # Each process reads its own shards (accelerate's `IterableDataset.shard` per process) instead of
            # process 0 reading every batch and sending slices to the others.
            args.accelerator_config.dispatch_batches = False
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "NLIPTrainer needs a `data_collator` or a `processing_class` (e.g. an NLIPProcessor) to batch "
                    "image-text examples."
                )
            data_collator = ImageTextCollator(processor=processing_class)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.objectives = build_objectives(args)
        self._unwrapped: dict[int, tuple[nn.Module, nn.Module]] = {}  # `_unwrap`'s (wrapper, unwrapped model) by id
        self._pretraining = hasattr(self._unwrap(self.model), "captioner")
        # A private copy of the collator for state passes and memory entries, so that the pairs they skip are not
        # counted twice in the training collator's `skip_report`.
        self._state_collator = copy.deepcopy(data_collator)
        # Evaluation is deterministic: an example with several captions is scored on its first one.
        self._eval_collator = (
            replace(data_collator, caption_choice="first", skip_report=data_collator.skip_report)
            if isinstance(data_collator, ImageTextCollator) else data_collator
        )
        self._row_of_index, self.noise = self._index_dataset(train_dataset)
        self.noise_state = None if self.noise is None else self.noise.state
        # Pairs skipped while loading (given by the caller: `trainers.data.pairs` loaders' reports) and, per process, at
        # batch time (counted from the batches' `skipped_pairs`, so DataLoader workers' skips count too).
        self.load_skip_report = skip_report
        self.batch_skips = BatchSkips(args.process_index, args.world_size)
        self._data_fingerprint: dict[str, Any] | None = None
        self.feature_caches: dict[str, FeatureCache] = self._setup_tower_locking()
        self._step_metrics: dict[str, list[torch.Tensor]] = {}
        self._pass_cache: tuple[tuple[int, int], TrainSetPass] | None = None
        self.context = self._build_context(supplied={"reference_model": reference_model, "captioner": captioner})
        for objective in self.objectives.values():
            objective.setup(self.context)
        unused = [name for name, value in self.context.supplied.items() if value is not None]
        if unused:
            raise ValueError(f"`{unused[0]}` is given but method {args.method!r} does not use it.")
        # The training set as the collators read it (its image column left encoded while they skip cached images).
        self._collated_train_dataset = train_dataset
        self._skip_cached_images()
        if prior_model is not None and args.noise_prior_epoch > 0:
            raise ValueError(f"`prior_model` is given but noise_prior_epoch={args.noise_prior_epoch} scores the pairs "
                             "with the run's own snapshot: pass one or the other.")
        self._prior_model = prior_model
        self.add_callback(
            TrainingScheduleCallback(_DataHooks(self), self.noise, list(self.objectives.values()), self.context)
        )

    # ------------------------------------------------------------------------------------------------------- setup

    def _index_dataset(self, dataset) -> tuple[np.ndarray | None, NoiseTracker | None]:
        """Row of each dataset `index`, and a noise tracker sized to the indices (with the `is_noisy` ground truth)."""
        if dataset is None:
            return None, None
        args = self.args
        pass_features = any(objective.uses_train_set_features() for objective in self.objectives.values())

        def noise_state(num_samples: int, growable: bool = False) -> NoiseState:
            return NoiseState(num_samples, growable=growable, max_fit_samples=args.gmm_max_fit_samples,
                              max_noisy_fraction=args.noise_max_noisy_fraction, min_separation=args.noise_min_separation,
                              loss_momentum=args.noise_loss_momentum, seed=args.seed)

        if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
            needs = [need for need in (o.map_style_requirement() for o in self.objectives.values()) if need]
            if needs:
                raise ValueError(
                    f"{' and '.join(needs)} look{'s' if len(needs) == 1 else ''} examples up by index, which needs a "
                    "map-style train_dataset; got a streaming (iterable) dataset."
                )
            return None, NoiseTracker(noise_state(0, growable=True), None, args, pass_features=pass_features)
        columns = getattr(dataset, "column_names", None)
        if columns is None or "index" not in columns:
            raise ValueError(
                "train_dataset must be a datasets.Dataset with an integer 'index' column (a stable id per example; "
                f"see trainers.data.pairs.add_index); got columns {columns}."
            )
        indices = np.asarray(dataset.with_format("numpy")["index"], dtype=np.int64)
        if indices.size == 0:
            raise ValueError("train_dataset is empty.")
        if indices.min() < 0 or np.unique(indices).size != indices.size:
            raise ValueError("train_dataset's 'index' column must hold unique non-negative integers.")
        num_samples = int(indices.max()) + 1
        row_of_index = np.full(num_samples, -1, dtype=np.int64)
        row_of_index[indices] = np.arange(indices.size)
        is_noisy = None
        if "is_noisy" in columns:
            is_noisy = torch.zeros(num_samples, dtype=torch.bool)
            is_noisy[torch.from_numpy(indices)] = torch.from_numpy(
                np.asarray(dataset.with_format("numpy")["is_noisy"], dtype=bool)
            )
        state = noise_state(num_samples)
        present = torch.zeros(num_samples, dtype=torch.bool)
        present[torch.from_numpy(indices)] = True
        return row_of_index, NoiseTracker(state, is_noisy, args, pass_features=pass_features, present=present)

    def _setup_tower_locking(self) -> dict[str, FeatureCache]:
        """Lock the towers named by `freeze_vision_tower` / `freeze_text_tower` and create the feature caches of the
        fully locked towers of a dual encoder (`trainers.feature_cache.lock_towers`)."""
        model = self._unwrap(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return lock_towers(
            base, self.args, num_samples=self.noise_state.num_samples if self._row_of_index is not None else None,
            cacheable=not self._pretraining, process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
        )

    def _skip_cached_images(self) -> None:
        """Let the collators skip the images the locked vision tower's cache holds, in training batches, state passes
        and memory entries alike (a LiT epoch after the first then costs little more than the heads); the image column
        then stays encoded until they decode the others."""
        if not self._pixels_only_feed_the_cached_tower():
            return
        for collator in (self.data_collator, self._state_collator):
            collator.is_image_cached = self.feature_caches["vision"].contains
        self._collated_train_dataset = images_left_encoded(self.train_dataset)

    def use_feature_caches(self, caches: dict[str, FeatureCache]) -> None:
        """Serve the locked towers' outputs from `caches` (by tower: `"vision"`, `"text"`) instead of this trainer's
        own, e.g. caches filled by an earlier run on the same training set with the same locked towers (a
        hyper-parameter sweep); the collators then skip the images they hold."""
        unknown = sorted(set(caches) - set(self.feature_caches))
        if unknown:
            raise ValueError(f"use_feature_caches: this trainer has no locked, cached {unknown[0]!r} tower (cached: "
                             f"{sorted(self.feature_caches)}).")
        self.feature_caches.update(caches)
        self._skip_cached_images()

    def _pixels_only_feed_the_cached_tower(self) -> bool:
        """Whether the training batches' pixels go nowhere but into the cached, locked image tower: no objective (a
        reference model, a captioner; NPC's sibling shares the cache) and no state pass reads them, and the collator
        runs in this process (DataLoader workers hold copies of the cache that never fill)."""
        args = self.args
        return (
            "vision" in self.feature_caches
            and isinstance(self.data_collator, ImageTextCollator)
            and args.dataloader_num_workers == 0
            and not self._pretraining
            and not any(objective.reads_batch_pixels() for objective in self.objectives.values())
            and args.noise_estimation_mode == "online"
        )

    def _build_context(self, supplied: dict[str, nn.Module | None]) -> TrainingContext:
        """The `TrainingContext` the objectives are called with (services bound to this trainer)."""
        return TrainingContext(
            args=self.args,
            noise=self.noise,
            train_dataset=self.train_dataset,
            processing_class=self.processing_class,
            is_pretraining=self._pretraining,
            supplied=dict(supplied),
            device=self.args.device,
            model=lambda: self._unwrap(self.model),
            optimizer=lambda: self.optimizer,
            log=self.log,
            track=self._track,
            autocast=self.accelerator.autocast,
            encode=self._encode,
            embed_images=self._embed_images,
            embed_texts=self._embed_texts,
            collate_examples=self._collate_examples,
            tokenize=self._tokenize_texts,
            train_set_pass=self.train_set_pass,
            show_progress=not self.args.disable_tqdm and self.is_local_process_zero(),
        )

    @property
    def _tokenizer(self):
        """The tokenizer of `processing_class` (or of the collator's processor)."""
        processor = self.processing_class or getattr(self.data_collator, "processor", None)
        return getattr(processor, "tokenizer", processor)

    # -------------------------------------------------------------------------------------------------- the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, NLIPLossOutput]:
        """The loss of `args.method` on the global batch (features gathered over processes), as a per-batch mean.

        Also records each pair's detached plain InfoNCE loss `CE_i` in the noise tracker (online noise estimation).
        An `NLIPForPreTraining` adds its captioning (and image-reconstruction) terms to the objectives' contrastive
        term (`weighted_loss`). `num_items_in_batch` is unused: contrastive losses are normalised by the batch size.
        """
        if "index" not in inputs:
            raise ValueError(
                "NLIPTrainer batches need an 'index' (the dataset's stable per-example id); got keys "
                f"{sorted(inputs)}. Use trainers.data.collator.ImageTextCollator on a dataset with an 'index' column."
            )
        extras: dict[str, ExtraTexts | ExtraPairs] = {}
        for objective in self.objectives.values():
            extras.update(objective.extra_inputs(inputs, self.context))
        if self._pretraining:
            loss, details = self._pretraining_loss(model, inputs, extras)
        else:
            pairs = [extra for extra in extras.values() if isinstance(extra, ExtraPairs)]
            images = [inputs["pixel_values"]] + [extra.pixel_values for extra in pairs]
            texts = [(inputs["input_ids"], inputs["attention_mask"])]
            texts += [(extra.input_ids, extra.attention_mask) for extra in extras.values()]
            image_index = [inputs["index"]] + [extra.index for extra in pairs]
            text_index = [inputs["index"]] + [getattr(extra, "index", None) for extra in extras.values()]
            image_parts, text_parts = self._encode(model, images, texts, image_index=image_index, text_index=text_index)
            pair_images = iter(image_parts[1:])
            encoded = {
                name: EncodedExtra(extra, text_embeds, next(pair_images) if isinstance(extra, ExtraPairs) else None)
                for (name, extra), text_embeds in zip(extras.items(), text_parts[1:])
            }
            loss, details = self._objective_loss(
                inputs, image_parts[0], text_parts[0], self._logit_scale(model), encoded, training=model.training
            )
        return (loss, details) if return_outputs else loss

    def _pretraining_loss(self, model, inputs, extras) -> tuple[torch.Tensor, NLIPLossOutput]:
        """`NLIPForPreTraining`'s captioning (and reconstruction) terms, weighted by the objectives' caption weights,
        plus the objectives' contrastive term (the model's `weighted_loss`). The model embeds synthetic captions
        itself; other extra inputs are not supported."""
        synthetic = extras.pop(SYNTHETIC_TEXTS, None)
        if extras:
            raise ValueError(f"An NLIPForPreTraining embeds no extra inputs but synthetic captions; got {sorted(extras)}.")
        kwargs: dict[str, torch.Tensor] = {}
        if synthetic is not None:
            kwargs.update(synthetic_input_ids=synthetic.input_ids, synthetic_attention_mask=synthetic.attention_mask)
        weights = [w for w in (o.caption_weights(inputs, self.context) for o in self.objectives.values()) if w is not None]
        if weights:
            kwargs["lm_sample_weights"] = math.prod(weights[1:], start=weights[0])
        outputs = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            retrieve_concepts=True,
            return_contrastive_loss=False,
            **kwargs,
        )
        encoded = {} if synthetic is None else {SYNTHETIC_TEXTS: EncodedExtra(synthetic, outputs.synthetic_text_embeds)}
        contrastive, details = self._objective_loss(
            inputs, outputs.image_embeds, outputs.text_embeds, self._logit_scale(model), encoded, training=model.training
        )
        for name in ("lm_loss", "ir_loss"):
            if outputs.get(name) is not None:
                self._track(f"pretraining/{name}", outputs[name])
        loss = self._unwrap(model).weighted_loss(
            contrastive_loss=contrastive, lm_loss=outputs.lm_loss, ir_loss=outputs.ir_loss
        )
        return loss, details

    def _objective_loss(
        self,
        inputs: dict[str, Any],
        local_image_embeds: torch.Tensor,
        local_text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        extra: dict[str, EncodedExtra],
        *,
        training: bool = True,
    ) -> tuple[torch.Tensor, NLIPLossOutput]:
        """Gather the batch over processes, record `CE_i`, and combine the objectives' contributions."""
        local_index = inputs["index"]
        sizes = gather_sizes(local_index.shape[0], local_index.device)
        image_embeds = all_gather_with_grad(local_image_embeds, sizes)
        text_embeds = all_gather_with_grad(local_text_embeds, sizes)
        index = gather_state(local_index, sizes)
        per_sample = contrastive_loss(image_embeds, text_embeds, logit_scale, reduction="none")
        if training:
            self.noise.record(index, per_sample, step=self.state.global_step)
        for encoded in extra.values():
            if isinstance(encoded.inputs, ExtraTexts):
                encoded.gathered_text_embeds = all_gather_with_grad(encoded.text_embeds, sizes)
        batch = EncodedBatch(inputs=inputs, sizes=sizes, index=index, image_embeds=image_embeds,
                             text_embeds=text_embeds, logit_scale=logit_scale, per_sample=per_sample, extra=extra,
                             training=training)
        contributions = {name: objective.contribute(batch, self.context) for name, objective in self.objectives.items()}
        for contribution in contributions.values():
            for name, value in contribution.metrics.items():
                self._track(name, value)
        loss = combine_contributions(image_embeds, text_embeds, logit_scale, list(contributions.values()),
                                     per_sample=per_sample)
        return loss, NLIPLossOutput(per_sample=per_sample.detach(), index=index, image_embeds=image_embeds,
                                    text_embeds=text_embeds, contributions=contributions)

    def _encode(
        self,
        model: nn.Module,
        images: list[torch.Tensor],
        texts: list[tuple[torch.Tensor, torch.Tensor]],
        image_index: list[torch.Tensor | None] | None = None,
        text_index: list[torch.Tensor | None] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Normalised embeddings of several image batches and text batches, in one forward of `model`. With the
        dataset indices of the parts (`image_index` / `text_index`, None for a part without one, e.g. synthetic
        captions), a locked tower's outputs come from its feature cache (computed and stored on a miss)."""
        input_ids, attention_mask = self._concat_texts(texts)
        model_inputs: dict[str, torch.Tensor | None] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "vision" in self.feature_caches and image_index is not None and all(i is not None for i in image_index):
            # Part by part: a batch whose cached images were not decoded holds placeholders of another size.
            model_inputs["vision_pooled_output"] = torch.cat([
                self._cached_tower_output("vision", model, index, pixel_values=pixels)
                for pixels, index in zip(images, image_index, strict=True)
            ])
            model_inputs["pixel_values"] = None
        else:
            model_inputs["pixel_values"] = torch.cat(images) if len(images) > 1 else images[0]
        if "text" in self.feature_caches and text_index is not None and all(i is not None for i in text_index):
            model_inputs["text_pooled_output"] = self._cached_tower_output(
                "text", model, torch.cat(text_index), input_ids=input_ids, attention_mask=attention_mask
            )
            model_inputs["input_ids"] = None
        outputs = model(**model_inputs)
        image_parts = list(outputs.image_embeds.split([batch.shape[0] for batch in images]))
        text_parts = list(outputs.text_embeds.split([ids.shape[0] for ids, _ in texts]))
        return image_parts, text_parts

    def _cached_tower_output(self, which: str, model: nn.Module, index: torch.Tensor, **inputs) -> torch.Tensor:
        """The locked `which` tower's pooled outputs of the examples `index` from its feature cache (computed and
        stored on a miss; `trainers.feature_cache.locked_tower_output`); the hit rate goes into the training logs."""
        base = self._unwrap(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        features, hit = locked_tower_output(self.feature_caches[which], which, base, index, **inputs)
        self._track(f"feature_cache/{which}_hit_rate", hit.float().mean())
        return features

    def _embed_images(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings from `get_image_features` of the unwrapped model (no-grad passes)."""
        features = self._unwrap(model).get_image_features(pixel_values=pixel_values)
        return nn.functional.normalize(embedding_tensor(features), dim=-1)

    def _embed_texts(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings from `get_text_features` of the unwrapped model (no-grad passes)."""
        features = self._unwrap(model).get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.normalize(embedding_tensor(features), dim=-1)

    def _concat_texts(self, texts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack token batches of different lengths, right-padding with the pad token (mask 0)."""
        if len(texts) == 1:
            return texts[0]
        length = max(ids.shape[1] for ids, _ in texts)
        pad_id = getattr(self._tokenizer, "pad_token_id", None) or 0
        padded_ids, padded_masks = [], []
        for ids, mask in texts:
            extra = length - ids.shape[1]
            padded_ids.append(nn.functional.pad(ids, (0, extra), value=pad_id))
            padded_masks.append(nn.functional.pad(mask, (0, extra), value=0))
        return torch.cat(padded_ids), torch.cat(padded_masks)

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """`accelerator.unwrap_model(model)`, remembered per wrapper: accelerate walks every module on each call (to
        look for compiled regions), milliseconds per call with large towers, and a step unwraps several times."""
        remembered = self._unwrapped.get(id(model))
        if remembered is None or remembered[0] is not model:
            remembered = self._unwrapped[id(model)] = (model, self.accelerator.unwrap_model(model))
        return remembered[1]

    def _logit_scale(self, model: nn.Module) -> torch.Tensor:
        """`1/τ = exp(logit_scale)` of the (unwrapped) model; a PEFT model forwards the attribute to its base."""
        return self._unwrap(model).logit_scale.exp()

    def _track(self, name: str, value: torch.Tensor) -> None:
        """Average `value` over the steps between two logs (added to the next training log)."""
        self._step_metrics.setdefault(name, []).append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the method's per-step averages (SRCL α, NPC confidence, ...) added to training logs."""
        if "loss" in logs and self._step_metrics:
            logs = {**logs, **{name: torch.stack(values).mean().item() for name, values in self._step_metrics.items()}}
            self._step_metrics = {}
        super().log(logs, start_time)

    def _collate_examples(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training examples of dataset indices `index`, collated like a training batch (by the state collator,
        whose skips are not counted twice) and moved to the device."""
        rows = self._row_of_index[index.detach().cpu().numpy()]
        batch = self._state_collator(dataset_rows(self._collated_train_dataset, rows))
        return self._prepare_inputs({key: batch[key] for key in (*_MODEL_INPUTS, "index") if key in batch})

    def _tokenize_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of `texts`, as the training collator tokenises captions."""
        if isinstance(self.data_collator, ImageTextCollator):
            encoded = self.data_collator.tokenize(texts)
        else:
            encoded = self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    # ------------------------------------------------------------------------------------ epoch-level state work

    def set_caption_epoch(self, epoch: int) -> None:
        """Make the collators draw `epoch`'s random captions (`ImageTextCollator.set_epoch`)."""
        for collator in (self.data_collator, self._state_collator):
            if hasattr(collator, "set_epoch"):
                collator.set_epoch(epoch)
        self.batch_skips.set_epoch(epoch)

    def refresh_concept_bank(self) -> None:
        """Re-embed the model's concept vocabulary with its current text tower (`build_concept_bank`)."""
        model = self._unwrap(self.model)
        model.build_concept_bank(model.concept_vocabulary, self.processing_class, show_progress=False)

    @torch.no_grad()
    def train_set_pass(self, epoch: int, *, features: bool) -> TrainSetPass:
        """Embed the whole training set without gradient (eval mode) in training-sized global batches: each pair's
        plain InfoNCE loss and, with `features`, its image and text features (a locked tower's outputs from its feature
        cache). Cached for the current step."""
        key = (epoch, self.state.global_step)
        if self._pass_cache is not None and self._pass_cache[0] == key:
            cached = self._pass_cache[1]
            if cached.image_features is not None or not features:
                return cached
        dataloader = DataLoader(
            self._collated_train_dataset,
            batch_size=self._train_batch_size,
            shuffle=False,
            collate_fn=self._state_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        dataloader = prepare_data_loader(
            dataloader,
            device=self.args.device,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            put_on_device=True,
        )
        model = self.model
        was_training = model.training
        model.eval()
        indices, losses, images, texts = [], [], [], []
        no_progress = self.args.disable_tqdm or not self.is_local_process_zero()
        try:
            with self.context.forked_rng():
                for batch in tqdm(dataloader, desc=f"Noise-state pass (epoch {epoch})", disable=no_progress):
                    if "pixel_values" not in batch:  # every pair of the batch was invalid (counted by the collator)
                        continue
                    with self.accelerator.autocast():
                        if self.feature_caches:  # a locked tower's outputs come from (and fill) its cache
                            index = [batch["index"]]
                            captions = [(batch["input_ids"], batch["attention_mask"])]
                            parts = self._encode(model, [batch["pixel_values"]], captions, image_index=index,
                                                 text_index=index)
                            local_images, local_texts = parts[0][0], parts[1][0]
                        else:
                            local_images = self._embed_images(model, batch["pixel_values"])
                            local_texts = self._embed_texts(model, batch["input_ids"], batch["attention_mask"])
                    sizes = gather_sizes(batch["index"].shape[0], batch["index"].device)
                    image_embeds = gather_state(local_images.float(), sizes)
                    text_embeds = gather_state(local_texts.float(), sizes)
                    indices.append(gather_state(batch["index"], sizes).cpu())
                    scale = self._logit_scale(model)
                    losses.append(contrastive_loss(image_embeds, text_embeds, scale, reduction="none").cpu())
                    if features:
                        images.append(image_embeds.cpu())
                        texts.append(text_embeds.cpu())
        finally:
            model.train(was_training)
        result = TrainSetPass(
            index=torch.cat(indices),
            losses=torch.cat(losses),
            image_features=torch.cat(images) if features else None,
            text_features=torch.cat(texts) if features else None,
        )
        self._pass_cache = (key, result)
        return result

    # ------------------------------------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def _evaluation_collator(self) -> Iterator[None]:
        """Build evaluation dataloaders with the first-caption collator (see `__init__`)."""
        training_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """Plain InfoNCE loss of the (local) eval batch; predictions are `(image_embeds, text_embeds)` and labels the
        dataset `index` (the text -> image map `trainers.evaluation.metrics.retrieval_compute_metrics` expects when the eval
        set's indices are 0..N-1 in order)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            image_embeds = self._embed_images(model, inputs["pixel_values"])
            text_embeds = self._embed_texts(model, inputs["input_ids"], inputs["attention_mask"])
            loss = contrastive_loss(image_embeds, text_embeds, self._logit_scale(model)).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, (image_embeds.float(), text_embeds.float()), inputs["index"]

    # ------------------------------------------------------------------------------------- checkpoints & resume

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Save the optimizer and scheduler, the noise state (training state as well: a resumed run restores it) with
        the data fingerprint and every process's batch-time skips (gathered: all processes call this), and every
        objective's state (`nlip_objective_<name>.*`)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.noise_state is not None:
            self.noise_state.batch_skips = self.batch_skips.gather()
            self.noise_state.data_fingerprint = self.data_fingerprint
        if self.args.should_save and self.noise_state is not None:
            self.noise_state.save(output_dir)
            for objective in self.objectives.values():
                save_objective_state(objective, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimizer and scheduler, the noise state and the objectives' states from `checkpoint` (a
        checkpoint of noise-state schema 1-2 hands its methods' part to the objectives)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.noise_state is None:
            return
        legacy = None
        if NoiseState.exists(checkpoint):
            expected = None if self.noise_state.loss_bank.growable else self.noise_state.num_samples
            self.noise_state.load(checkpoint, expected_num_samples=expected)
            legacy = self.noise_state.legacy_objective_state
            self.batch_skips.restore(self.noise_state.batch_skips)
            # A frozen reference's prior the checkpoint lacks is scored now (a snapshot's at its epoch, by NoiseTracker).
            if self.args.scores_prior_before_training and self.noise_state.reference_prior is None:
                if self._prior_model is None and self.args.noise_prior_model is None:
                    raise ValueError(
                        f"Checkpoint {checkpoint} has no reference prior, and the default reference (the model before "
                        "its first step) is gone: pass --noise_prior_model to score the pairs on resume."
                    )
                self.score_reference_prior()
        else:
            logger.warning("Checkpoint %s has no noise state; noise estimation starts afresh.", checkpoint)
        for objective in self.objectives.values():
            load_objective_state(objective, checkpoint, legacy)

    def score_reference_prior(self) -> ReferencePrior:
        """Score every training pair once with the frozen reference model (`prior_model`, else `noise_prior_model`,
        else the model as it is now, before its first step) and install the prior in the noise state; logged with
        the pass's time (`reference_pass_seconds`). Every process scores the whole training set."""
        if self.noise_state is None or self.noise_state.loss_bank.growable:
            raise ValueError("--noise_prior reference needs a map-style training set with an `index` column (not a stream).")
        reference = self._prior_model
        if reference is None and self.args.noise_prior_model is not None:
            reference = AutoModel.from_pretrained(self.args.noise_prior_model)
        name = "the reference model" if reference is not None else "the model before its first step"
        reference = reference if reference is not None else self._unwrap(self.model)
        prior, self.reference_pass_seconds = self.noise.score_prior(
            lambda: compute_embeddings(reference.to(self.args.device), self.train_dataset, processor=self.processing_class,
                                       batch_size=self.args.per_device_eval_batch_size,
                                       progress=not self.args.disable_tqdm),
            name,
        )
        self._prior_model = None  # used once
        return prior

    # ------------------------------------------------------------------------------- resume, data and skip checks

    @property
    def data_fingerprint(self) -> dict[str, Any] | None:
        """The training data's fingerprint (`trainers.data.fingerprint`), computed once."""
        if self._data_fingerprint is None and self.train_dataset is not None:
            self._data_fingerprint = data_fingerprint(self.train_dataset)
        return self._data_fingerprint

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """`True`, `"true"`/`"True"` or `"latest"`: the newest `checkpoint-*` in `output_dir` (ValueError naming the
        folder when there is none); `False`/`"false"`/None: no resume; anything else: that path (must exist)."""
        value = resume_from_checkpoint
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("false", "")):
            return None
        if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "latest", "last")):
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint={value!r} resumes the newest checkpoint in output_dir, but "
                    f"{self.args.output_dir!r} holds no checkpoint-* folder."
                )
            logger.info("Resuming from the newest checkpoint in %s: %s", self.args.output_dir, checkpoint)
            return checkpoint
        if not os.path.isdir(str(value)):
            raise ValueError(f"resume_from_checkpoint={value!r} is not a checkpoint folder (nor True/'latest').")
        return str(value)

    def check_resume_data(self, checkpoint: str) -> None:
        """Fail at once when `checkpoint` was trained on other data than `train_dataset` (its noise state's data
        fingerprint), saying what changed; warn when the checkpoint predates fingerprints."""
        if self.noise_state is None or not NoiseState.exists(checkpoint):
            return
        saved = read_metadata(checkpoint).get("data_fingerprint")
        if saved is None:
            logger.warning(
                "Checkpoint %s has no data fingerprint (noise state written by an older nlip): the training data "
                "cannot be verified against it.", checkpoint,
            )
            return
        change = describe_change(saved, self.data_fingerprint)
        if change is not None:
            raise ValueError(
                f"Cannot resume from {checkpoint} on other training data: {change}. Resume with the data it was "
                "trained on, or train afresh without resume_from_checkpoint."
            )

    def _warn_if_warmup_outlasts_training(self) -> None:
        """A warning (not an error: a warm-up-only run, resumed later for more epochs, is legitimate) when the noise
        is never estimated because `noise_warmup_epochs` reaches the end of training."""
        args = self.args
        warmup = args.noise_warmup_epochs
        if warmup == 0 or self.noise_state is None:
            return
        uses_estimate = any(objective.uses_noise_estimate for objective in self.objectives.values())
        effect = f"method {args.method!r} then trains as plain 'clip'" if uses_estimate else "no noise statistics are logged"
        if not isinstance(self.train_dataset, datasets.Dataset):
            logger.warning(
                "Streaming data: an epoch is one full pass over the shards, and noise estimation starts after "
                "noise_warmup_epochs=%d of them; if max_steps=%d ends first, the noise is never estimated (%s). Set "
                "noise_warmup_epochs=0 with noise_estimation_mode='online' to estimate from the first pass's losses.",
                warmup, args.max_steps, effect,
            )
            return
        batches = math.ceil(len(self.train_dataset) / max(1, self._train_batch_size * args.world_size))
        steps_per_epoch = max(1, batches // args.gradient_accumulation_steps)
        epochs = math.ceil(args.max_steps / steps_per_epoch) if args.max_steps > 0 else math.ceil(args.num_train_epochs)
        if warmup >= epochs:
            logger.warning(
                "noise_warmup_epochs=%d >= the %d epoch(s) this run trains: the noise is never estimated (%s). Lower "
                "noise_warmup_epochs or train longer.", warmup, epochs, effect,
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, with `resume_from_checkpoint=True`/`"latest"` resuming the newest checkpoint of
        `output_dir`, a resume on other data failing before any step (`check_resume_data`), and a warning when the
        warm-up outlasts training. Afterwards `skipped_pairs()` holds every process's skips."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self.check_resume_data(checkpoint)
        elif self.args.scores_prior_before_training:
            self.score_reference_prior()  # on resume the checkpoint's noise state holds it
        self._warn_if_warmup_outlasts_training()
        result = super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                               **kwargs)
        self.batch_skips.all_processes = self.batch_skips.gather()
        return result

    def get_train_dataloader(self) -> DataLoader:
        """`Trainer.get_train_dataloader`; while the collator skips the images the locked vision tower's cache holds,
        the image column stays encoded until the collator decodes the others (no epoch decodes a cached image)."""
        if self.train_dataset is None or getattr(self.data_collator, "is_image_cached", None) is None:
            return super().get_train_dataloader()
        return self._get_dataloader(dataset=self._collated_train_dataset, description="Training",
                                    batch_size=self._train_batch_size, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples` over the batches that kept a pair: a batch whose every pair was invalid (a run
        of broken samples in a stream) is skipped and counted, never fatal, and every batch's `skipped_pairs` is
        counted and removed before the model sees it. Under DDP the process that skips a batch reaches the end of its
        data one batch before the others: with `max_steps` (which streaming requires) every process still takes the
        same steps; map-style data is validated when loaded, so its batches are never empty."""
        return super().get_batch_samples(self.batch_skips.kept_batches(iter(epoch_iterator)), num_batches, device)

    def skipped_pairs(self) -> dict[str, Any] | None:
        """Every skipped pair of this run, by reason, with the broken files: load time (`skip_report`) plus batch time
        on every process; `empty_batches`: batches skipped whole. None when nothing is known to have been skipped."""
        return self.batch_skips.summary(self.load_skip_report)

    # ------------------------------------------------------------------------------------------------------- Hub

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Write the remote-code files, the model card and the training summary before each checkpoint push, so the
        first push already loads with `trust_remote_code=True`."""
        if self.is_world_process_zero():
            self._write_hub_files()
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        dataset_description: str | None = None,
    ) -> None:
        """Write `README.md` (rendered by `trainers.model_card`), `nlip_training_summary.json` and the remote-code
        files into `output_dir`. `dataset`: dataset names / Hub ids for the card's metadata; `dataset_description`:
        the training data in words (e.g. "the imagefolder `my_pairs`"). `language`, `tags`, `tasks`, `dataset_tags`
        and `dataset_args` are not used."""
        if not self.is_world_process_zero():
            return
        datasets_ = [dataset] if isinstance(dataset, str) else list(dataset or [])
        self._write_hub_files(model_name=model_name, finetuned_from=finetuned_from, datasets_=datasets_, license=license,
                              dataset_description=dataset_description)

    def _write_hub_files(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        datasets_: list[str] | None = None,
        license: str | None = None,
        dataset_description: str | None = None,
    ) -> None:
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self._unwrap(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "_auto_class", None) is not None:
            custom_object_save(base, output_dir, config=base.config)
        summary = self.training_summary(
            model_name=model_name, finetuned_from=finetuned_from, datasets_=datasets_, license=license
        )
        summary.architecture = type(base).__name__
        summary.towers = describe_towers(base.config)
        summary.dataset_description = dataset_description or summary.dataset_description
        if hasattr(model, "get_base_model"):
            summary.training_hyperparameters = {**(summary.training_hyperparameters or {}), "lora": True}
        summary.save(output_dir)
        summary.to_model_card(repo_id=self.hub_model_id).save(os.path.join(output_dir, "README.md"))

    def training_summary(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        datasets_: list[str] | None = None,
        license: str | None = None,
    ) -> TrainingSummary:
        """What this run records for its model card: method, noise settings and statistics, evaluation results."""
        args = self.args
        if model_name is None:
            model_name = (self.args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1]
        settings = {} if self.noise is None else self.noise.settings()
        for objective in self.objectives.values():
            settings.update(objective.settings())
        statistics = None if self.noise is None else self.noise.summary_statistics()
        evaluation = last_evaluation(self.state.log_history)
        hyperparameters = training_hyperparameters(args)
        return TrainingSummary(
            model_name=model_name,
            method=args.method,
            base_model=finetuned_from,
            noise_settings=settings,
            noise_statistics=statistics,
            datasets=datasets_ or [],
            evaluation_results=evaluation,
            training_hyperparameters=hyperparameters,
            skipped_pairs=self.skipped_pairs(),
            **({"license": license} if license else {}),
        )


class _DataHooks:
    """The trainer's own epoch work, run first by `TrainingScheduleCallback`: the collators learn the epoch (a
    multi-caption example's random caption depends on `(seed, epoch, index)`, so a resumed run draws the captions the
    uninterrupted run drew), and a pre-training model's concept bank is re-embedded with the current text tower at the
    start of every epoch not yet prepared (a run resumed mid-epoch keeps the checkpoint's bank, part of its weights)
    and at the end of training."""

    def __init__(self, trainer: NLIPTrainer):
        self._trainer = trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        self._concept_bank = trainer._pretraining and model.has_concept_bank

    def on_epoch_begin(self, epoch: int, prepared: bool) -> None:
        self._trainer.set_caption_epoch(epoch)
        if self._concept_bank and not prepared:
            self._trainer.refresh_concept_bank()

    def on_train_end(self) -> None:
        if self._concept_bank:
            self._trainer.refresh_concept_bank()
