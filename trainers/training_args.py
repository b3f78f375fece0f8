"""`TrainingArguments` for noise-robust image-text training: the method and its noise settings (DESIGN.md §4–5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import DEFAULT_SRCL_TEMPERATURE


METHOD_COMPONENTS = ("nlip", "npc", "srcl")
VALID_METHODS_HELP = "'clip', or one or more of 'nlip', 'npc', 'srcl' joined with '+' (e.g. 'nlip+srcl', 'npc+nlip')"
NOISE_ESTIMATION_MODES = ("online", "pass")


def parse_method(method: str) -> frozenset[str]:
    """The set of method components of a `method` string: empty for `clip`, e.g. `{"nlip", "srcl"}` for `nlip+srcl`."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"`method` must be {VALID_METHODS_HELP}; got {method!r}.")
    names = [name.strip().lower() for name in method.split("+")]
    if names == ["clip"]:
        return frozenset()
    unknown = [name for name in names if name not in METHOD_COMPONENTS]
    if "clip" in names:
        raise ValueError(
            f"`method`={method!r}: 'clip' is the plain contrastive loss and cannot be combined; valid methods are "
            f"{VALID_METHODS_HELP}."
        )
    if unknown:
        raise ValueError(f"`method`={method!r} has unknown name(s) {unknown}; valid methods are {VALID_METHODS_HELP}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`method`={method!r} names a method twice.")
    return frozenset(names)


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
            "--srcl_alpha_end). Default: 1.0 with a reference model, 0.0 without (a value > 0 then is an error)."
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
    npc_clean_threshold: float = field(
        default=0.9,
        metadata={"help": "NPC: pairs with clean probability above this form the clean memory bank."},
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
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Must stay False: the image-text collator needs the 'image', 'text' and 'index' columns that "
            "the model's forward does not name."
        },
    )

    def __post_init__(self):
        super().__post_init__()
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
        if self.srcl_weight_temperature <= 0:
            raise ValueError(f"`srcl_weight_temperature` (τ_w) must be > 0; got {self.srcl_weight_temperature}.")
        if not 0.0 < self.npc_clean_threshold < 1.0:
            raise ValueError(f"`npc_clean_threshold` must be in (0, 1); got {self.npc_clean_threshold}.")
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

    def _check_srcl(self, methods: frozenset[str]) -> None:
        has_reference = self.srcl_reference_model is not None
        if has_reference and "srcl" not in methods:
            raise ValueError(
                f"`srcl_reference_model` is only used by method 'srcl'; add it to `method` (got {self.method!r})."
            )
        if self.srcl_alpha_start is None:
            self.srcl_alpha_start = 1.0 if has_reference else 0.0
        for name in ("srcl_alpha_start", "srcl_alpha_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1]; got {value}.")
            if value > 0 and not has_reference:
                raise ValueError(
                    f"`{name}`={value} mixes in a reference model's similarities, but `srcl_reference_model` is None; "
                    "set srcl_reference_model or use α = 0."
                )

    @property
    def methods(self) -> frozenset[str]:
        """The method components in use (`{"nlip", "srcl"}` for `nlip+srcl`; empty for `clip`)."""
        return parse_method(self.method)

    def srcl_alpha(self, global_step: int, max_steps: int) -> float:
        """SRCL's α at `global_step`: linear from `srcl_alpha_start` (step 0) to `srcl_alpha_end` (the last step)."""
        progress = min(1.0, global_step / max(1, max_steps - 1))
        return self.srcl_alpha_start + (self.srcl_alpha_end - self.srcl_alpha_start) * progress


def _check_int(args: NLIPTrainingArguments, name: str, minimum: int) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
