"""Embeddings for evaluation, and retrieval / zero-shot evaluation of CLIP-contract models.

Works with any model exposing `get_image_features(pixel_values=...)` and `get_text_features(input_ids=...,
attention_mask=...)` (`NLIPModel`, `CLIPModel`, ...): in transformers 5 those return a `BaseModelOutputWithPooling`
whose `pooler_output` is the projected embedding; a bare tensor is accepted too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import datasets
import PIL.Image
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.collator import ImageTextCollator
from ..data.pairs import column_values, non_empty_captions, to_rgb
from .metrics import retrieval_metrics, zero_shot_accuracy


@dataclass
class PairEmbeddings:
    """Embeddings of image-text pairs, row i of each tensor belonging to the example with `index[i]`."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    index: torch.Tensor


def embedding_tensor(output: Any) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` output: `pooler_output` of a model output, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(
            f"Expected get_image_features/get_text_features to return a tensor or an output with `pooler_output`, "
            f"got {type(output).__name__}."
        )
    return pooled


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Run a block in `eval()` mode without autograd, restoring the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _finish(chunks: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    embeds = torch.cat(chunks).float()
    return torch.nn.functional.normalize(embeds, dim=-1) if normalize else embeds


def _image_features(model: torch.nn.Module, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return embedding_tensor(model.get_image_features(pixel_values=pixel_values.to(device, dtype))).cpu()


def _text_features(model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    output = model.get_text_features(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    return embedding_tensor(output).cpu()


def compute_image_embeddings(
    model: torch.nn.Module,
    images: datasets.Dataset | Sequence[PIL.Image.Image],
    processor: Any,
    *,
    image_column: str = "image",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """`[N, D]` float32 CPU image embeddings (L2-normalised unless `normalize=False`) of a dataset's `image_column`
    or a list of PIL images, using `processor.image_processor` (or `processor` itself when it is one)."""
    image_processor = getattr(processor, "image_processor", processor)
    device = _device_of(model, device)
    if isinstance(images, datasets.Dataset):
        images = images.select_columns([image_column])
    chunks = []
    with _inference(model):
        for start in tqdm(range(0, len(images), batch_size), desc="Image embeddings", disable=not progress):
            stop = min(start + batch_size, len(images))
            batch = images[start:stop][image_column] if isinstance(images, datasets.Dataset) else images[start:stop]
            pixel_values = image_processor(images=[to_rgb(image) for image in batch], return_tensors="pt")
            chunks.append(_image_features(model, pixel_values["pixel_values"], device))
    return _finish(chunks, normalize)


def compute_text_embeddings(
    model: torch.nn.Module,
    texts: Sequence[str],
    processor: Any,
    *,
    batch_size: int = 256,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """`[N, D]` float32 CPU text embeddings (L2-normalised unless `normalize=False`), tokenised with
    `processor.tokenizer` (or `processor` itself when it is a tokenizer), padded and truncated to `max_length`."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = _device_of(model, device)
    chunks = []
    with _inference(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="Text embeddings", disable=not progress):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            chunks.append(_text_features(model, batch, device))
    return _finish(chunks, normalize)


def compute_embeddings(
    model: torch.nn.Module,
    data: datasets.Dataset | datasets.IterableDataset | Iterable[dict[str, Any]],
    *,
    processor: Any = None,
    collator: ImageTextCollator | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> PairEmbeddings:
    """Image and text embeddings of each pair, batched.

    `data` is a `Dataset`/`IterableDataset` of `image`/`text`/`index` examples (batched with `collator`, by default an
    `ImageTextCollator(processor, caption_choice="first")`), or a `DataLoader`/iterable of collated batches holding
    `pixel_values`, `input_ids`, `attention_mask` and `index`.
    """
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        if collator is None:
            if processor is None:
                raise ValueError("compute_embeddings needs a `processor` or a `collator` to batch a Dataset.")
            collator = ImageTextCollator(processor, caption_choice="first")
        data = DataLoader(data, batch_size=batch_size, collate_fn=collator)
    device = _device_of(model, device)
    images, texts, indices = [], [], []
    with _inference(model):
        for batch in tqdm(data, desc="Embeddings", disable=not progress):
            images.append(_image_features(model, batch["pixel_values"], device))
            texts.append(_text_features(model, batch, device))
            indices.append(batch["index"].cpu())
    return PairEmbeddings(_finish(images, normalize), _finish(texts, normalize), torch.cat(indices))


def build_zero_shot_classifier(
    model: torch.nn.Module,
    processor: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`[num_classes, D]` zero-shot classifier: for each class, the mean of its L2-normalised prompt embeddings
    (`template.format(class_name)` for every template, e.g. "a photo of a {}."), re-normalised."""
    if not class_names or not templates:
        raise ValueError("build_zero_shot_classifier needs at least one class name and one template.")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = compute_text_embeddings(
        model, prompts, processor, batch_size=batch_size, device=device, normalize=True, progress=progress
    )
    per_class = embeds.view(len(class_names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Image<->text Recall@1/5/10 and rSum (percent) over a dataset's `image`/`text` pairs; every non-empty caption
    of a multi-caption row is a text of that row's image."""
    texts, text_to_image = [], []
    for row, text in enumerate(column_values(dataset, "text")):
        captions = non_empty_captions(text)
        texts.extend(captions)
        text_to_image.extend([row] * len(captions))
    image_embeds = compute_image_embeddings(
        model, dataset, processor, batch_size=batch_size, device=device, progress=progress
    )
    text_embeds = compute_text_embeddings(
        model, texts, processor, batch_size=batch_size, device=device, progress=progress
    )
    return retrieval_metrics(image_embeds @ text_embeds.T, text_to_image)


def evaluate_zero_shot(
    model: torch.nn.Module,
    processor: Any,
    dataset: datasets.Dataset,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {}.",),
    *,
    label_column: str = "label",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy (percent) on a labelled dataset. `class_names` default to the names of the
    dataset's `ClassLabel` `label_column` (e.g. `load_fashion_mnist()`)."""
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {label_column!r}; columns present: {dataset.column_names}.")
    if class_names is None:
        feature = dataset.features[label_column]
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(f"Column {label_column!r} is not a ClassLabel; pass class_names explicitly.")
        class_names = feature.names
    classifier = build_zero_shot_classifier(model, processor, class_names, templates, device=device)
    image_embeds = compute_image_embeddings(
        model, dataset, processor, batch_size=batch_size, device=device, progress=progress
    )
    return zero_shot_accuracy(image_embeds, classifier, column_values(dataset, label_column))
