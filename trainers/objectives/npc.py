"""`npc`: NPC's negative pre-aware fine-tuning (Zhang et al., AAAI 2024).

- **Memory bank** (`trainers.noise.memory_bank`): every `npc_memory_refresh_epochs` once the noise is estimated, each
  training pair's nearest confidently clean pairs (clean probability above `npc_clean_threshold`), by image and by
  text, from a no-grad pass over the training set. The clean probability is by default (`npc_clean_set="evidence"`)
  the mixture's posterior with the clean weight capped at the noisy weight
  (`trainers.noise.estimation.evidence_clean_prob`): a pair then needs its loss's likelihood to favour clean, where
  NPC's posterior (`"posterior"`) lets a mixture that calls nearly every pair clean (before the losses separate at
  high noise from scratch) fill the bank with noisy pairs. When fewer than `npc_min_clean_fraction` (10 %) of the
  pairs pass the threshold, the bank takes that many most probably clean pairs: a bank of a handful of pairs makes
  every sample's memory entries the same few pairs.
- **Confidence**: each step a sibling copy of the model (`trainers.objectives.npc_sibling.NPCSibling`) takes one optimizer step on the
  batch; a pair whose step makes its memory entries' loss worse gets a low confidence
  (`trainers.losses.npc_confidence`).
- **Loss**: the confidences weigh the pairs' positive terms, and the memory entries' mean InfoNCE (with gradient) is
  added.

The memory entries are the batch's neighbours, deduplicated, collated like a training batch and embedded in the same
forward as the batch; under data parallelism they are gathered and deduplicated by index into one contrastive batch.
NPC needs map-style data (it looks pairs up by index) and a dual encoder (`NLIPModel`). A locked tower is shared with
the sibling (it does not train), so the sibling reads its cached outputs too (`trainers.feature_cache`): with LiT-style
towers NPC's extra cost is the heads' forward and backward, not a second pass through the towers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..distributed import all_gather_with_grad, gather_sizes, gather_state
from ..losses import Contribution, contrastive_loss, npc_confidence
from ..noise.memory_bank import MemoryBank, build_memory_bank
from .npc_sibling import NPCSibling
from .base import EncodedBatch, ExtraPairs, MethodCard, Objective
from .schedule import is_due


logger = logging.getLogger(__name__)

NPC_SIBLING_OPTIMIZER_NAME = "nlip_npc_sibling_optimizer.pt"
MEMORY_ENTRIES = "npc_memory"


def first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and, for each, the position of its first occurrence in `values`."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full((unique.shape[0],), values.shape[0], dtype=torch.long, device=values.device)
    return unique, first.scatter_reduce(0, inverse, positions, reduce="amin")


class NPCObjective(Objective):
    """NPC. State: the memory bank and the epoch it was built for; the sibling's optimizer in its own file."""

    name = "npc"
    uses_noise_estimate = True
    card = MethodCard(
        "NPC negative pre-aware fine-tuning",
        "a memory bank holds each sample's nearest confidently clean pairs; a copy of the model takes one step on the "
        "batch, and a sample whose step makes its clean neighbours' loss worse gets a low confidence "
        "`w = tanh(ℓ⁰/ℓ¹)`; the model is updated with the confidence-weighted contrastive loss plus the memory-bank loss",
        "Zhang et al., AAAI 2024",
        "Zhang et al. *Negative Pre-aware for Noisy Cross-modal Matching.* AAAI 2024.",
        combined_weight="NPC's confidence",
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self.memory_bank: MemoryBank | None = None
        self.memory_epoch: int | None = None
        self.sibling: NPCSibling | None = None
        self._pending_sibling_state: dict | None = None

    def setup(self, context) -> None:
        if context.is_pretraining:
            raise ValueError(
                "method 'npc' fine-tunes a dual encoder (NLIPModel); an NLIPForPreTraining would also learn captions "
                "from the memory entries. Load the checkpoint with NLIPModel.from_pretrained for NPC."
            )

    def map_style_requirement(self) -> str | None:
        return "method 'npc'"

    def uses_train_set_features(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------------ per step
    def extra_inputs(self, inputs: dict[str, Any], context) -> dict[str, ExtraPairs]:
        """The batch's memory entries (each pair's nearest clean image-side and text-side pairs, deduplicated);
        none outside training or before the memory bank exists."""
        if self.memory_bank is None or not context.model().training:
            return {}
        index = inputs["index"].detach().cpu()
        neighbors = torch.cat([self.memory_bank.image_neighbors[index], self.memory_bank.text_neighbors[index]]).unique()
        batch = context.collate_examples(neighbors)
        if not torch.equal(batch["index"].cpu(), neighbors):
            raise RuntimeError("NPC memory entries could not all be collated (an invalid image-text pair was skipped).")
        return {MEMORY_ENTRIES: ExtraPairs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                           batch["index"])}

    def contribute(self, batch: EncodedBatch, context) -> Contribution:
        """The confidences `w_i` of the global batch and the memory-bank loss (with gradient).

        The memory entries of all processes are gathered and deduplicated by index into one contrastive batch. Its
        per-pair losses under the real model are `ℓ⁰`; the sibling then steps on the batch and its losses are `ℓ¹`."""
        encoded = batch.extra.get(MEMORY_ENTRIES)
        if encoded is None:
            return Contribution()
        memory = encoded.inputs
        memory_sizes = gather_sizes(memory.index.shape[0], memory.index.device)
        unique, first = first_occurrences(gather_state(memory.index, memory_sizes))
        memory_images = all_gather_with_grad(encoded.image_embeds, memory_sizes)[first]
        memory_texts = all_gather_with_grad(encoded.text_embeds, memory_sizes)[first]
        memory_per_pair = contrastive_loss(memory_images, memory_texts, batch.logit_scale, reduction="none")
        before = memory_per_pair.detach()
        after = self._sibling_memory_losses(batch, memory, memory_sizes, first, context)
        cpu_index = batch.index.detach().cpu()
        image_side = torch.searchsorted(unique, self.memory_bank.image_neighbors[cpu_index].to(unique.device))
        text_side = torch.searchsorted(unique, self.memory_bank.text_neighbors[cpu_index].to(unique.device))
        confidence = npc_confidence(before[image_side], after[image_side], before[text_side], after[text_side])
        memory_loss = memory_per_pair.mean()
        return Contribution(sample_weights=confidence, losses={"npc/memory_loss": memory_loss},
                            metrics={"npc/confidence": confidence.mean(), "npc/memory_loss": memory_loss})

    def _sibling_memory_losses(self, batch: EncodedBatch, memory: ExtraPairs, memory_sizes, first, context) -> torch.Tensor:
        """One optimizer step of the sibling on the global batch, then its per-pair losses on the memory entries."""
        model, optimizer = context.model(), context.optimizer()
        if self.sibling is None:
            self.sibling = NPCSibling(model, optimizer, max_grad_norm=self.args.max_grad_norm)
            if self._pending_sibling_state is not None:
                self.sibling.load_state_dict(self._pending_sibling_state)
                self._pending_sibling_state = None
        self.sibling.sync(model, optimizer)
        inputs, sizes = batch.inputs, batch.sizes

        def batch_loss(sibling: nn.Module) -> torch.Tensor:
            with context.autocast():
                texts = [(inputs["input_ids"], inputs["attention_mask"])]
                index = [inputs["index"]]
                images, texts = context.encode(sibling, [inputs["pixel_values"]], texts, image_index=index, text_index=index)
            return contrastive_loss(
                all_gather_with_grad(images[0], sizes), all_gather_with_grad(texts[0], sizes), sibling.logit_scale.exp()
            )

        self.sibling.step(batch_loss)
        sibling = self.sibling.model
        with torch.no_grad(), context.autocast():
            images, texts = context.encode(sibling, [memory.pixel_values], [(memory.input_ids, memory.attention_mask)],
                                           image_index=[memory.index], text_index=[memory.index])
            images, texts = gather_state(images[0], memory_sizes)[first], gather_state(texts[0], memory_sizes)[first]
            return contrastive_loss(images, texts, sibling.logit_scale.exp(), reduction="none")

    # --------------------------------------------------------------------------------------------- schedule
    def on_epoch_begin(self, epoch: int, context) -> None:
        """Rebuild the memory bank every `npc_memory_refresh_epochs` once the noise is estimated."""
        args = self.args
        if context.noise.is_estimated and is_due(epoch, self.memory_epoch, args.noise_warmup_epochs,
                                                 args.npc_memory_refresh_epochs):
            self.rebuild_memory_bank(epoch, context)

    def rebuild_memory_bank(self, epoch: int, context) -> None:
        """Build the memory bank from features of the whole training set and the current clean probabilities."""
        result = context.train_set_pass(epoch, features=True)
        state = context.noise.state
        image_features = torch.zeros(state.num_samples, result.image_features.shape[1])
        text_features = torch.zeros_like(image_features)
        present = torch.zeros(state.num_samples, dtype=torch.bool)
        image_features[result.index] = result.image_features
        text_features[result.index] = result.text_features
        present[result.index] = True
        noise_prob = state.noise_prob_on_evidence() if self.args.npc_clean_set == "evidence" else state.noise_prob
        clean_prob = torch.where(present, 1.0 - noise_prob, torch.zeros(()))
        try:
            bank = build_memory_bank(image_features, text_features, clean_prob, threshold=self.args.npc_clean_threshold,
                                     min_clean_fraction=self.args.npc_min_clean_fraction, device=context.device,
                                     progress_bar=context.show_progress)
        except ValueError as error:
            logger.warning("NPC memory bank not rebuilt at epoch %d (keeping the previous one): %s", epoch, error)
            return
        self.memory_bank, self.memory_epoch = bank, epoch
        context.log({"npc/clean_set_size": float(bank.clean_indices.numel())})

    # ---------------------------------------------------------------------------------------- reporting & state
    def settings(self) -> dict[str, Any]:
        return {"npc_clean_threshold": self.args.npc_clean_threshold, "npc_clean_set": self.args.npc_clean_set,
                "npc_min_clean_fraction": self.args.npc_min_clean_fraction,
                "npc_memory_refresh_epochs": self.args.npc_memory_refresh_epochs}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.memory_bank is None and self.memory_epoch is None:
            return {}, {}
        tensors = {} if self.memory_bank is None else {f"memory_bank.{k}": v for k, v in self.memory_bank.state_dict().items()}
        return tensors, {"memory_epoch": self.memory_epoch}

    def load_state_dict(self, tensors, metadata, *, where: str) -> None:
        memory = {k[len("memory_bank."):]: v for k, v in tensors.items() if k.startswith("memory_bank.")}
        try:
            self.memory_bank = MemoryBank.from_state_dict(memory) if memory else None
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: NPC memory bank: {type(error).__name__}: {error}") from None
        self.memory_epoch = metadata.get("memory_epoch")

    def upgrade_legacy_state(self, legacy):
        tensors = {k: v for k, v in legacy["tensors"].items() if k.startswith("memory_bank.")}
        if not tensors and legacy["metadata"].get("memory_epoch") is None:
            return None
        return tensors, {"memory_epoch": legacy["metadata"].get("memory_epoch")}

    def save_files(self, directory: str) -> None:
        if self.sibling is not None:
            torch.save(self.sibling.state_dict(), os.path.join(directory, NPC_SIBLING_OPTIMIZER_NAME))

    def load_files(self, directory: str) -> None:
        path = os.path.join(directory, NPC_SIBLING_OPTIMIZER_NAME)
        if os.path.isfile(path):
            self._pending_sibling_state = torch.load(path, map_location="cpu", weights_only=True)
            self.sibling = None
