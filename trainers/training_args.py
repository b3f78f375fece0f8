"""`TrainingArguments` for noise-robust image-text training: the method and its noise settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import os

from transformers import TrainingArguments

from .feature_cache import CACHE_MODES
from .losses import DEFAULT_SRCL_TEMPERATURE, NITC_FORMS
from .objectives import parse_method


NOISE_ESTIMATION_MODES = ("online", "pass")
NOISE_PRIORS = ("none", "reference")
NPC_CLEAN_SETS = ("evidence", "posterior")


@dataclass
class NLIPTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] plus the settings of the noise-robust methods NLIP, NPC and SRCL.

    Per-sample losses are recorded for every method (for `clip`/`srcl` the noise estimates are only reported, not used
    in the loss). Image-text batches are built by a collator from `image`/`text`/`index` columns, so
    `remove_unused_columns` defaults to False (True would delete those columns) and True is rejected.
    """

    method: str = field(
        default="clip",
        metadata={
            "help": "Training loss: 'clip' (plain symmetric InfoNCE), 'nlip' (noise-adaptive contrastive NITC, "
            "+ noise completion with --noise_completion), 'npc' (negative pre-aware re-weighting with a clean memory "
            "bank, for fine-tuning a pretrained model), 'srcl' (similarity-regulated negatives), or a combination "
            "joined with '+', e.g. 'nlip+srcl', 'npc+nlip'."
        },
    )
    noise_warmup_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs of plain contrastive training before the first noise estimate (GMM fit on per-sample "
            "losses). 0 fits at the start of training, which needs losses: use --noise_estimation_mode pass."
        },
    )
    gmm_refit_epochs: int = field(
        default=1, metadata={"help": "Refit the noise-estimation GMM every this many epochs after warm-up."}
    )
    noise_estimation_mode: str = field(
        default="online",
        metadata={
            "help": "'online': per-sample losses are recorded from the training forward pass (no extra cost). "
            "'pass': an extra no-grad pass over the training set at epoch start gives same-model losses (NCR/NPC)."
        },
    )
    gmm_max_fit_samples: int = field(
        default=100_000,
        metadata={"help": "The most per-sample losses the GMM is fit on (a seeded random subset); all are scored."},
    )
    nitc_strength: float = field(
        default=0.1,
        metadata={"help": "λ of NLIP's NITC loss: weight of the similarity penalty λ·ε_i·s_ii on likely-noisy pairs."},
    )
    nitc_form: str = field(
        default="balanced",
        metadata={
            "help": "Form of NLIP's NITC loss. 'balanced' (default): the positive terms are normalised by their total "
            "weight Σ(1 − ε_i) (InfoNCE's gradient scale however many pairs are called noisy) and the push-apart "
            "term is bounded, λ·ε_i·relu(s_ii − mean random-pair cosine). 'paper': the reference form "
            "mean[(1 − ε_i)·CE_i + λ·ε_i·s_ii], which collapses when most pairs are called noisy."
        },
    )
    noise_prior: str = field(
        default="none",
        metadata={
            "help": "'reference': before training, a frozen, already aligned reference model (--noise_prior_model) "
            "scores every training pair once: c_i = cos(v_i, t_i) − mean cosine of random pairs, and a 2-component "
            "mixture over c gives a clean probability p_i (0 where c_i <= 0). 1 − p_i is the noise probability ε "
            "from the first step on (NLIP's weights, NPC's clean memory bank), mixed with the loss-based estimate by "
            "--noise_prior_weight; the reference's embeddings give SRCL its reference similarity (without "
            "--srcl_reference_model). Saved in checkpoints. 'none': loss-based estimate only."
        },
    )
    noise_prior_model: str | None = field(
        default=None,
        metadata={
            "help": "With --noise_prior reference: the reference model (path or Hub id of an NLIP/CLIP-contract dual "
            "encoder). Default: the model being trained, as it is before the first step (the pretrained checkpoint "
            "when fine-tuning). It must already be aligned and must not have seen the evaluation data."
        },
    )
    noise_prior_epoch: int = field(
        default=0,
        metadata={
            "help": "With --noise_prior reference and no --noise_prior_model: 0 (default) scores the pairs with the "
            "model as it is before the first step (the pretrained checkpoint when fine-tuning); N >= 1 with the run's "
            "own snapshot at the start of epoch N (one no-grad pass then), e.g. the end of the noise warm-up when "
            "training from scratch, where no aligned reference exists. Until then ε comes from the loss mixture alone."
        },
    )
    noise_prior_neighbours: int = field(
        default=0,
        metadata={
            "help": "With --noise_prior reference: 0 (default) scores each pair by its reference cosine (above); k >= 1 "
            "by the caption agreement of its k nearest images instead, c_i = mean over the k training images most "
            "similar to v_i of cos(t_i, t_j), minus the mean cosine of random caption pairs. It needs no image-text "
            "alignment, so it suits a snapshot of a model trained from scratch (--noise_prior_epoch)."
        },
    )
    noise_prior_weight: float = field(
        default=0.5,
        metadata={"help": "w in ε = w·ε_prior + (1 − w)·ε_loss once the loss-based mixture is fit (1: the prior alone). "
                  "The default 0.5 won the validation tuning of nlip@reference in both pretrained benchmark settings."},
    )
    noise_max_noisy_fraction: float = field(
        default=0.9,
        metadata={
            "help": "A noise-estimation fit that calls more than this fraction of the pairs noisy is not used (every "
            "pair is then treated as clean until the next fit, and the reason is logged). 1.0 trusts every fit."
        },
    )
    noise_min_separation: float = field(
        default=0.0,
        metadata={
            "help": "A noise-estimation fit whose two components are closer than this in Ashman's D, |μ_noisy − "
            "μ_clean|·√(2 / (σ²_clean + σ²_noisy)), is not used (every pair is then treated as clean until the next "
            "fit, and the reason is logged): before the losses separate, the mixture splits them by spread, not by "
            "level (D < 1). 2 is the usual bar for two distinct modes; 0 trusts every fit."
        },
    )
    noise_loss_momentum: float = field(
        default=0.0,
        metadata={
            "help": "What the noise-estimation mixture is fit on. 0: each pair's latest loss (NLIP, NPC). m in (0, 1): "
            "an exponential moving average over the fits (epochs), L̄ ← m·L̄ + (1 − m)·L, which averages out how a "
            "pair's loss depends on the negatives its batch happened to hold."
        },
    )
    srcl_reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Path (or Hub id) of a frozen reference model (same family, trained on clean data) whose "
            "similarities are mixed into SRCL's negative weights. Without it α = 0 (online similarities only)."
        },
    )
    srcl_alpha_start: float | None = field(
        default=None,
        metadata={
            "help": "SRCL mixing weight α of the reference similarity at the start of training (linear schedule to "
            "--srcl_alpha_end). Default: 1.0 with a reference (--srcl_reference_model, else the stored embeddings of "
            "--noise_prior reference), 0.0 without (a value > 0 then is an error)."
        },
    )
    srcl_alpha_end: float = field(
        default=0.0, metadata={"help": "SRCL mixing weight α at the end of training (reached at the last step)."}
    )
    srcl_weight_temperature: float = field(
        default=DEFAULT_SRCL_TEMPERATURE,
        metadata={
            "help": "τ_w of SRCL's negative weights w_ij ∝ exp(−ŝ_ij/τ_w): smaller suppresses likely false negatives "
            "harder, larger tends to plain InfoNCE."
        },
    )
    rcl_infonce_weight: float = field(
        default=0.5,
        metadata={
            "help": "RCL: weight β of an InfoNCE term added to the complementary loss, per pair "
            "−Σ_{j≠i} log(1 − p_ij) + β·CE_i (the active-passive pairing of Symmetric Cross Entropy). The "
            "complementary loss alone is robust but underfits; 0 is RCL's loss."
        },
    )
    npc_clean_threshold: float = field(
        default=0.9,
        metadata={"help": "NPC: pairs with clean probability above this form the clean memory bank."},
    )
    npc_clean_set: str = field(
        default="evidence",
        metadata={
            "help": "NPC: how clean probabilities select the memory bank. 'evidence' (default): the mixture's "
            "posterior with its clean weight capped at its noisy weight, > --npc_clean_threshold, so a pair needs its "
            "loss's likelihood to favour clean. 'posterior' (NPC's rule): the posterior itself. The two agree whenever "
            "the mixture calls at most half the pairs clean, and differ when it calls nearly all clean before the "
            "losses separate (high noise from scratch), where 'posterior' fills the bank with noisy pairs."
        },
    )
    npc_min_clean_fraction: float = field(
        default=0.1,
        metadata={
            "help": "NPC: the memory bank holds at least this fraction of the training pairs, the most probably clean "
            "ones, when fewer pass --npc_clean_threshold (a weakly separating mixture leaves a handful above it, and "
            "a bank of a handful of pairs gives every sample the same few memory entries). 0: the threshold alone."
        },
    )
    npc_memory_refresh_epochs: int = field(
        default=1,
        metadata={"help": "NPC: rebuild the memory bank (nearest clean pairs) every this many epochs."},
    )
    noise_completion: bool = field(
        default=False,
        metadata={
            "help": "NLIP noise completion: generate synthetic captions for the training images with a captioner "
            "and use them as a second, noise-weighted positive (needs 'nlip' in --method)."
        },
    )
    completion_refresh_epochs: int = field(
        default=1, metadata={"help": "Regenerate the synthetic captions every this many epochs."}
    )
    completion_model: str | None = field(
        default=None,
        metadata={
            "help": "Path of an NLIPForCaptioning checkpoint that writes the synthetic captions. None: the model "
            "being trained, which must then be an NLIPForPreTraining."
        },
    )
    completion_max_new_tokens: int = field(
        default=20, metadata={"help": "The most tokens of a generated synthetic caption."}
    )
    freeze_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "Lock the image tower, LiT-style: its parameters get no gradient and it stays in eval mode "
            "(batch-norm statistics and dropout frozen); only the projections, the logit scale (and the text tower "
            "unless it is locked too) train. A fully locked tower's outputs are cached (--frozen_feature_cache)."
        },
    )
    freeze_text_tower: bool = field(
        default=False,
        metadata={"help": "Lock the text tower likewise (never the captioning decoder)."},
    )
    unfreeze_last_n: int = field(
        default=0,
        metadata={
            "help": "With --freeze_vision_tower / --freeze_text_tower: keep the last N blocks of each locked tower "
            "trainable (transformer layers; a timm CNN's stages), with the modules after them (final norm, conv "
            "head). 0 locks whole towers; N > 0 disables the feature cache (the tower's output changes)."
        },
    )
    frozen_feature_cache: str = field(
        default="memory",
        metadata={
            "help": "Cache of a fully locked tower's pooled outputs by dataset index, computed the first time an "
            "example is seen and reused every epoch (the tower then runs once per example, not once per epoch): "
            "'memory', 'disk' (a memory-mapped file in --feature_cache_dir, for data whose features do not fit in "
            "RAM) or 'none'. Applies to NLIPModel dual encoders (an NLIPForPreTraining's towers are locked but not "
            "cached: its captioner cross-attends to every image token)."
        },
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the on-disk feature cache (default: OUTPUT_DIR/feature_cache)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Must stay False: the image-text collator needs the 'image', 'text' and 'index' columns that "
            "the model's forward does not name."
        },
    )

    def __post_init__(self):
        # Before TrainingArguments' own checks: a 0 here otherwise fails late, inside torch's sampler (batch size) or
        # as a ZeroDivisionError inside transformers (accumulation), after the data and model are built.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` (--{name}) must be a positive integer; got {value!r}.")
        super().__post_init__()
        if self.dataloader_pin_memory and not _has_accelerator(self.use_cpu):
            # Pinned memory only speeds up copies to an accelerator; without one torch warns at every DataLoader
            # iterator (every epoch) and pins nothing.
            self.dataloader_pin_memory = False
        methods = parse_method(self.method)
        _check_int(self, "noise_warmup_epochs", minimum=0)
        for name in ("gmm_refit_epochs", "npc_memory_refresh_epochs", "completion_refresh_epochs"):
            _check_int(self, name, minimum=1)
        _check_int(self, "completion_max_new_tokens", minimum=1)
        _check_int(self, "gmm_max_fit_samples", minimum=10)
        if self.noise_estimation_mode not in NOISE_ESTIMATION_MODES:
            raise ValueError(
                f"`noise_estimation_mode` must be one of {NOISE_ESTIMATION_MODES}; got {self.noise_estimation_mode!r}."
            )
        if self.nitc_strength < 0:
            raise ValueError(f"`nitc_strength` (λ) must be >= 0; got {self.nitc_strength}.")
        if self.nitc_form not in NITC_FORMS:
            raise ValueError(f"`nitc_form` must be one of {NITC_FORMS}; got {self.nitc_form!r}.")
        if self.noise_prior not in NOISE_PRIORS:
            raise ValueError(f"`noise_prior` must be one of {NOISE_PRIORS}; got {self.noise_prior!r}.")
        if self.noise_prior_model is not None and self.noise_prior != "reference":
            raise ValueError("`noise_prior_model` is set but `noise_prior` is not 'reference': it would be unused.")
        if self.noise_prior_epoch < 0:
            raise ValueError(f"`noise_prior_epoch` must be >= 0; got {self.noise_prior_epoch}.")
        if self.noise_prior_epoch > 0 and (self.noise_prior != "reference" or self.noise_prior_model is not None):
            raise ValueError(
                f"`noise_prior_epoch`={self.noise_prior_epoch} scores the pairs with the run's own snapshot: it needs "
                "noise_prior='reference' and no noise_prior_model."
            )
        if self.noise_prior_neighbours < 0:
            raise ValueError(f"`noise_prior_neighbours` must be >= 0; got {self.noise_prior_neighbours}.")
        if self.noise_prior_neighbours > 0 and self.noise_prior != "reference":
            raise ValueError(f"`noise_prior_neighbours`={self.noise_prior_neighbours} scores the reference prior by "
                             "neighbour agreement: it needs noise_prior='reference'.")
        if not 0.0 <= self.noise_prior_weight <= 1.0:
            raise ValueError(f"`noise_prior_weight` must be in [0, 1]; got {self.noise_prior_weight}.")
        if not 0.0 <= self.noise_loss_momentum < 1.0:
            raise ValueError(f"`noise_loss_momentum` must be in [0, 1); got {self.noise_loss_momentum}.")
        if self.noise_min_separation < 0.0:
            raise ValueError(f"`noise_min_separation` must be >= 0; got {self.noise_min_separation}.")
        if not 0.0 < self.noise_max_noisy_fraction <= 1.0:
            raise ValueError(f"`noise_max_noisy_fraction` must be in (0, 1]; got {self.noise_max_noisy_fraction}.")
        if self.srcl_weight_temperature <= 0:
            raise ValueError(f"`srcl_weight_temperature` (τ_w) must be > 0; got {self.srcl_weight_temperature}.")
        if self.rcl_infonce_weight < 0:
            raise ValueError(f"`rcl_infonce_weight` (β) must be >= 0; got {self.rcl_infonce_weight}.")
        if not 0.0 < self.npc_clean_threshold < 1.0:
            raise ValueError(f"`npc_clean_threshold` must be in (0, 1); got {self.npc_clean_threshold}.")
        if not 0.0 <= self.npc_min_clean_fraction < 1.0:
            raise ValueError(f"`npc_min_clean_fraction` must be in [0, 1); got {self.npc_min_clean_fraction}.")
        if self.npc_clean_set not in NPC_CLEAN_SETS:
            raise ValueError(f"`npc_clean_set` must be one of {NPC_CLEAN_SETS}; got {self.npc_clean_set!r}.")
        self._check_tower_locking()
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns=True` would delete the 'image', 'text' and 'index' columns before the "
                "image-text collator sees them; NLIPTrainingArguments needs remove_unused_columns=False."
            )
        self._check_srcl(methods)
        if self.noise_completion and "nlip" not in methods:
            raise ValueError(
                f"`noise_completion=True` feeds synthetic captions to NLIP's loss; add 'nlip' to `method` "
                f"(got {self.method!r})."
            )
        if self.completion_model is not None and not self.noise_completion:
            raise ValueError("`completion_model` is set but `noise_completion` is False; set noise_completion=True.")
        if "npc" in methods and self.noise_warmup_epochs == 0 and self.noise_estimation_mode == "online":
            raise ValueError(
                "method 'npc' with `noise_warmup_epochs=0` builds its memory bank before training, from losses that "
                "`noise_estimation_mode='online'` has not recorded yet; use noise_estimation_mode='pass' (losses of "
                "the pretrained model) or noise_warmup_epochs >= 1."
            )

    def _check_tower_locking(self) -> None:
        _check_int(self, "unfreeze_last_n", minimum=0)
        if self.unfreeze_last_n and not (self.freeze_vision_tower or self.freeze_text_tower):
            raise ValueError(
                f"`unfreeze_last_n`={self.unfreeze_last_n} unlocks the last blocks of a locked tower, but no tower is "
                "locked: set freeze_vision_tower and/or freeze_text_tower."
            )
        if self.frozen_feature_cache not in CACHE_MODES:
            raise ValueError(f"`frozen_feature_cache` must be one of {CACHE_MODES}; got {self.frozen_feature_cache!r}.")
        if self.feature_cache_dir is not None and self.frozen_feature_cache != "disk":
            raise ValueError("`feature_cache_dir` is only used with frozen_feature_cache='disk'.")
        if self.frozen_feature_cache == "disk" and self.feature_cache_dir is None:
            self.feature_cache_dir = os.path.join(self.output_dir, "feature_cache")

    def _check_srcl(self, methods: frozenset[str]) -> None:
        if self.srcl_reference_model is not None and "srcl" not in methods:
            raise ValueError(
                f"`srcl_reference_model` is only used by method 'srcl'; add it to `method` (got {self.method!r})."
            )
        # SRCL's reference: a reference model, else the reference prior's stored embeddings.
        has_reference = self.srcl_reference_model is not None or self.noise_prior == "reference"
        if self.srcl_alpha_start is None:
            self.srcl_alpha_start = 1.0 if has_reference else 0.0
        for name in ("srcl_alpha_start", "srcl_alpha_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1]; got {value}.")
            if value > 0 and not has_reference:
                raise ValueError(
                    f"`{name}`={value} mixes in a reference model's similarities, but `srcl_reference_model` is None "
                    "and there is no reference prior; set srcl_reference_model or noise_prior='reference', or use α = 0."
                )

    @property
    def methods(self) -> frozenset[str]:
        """The method components in use (`{"nlip", "srcl"}` for `nlip+srcl`; empty for `clip`)."""
        return parse_method(self.method)

    @property
    def scores_prior_before_training(self) -> bool:
        """Whether the reference prior is scored once before the first step, by a frozen reference (`noise_prior`
        'reference' with `noise_prior_epoch` 0), rather than by the run's own snapshot at epoch N."""
        return self.noise_prior == "reference" and self.noise_prior_epoch == 0

    def srcl_alpha(self, global_step: int, max_steps: int) -> float:
        """SRCL's α at `global_step`: linear from `srcl_alpha_start` (step 0) to `srcl_alpha_end` (the last step)."""
        progress = min(1.0, global_step / max(1, max_steps - 1))
        return self.srcl_alpha_start + (self.srcl_alpha_end - self.srcl_alpha_start) * progress


def _has_accelerator(use_cpu: bool) -> bool:
    """Whether training runs on a device that pinned host memory helps (CUDA, XPU, MPS, ...)."""
    if use_cpu:
        return False
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _check_int(args: NLIPTrainingArguments, name: str, minimum: int) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
