"""Builders and helpers shared by the tests (one testing-utilities module): a word-level tokenizer, a 32-px image
processor and tiny model configurations; tiny models, image-text datasets, trainer arguments and trainers for the
NLIPTrainer tests (and the DDP worker); the repository paths; and importing a benchmark script for its smoke test.
Nothing here touches the network; `modeling_nlip` and `trainers` are imported only inside the builders that need
them, so a subprocess that blocks the nlip packages can still use the tokenizer and configurations."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np
import PIL.Image
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast


# The tests folder and the repository root (tests live in sub-folders mirroring the source tree).
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# EOS is not id 2: CLIP text towers treat eos_token_id == 2 as "legacy" and pool at argmax(input_ids).
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

BASE_WORDS = (
    "a an the of photo picture image this is in on with and at by for to from it its some small large "
    "t-shirt top trouser pullover dress coat sandal shirt sneaker bag ankle boot "
    "cat dog bird car tree house person man woman child red green blue black white "
    "astronaut coffee rocket camera chelsea horse clock flower fruit ball chair table"
).split()


def tiny_tokenizer(extra_words: list[str] | None = None, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: ids 0-3 are [PAD] [UNK] [BOS] [EOS], then `BASE_WORDS` + `extra_words`."""
    words = list(dict.fromkeys(BASE_WORDS + [w for text in (extra_words or []) for w in re.findall(r"[\w'-]+|[^\w\s]", text.lower())]))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=model_max_length,
    )


def tiny_image_processor(size: int = 32) -> CLIPImageProcessorPil:
    """A CLIP image processor that resizes and centre-crops to `size` px (CLIP mean/std normalisation)."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_vision_config(**overrides) -> dict:
    """A 2-layer, 32-dim CLIP ViT over 32-px images with 8-px patches."""
    config = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4)
    return {**config, **overrides}


def tiny_text_config(tokenizer=None, **overrides) -> dict:
    """A 2-layer, 32-dim CLIP text transformer sized for `tokenizer` (default: `tiny_tokenizer()`)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = dict(model_type="clip_text_model", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return {**config, **overrides}


def tiny_nlip_config(tokenizer=None, **overrides):
    """An `NLIPConfig` with tiny CLIP towers and a 16-dim joint space."""
    from modeling_nlip import NLIPConfig

    kwargs = dict(vision_config=tiny_vision_config(), text_config=tiny_text_config(tokenizer), projection_dim=16)
    return NLIPConfig(**{**kwargs, **overrides})


def tiny_processor(tokenizer=None):
    """An `NLIPProcessor` with the tiny image processor and tokenizer."""
    from modeling_nlip import NLIPProcessor

    return NLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer or tiny_tokenizer())


def tiny_decoder_config(tokenizer=None, **overrides) -> dict:
    """A 2-layer, 32-dim BERT causal decoder with cross-attention, sized for `tokenizer` (default: `tiny_tokenizer()`)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return {**config, **overrides}


def save_tiny_dual_checkpoint(path) -> str:
    """Save a seeded tiny `NLIPModel` and its processor into `path` (a checkpoint the scripts can load); returns it."""
    from modeling_nlip import NLIPModel

    torch.manual_seed(0)
    NLIPModel(tiny_nlip_config()).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return str(path)


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


def png(value: int, size: int = 8) -> bytes:
    """A `size`-px square PNG whose red channel is `value`."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (size, size), (value, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def add_file(tar, name, data):
    """Add the file `name` holding the bytes `data` to the open tar archive `tar`."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, first, count, padding=0):
    """`count` samples `KEY.png` + `KEY.txt`, keys `first`.. (`padding` random bytes in a `.bin` member per sample:
    a larger shard whose headers are far apart)."""
    rng = np.random.default_rng(first)
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            add_file(tar, f"{i:05d}.png", png(i % 256))
            add_file(tar, f"{i:05d}.txt", f"caption {i}".encode())
            if padding:
                add_file(tar, f"{i:05d}.bin", rng.bytes(padding))
    return path


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


BENCH_DIR = REPO_ROOT / "bench"


def load_bench_script(name: str) -> ModuleType:
    """`bench/<name>.py` as the module `bench_<name>`, executed afresh."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
