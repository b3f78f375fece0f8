"""Builders shared by the NLIPTrainer tests (and the DDP worker): tiny models, tiny image-text datasets, arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import datasets
import numpy as np
import PIL.Image
import torch

from tiny import (
    BASE_WORDS,
    tiny_decoder_config,
    tiny_nlip_config,
    tiny_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)


# From-scratch tiny CLIP towers start with nearly identical embeddings for every input; a larger initialisation breaks
# that symmetry and lets them learn Fashion-MNIST in a few epochs.
INITIALIZER_FACTOR = 4.0


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models on 2 (shared) cores are many times faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_model(seed: int = 0, tokenizer=None):
    """A freshly initialised tiny `NLIPModel` (2-layer 32-dim CLIP towers, 16-dim joint space)."""
    from modeling_nlip import NLIPModel

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_nlip_config(
        tokenizer,
        vision_config=tiny_vision_config(initializer_factor=INITIALIZER_FACTOR),
        text_config=tiny_text_config(tokenizer, initializer_factor=INITIALIZER_FACTOR),
    )
    return NLIPModel(config)


def training_args(output_dir, **overrides):
    """`NLIPTrainingArguments` for fast CPU tests: no saving, logging or progress bars unless asked."""
    from trainers.training_args import NLIPTrainingArguments

    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        optim="adamw_torch",
        dataloader_num_workers=0,
        seed=0,
    )
    options.update(overrides)
    return NLIPTrainingArguments(**options)


def synthetic_pairs(num_pairs: int, seed: int = 0, noisy_every: int = 4) -> datasets.Dataset:
    """In-memory image-text pairs: random 32-px RGB images, captions from the tiny vocabulary, `index`, and every
    `noisy_every`-th pair marked `is_noisy` (only bookkeeping: nothing about these pairs is learnable)."""
    rng = np.random.default_rng(seed)
    words = BASE_WORDS[20:]
    images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(num_pairs)]
    texts = [f"a photo of a {words[i % len(words)]} {words[(3 * i + 1) % len(words)]}" for i in range(num_pairs)]
    return datasets.Dataset.from_dict(
        {
            "image": images,
            "text": texts,
            "index": list(range(num_pairs)),
            "is_noisy": [i % noisy_every == 0 for i in range(num_pairs)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "index": datasets.Value("int64"),
                "is_noisy": datasets.Value("bool"),
            }
        ),
    )


def noisy_fashion_mnist(num_pairs: int = 512, ratio: float = 0.4, seed: int = 0) -> datasets.DatasetDict:
    """Fashion-MNIST subsets: `train` with `ratio` of its captions shuffled (`is_noisy` marks them), `test` clean."""
    from trainers.noise.injection import inject_caption_noise
    from trainers.data.real_datasets import load_fashion_mnist

    data = load_fashion_mnist(max_samples_per_split=num_pairs)
    return datasets.DatasetDict({"train": inject_caption_noise(data["train"], ratio, seed=seed), "test": data["test"]})


def processor():
    return tiny_processor(tiny_tokenizer())


def noise_state_snapshot(noise_state) -> dict:
    """The noise state as plain comparable values (tensors and JSON-like metadata)."""
    tensors, metadata = noise_state.state_dict()
    return {"tensors": {k: v.clone() for k, v in tensors.items()}, "metadata": metadata}


def legacy_resume_dataset() -> datasets.Dataset:
    """The 64 two-caption pairs of the committed legacy-checkpoint fixture (`tests/fixtures/make_legacy_checkpoint.py`)."""
    return synthetic_pairs(64).map(lambda row: {"text": [row["text"], " ".join(reversed(row["text"].split()))]})


def legacy_resume_args(output_dir, **overrides):
    """The arguments of the legacy-checkpoint fixture's run: `nlip+npc`, 4 steps per epoch, 3 epochs, a checkpoint
    every 2 steps, the mixture first fit at epoch 1."""
    options = dict(
        method="nlip+npc", per_device_train_batch_size=16, num_train_epochs=3, noise_warmup_epochs=1,
        save_strategy="steps", save_steps=2, learning_rate=3e-3, npc_clean_threshold=0.5,
    )
    options.update(overrides)
    return training_args(output_dir, **options)


def tiny_pair_batch(num_pairs: int = 8) -> tuple[datasets.Dataset, dict]:
    """`num_pairs` synthetic pairs and their whole batch, collated with each example's first caption."""
    from trainers.data.collator import ImageTextCollator

    pairs = synthetic_pairs(num_pairs)
    return pairs, ImageTextCollator(processor(), caption_choice="first")([pairs[i] for i in range(num_pairs)])


def method_trainer(output_dir, pairs, method: str, **overrides):
    """An `NLIPTrainer` of `method` on `pairs` with the tiny model, batches of 8."""
    from trainers.trainer import NLIPTrainer

    args = training_args(output_dir, method=method, per_device_train_batch_size=8, **overrides)
    return NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())


def embed_batch(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's normalised image and text embeddings of `batch`, and its scale `1/τ`."""
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    return out.image_embeds, out.text_embeds, model.logit_scale.exp()


def tiny_pretraining_model():
    """A freshly initialised tiny `NLIPForPreTraining` (dual towers and a 2-layer caption decoder)."""
    from modeling_nlip import NLIPForPreTraining

    tokenizer = tiny_tokenizer()
    config = tiny_nlip_config(
        tokenizer,
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        decoder_config=tiny_decoder_config(tokenizer),
    )
    torch.manual_seed(0)
    return NLIPForPreTraining(config)
