"""ImageTextCollator: shapes, dtypes, caption choice, pass-through columns, skipping and strict mode."""

import copy
import io

import PIL.Image
import pytest
import torch
from nlip_testing import tiny_image_processor, tiny_tokenizer
from torch.utils.data import DataLoader
from transformers import CLIPProcessor

from trainers.data.collator import SKIPPED_KEY, ImageTextCollator, is_empty_batch
from trainers.data.pairs import EMPTY_CAPTION, MISSING_IMAGE, TOO_MANY_PIXELS, UNDECODABLE_IMAGE, InvalidPairError

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def tiny_processor() -> CLIPProcessor:
    return CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer())


@pytest.fixture
def processor():
    return tiny_processor()


def example(i, text="a photo of a cat", **extra):
    return {"image": PIL.Image.new("RGB", (40, 30), (10 * i, 0, 0)), "text": text, "index": i, **extra}


def test_shapes_dtypes_and_passthrough(processor):
    examples = [
        example(0, "a red car", is_noisy=True, synthetic_text="a small red car", concepts=["car"]),
        example(7, "a dog", is_noisy=False, synthetic_text=None, concepts=["dog", "ball"]),
        example(3, "a large black dog in the house", is_noisy=False, synthetic_text="", concepts=[]),
    ]
    batch = ImageTextCollator(processor, max_length=6)(examples)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 6)  # truncated to max_length
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0]  # [BOS] a dog [EOS] + padding
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 7, 3]
    assert batch["is_noisy"].dtype == torch.bool and batch["is_noisy"].tolist() == [True, False, False]
    tokenizer = processor.tokenizer
    assert tokenizer.batch_decode(batch["synthetic_input_ids"], skip_special_tokens=True) == [
        "a small red car",
        "a dog",  # no synthetic caption yet: falls back to the example's own caption
        "a large black dog",
    ]
    assert batch["synthetic_attention_mask"].shape == batch["synthetic_input_ids"].shape
    assert batch["concepts"] == [["car"], ["dog", "ball"], []]


def test_optional_columns_absent(processor):
    batch = ImageTextCollator(processor)([example(0), example(1)])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "index"}


def test_images_become_rgb_on_white(processor):
    transparent = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    grey = PIL.Image.new("L", (32, 32), 0)
    batch = ImageTextCollator(processor)([example(0) | {"image": transparent}, example(1) | {"image": grey}])
    white = (1.0 - CLIP_MEAN) / CLIP_STD
    black = (0.0 - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(batch["pixel_values"][0, :, 5, 5], white, atol=1e-3, rtol=0)
    torch.testing.assert_close(batch["pixel_values"][1, :, 5, 5], black, atol=1e-3, rtol=0)


def test_caption_choice(processor):
    captions = [f"a {word}" for word in ("cat", "dog", "bird", "car", "tree", "house")]
    examples = [example(i, captions) for i in range(8)]
    decode = processor.tokenizer.batch_decode

    first = ImageTextCollator(processor, caption_choice="first")(examples)
    assert decode(first["input_ids"], skip_special_tokens=True) == ["a cat"] * 8

    picks = [
        decode(ImageTextCollator(processor, seed=seed)(examples)["input_ids"], skip_special_tokens=True)
        for seed in (0, 0, 1)
    ]
    assert picks[0] == picks[1]  # seeded: reproducible
    assert picks[0] != picks[2]  # another seed draws differently
    assert len(set(picks[0])) > 1 and set(picks[0]) <= set(captions)
    # empty captions in a list are never picked
    batch = ImageTextCollator(processor, seed=3)([example(i, ["", "a dog", " "]) for i in range(6)])
    assert decode(batch["input_ids"], skip_special_tokens=True) == ["a dog"] * 6
    with pytest.raises(ValueError, match="caption_choice must be 'random' or 'first', got 'last'"):
        ImageTextCollator(processor, caption_choice="last")


def test_random_captions_depend_on_seed_epoch_and_index_only(processor):
    """The random pick of an example is the same in any worker layout and batch order (so a resumed run draws what the
    uninterrupted run drew) and changes with the epoch."""
    captions = [f"a {word}" for word in ("cat", "dog", "bird", "car", "tree", "house")]
    examples = [example(i, captions) for i in range(16)]
    collator = ImageTextCollator(processor, seed=0)

    def picks(num_workers, order=range(16)):
        loader = DataLoader([examples[i] for i in order], batch_size=4, num_workers=num_workers, collate_fn=collator)
        by_index = {}
        for batch in loader:
            texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
            by_index.update(zip(batch["index"].tolist(), texts, strict=True))
        return by_index

    epoch_0 = picks(0)
    assert picks(2) == epoch_0  # worker processes draw what the main process draws
    assert picks(0, order=reversed(range(16))) == epoch_0  # independent of the batch an example lands in
    assert len(set(epoch_0.values())) > 1
    collator.set_epoch(1)
    epoch_1 = picks(2)  # the workers see the new epoch (non-persistent workers get the collator at iterator start)
    assert epoch_1 != epoch_0 and picks(0) == epoch_1
    collator.set_epoch(0)
    assert picks(0) == epoch_0


def test_persistent_workers_see_set_epoch(processor):
    """Persistent workers keep their copy of the collator across epochs; the epoch they draw with is still the one
    set last (shared memory), also for a deep copy of the collator such as the trainer's state-pass collator."""
    captions = [f"a {word}" for word in ("cat", "dog", "bird", "car", "tree", "house")]
    examples = [example(i, captions) for i in range(8)]

    def drawn(loader):
        return [text for batch in loader for text in processor.tokenizer.batch_decode(batch["input_ids"], True)]

    for collator in (ImageTextCollator(processor, seed=0), copy.deepcopy(ImageTextCollator(processor, seed=0))):
        collator.set_epoch(0)
        loader = DataLoader(examples, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=collator)
        in_process = DataLoader(examples, batch_size=4, collate_fn=collator)
        epoch_0 = drawn(loader)
        collator.set_epoch(1)
        assert collator.epoch == 1
        epoch_1 = drawn(loader)  # the same worker process as epoch 0
        assert epoch_1 != epoch_0
        assert epoch_1 == drawn(in_process)


def test_skips_bad_examples_and_strict(processor):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, "PNG")
    truncated = {"bytes": buffer.getvalue()[:30], "path": "shard.tar/0001.png"}
    encoded = {"bytes": buffer.getvalue(), "path": "shard.tar/0002.png"}
    examples = [
        example(0),
        example(1) | {"image": truncated},
        example(2) | {"image": None},
        example(3) | {"image": encoded},
    ]
    collator = ImageTextCollator(processor)
    batch = collator(examples)
    assert batch["index"].tolist() == [0, 3]
    assert collator.skip_report.reasons == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1}
    assert collator.skip_report.examples[0][0] == "shard.tar/0001.png"
    assert collator.skip_report.examples[1][0] == "index 2"

    with pytest.raises(InvalidPairError, match=r"shard\.tar/0001\.png: undecodable image"):
        ImageTextCollator(processor, strict=True)(examples)
    assert batch[SKIPPED_KEY] == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1, "files": ["shard.tar/0001.png"]}
    # A batch with no valid pair is returned empty (the trainer skips and counts it) rather than failing the run.
    empty = ImageTextCollator(processor)([example(5, ""), example(6) | {"image": None}])
    assert is_empty_batch(empty) and empty == {SKIPPED_KEY: {EMPTY_CAPTION: 1, MISSING_IMAGE: 1, "files": []}}
    assert not is_empty_batch(batch)
    with pytest.raises(ValueError, match="no 'index' column"):
        ImageTextCollator(processor)([{"image": PIL.Image.new("RGB", (8, 8)), "text": "a cat"}])


def test_pixel_limit_skips_before_decoding(processor):
    """An image over `max_image_pixels` is skipped and counted from its header, never decoded at full size."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (3000, 3000)).save(buffer, "PNG")  # 9 Mpx, a few KB of PNG
    big = {"bytes": buffer.getvalue(), "path": "shard.tar/big.png"}
    collator = ImageTextCollator(processor, max_image_pixels=1_000_000)
    batch = collator([example(0), example(1) | {"image": big}])
    assert batch["index"].tolist() == [0]
    assert batch[SKIPPED_KEY] == {TOO_MANY_PIXELS: 1, "files": ["shard.tar/big.png"]}
    with pytest.raises(InvalidPairError, match="image over the pixel limit.*3000x3000"):
        ImageTextCollator(processor, max_image_pixels=1_000_000, strict=True)([example(1) | {"image": big}])
    assert ImageTextCollator(processor, max_image_pixels=None)([example(1) | {"image": big}])["index"].tolist() == [1]
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        ImageTextCollator(processor, max_image_pixels=-5)
