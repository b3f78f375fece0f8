"""`NLIPTrainer`: a `transformers.Trainer` that trains CLIP-contract image-text models with noise-robust losses.

The losses are pure functions (`trainers.losses`); this file wires them to the data and to the per-run noise state:

- every training step embeds the batch, gathers the features of all processes **with gradient** (the negatives are
  the global batch), records each pair's plain InfoNCE loss `CE_i` into the loss bank by its dataset `index` (the
  gathered values, so every process holds the same bank), and computes the loss of `args.method`;
- callbacks (`trainers.callbacks`) fit the noise GMM, rebuild NPC's memory bank and refresh the synthetic captions at
  epoch start, advance SRCL's α schedule, and log noise statistics through `self.log`;
- the noise state is saved into every checkpoint and restored by `resume_from_checkpoint`;
- pushes to the Hub carry the remote-code files from the first push, and a model card written by
  `trainers.model_card`.

Gradient accumulation: the loss of a micro-batch is its mean over the (global) micro-batch and the Trainer divides it
by the number of accumulation steps (`loss_is_scaled_for_ga = False`), so an accumulated update is the mean of the
micro-batch losses. For a contrastive loss that is **not** the loss of one batch of `GA ×` the size: the negatives of
a pair are the other pairs of its own micro-batch (across processes), never those of other micro-batches. NPC's sibling
likewise takes its look-ahead step on each micro-batch.
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

from .callbacks import (
    CaptionEpochCallback,
    CompletionCallback,
    ConceptBankCallback,
    MemoryBankCallback,
    NoiseEstimationCallback,
    SRCLScheduleCallback,
)
from .collator import ImageTextCollator
from .data import dataset_rows
from .completion import generate_synthetic_captions, load_captioner, load_captioner_processor
from .distributed import all_gather_with_grad, gather_sizes, gather_state
from .evaluation import embedding_tensor
from .losses import contrastive_logits, contrastive_loss, nitc_loss, npc_confidence, srcl_negative_weights
from .memory_bank import build_memory_bank
from .model_card import TrainingSummary
from .noise_state import NoiseState
from .npc import NPCSibling
from .training_args import NLIPTrainingArguments


logger = logging.getLogger(__name__)

NPC_SIBLING_OPTIMIZER_NAME = "nlip_npc_sibling_optimizer.pt"
# The batch keys a CLIP-contract model's forward takes.
_MODEL_INPUTS = ("input_ids", "pixel_values", "attention_mask")


@dataclass
class NLIPLossOutput:
    """What `compute_loss(..., return_outputs=True)` returns next to the loss (all gathered over processes).

    Attributes:
        per_sample: detached plain InfoNCE `CE_i` of the global batch (what the loss bank records).
        index: dataset indices of the global batch.
        image_embeds, text_embeds: the global batch's normalised embeddings (with gradient).
        noise_prob: `ε_i` used by NITC (None without `nlip`).
        confidence: NPC's `w_i` (None without `npc` or before the memory bank exists).
        memory_loss: NPC's memory-bank contrastive loss (None likewise).
    """

    per_sample: torch.Tensor
    index: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    noise_prob: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    memory_loss: torch.Tensor | None = None


@dataclass
class TrainSetPass:
    """Outputs of a no-grad pass over the training set (gathered; identical on every process)."""

    index: torch.Tensor
    losses: torch.Tensor
    image_features: torch.Tensor | None
    text_features: torch.Tensor | None


class NLIPTrainer(Trainer):
    """`Trainer` for the NLIP model family (and any model with `CLIPModel`'s forward contract) with the losses of
    `args.method` (`clip`, `nlip`, `npc`, `srcl` or a `+` combination; see `NLIPTrainingArguments`).

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for `Trainer`.
            `args` must be `NLIPTrainingArguments`. The datasets hold `image`, `text` and a unique int `index` per
            example (`trainers.data`); an `is_noisy` column, when present, is the ground truth the logged noise-detection
            ROC-AUC is measured against. `data_collator` defaults to `ImageTextCollator(processing_class)`.
        reference_model: SRCL's frozen reference model (default: loaded from `args.srcl_reference_model`).
        captioner: noise completion's captioner (default: loaded from `args.completion_model`, else the model itself
            when it is an `NLIPForPreTraining`, through its weight-sharing `captioner()` view).
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
        **kwargs,
    ):
        if args is None:
            args = NLIPTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, NLIPTrainingArguments):
            raise TypeError(f"`args` must be NLIPTrainingArguments; got {type(args).__name__}.")
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
        self.methods = args.methods
        self._pretraining = hasattr(self.accelerator.unwrap_model(self.model), "captioner")
        if self._pretraining and "npc" in self.methods:
            raise ValueError(
                "method 'npc' fine-tunes a dual encoder (NLIPModel); an NLIPForPreTraining would also learn captions "
                "from the memory entries. Load the checkpoint with NLIPModel.from_pretrained for NPC."
            )
        # A private copy of the collator for state passes and memory entries, so that the pairs they skip are not
        # counted twice in the training collator's `skip_report`.
        self._state_collator = copy.deepcopy(data_collator)
        # Evaluation is deterministic: an example with several captions is scored on its first one.
        self._eval_collator = (
            replace(data_collator, caption_choice="first", skip_report=data_collator.skip_report)
            if isinstance(data_collator, ImageTextCollator) else data_collator
        )
        self._row_of_index, self._is_noisy, self.noise_state = self._index_dataset(train_dataset)
        self.reference_model = self._setup_reference_model(reference_model)
        self.captioner = self._setup_captioner(captioner)
        self.npc_sibling: NPCSibling | None = None
        self._pending_sibling_state: dict | None = None
        self.srcl_alpha = args.srcl_alpha_start
        self._step_metrics: dict[str, list[torch.Tensor]] = {}
        self._pass_cache: tuple[tuple[int, int], TrainSetPass] | None = None
        self.add_callback(CaptionEpochCallback(self))
        if self._pretraining and self.accelerator.unwrap_model(self.model).has_concept_bank:
            self.add_callback(ConceptBankCallback(self))
        self.add_callback(NoiseEstimationCallback(self))
        if "npc" in self.methods:
            self.add_callback(MemoryBankCallback(self))
        if args.noise_completion:
            self.add_callback(CompletionCallback(self))
        if "srcl" in self.methods:
            self.add_callback(SRCLScheduleCallback(self))

    # ------------------------------------------------------------------------------------------------------- setup

    def _index_dataset(self, dataset) -> tuple[np.ndarray | None, torch.Tensor | None, NoiseState | None]:
        """Row of each dataset `index`, the `is_noisy` ground truth by index, and a noise state sized to the indices."""
        if dataset is None:
            return None, None, None
        args = self.args
        if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
            if args.noise_completion or "npc" in self.methods:
                raise ValueError(
                    "noise_completion and method 'npc' look examples up by index, which needs a map-style train_dataset; "
                    "got a streaming (iterable) dataset."
                )
            state = NoiseState(0, growable=True, max_fit_samples=args.gmm_max_fit_samples, seed=args.seed)
            return None, None, state
        columns = getattr(dataset, "column_names", None)
        if columns is None or "index" not in columns:
            raise ValueError(
                "train_dataset must be a datasets.Dataset with an integer 'index' column (a stable id per example; "
                f"see trainers.data.add_index); got columns {columns}."
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
        state = NoiseState(num_samples, max_fit_samples=args.gmm_max_fit_samples, seed=args.seed)
        return row_of_index, is_noisy, state

    def _setup_reference_model(self, reference_model: nn.Module | None) -> nn.Module | None:
        if reference_model is None and self.args.srcl_reference_model is not None:
            reference_model = AutoModel.from_pretrained(self.args.srcl_reference_model)
        if reference_model is None:
            return None
        if "srcl" not in self.methods:
            raise ValueError(f"A reference model is only used by method 'srcl'; method is {self.args.method!r}.")
        if self.args.srcl_alpha_start == 0 and self.args.srcl_alpha_end == 0:
            logger.warning("An SRCL reference model is given but srcl_alpha_start = srcl_alpha_end = 0: it is unused.")
        reference_model.requires_grad_(False).eval()
        return reference_model.to(self.args.device)

    def _setup_captioner(self, captioner: nn.Module | None) -> nn.Module | None:
        if not self.args.noise_completion:
            if captioner is not None:
                raise ValueError("A captioner is given but `noise_completion` is False.")
            return None
        self._captioner_processor = load_captioner_processor(self.args.completion_model, self.processing_class)
        if captioner is None:
            captioner = load_captioner(self.args.completion_model, self.accelerator.unwrap_model(self.model))
        return captioner.to(self.args.device)

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

        Also records each pair's detached plain InfoNCE loss `CE_i` into the loss bank (online noise estimation). An
        `NLIPForPreTraining` computes its captioning (and image-reconstruction) terms itself and takes this contrastive
        objective as its `contrastive_loss_fn`; its LM term is weighted by the clean probabilities `1 − ε` once
        estimated. `num_items_in_batch` is unused: contrastive losses are normalised by the batch size.
        """
        if "index" not in inputs:
            raise ValueError(
                "NLIPTrainer batches need an 'index' (the dataset's stable per-example id); got keys "
                f"{sorted(inputs)}. Use trainers.collator.ImageTextCollator on a dataset with an 'index' column."
            )
        synthetic = self._synthetic_text_inputs(inputs)
        if self._pretraining:
            return self._pretraining_loss(model, inputs, synthetic, return_outputs)
        memory = self._memory_inputs(inputs["index"])
        texts = [(inputs["input_ids"], inputs["attention_mask"])]
        if synthetic is not None:
            texts.append(synthetic)
        images = [inputs["pixel_values"]]
        if memory is not None:
            images.append(memory["pixel_values"])
            texts.append((memory["input_ids"], memory["attention_mask"]))
        image_parts, text_parts = self._encode(model, images, texts)
        loss, details = self._contrastive_objective(
            inputs,
            image_parts[0],
            text_parts[0],
            self._logit_scale(model),
            synthetic=synthetic,
            synthetic_embeds=text_parts[1] if synthetic is not None else None,
            memory=memory,
            memory_embeds=(image_parts[1], text_parts[-1]) if memory is not None else None,
            training=model.training,
        )
        return (loss, details) if return_outputs else loss

    def _pretraining_loss(self, model, inputs, synthetic, return_outputs):
        """`NLIPForPreTraining`'s objective with this trainer's contrastive term (its `contrastive_loss_fn`)."""
        captured: dict[str, NLIPLossOutput] = {}

        def contrastive_loss_fn(image_embeds, text_embeds, logit_scale, synthetic_text_embeds=None, **unused):
            loss, captured["details"] = self._contrastive_objective(
                inputs, image_embeds, text_embeds, logit_scale, synthetic=synthetic,
                synthetic_embeds=synthetic_text_embeds, training=model.training,
            )
            return loss

        extra: dict[str, torch.Tensor] = {}
        if synthetic is not None:
            extra["synthetic_input_ids"], extra["synthetic_attention_mask"] = synthetic
        if "nlip" in self.methods and self.noise_state.is_estimated:
            extra["lm_sample_weights"] = 1.0 - self.noise_state.noise_prob_of(inputs["index"])
        outputs = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            contrastive_loss_fn=contrastive_loss_fn,
            retrieve_concepts=True,
            **extra,
        )
        for name in ("lm_loss", "ir_loss"):
            if outputs.get(name) is not None:
                self._track(f"pretraining/{name}", outputs[name])
        return (outputs.loss, captured["details"]) if return_outputs else outputs.loss

    def _contrastive_objective(
        self,
        inputs: dict[str, Any],
        local_image_embeds: torch.Tensor,
        local_text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
        synthetic_embeds: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        memory_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        training: bool = True,
    ) -> tuple[torch.Tensor, NLIPLossOutput]:
        """Gather the batch over processes, record `CE_i`, and combine the method's terms (DESIGN §4.6): SRCL
        negative weights inside the softmax, NPC confidences as sample weights plus the memory loss, NITC with the
        noise probabilities (and synthetic captions) when `nlip` is on."""
        local_index = inputs["index"]
        sizes = gather_sizes(local_index.shape[0], local_index.device)
        image_embeds = all_gather_with_grad(local_image_embeds, sizes)
        text_embeds = all_gather_with_grad(local_text_embeds, sizes)
        index = gather_state(local_index, sizes)
        per_sample = contrastive_loss(image_embeds, text_embeds, logit_scale, reduction="none")
        if training and self.args.noise_estimation_mode == "online":
            self.noise_state.record(index, per_sample, step=self.state.global_step)
        synthetic_embeds = all_gather_with_grad(synthetic_embeds, sizes) if synthetic_embeds is not None else None

        negative_weights = synthetic_negative_weights = None
        if "srcl" in self.methods:
            texts = [(inputs["input_ids"], inputs["attention_mask"])] + ([synthetic] if synthetic_embeds is not None else [])
            reference = self._reference_embeddings([inputs["pixel_values"]], texts, sizes)
            negative_weights = self._srcl_weights(image_embeds, text_embeds, reference, 1)
            if synthetic_embeds is not None:
                synthetic_negative_weights = self._srcl_weights(image_embeds, synthetic_embeds, reference, 2)
            self._track("srcl/alpha", torch.tensor(self._effective_alpha()))

        confidence = memory_loss = None
        if memory is not None:
            confidence, memory_loss = self._npc_terms(inputs, memory, *memory_embeds, index, sizes, logit_scale)

        noise_prob = None
        if "nlip" in self.methods:
            noise_prob = self.noise_state.noise_prob_of(index)
            loss = nitc_loss(
                image_embeds,
                text_embeds,
                logit_scale,
                noise_prob,
                strength=self.args.nitc_strength,
                synthetic_text_embeds=synthetic_embeds,
                negative_weights=negative_weights,
                synthetic_negative_weights=synthetic_negative_weights,
                sample_weights=confidence,
            )
            self._track("nlip/batch_noise_prob", noise_prob.mean())
        elif negative_weights is not None or confidence is not None:
            loss = contrastive_loss(
                image_embeds, text_embeds, logit_scale, sample_weights=confidence, negative_weights=negative_weights
            )
        else:
            loss = per_sample.mean()
        if memory_loss is not None:
            loss = loss + memory_loss
        return loss, NLIPLossOutput(
            per_sample=per_sample.detach(),
            index=index,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            noise_prob=noise_prob,
            confidence=confidence,
            memory_loss=memory_loss,
        )

    def _encode(
        self, model: nn.Module, images: list[torch.Tensor], texts: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Normalised embeddings of several image batches and text batches, in one forward of `model`."""
        input_ids, attention_mask = self._concat_texts(texts)
        outputs = model(
            input_ids=input_ids, pixel_values=torch.cat(images) if len(images) > 1 else images[0],
            attention_mask=attention_mask,
        )
        image_parts = list(outputs.image_embeds.split([batch.shape[0] for batch in images]))
        text_parts = list(outputs.text_embeds.split([ids.shape[0] for ids, _ in texts]))
        return image_parts, text_parts

    def _embed_images(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings from `get_image_features` of the unwrapped model (no-grad passes)."""
        features = self.accelerator.unwrap_model(model).get_image_features(pixel_values=pixel_values)
        return nn.functional.normalize(embedding_tensor(features), dim=-1)

    def _embed_texts(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings from `get_text_features` of the unwrapped model (no-grad passes)."""
        features = self.accelerator.unwrap_model(model).get_text_features(input_ids=input_ids, attention_mask=attention_mask)
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

    def _logit_scale(self, model: nn.Module) -> torch.Tensor:
        """`1/τ = exp(logit_scale)` of the (unwrapped) model; a PEFT model forwards the attribute to its base."""
        return self.accelerator.unwrap_model(model).logit_scale.exp()

    def _track(self, name: str, value: torch.Tensor) -> None:
        """Average `value` over the steps between two logs (added to the next training log)."""
        self._step_metrics.setdefault(name, []).append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the method's per-step averages (SRCL α, NPC confidence, ...) added to training logs."""
        if "loss" in logs and self._step_metrics:
            logs = {**logs, **{name: torch.stack(values).mean().item() for name, values in self._step_metrics.items()}}
            self._step_metrics = {}
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------------- SRCL

    def _effective_alpha(self) -> float:
        return self.srcl_alpha if self.reference_model is not None else 0.0

    @torch.no_grad()
    def _reference_embeddings(self, images, texts, sizes) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The reference model's gathered image and text embeddings of the batch (None without one or at α = 0)."""
        if self.reference_model is None or self._effective_alpha() == 0:
            return None
        with self.accelerator.autocast():
            image_embeds = self._embed_images(self.reference_model, images[0])
            text_parts = [self._embed_texts(self.reference_model, *text) for text in texts]
        return gather_state(image_embeds, sizes), [gather_state(part, sizes) for part in text_parts]

    def _srcl_weights(self, image_embeds, text_embeds, reference, text_part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SRCL's `(w^v, w^t)` for the image-text similarity matrix, each direction normalised on its own."""
        options = {"alpha": self._effective_alpha(), "temperature": self.args.srcl_weight_temperature}
        online = contrastive_logits(image_embeds.detach().float(), text_embeds.detach().float(), 1.0)
        ref = None
        if reference is not None:
            ref_images, ref_texts = reference
            ref = contrastive_logits(ref_images.float(), ref_texts[text_part - 1].float(), 1.0)
        weights_v = srcl_negative_weights(online, reference_similarity=ref, **options)
        weights_t = srcl_negative_weights(online.T, reference_similarity=None if ref is None else ref.T, **options)
        return weights_v, weights_t

    # ------------------------------------------------------------------------------------------------------ NPC

    def _memory_inputs(self, local_index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The batch's memory entries (each sample's nearest clean image-side and text-side pairs, deduplicated),
        collated like a training batch; None without NPC, outside training or before the memory bank exists."""
        bank = self.noise_state.memory_bank if self.noise_state is not None else None
        if "npc" not in self.methods or bank is None or not self.model.training:
            return None
        index = local_index.detach().cpu()
        neighbors = torch.cat([bank.image_neighbors[index], bank.text_neighbors[index]]).unique()
        rows = self._row_of_index[neighbors.numpy()]
        batch = self._state_collator(dataset_rows(self.train_dataset, rows))
        if not torch.equal(batch["index"], neighbors):
            raise RuntimeError("NPC memory entries could not all be collated (an invalid image-text pair was skipped).")
        return self._prepare_inputs({key: batch[key] for key in (*_MODEL_INPUTS, "index")})

    def _npc_terms(
        self,
        inputs: dict[str, torch.Tensor],
        memory: dict[str, torch.Tensor],
        memory_image_embeds: torch.Tensor,
        memory_text_embeds: torch.Tensor,
        index: torch.Tensor,
        sizes: list[int],
        logit_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NPC's confidences `w_i` of the global batch and the memory-bank loss (with gradient), DESIGN §4.4.

        The memory entries of all processes are gathered and deduplicated by index into one contrastive batch. Its
        per-pair losses under the real model are `ℓ⁰`; the sibling then steps on the batch and its losses are `ℓ¹`.
        """
        memory_sizes = gather_sizes(memory["index"].shape[0], memory["index"].device)
        unique, first = _first_occurrences(gather_state(memory["index"], memory_sizes))
        memory_images = all_gather_with_grad(memory_image_embeds, memory_sizes)[first]
        memory_texts = all_gather_with_grad(memory_text_embeds, memory_sizes)[first]
        memory_per_pair = contrastive_loss(memory_images, memory_texts, logit_scale, reduction="none")
        before = memory_per_pair.detach()
        after = self._sibling_memory_losses(inputs, memory, sizes, memory_sizes, first)

        bank = self.noise_state.memory_bank
        cpu_index = index.detach().cpu()
        image_side = torch.searchsorted(unique, bank.image_neighbors[cpu_index].to(unique.device))
        text_side = torch.searchsorted(unique, bank.text_neighbors[cpu_index].to(unique.device))
        confidence = npc_confidence(before[image_side], after[image_side], before[text_side], after[text_side])
        memory_loss = memory_per_pair.mean()
        self._track("npc/confidence", confidence.mean())
        self._track("npc/memory_loss", memory_loss)
        return confidence, memory_loss

    def _sibling_memory_losses(self, inputs, memory, sizes, memory_sizes, first) -> torch.Tensor:
        """One optimizer step of the sibling on the global batch, then its per-pair losses on the memory entries."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.npc_sibling is None:
            self.npc_sibling = NPCSibling(unwrapped, self.optimizer, max_grad_norm=self.args.max_grad_norm)
            if self._pending_sibling_state is not None:
                self.npc_sibling.load_state_dict(self._pending_sibling_state)
                self._pending_sibling_state = None
        self.npc_sibling.sync(unwrapped, self.optimizer)

        def batch_loss(sibling: nn.Module) -> torch.Tensor:
            with self.accelerator.autocast():
                texts = [(inputs["input_ids"], inputs["attention_mask"])]
                images, texts = self._encode(sibling, [inputs["pixel_values"]], texts)
            return contrastive_loss(
                all_gather_with_grad(images[0], sizes), all_gather_with_grad(texts[0], sizes), sibling.logit_scale.exp()
            )

        self.npc_sibling.step(batch_loss)
        sibling = self.npc_sibling.model
        with torch.no_grad(), self.accelerator.autocast():
            memory_images = gather_state(self._embed_images(sibling, memory["pixel_values"]), memory_sizes)[first]
            local_texts = self._embed_texts(sibling, memory["input_ids"], memory["attention_mask"])
            memory_texts = gather_state(local_texts, memory_sizes)[first]
            return contrastive_loss(memory_images, memory_texts, sibling.logit_scale.exp(), reduction="none")

    # ---------------------------------------------------------------------------------------- noise completion

    def _synthetic_text_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids of the batch's synthetic captions: the refreshed captions of the noise state, else a
        `synthetic_text` dataset column passed through by the collator; None when there are none."""
        if "nlip" not in self.methods or not self.model.training:
            return None
        captions = self.noise_state.synthetic_captions if self.noise_state is not None else None
        if captions is not None:
            own = inputs["index"].tolist()
            texts = [captions[i] if i < len(captions) and captions[i] else None for i in own]
            if any(text is None for text in texts):
                raise RuntimeError(f"No synthetic caption for some of the dataset indices {own}.")
            max_length = getattr(self.data_collator, "max_length", None)
            encoded = self._tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return (
                encoded["input_ids"].to(inputs["input_ids"].device),
                encoded["attention_mask"].to(inputs["input_ids"].device),
            )
        if self.args.noise_completion and "synthetic_input_ids" in inputs:
            return inputs["synthetic_input_ids"], inputs["synthetic_attention_mask"]
        return None

    def set_caption_epoch(self, epoch: int) -> None:
        """Make the collators draw `epoch`'s random captions (`ImageTextCollator.set_epoch`)."""
        for collator in (self.data_collator, self._state_collator):
            if hasattr(collator, "set_epoch"):
                collator.set_epoch(epoch)

    def refresh_concept_bank(self) -> None:
        """Re-embed the model's concept vocabulary with its current text tower (`build_concept_bank`)."""
        model = self.accelerator.unwrap_model(self.model)
        model.build_concept_bank(model.concept_vocabulary, self.processing_class, show_progress=False)

    def refresh_synthetic_captions(self, epoch: int) -> None:
        """Generate a synthetic caption for every training image with the captioner and store it by index."""
        with self._forked_rng():
            generated = generate_synthetic_captions(
                self.captioner,
                self.train_dataset,
                self._captioner_processor,
                batch_size=self.args.per_device_eval_batch_size,
                max_new_tokens=self.args.completion_max_new_tokens,
                autocast=self.accelerator.autocast,
                progress=not self.args.disable_tqdm and self.is_local_process_zero(),
            )
        captions: list[str | None] = [None] * self.noise_state.num_samples
        for index, caption in generated.items():
            captions[index] = caption
        self.noise_state.synthetic_captions = captions
        self.noise_state.completion_epoch = epoch

    # ------------------------------------------------------------------------------------ epoch-level state work

    @torch.no_grad()
    def train_set_pass(self, epoch: int, *, features: bool) -> TrainSetPass:
        """Embed the whole training set without gradient (eval mode) in training-sized global batches: each pair's
        plain InfoNCE loss and, with `features`, its image and text features. Cached for the current step."""
        key = (epoch, self.state.global_step)
        if self._pass_cache is not None and self._pass_cache[0] == key:
            cached = self._pass_cache[1]
            if cached.image_features is not None or not features:
                return cached
        dataloader = DataLoader(
            self.train_dataset,
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
            with self._forked_rng():
                for batch in tqdm(dataloader, desc=f"Noise-state pass (epoch {epoch})", disable=no_progress):
                    with self.accelerator.autocast():
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

    @contextlib.contextmanager
    def _forked_rng(self) -> Iterator[None]:
        """Run a state pass without moving the random generators the training loop (and its resume) depends on."""
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    def fit_noise_model(self, epoch: int) -> None:
        """Refresh the loss bank (`pass` mode: an extra no-grad pass) and fit the noise GMM."""
        if self.args.noise_estimation_mode == "pass":
            result = self.train_set_pass(epoch, features="npc" in self.methods)
            self.noise_state.record(result.index, result.losses, step=self.state.global_step)
        self.noise_state.fit(epoch)

    def rebuild_memory_bank(self, epoch: int) -> None:
        """Build NPC's memory bank from features of the whole training set and the current clean probabilities."""
        result = self.train_set_pass(epoch, features=True)
        self._pass_cache = None
        num_samples = self.noise_state.num_samples
        image_features = torch.zeros(num_samples, result.image_features.shape[1])
        text_features = torch.zeros_like(image_features)
        present = torch.zeros(num_samples, dtype=torch.bool)
        image_features[result.index] = result.image_features
        text_features[result.index] = result.text_features
        present[result.index] = True
        clean_prob = torch.where(present, 1.0 - self.noise_state.noise_prob, torch.zeros(()))
        try:
            bank = build_memory_bank(
                image_features,
                text_features,
                clean_prob,
                threshold=self.args.npc_clean_threshold,
                device=self.args.device,
                progress_bar=not self.args.disable_tqdm and self.is_local_process_zero(),
            )
        except ValueError as error:
            logger.warning("NPC memory bank not rebuilt at epoch %d (keeping the previous one): %s", epoch, error)
            return
        self.noise_state.memory_bank = bank
        self.noise_state.memory_epoch = epoch
        self.log({"npc/clean_set_size": float(bank.clean_indices.numel())})

    def log_noise_statistics(self, prefix: str = "") -> dict[str, float]:
        """Log the noise statistics (mean ε, estimated noisy fraction, ROC-AUC vs `is_noisy` when known)."""
        stats = self.noise_state.compute_statistics(self._is_noisy)
        self.log({f"{prefix}{name}": value for name, value in stats.items()})
        return stats

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
        dataset `index` (the text -> image map `trainers.metrics.retrieval_compute_metrics` expects when the eval
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
        """Save the optimizer and scheduler, and the noise state (training state as well: a resumed run restores it)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.noise_state is not None:
            self.noise_state.save(output_dir)
            if self.npc_sibling is not None:
                torch.save(self.npc_sibling.state_dict(), os.path.join(output_dir, NPC_SIBLING_OPTIMIZER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimizer and scheduler, the noise state and NPC's sibling optimizer from `checkpoint`."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.noise_state is None:
            return
        if NoiseState.exists(checkpoint):
            self.noise_state.load(checkpoint)
        else:
            logger.warning("Checkpoint %s has no noise state; noise estimation starts afresh.", checkpoint)
        sibling_path = os.path.join(checkpoint, NPC_SIBLING_OPTIMIZER_NAME)
        if os.path.isfile(sibling_path):
            self._pending_sibling_state = torch.load(sibling_path, map_location="cpu", weights_only=True)
            self.npc_sibling = None

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
    ) -> None:
        """Write `README.md` (rendered by `trainers.model_card`), `nlip_training_summary.json` and the remote-code
        files into `output_dir`. `language`, `tags`, `tasks`, `dataset_tags` and `dataset_args` are not used."""
        if not self.is_world_process_zero():
            return
        datasets_ = [dataset] if isinstance(dataset, str) else list(dataset or [])
        self._write_hub_files(model_name=model_name, finetuned_from=finetuned_from, datasets_=datasets_, license=license)

    def _write_hub_files(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        datasets_: list[str] | None = None,
        license: str | None = None,
    ) -> None:
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "_auto_class", None) is not None:
            custom_object_save(base, output_dir, config=base.config)
        summary = self.training_summary(
            model_name=model_name, finetuned_from=finetuned_from, datasets_=datasets_, license=license
        )
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
        settings: dict[str, Any] = {
            "noise_warmup_epochs": args.noise_warmup_epochs,
            "gmm_refit_epochs": args.gmm_refit_epochs,
            "noise_estimation_mode": args.noise_estimation_mode,
        }
        if "nlip" in self.methods:
            settings.update(nitc_strength=args.nitc_strength, noise_completion=args.noise_completion)
        if "srcl" in self.methods:
            settings.update(
                srcl_reference_model=args.srcl_reference_model,
                srcl_alpha_start=args.srcl_alpha_start,
                srcl_alpha_end=args.srcl_alpha_end,
                srcl_weight_temperature=args.srcl_weight_temperature,
            )
        if "npc" in self.methods:
            settings.update(
                npc_clean_threshold=args.npc_clean_threshold, npc_memory_refresh_epochs=args.npc_memory_refresh_epochs
            )
        if self._is_noisy is not None:
            present = torch.from_numpy(self._row_of_index >= 0)
            settings["injected_noisy_fraction"] = float(self._is_noisy[present].float().mean())
        statistics = None
        if self.noise_state is not None and self.noise_state.statistics:
            renamed = {"mean_noise_prob": "mean_noise_probability"}
            statistics = {
                renamed.get(name.split("/", 1)[1], name.split("/", 1)[1]): value
                for name, value in self.noise_state.statistics.items()
            }
            statistics["num_pairs"] = float(int(self.noise_state.loss_bank.seen.sum()))
            if self.noise_state.last_fit_epoch is not None:
                statistics["epoch"] = float(self.noise_state.last_fit_epoch)
            statistics = {name: value for name, value in statistics.items() if not math.isnan(value)}
        evaluation = {}
        for entry in self.state.log_history:
            metrics = {
                k[len("eval_") :]: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))
            }
            metrics = {k: v for k, v in metrics.items() if k not in ("runtime", "samples_per_second", "steps_per_second")}
            if metrics:
                evaluation = {"evaluation": metrics}
        hyperparameters = {
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": args.world_size,
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "optimizer": getattr(args.optim, "value", args.optim),
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "weight_decay": args.weight_decay,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "seed": args.seed,
        }
        return TrainingSummary(
            model_name=model_name,
            method=args.method,
            base_model=finetuned_from,
            noise_settings=settings,
            noise_statistics=statistics,
            datasets=datasets_ or [],
            evaluation_results=evaluation or None,
            training_hyperparameters=hyperparameters,
            **({"license": license} if license else {}),
        )


def _first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and, for each, the position of its first occurrence in `values`."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full((unique.shape[0],), values.shape[0], dtype=torch.long, device=values.device)
    return unique, first.scatter_reduce(0, inverse, positions, reduce="amin")
