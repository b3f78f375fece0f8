"""`srcl`: SRCL's cross-modal similarity regulation (Jiang et al., ACL 2023).

The negatives inside the softmax are re-weighted by the inverse of their cross-modal similarity
(`trainers.losses.srcl_weight_pair`): likely false negatives, other captions that also fit the image, are pushed away
less. With a reference the similarity mixes in the reference's with weight `α`, scheduled linearly in the global step
from `srcl_alpha_start` to `srcl_alpha_end` (a function of the step, so a resumed run continues it exactly). The
reference is a frozen model (`--srcl_reference_model`, or `reference_model=` to `NLIPTrainer`), run on every batch;
without one, the reference prior's stored embeddings (`--noise_prior reference`, scored once before training) give the
reference similarity of the batch's real captions at no cost per step (synthetic captions then get none).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModel

from ..distributed import gather_state
from ..losses import Contribution, srcl_weight_pair
from .base import SYNTHETIC_TEXTS, EncodedBatch, MethodCard, Objective


logger = logging.getLogger(__name__)


class SRCLObjective(Objective):
    """SRCL. Attributes: `reference_model` (frozen, or None) and `alpha`, the reference's current mixing weight."""

    name = "srcl"
    card = MethodCard(
        "SRCL cross-modal similarity regulation",
        "negatives in the contrastive denominator are re-weighted by the inverse of their cross-modal similarity "
        "(each row normalized to mean 1), so that likely false negatives — other captions that also fit the image — "
        "are pushed away less",
        "Jiang et al., ACL 2023",
        "Jiang et al. *Vision Language Pre-training by Contrastive Learning with Cross-Modal Similarity Regulation.* "
        "ACL 2023.",
        combined_clause="SRCL's weights re-weight the negatives in its denominator",
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self.reference_model = None
        self.alpha = args.srcl_alpha_start

    def setup(self, context) -> None:
        reference = context.supplied.pop("reference_model", None)
        if reference is None and self.args.srcl_reference_model is not None:
            reference = AutoModel.from_pretrained(self.args.srcl_reference_model)
        if reference is None:
            return
        if self.args.srcl_alpha_start == 0 and self.args.srcl_alpha_end == 0:
            logger.warning("An SRCL reference model is given but srcl_alpha_start = srcl_alpha_end = 0: it is unused.")
        self.reference_model = reference.requires_grad_(False).eval().to(context.device)

    def reads_batch_pixels(self) -> bool:
        return self.reference_model is not None

    def effective_alpha(self, context) -> float:
        """`α`, or 0 without a reference (model or reference prior with embeddings)."""
        has_reference = self.reference_model is not None or self._prior(context) is not None
        return self.alpha if has_reference else 0.0

    @staticmethod
    def _prior(context):
        prior = context.noise.state.reference_prior if context.noise is not None else None
        return prior if prior is not None and prior.image_embeds is not None else None

    def on_step_begin(self, global_step: int, max_steps: int, context) -> None:
        self.alpha = self.args.srcl_alpha(global_step, max_steps)

    @torch.no_grad()
    def _reference_embeddings(self, batch: EncodedBatch, texts: list, context) -> tuple[torch.Tensor, list] | None:
        """The reference's gathered image embeddings and text embeddings of each text part (None for a part it has
        none of; None altogether at α = 0)."""
        if self.effective_alpha(context) == 0:
            return None
        if self.reference_model is None:  # the reference prior's stored embeddings, by dataset index
            images, captions = self._prior(context).similarity(batch.index)
            return images, [captions] + [None] * (len(texts) - 1)
        with context.autocast():
            images = context.embed_images(self.reference_model, batch.inputs["pixel_values"])
            text_parts = [context.embed_texts(self.reference_model, *text) for text in texts]
        return gather_state(images, batch.sizes), [gather_state(part, batch.sizes) for part in text_parts]

    def contribute(self, batch: EncodedBatch, context) -> Contribution:
        synthetic = batch.extra.get(SYNTHETIC_TEXTS)
        texts = [(batch.inputs["input_ids"], batch.inputs["attention_mask"])]
        if synthetic is not None:
            texts.append((synthetic.inputs.input_ids, synthetic.inputs.attention_mask))
        reference = self._reference_embeddings(batch, texts, context)
        alpha = self.effective_alpha(context)

        def weights(text_embeds: torch.Tensor, part: int) -> tuple[torch.Tensor, torch.Tensor]:
            if reference is None or reference[1][part] is None:
                return srcl_weight_pair(batch.image_embeds, text_embeds, temperature=self.args.srcl_weight_temperature)
            return srcl_weight_pair(batch.image_embeds, text_embeds, reference_image_embeds=reference[0],
                                    reference_text_embeds=reference[1][part], alpha=alpha,
                                    temperature=self.args.srcl_weight_temperature)

        return Contribution(
            negative_weights=weights(batch.text_embeds, 0),
            synthetic_negative_weights=None if synthetic is None else weights(synthetic.gathered_text_embeds, 1),
            metrics={"srcl/alpha": torch.tensor(alpha)},
        )

    def settings(self) -> dict[str, Any]:
        args = self.args
        return {
            "srcl_reference_model": args.srcl_reference_model,
            "srcl_alpha_start": args.srcl_alpha_start,
            "srcl_alpha_end": args.srcl_alpha_end,
            "srcl_weight_temperature": args.srcl_weight_temperature,
        }
