"""Speed benchmark (not a test): NLIP against transformers' CLIP / BLIP, and the cost of each noise-robust method.

Every figure is a ratio of two timings taken in the same run: the repetitions of the baseline and of the candidate are
interleaved (order reversed every other repetition), preceded by warm-up calls, and the ratio is that of the median
times — so that a busy or throttling machine slows both sides alike (the ratio of the fastest repetitions is reported
next to it). Figures:

1. training samples/s of `NLIPModel` vs `CLIPModel` of identical size (plain contrastive loss + AdamW step);
2. step time of each training method (nlip, srcl, srcl with a reference model, npc, nlip+srcl) vs plain `clip`;
3. zero-shot inference images/s (`get_image_features`) of `NLIPModel` vs `CLIPModel`;
4. captioning tokens/s of `NLIPForCaptioning.generate` vs `BlipForConditionalGeneration.generate`, and with vs without
   KV cache;
5. achieved FLOP/s of a training step as a fraction of this device's matmul throughput (in the timed precision).

Models are randomly initialised (speed does not depend on the weights). Everything runs on `--device` (CPU by default,
or a CUDA GPU), in float32 or, with `--bf16`, with forward and loss under bfloat16 autocast. Prints a JSON summary,
writes it to `--output` and a bar plot of the ratios next to it (`.png`).

    python bench/speed.py [--quick] [--output bench/results/speed.json] [--device cpu|cuda] [--bf16] [--threads N]
                          [--repetitions R] [--warmup W]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

from modeling_nlip import NLIPConfig, NLIPModel
from modeling_nlip.modeling_nlip_captioning import NLIPForCaptioning
from trainers.losses import contrastive_loss
from trainers.noise.memory_bank import MemoryBank
from trainers.trainer import NLIPTrainer
from trainers.training_args import NLIPTrainingArguments

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "speed.json"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 4

# Targets: ("min", x) means the ratio should be >= x, ("max", x) that it should be <= x.
TARGETS = {
    "training_samples_per_s": ("min", 1.0),
    "nlip": ("max", 1.05),
    "srcl": ("max", 1.05),
    "srcl_reference": ("max", 1.5),
    "npc": ("max", 3.0),
    "nlip+srcl": ("max", 1.05),
    "nlip+srcl_prior": ("max", 1.05),
}


@dataclass(frozen=True)
class BenchSizes:
    """Model and batch sizes. Towers are CLIP ViT / text transformers with MLP width 4x hidden."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 256
    vision_layers: int = 4
    text_hidden_size: int = 256
    text_layers: int = 4
    num_attention_heads: int = 4
    text_length: int = 32
    vocab_size: int = 1024
    projection_dim: int = 256
    batch_size: int = 32
    decoder_hidden_size: int = 256
    decoder_layers: int = 4
    caption_batch_size: int = 8
    max_new_tokens: int = 16
    matmul_size: int = 2048


QUICK_SIZES = BenchSizes(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, text_hidden_size=32, text_layers=2,
    num_attention_heads=2, text_length=16, vocab_size=128, projection_dim=32, batch_size=8, decoder_hidden_size=32,
    decoder_layers=2, caption_batch_size=2, max_new_tokens=4, matmul_size=256,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Execution:
    """Where and in which precision the timed steps run: `device` ("cpu" or "cuda"), and with `bf16` their forward
    and loss under bfloat16 autocast (parameters, gradients and optimizer states stay float32)."""

    device: str = "cpu"
    bf16: bool = False

    @property
    def dtype(self) -> str:
        return "bfloat16 autocast" if self.bf16 else "float32"

    @property
    def matmul_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def synchronize(self) -> None:
        """Wait for the device's queued kernels, so that the clock measures the work and not its launch."""
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """How each comparison is timed: `warmup` untimed rounds, then `repetitions` interleaved timed rounds."""

    repetitions: int = 20
    warmup: int = 2
    progress: bool = True


@dataclass
class Comparison:
    """Seconds per call of each candidate over the timed repetitions."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def best(self, name: str) -> float:
        return min(self.times[name])

    def slowdown(self, name: str, baseline: str) -> float:
        """Ratio of median times `name / baseline` (> 1: `name` is slower)."""
        return self.median(name) / self.median(baseline)

    def best_slowdown(self, name: str, baseline: str) -> float:
        """The same with the fastest repetition of each: less sensitive to other load on the machine."""
        return self.best(name) / self.best(baseline)


def compare(
    candidates: dict[str, Callable[[], object]], timing: Timing, execution: Execution, desc: str
) -> Comparison:
    """Time the candidates in interleaved rounds, the order reversed every other round, after warm-up rounds."""
    names = list(candidates)
    for _ in range(timing.warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for repetition in tqdm(range(timing.repetitions), desc=desc, disable=not timing.progress):
        for name in names if repetition % 2 == 0 else reversed(names):
            execution.synchronize()
            start = time.perf_counter()
            candidates[name]()
            execution.synchronize()
            times[name].append(time.perf_counter() - start)
    return Comparison(times)


def _verdict(key: str, ratio: float) -> dict:
    """The target for ``key`` and whether ``ratio``, as reported (rounded by ``_round``), meets it."""
    kind, value = TARGETS[key]
    ratio = _round(ratio)
    met = ratio >= value if kind == "min" else ratio <= value
    return {"target": f"{'>=' if kind == 'min' else '<='} {value}", "met": met}


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


# ----------------------------------------------------------------------------------------------------------- models


def vision_config(sizes: BenchSizes) -> dict:
    return dict(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=4 * sizes.vision_hidden_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.num_attention_heads,
    )


def text_config(sizes: BenchSizes) -> dict:
    return dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.text_hidden_size,
        intermediate_size=4 * sizes.text_hidden_size,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.num_attention_heads,
        max_position_embeddings=sizes.text_length,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_clip(sizes: BenchSizes) -> CLIPModel:
    config = CLIPConfig(
        vision_config=vision_config(sizes), text_config=text_config(sizes), projection_dim=sizes.projection_dim
    )
    return CLIPModel(config)


def build_nlip(sizes: BenchSizes) -> NLIPModel:
    config = NLIPConfig(
        vision_config={"model_type": "clip_vision_model", **vision_config(sizes)},
        text_config={"model_type": "clip_text_model", **text_config(sizes)},
        projection_dim=sizes.projection_dim,
    )
    return NLIPModel(config)


def random_pairs(sizes: BenchSizes, num_pairs: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random images and full-length captions `[BOS] words... [EOS]` (CLIP pools at the first EOS)."""
    input_ids = torch.randint(FIRST_WORD_ID, sizes.vocab_size, (num_pairs, sizes.text_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = BOS_ID, EOS_ID
    return {
        "pixel_values": torch.randn(num_pairs, 3, sizes.image_size, sizes.image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """CLIP-style AdamW (NPC paper's betas/eps/weight decay)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def embeddings(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = model(**batch)
    return outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp()


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ------------------------------------------------------------------------------------- 1. training vs CLIPModel


def bench_training(
    sizes: BenchSizes, timing: Timing, execution: Execution, batch: dict[str, torch.Tensor]
) -> tuple[dict, dict]:
    torch.manual_seed(0)
    models = {"clip": build_clip(sizes).to(execution.device), "nlip": build_nlip(sizes).to(execution.device)}
    optimizers = {name: make_optimizer(model) for name, model in models.items()}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            with execution.autocast():
                loss = models[name](**batch, return_loss=True).loss
            optimizer_step(optimizers[name], loss)

        return run

    timed = compare({name: step(name) for name in models}, timing, execution, "1/5 training NLIP vs CLIP")
    ratio = timed.slowdown("clip", "nlip")  # samples/s ratio NLIP / CLIP = time ratio CLIP / NLIP
    parameters = {name: num_parameters(model) for name, model in models.items()}
    result = {
        "what": "samples/s of model(..., return_loss=True) + backward + AdamW step, NLIPModel / CLIPModel",
        "clip_samples_per_s": _round(sizes.batch_size / timed.median("clip")),
        "nlip_samples_per_s": _round(sizes.batch_size / timed.median("nlip")),
        "median_step_s": {name: _round(timed.median(name)) for name in models},
        "ratio": _round(ratio),
        **_verdict("training_samples_per_s", ratio),
        "ratio_of_best_times": _round(timed.best_slowdown("clip", "nlip")),
        "parameter_count": {**parameters, "equal": parameters["clip"] == parameters["nlip"]},
    }
    return result, models


# ------------------------------------------------------------------------------ 2. method overhead vs plain clip


METHODS = ("clip", "nlip", "srcl", "srcl_reference", "npc", "nlip+srcl", "nlip+srcl_prior")
# The trainer's `--method` of each timed configuration that is not a method name itself.
METHOD_OF = {"srcl_reference": "srcl", "nlip+srcl_prior": "nlip+srcl"}
METHOD_STEPS = {
    "clip": "forward, plain InfoNCE, backward, optimizer step (every method also records CE_i into the loss bank)",
    "nlip": "NITC with fitted noise probabilities",
    "srcl": "SRCL negative weights from the online similarities (no reference model, alpha=0)",
    "srcl_reference": "SRCL with alpha=0.5: + a no-grad image and text forward of a frozen same-size reference model",
    "npc": (
        "memory entries (2 distinct clean neighbours per sample) fetched from the dataset and collated (timed alone "
        "as npc_memory_fetch_s); sibling synced to the real weights, one sibling forward+backward+optimizer step on "
        "the batch, one no-grad sibling forward on the memory entries; real forward+backward on batch + memory "
        "entries (their losses before the sibling step come from this forward), confidence-weighted InfoNCE + "
        "memory loss"
    ),
    "nlip+srcl": "NITC with fitted noise probabilities and SRCL negative weights",
    "nlip+srcl_prior": (
        "nlip+srcl with --noise_prior reference (the recommended configuration): ε mixes the reference prior with the "
        "fitted noise probabilities, SRCL's reference similarity comes from the prior's stored embeddings (alpha=1); "
        "the reference pass before training is not a step and is not timed"
    ),
}


def stack_collator(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate pre-tensorised pairs (the benchmark skips image decoding and tokenisation)."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


class TrainerSteps:
    """One `NLIPTrainer` per method, each on its own copy of the same `NLIPModel`, stepped outside `train()`.

    The train set is a pool of `3 x B` random pairs; the batch is pairs `0..B-1`. Methods that use noise probabilities
    get a GMM fitted on bimodal random losses; NPC's memory bank gives the batch `2 x B` distinct clean neighbours, as
    in a large dataset where neighbours seldom coincide. As in `Trainer.train()`, each model and optimizer go through
    `accelerator.prepare`, which puts the model's forward under the mixed-precision autocast (`--bf16`).
    """

    def __init__(
        self, model: NLIPModel, sizes: BenchSizes, execution: Execution, generator: torch.Generator, workdir: Path
    ):
        batch_size, pool_size = sizes.batch_size, 3 * sizes.batch_size
        pool = random_pairs(sizes, pool_size, generator)
        features = datasets.Features(
            {
                "index": datasets.Value("int64"),
                "pixel_values": datasets.Array3D(tuple(pool["pixel_values"].shape[1:]), "float32"),
                "input_ids": datasets.Sequence(datasets.Value("int64"), length=sizes.text_length),
                "attention_mask": datasets.Sequence(datasets.Value("int64"), length=sizes.text_length),
            }
        )
        columns = {"index": list(range(pool_size)), **{key: value.numpy() for key, value in pool.items()}}
        self.dataset = datasets.Dataset.from_dict(columns, features=features).with_format("torch")
        self.batch = execution.to_device(stack_collator([self.dataset[i] for i in range(batch_size)]))
        noisy = torch.rand(pool_size, generator=generator) < 0.3
        self.losses = torch.where(noisy, 3.0, 1.0) + 0.1 * torch.randn(pool_size, generator=generator)
        self.memory_bank = MemoryBank(
            clean_indices=torch.arange(batch_size, pool_size),
            image_neighbors=torch.cat([torch.arange(batch_size, 2 * batch_size), torch.arange(batch_size, pool_size)]),
            text_neighbors=torch.cat([torch.arange(2 * batch_size, pool_size), torch.arange(batch_size, pool_size)]),
            threshold=0.9,
        )
        reference_dir = workdir / "reference"
        model.save_pretrained(reference_dir)
        self.trainers = {
            name: self._trainer(name, model, self.dataset, execution, workdir, reference_dir) for name in METHODS
        }

    def _trainer(
        self, name: str, model: NLIPModel, dataset, execution: Execution, workdir: Path, reference_dir: Path
    ):
        reference = {}
        if name == "srcl_reference":
            reference = dict(srcl_reference_model=str(reference_dir), srcl_alpha_start=0.5, srcl_alpha_end=0.5)
        if name == "nlip+srcl_prior":
            reference = dict(noise_prior="reference")
        args = NLIPTrainingArguments(
            output_dir=str(workdir / name.replace("+", "_")),
            method=METHOD_OF.get(name, name),
            per_device_train_batch_size=len(self.batch["index"]),
            learning_rate=1e-5,
            weight_decay=0.2,
            adam_beta2=0.98,
            adam_epsilon=1e-6,
            max_grad_norm=0.0,
            use_cpu=execution.device == "cpu",
            bf16=execution.bf16,
            report_to=[],
            disable_tqdm=True,
            dataloader_pin_memory=False,
            **reference,
        )
        model = copy.deepcopy(model)
        trainer = NLIPTrainer(model=model, args=args, data_collator=stack_collator, train_dataset=dataset)
        trainer.create_optimizer()
        trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
        trainer.noise_state.record(torch.arange(len(self.losses)), self.losses, step=0)
        if "nlip" in trainer.objectives:
            trainer.noise_state.fit(epoch=0)
            if not trainer.noise_state.is_estimated:
                raise RuntimeError(f"The benchmark's noise GMM fit fell back: {trainer.noise_state.estimate_summary}.")
        if "npc" in trainer.objectives:
            trainer.objectives["npc"].memory_bank = self.memory_bank
        if args.noise_prior == "reference":  # what the pass before training installs, the model its own reference
            trainer.noise.score_snapshot_prior(0, trainer.context)
        return trainer

    def steps(self) -> dict[str, Callable[[], None]]:
        return {name: functools.partial(self.step, trainer) for name, trainer in self.trainers.items()}

    def fetch_memory_entries(self) -> dict:
        """What NPC's step spends loading its memory entries (`2 x B` dataset rows, collated, moved to the device):
        the NPC objective's own fetch."""
        trainer = self.trainers["npc"]
        trainer.model.train()
        return trainer.objectives["npc"].extra_inputs(self.batch, trainer.context)

    def step(self, trainer) -> None:
        """What the Trainer's loop does per batch without gradient accumulation or clipping: `training_step` (forward
        and backward), optimizer step, zero grad."""
        trainer.training_step(trainer.model_wrapped, dict(self.batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1


def bench_methods(
    model: NLIPModel, sizes: BenchSizes, timing: Timing, execution: Execution, generator: torch.Generator
) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        methods = TrainerSteps(model, sizes, execution, generator, Path(workdir))
        candidates = {**methods.steps(), "npc_memory_fetch": methods.fetch_memory_entries}
        timed = compare(candidates, timing, execution, "2/5 method overhead")
        optimizer = methods.trainers["clip"].optimizer
        optimizer = type(getattr(optimizer, "optimizer", optimizer)).__name__
    ratios = {name: timed.slowdown(name, "clip") for name in METHODS if name != "clip"}
    return {
        "what": "median step time of each method / plain clip step, all through NLIPTrainer with the same model, "
        "batch and optimizer",
        "measured_through": "NLIPTrainer.training_step",
        "optimizer": optimizer,
        "step_details": METHOD_STEPS,
        "npc_memory_entries_per_step": 2 * sizes.batch_size,
        "npc_memory_fetch_s": _round(timed.median("npc_memory_fetch")),
        "median_step_s": {name: _round(timed.median(name)) for name in METHODS},
        "ratio_vs_clip": {name: _round(value) for name, value in ratios.items()},
        "targets": {name: _verdict(name, value)["target"] for name, value in ratios.items()},
        "met": {name: _verdict(name, value)["met"] for name, value in ratios.items()},
        "ratio_vs_clip_of_best_times": {name: _round(timed.best_slowdown(name, "clip")) for name in ratios},
    }


# ------------------------------------------------------------------------------- 3. zero-shot image features


def bench_inference(
    models: dict[str, torch.nn.Module], sizes: BenchSizes, timing: Timing, execution: Execution, batch: dict
) -> dict:
    pixel_values = batch["pixel_values"]

    def features(model) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), execution.autocast():
                model.get_image_features(pixel_values=pixel_values)

        return run

    for model in models.values():
        model.eval()
    candidates = {name: features(model) for name, model in models.items()}
    timed = compare(candidates, timing, execution, "3/5 zero-shot images")
    return {
        "what": "images/s of get_image_features (eval, inference_mode), NLIPModel / CLIPModel",
        "batch_size": len(pixel_values),
        "clip_images_per_s": _round(len(pixel_values) / timed.median("clip")),
        "nlip_images_per_s": _round(len(pixel_values) / timed.median("nlip")),
        "ratio": _round(timed.slowdown("clip", "nlip")),
        "ratio_of_best_times": _round(timed.best_slowdown("clip", "nlip")),
        "target": None,
    }


# ------------------------------------------------------------------------------------- 4. captioning tokens/s


def decoder_config(sizes: BenchSizes) -> dict:
    """BERT-style decoder layers shared by both captioners (BLIP's text decoder is a BERT with cross-attention)."""
    return dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.decoder_hidden_size,
        intermediate_size=4 * sizes.decoder_hidden_size,
        num_hidden_layers=sizes.decoder_layers,
        num_attention_heads=sizes.num_attention_heads,
        max_position_embeddings=2 * sizes.max_new_tokens,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_captioners(sizes: BenchSizes, device: str) -> dict[str, torch.nn.Module]:
    """`NLIPForCaptioning` and `BlipForConditionalGeneration` with the same vision tower and decoder sizes."""
    nlip_config = NLIPConfig(
        vision_config={"model_type": "clip_vision_model", **vision_config(sizes)},
        text_config={"model_type": "clip_text_model", **text_config(sizes)},
        decoder_config={
            "model_type": "bert", "is_decoder": True, "add_cross_attention": True, **decoder_config(sizes)
        },
        projection_dim=sizes.projection_dim,
    )
    blip_config = BlipConfig(
        vision_config=vision_config(sizes),
        text_config={**decoder_config(sizes), "encoder_hidden_size": sizes.vision_hidden_size, "sep_token_id": EOS_ID},
        projection_dim=sizes.projection_dim,
    )
    torch.manual_seed(0)
    captioners = {"nlip": NLIPForCaptioning(nlip_config), "blip": BlipForConditionalGeneration(blip_config)}
    return {name: model.to(device).eval() for name, model in captioners.items()}


def bench_captioning(sizes: BenchSizes, timing: Timing, execution: Execution, generator: torch.Generator) -> dict:
    captioners = build_captioners(sizes, execution.device)
    shape = (sizes.caption_batch_size, 3, sizes.image_size, sizes.image_size)
    pixel_values = torch.randn(shape, generator=generator).to(execution.device)
    greedy = dict(
        max_new_tokens=sizes.max_new_tokens, min_new_tokens=sizes.max_new_tokens, do_sample=False, num_beams=1
    )
    new_tokens = {}

    def generate(name: str, model, use_cache: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), execution.autocast():
                sequences = model.generate(pixel_values=pixel_values, use_cache=use_cache, **greedy)
            new_tokens[name] = sequences.shape[0] * (sequences.shape[1] - 1)  # both start from one BOS token

        return run

    candidates = {
        "nlip": generate("nlip", captioners["nlip"], True),
        "blip": generate("blip", captioners["blip"], True),
        "nlip_no_cache": generate("nlip_no_cache", captioners["nlip"], False),
    }
    timed = compare(candidates, timing, execution, "4/5 captioning")
    expected = sizes.caption_batch_size * sizes.max_new_tokens
    if set(new_tokens.values()) != {expected}:
        raise RuntimeError(f"Captioners generated {new_tokens} new tokens; expected {expected} each (min_new_tokens).")
    return {
        "what": "new tokens/s of generate() (greedy, min_new_tokens = max_new_tokens, no concept prefix): "
        "NLIPForCaptioning / BlipForConditionalGeneration with KV cache, and NLIPForCaptioning with / without cache",
        "parameter_count": {name: num_parameters(model) for name, model in captioners.items()},
        "new_tokens_per_call": expected,
        "nlip_tokens_per_s": _round(expected / timed.median("nlip")),
        "blip_tokens_per_s": _round(expected / timed.median("blip")),
        "ratio": _round(timed.slowdown("blip", "nlip")),
        "nlip_no_cache_tokens_per_s": _round(expected / timed.median("nlip_no_cache")),
        "kv_cache_speedup": _round(timed.slowdown("nlip_no_cache", "nlip")),
        "ratio_of_best_times": _round(timed.best_slowdown("blip", "nlip")),
        "target": None,
    }


# ------------------------------------------------------------------------------- 5. achieved FLOP/s vs matmul


def training_step_flops(model: NLIPModel, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of forward + backward of the contrastive step, counted in float32 on an eager-attention copy on the CPU.

    `FlopCounterMode` has no formula for the CPU SDPA kernels; eager attention does the same math with countable
    matmuls. The count depends on neither the device nor the precision, so it is taken on the CPU for every `--device`.
    """
    counted = copy.deepcopy(model).cpu().train()
    counted.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(*embeddings(counted, {key: value.cpu() for key, value in batch.items()})).backward()
    return counter.get_total_flops()


def bench_flops(
    model: NLIPModel, sizes: BenchSizes, timing: Timing, execution: Execution, batch: dict, generator: torch.Generator
) -> dict:
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model)
    n = sizes.matmul_size
    a, b = (torch.randn(n, n, generator=generator).to(execution.device, execution.matmul_dtype) for _ in range(2))

    def training_step() -> None:
        with execution.autocast():
            loss = contrastive_loss(*embeddings(model, batch))
        optimizer_step(optimizer, loss)

    candidates = {"matmul": lambda: torch.matmul(a, b), "training_step": training_step}
    timed = compare(candidates, timing, execution, "5/5 FLOP/s")
    step_flops = training_step_flops(model, batch)
    matmul_flops = 2 * n**3
    peak = matmul_flops / timed.median("matmul")
    achieved = step_flops / timed.median("training_step")
    return {
        "what": "FLOP/s of an NLIPModel clip training step (forward+backward FLOPs / step time incl. AdamW) "
        "/ FLOP/s of an n x n matmul in matmul_dtype, timed interleaved",
        "matmul_size": n,
        "matmul_dtype": str(execution.matmul_dtype).removeprefix("torch."),
        "matmul_flops_per_s": _round(peak),
        "matmul_best_flops_per_s": _round(matmul_flops / timed.best("matmul")),
        "training_step_flops": step_flops,
        "training_step_s": _round(timed.median("training_step")),
        "achieved_flops_per_s": _round(achieved),
        "fraction_of_peak": _round(achieved / peak),
        "target": None,
    }


# ---------------------------------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    """Bar plot of the ratios, each target a red dashed tick; higher-is-better and lower-is-better panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = {
        "training samples/s\nNLIP / CLIP": (results["training"]["ratio"], TARGETS["training_samples_per_s"][1]),
        "zero-shot images/s\nNLIP / CLIP": (results["zero_shot_inference"]["ratio"], None),
        "train-step FLOP/s\n/ matmul FLOP/s": (results["flops"]["fraction_of_peak"], None),
        "caption tokens/s\nNLIP / BLIP": (results["captioning"]["ratio"], None),
        "caption tokens/s\nKV cache / none": (results["captioning"]["kv_cache_speedup"], None),
    }
    lower = {
        f"{name}\nstep / clip step": (ratio, TARGETS[name][1])
        for name, ratio in results["method_overhead"]["ratio_vs_clip"].items()
    }
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [len(higher), len(lower)]})
    for axis, bars, title in ((axes[0], higher, "higher is better"), (axes[1], lower, "lower is better")):
        axis.bar(range(len(bars)), [value for value, _ in bars.values()], color="tab:blue")
        for position, (value, target) in enumerate(bars.values()):
            axis.text(position, max(value, target or 0), f"{value:.2f}", ha="center", va="bottom", fontsize=8)
            if target is not None:
                axis.hlines(target, position - 0.4, position + 0.4, colors="tab:red", linestyles="--")
        axis.set_xticks(range(len(bars)), list(bars), fontsize=7)
        axis.set_ylabel("ratio")
        axis.set_title(f"{title} (red dashes: target)")
    machine = results["machine"]
    where = machine["device_name"] if machine["device"] == "cuda" else f"{machine['torch_num_threads']} CPU thread(s)"
    figure.suptitle(f"nlip speed ({results['preset']} sizes, {where}, {machine['dtype']}, ratios of medians)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(sizes: BenchSizes, timing: Timing, execution: Execution, threads: int, preset: str) -> dict:
    """Every figure, in order; returns the JSON summary. Random inputs come from a CPU generator on every device."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    batch = execution.to_device(random_pairs(sizes, sizes.batch_size, generator))
    on_cuda = execution.device == "cuda"
    start = time.perf_counter()
    results = {
        "benchmark": "speed",
        "preset": preset,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
            "load_average_1min_at_start": os.getloadavg()[0],
            "device": execution.device,
            "device_name": torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine(),
            "cuda": torch.version.cuda if on_cuda else None,
            "dtype": execution.dtype,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "sizes": asdict(sizes),
        "timing": {
            **asdict(timing),
            "method": "warm-up rounds, then interleaved repetitions (order reversed every other round); figures from "
            "median times, ratios are ratios of medians; on cuda, torch.cuda.synchronize() before each clock read",
        },
    }
    results["training"], models = bench_training(sizes, timing, execution, batch)
    results["method_overhead"] = bench_methods(models["nlip"], sizes, timing, execution, generator)
    results["zero_shot_inference"] = bench_inference(models, sizes, timing, execution, batch)
    results["captioning"] = bench_captioning(sizes, timing, execution, generator)
    results["flops"] = bench_flops(models["nlip"], sizes, timing, execution, batch, generator)
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    results["total_seconds"] = _round(time.perf_counter() - start)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 repetitions (smoke test: seconds)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON path; the .png plot goes next to it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every step runs (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="forward and loss in bfloat16 autocast, bf16 matmul")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads, for the CPU side (default: cores)"
    )
    parser.add_argument("--repetitions", type=int, default=None, help="timed rounds per figure (default 20, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2, quick 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name, minimum in (("threads", 1), ("repetitions", 1), ("warmup", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda needs a CUDA GPU; torch.cuda.is_available() is False (torch {torch.__version__})")
    if args.device == "cuda" and args.bf16 and not torch.cuda.is_bf16_supported():
        parser.error(f"--bf16 with --device cuda needs bfloat16 support, which {torch.cuda.get_device_name()} lacks")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else BenchSizes()
    timing = Timing(repetitions=3, warmup=1) if args.quick else Timing()
    overrides = {name: getattr(args, name) for name in ("repetitions", "warmup") if getattr(args, name) is not None}
    timing = replace(timing, progress=not args.no_progress, **overrides)
    execution = Execution(device=args.device, bf16=args.bf16)
    results = run(sizes, timing, execution, args.threads, "quick" if args.quick else "small")
    results["command"] = " ".join(["python bench/speed.py", *(sys.argv[1:] if argv is None else argv)])
    text = json.dumps(results, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    plot(results, args.output.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
