"""`nlip`: NLIP's noise harmonization and noise completion (Huang et al., AAAI 2023).

Harmonization: each pair's noise probability `ε` (the run's noise estimate: the loss mixture, and the reference prior
when one is set) turns the positive InfoNCE term into NITC (`trainers.losses.nitc_loss`, `--nitc_form`,
`--nitc_strength`). A pre-training model's captioning term is weighted by `1 − ε` once the noise is estimated.

Completion (`--noise_completion`): a captioner writes a synthetic caption for every training image every
`completion_refresh_epochs` from the end of the warm-up; each batch embeds them as a second positive weighted by `ε`
(they enter the loss only through `ε`, which is 0 before the first fit). A `synthetic_text` dataset column, passed
through by the collator, is used when no captions were generated.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .completion import generate_synthetic_captions, load_captioner, load_captioner_processor
from ..losses import Contribution
from .base import SYNTHETIC_TEXTS, EncodedBatch, ExtraTexts, MethodCard, Objective
from .schedule import is_due


logger = logging.getLogger(__name__)


class NLIPObjective(Objective):
    """NLIP. State: the synthetic captions by dataset index and the epoch they were written for."""

    name = "nlip"
    shapes_positive_term = True
    uses_noise_estimate = True
    card = MethodCard(
        "NLIP noise-harmonization and noise-completion",
        "each pair's loss is tracked during training and, after a warm-up, a two-component Gaussian mixture over the "
        "normalized losses gives the pair a noise probability `ε`; the pair's contrastive term is weighted by `1 − ε` "
        "(normalized by the total weight in the default balanced form) and a term `λ·ε·s_ii` (bounded at the "
        "random-pair similarity in the balanced form) pushes likely mismatched pairs apart. With noise-completion, a "
        "concept-conditioned captioner writes synthetic captions that serve as a second positive weighted by `ε`",
        "Huang et al., AAAI 2023",
        "Huang et al. *NLIP: Noise-Robust Language-Image Pre-training.* AAAI 2023.",
        combined_weight="NLIP's `1 − ε`",
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self.captioner = None
        self.synthetic_captions: list[str | None] | None = None
        self.completion_epoch: int | None = None

    def setup(self, context) -> None:
        if not self.args.noise_completion:
            return
        self._captioner_processor = load_captioner_processor(self.args.completion_model, context.processing_class)
        captioner = context.supplied.pop("captioner", None)
        if captioner is None:
            captioner = load_captioner(self.args.completion_model, context.model())
        self.captioner = captioner.to(context.device)

    def map_style_requirement(self) -> str | None:
        return "noise_completion" if self.args.noise_completion else None

    def reads_batch_pixels(self) -> bool:
        return self.args.noise_completion

    def caption_weights(self, inputs: dict[str, Any], context) -> torch.Tensor | None:
        """A pre-training model's captioning weights: the clean probabilities `1 − ε` once the noise is estimated."""
        return 1.0 - context.noise.noise_prob_of(inputs["index"]) if context.noise.is_estimated else None

    def extra_inputs(self, inputs: dict[str, Any], context) -> dict[str, ExtraTexts]:
        """The batch's synthetic captions: the generated ones, else the collator's `synthetic_text` column."""
        if not context.model().training:
            return {}
        if self.synthetic_captions is not None:
            own = inputs["index"].tolist()
            texts = [self.synthetic_captions[i] if i < len(self.synthetic_captions) else None for i in own]
            if any(not text for text in texts):
                raise RuntimeError(f"No synthetic caption for some of the dataset indices {own}.")
            input_ids, attention_mask = context.tokenize(texts)
            device = inputs["input_ids"].device
            return {SYNTHETIC_TEXTS: ExtraTexts(input_ids.to(device), attention_mask.to(device))}
        if self.args.noise_completion and "synthetic_input_ids" in inputs:
            return {SYNTHETIC_TEXTS: ExtraTexts(inputs["synthetic_input_ids"], inputs["synthetic_attention_mask"])}
        return {}

    def contribute(self, batch: EncodedBatch, context) -> Contribution:
        noise_prob = context.noise.noise_prob_of(batch.index)
        synthetic = batch.extra.get(SYNTHETIC_TEXTS)
        return Contribution(
            noise_prob=noise_prob,
            nitc_strength=self.args.nitc_strength,
            nitc_form=self.args.nitc_form,
            synthetic_text_embeds=None if synthetic is None else synthetic.gathered_text_embeds,
            metrics={"nlip/batch_noise_prob": noise_prob.mean()},
        )

    def on_epoch_begin(self, epoch: int, context) -> None:
        """Regenerate the synthetic captions every `completion_refresh_epochs` from the end of the warm-up."""
        args = self.args
        if args.noise_completion and is_due(epoch, self.completion_epoch, args.noise_warmup_epochs,
                                            args.completion_refresh_epochs):
            self.refresh_synthetic_captions(epoch, context)

    def refresh_synthetic_captions(self, epoch: int, context) -> None:
        """Caption every training image with the captioner and store the captions by dataset index."""
        with context.forked_rng():
            generated = generate_synthetic_captions(
                self.captioner,
                context.train_dataset,
                self._captioner_processor,
                batch_size=self.args.per_device_eval_batch_size,
                max_new_tokens=self.args.completion_max_new_tokens,
                autocast=context.autocast,
                progress=context.show_progress,
            )
        captions: list[str | None] = [None] * context.noise.state.num_samples
        for index, caption in generated.items():
            captions[index] = caption
        self.synthetic_captions, self.completion_epoch = captions, epoch

    def settings(self) -> dict[str, Any]:
        args = self.args
        return {"nitc_strength": args.nitc_strength, "nitc_form": args.nitc_form, "noise_completion": args.noise_completion}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.synthetic_captions is None and self.completion_epoch is None:
            return {}, {}
        return {}, {"synthetic_captions": self.synthetic_captions, "completion_epoch": self.completion_epoch}

    def load_state_dict(self, tensors, metadata, *, where: str) -> None:
        captions = metadata.get("synthetic_captions")
        if captions is not None and not isinstance(captions, list):
            raise ValueError(f"{where}: `synthetic_captions` must be a list; got {type(captions).__name__}.")
        self.synthetic_captions, self.completion_epoch = captions, metadata.get("completion_epoch")

    def upgrade_legacy_state(self, legacy):
        metadata = legacy["metadata"]
        if metadata.get("synthetic_captions") is None and metadata.get("completion_epoch") is None:
            return None
        return {}, {"synthetic_captions": metadata["synthetic_captions"], "completion_epoch": metadata["completion_epoch"]}
