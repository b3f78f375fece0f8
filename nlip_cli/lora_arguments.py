"""LoRA fine-tuning from the command line (`nlip-train --lora_r 8 ...`), with `peft`.

The model's chosen linear layers get low-rank adapters; only the adapters (and the projection heads, which a new task
usually needs to move) train. `NLIPTrainer` handles a `peft` model as is (tests/trainers/test_trainer_lora.py). At the end of
training `nlip-train` saves the adapter alone into `output_dir/lora_adapter/` and the merged model (base weights +
adapters) into `output_dir`, so that `nlip-eval`, `nlip-audit`, `nlip-caption` and `from_pretrained` load it like any
checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger("nlip.train")

LORA_ADAPTER_DIR = "lora_adapter"
# Attention projections of the CLIP-style towers (q_proj/v_proj) and of BERT-style text towers and decoders
# (query/value).
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj", "query", "value"]
DEFAULT_MODULES_TO_SAVE = ["visual_projection", "text_projection"]


@dataclass
class LoraArguments:
    """LoRA adapters (peft) instead of full fine-tuning."""

    lora_r: int = field(
        default=0,
        metadata={"help": "Rank of the LoRA adapters; 0 (the default) trains every weight (no LoRA). With LoRA, only "
                          "the adapters and --lora_modules_to_save train."},
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r; default: 2 * r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Names (suffixes) of the linear layers that get adapters, e.g. q_proj v_proj k_proj "
                          "out_proj fc1 fc2 (CLIP towers) or query value (BERT towers and the captioning decoder); "
                          "names no layer has are ignored as long as one matches."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE),
        metadata={"help": "Modules trained in full next to the adapters (default: the two projection heads)."},
    )

    def __post_init__(self):
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}.")
        if self.lora_r and not self.lora_target_modules:
            raise ValueError("--lora_target_modules must name at least one layer when --lora_r > 0.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0


def apply_lora(model: nn.Module, args: LoraArguments) -> nn.Module:
    """`model` wrapped with LoRA adapters on the `lora_target_modules` it has (ValueError when it has none)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = [name for name in args.lora_target_modules if name in names]
    if not targets:
        raise ValueError(f"--lora_target_modules {args.lora_target_modules} match no linear layer of the model; its "
                         f"linear layers are named {sorted(names)}.")
    children = {name.split(".")[0] for name, _ in model.named_modules() if name}
    modules_to_save = [name for name in args.lora_modules_to_save if name in children or name in names]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=modules_to_save or None)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d on %s (+ full %s): %d of %d parameters train (%.2f%%).", args.lora_r, targets,
                modules_to_save or "nothing", trainable, total, 100 * trainable / max(total, 1))
    return model


__all__ = ["DEFAULT_LORA_TARGETS", "LORA_ADAPTER_DIR", "LoraArguments", "apply_lora"]
