"""Frozen-tower feature cache: the cache itself, and identical losses, gradients and weights with and without it."""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import TrainerCallback

from nlip_testing import BASE_WORDS, processor, single_thread, synthetic_pairs, tiny_model, training_args
from trainers.data.collator import ImageTextCollator
from trainers.feature_cache import FeatureCache, token_fingerprints
from trainers.trainer import NLIPTrainer

NUM_PAIRS, EPOCHS, BATCH = 48, 3, 16


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ----------------------------------------------------------------------------------------------- the cache itself


def test_store_and_lookup():
    cache = FeatureCache("vision", num_samples=10)
    features, hit = cache.lookup(torch.tensor([1, 2]))
    assert features is None and hit.tolist() == [False, False] and cache.misses == 2
    cache.store(torch.tensor([2, 7]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    features, hit = cache.lookup(torch.tensor([7, 3, 2]))
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(features, torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]))
    assert len(cache) == 2 and cache.hits == 2 and cache.misses == 3
    with pytest.raises(ValueError, match="holds 2-d features, got 3-d"):
        cache.store(torch.tensor([1]), torch.zeros(1, 3))
    cache.clear()
    assert len(cache) == 0 and not cache.lookup(torch.tensor([2]))[1].any()


def test_fingerprint_mismatch_is_a_miss():
    cache = FeatureCache("text", num_samples=4)
    ids = torch.tensor([[2, 10, 11, 3, 0], [2, 12, 3, 0, 0]])
    mask = (ids != 0).long()
    prints = token_fingerprints(ids, mask)
    # padding does not change a fingerprint; another caption does
    assert token_fingerprints(ids[:, :4], mask[:, :4]).tolist() == prints.tolist()
    assert prints[0] != prints[1] and (prints >= 0).all()
    cache.store(torch.tensor([0, 1]), torch.ones(2, 3), prints)
    _, hit = cache.lookup(torch.tensor([0, 1]), prints.flip(0))
    assert hit.tolist() == [False, False]
    _, hit = cache.lookup(torch.tensor([0, 1]), prints)
    assert hit.tolist() == [True, True]


def test_memory_cache_grows_for_unknown_sizes():
    cache = FeatureCache("vision")
    cache.store(torch.tensor([5000]), torch.full((1, 2), 7.0))
    features, hit = cache.lookup(torch.tensor([5000, 10_000]))
    assert hit.tolist() == [True, False]
    torch.testing.assert_close(features[0], torch.full((2,), 7.0))


def test_disk_cache_is_a_memory_mapped_file(tmp_path):
    cache = FeatureCache("vision", num_samples=6, directory=str(tmp_path))
    cache.store(torch.tensor([4]), torch.tensor([[0.5, -1.5, 2.0]]))
    on_disk = np.memmap(tmp_path / "vision_features.f32", dtype=np.float32, mode="r", shape=(6, 3))
    np.testing.assert_array_equal(on_disk[4], [0.5, -1.5, 2.0])
    assert cache.lookup(torch.tensor([4]))[1].item()
    with pytest.raises(IndexError, match="beyond the 6 examples"):
        cache.store(torch.tensor([6]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="needs the number of examples"):
        FeatureCache("vision", directory=str(tmp_path))


# ------------------------------------------------------------------------------------------ training equivalence


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def count_tower_rows(model):
    """How many examples each tower has run on (a forward hook per tower)."""
    counts = {"vision": 0, "text": 0}

    def counter(tower: str, key: str):
        def hook(module, args, kwargs, output):
            counts[tower] += kwargs[key].shape[0]

        return hook

    model.vision_model.register_forward_hook(counter("vision", "pixel_values"), with_kwargs=True)
    model.text_model.register_forward_hook(counter("text", "input_ids"), with_kwargs=True)
    return counts


def train(tmp_path, dataset, cache: str, method: str = "clip", **overrides):
    model = tiny_model()
    counts = count_tower_rows(model)
    recorder = LossRecorder()
    options = dict(num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, logging_steps=1, method=method,
                   freeze_vision_tower=True, freeze_text_tower=True, frozen_feature_cache=cache)
    options.update(overrides)
    args = training_args(tmp_path / cache, **options)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor(),
                          callbacks=[recorder])
    trainer.train()
    return trainer, recorder.losses, counts


def assert_same_training(a, b):
    (trainer_a, losses_a, _), (trainer_b, losses_b, _) = a, b
    assert len(losses_a) == len(losses_b) == EPOCHS * NUM_PAIRS // BATCH
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(trainer_a.model.named_parameters(), trainer_b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["clip", "nlip+srcl"])
def test_identical_losses_and_weights_with_and_without_the_cache(tmp_path, method):
    data = synthetic_pairs(NUM_PAIRS)
    cached = train(tmp_path, data, "memory", method)
    plain = train(tmp_path, data, "none", method)
    assert_same_training(cached, plain)
    # Each tower ran once per example with the cache, once per example and epoch without it.
    assert cached[2] == {"vision": NUM_PAIRS, "text": NUM_PAIRS}
    assert plain[2] == {"vision": EPOCHS * NUM_PAIRS, "text": EPOCHS * NUM_PAIRS}
    caches = cached[0].feature_caches
    assert sorted(caches) == ["text", "vision"] and len(caches["vision"]) == len(caches["text"]) == NUM_PAIRS
    assert caches["vision"].hits == (EPOCHS - 1) * NUM_PAIRS and caches["vision"].misses == NUM_PAIRS
    assert plain[0].feature_caches == {}


def test_cached_images_are_not_decoded_again(tmp_path, monkeypatch):
    """With the image tower locked and cached (and nothing else reading pixels) the collator decodes each image once:
    later epochs batch zeros in its place, and training is identical to the run that decodes every epoch."""
    import trainers.data.collator as collator_module

    decoded, decoded_by_datasets = [], []
    real_decode, real_datasets_decode = collator_module.decode_image, datasets.Image.decode_example
    monkeypatch.setattr(collator_module, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(datasets.Image, "decode_example",
                        lambda self, *a, **k: decoded_by_datasets.append(1) or real_datasets_decode(self, *a, **k))
    data = synthetic_pairs(NUM_PAIRS)
    assert data.features["image"].decode
    cached = train(tmp_path, data, "memory")
    # The first epoch only, and by the collator: the training loader leaves the image column encoded.
    assert len(decoded) == NUM_PAIRS and decoded_by_datasets == []
    assert cached[0].data_collator.is_image_cached is not None and cached[0].train_dataset.features["image"].decode
    decoded.clear()
    plain = train(tmp_path, data, "none")
    assert len(decoded) == len(decoded_by_datasets) == EPOCHS * NUM_PAIRS
    assert plain[0].data_collator.is_image_cached is None
    assert_same_training(cached, plain)
    # A batch of cached and uncached examples: real pixels for the uncached ones, zeros for the others.
    collator = ImageTextCollator(processor(), is_image_cached=lambda index: index % 2 == 0)
    batch = collator([data[i] for i in range(4)])
    full = ImageTextCollator(processor())([data[i] for i in range(4)])
    assert torch.equal(batch["pixel_values"][1::2], full["pixel_values"][1::2])
    assert not batch["pixel_values"][0::2].any()
    all_cached = ImageTextCollator(processor(), is_image_cached=lambda index: True)([data[i] for i in range(4)])
    assert all_cached["pixel_values"].shape == (4, 3, 1, 1) and torch.equal(all_cached["input_ids"], full["input_ids"])


def test_pixels_for_other_readers_are_always_decoded(tmp_path):
    """An SRCL reference model (or NPC, a captioner, a state pass) reads the batch's pixels: nothing is skipped."""
    args = training_args(tmp_path, method="srcl", freeze_vision_tower=True, freeze_text_tower=True,
                         per_device_train_batch_size=BATCH, srcl_reference_model="unused", srcl_alpha_start=0.5)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=synthetic_pairs(NUM_PAIRS),
                          processing_class=processor(), reference_model=tiny_model(seed=1))
    assert "vision" in trainer.feature_caches and trainer.data_collator.is_image_cached is None


def test_identical_gradients_with_a_warm_cache(tmp_path):
    trainer, _, _ = train(tmp_path, synthetic_pairs(NUM_PAIRS), "memory", num_train_epochs=1)
    model = trainer.model
    model.train()
    collator = ImageTextCollator(processor(), seed=0)
    inputs = trainer._prepare_inputs(collator([trainer.train_dataset[i] for i in range(BATCH)]))

    def gradients():
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    hits_before = trainer.feature_caches["vision"].hits
    cached_loss, cached_grads = gradients()
    assert trainer.feature_caches["vision"].hits == hits_before + BATCH  # served from the cache
    caches, trainer.feature_caches = trainer.feature_caches, {}
    plain_loss, plain_grads = gradients()
    trainer.feature_caches = caches
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert sorted(cached_grads) == ["logit_scale", "text_projection.weight", "visual_projection.weight"]
    for name, grad in cached_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def multi_caption_pairs(num_pairs: int) -> datasets.Dataset:
    rng = np.random.default_rng(1)
    words = BASE_WORDS[20:]
    return datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(num_pairs)],
            "text": [[f"a photo of a {words[i % len(words)]}", f"a {words[(5 * i + 2) % len(words)]} picture"]
                     for i in range(num_pairs)],
            "index": list(range(num_pairs)),
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string")),
                                    "index": datasets.Value("int64")}),
    )


def test_a_changed_caption_is_recomputed_not_served_stale(tmp_path):
    data = multi_caption_pairs(NUM_PAIRS)
    cached = train(tmp_path, data, "memory")
    plain = train(tmp_path, data, "none")
    assert_same_training(cached, plain)
    text_cache = cached[0].feature_caches["text"]
    # Captions are drawn at random per epoch: some re-draws differ from the cached caption and miss.
    assert NUM_PAIRS < text_cache.misses < EPOCHS * NUM_PAIRS
    assert cached[2]["vision"] == NUM_PAIRS and NUM_PAIRS < cached[2]["text"] < EPOCHS * NUM_PAIRS


def test_disk_cache_trains_like_the_memory_cache(tmp_path):
    data = synthetic_pairs(NUM_PAIRS)
    on_disk = train(tmp_path, data, "disk")
    in_memory = train(tmp_path, data, "memory")
    assert_same_training(on_disk, in_memory)
    assert (tmp_path / "disk" / "feature_cache" / "vision_features.f32").stat().st_size == NUM_PAIRS * 32 * 4
    assert on_disk[2] == {"vision": NUM_PAIRS, "text": NUM_PAIRS}


def test_partially_unlocked_towers_are_not_cached(tmp_path):
    trainer, _, counts = train(tmp_path, synthetic_pairs(NUM_PAIRS), "memory", unfreeze_last_n=1, num_train_epochs=1)
    assert trainer.feature_caches == {}
    assert counts == {"vision": NUM_PAIRS, "text": NUM_PAIRS}


def test_only_the_locked_tower_is_cached(tmp_path):
    args = training_args(tmp_path, freeze_vision_tower=True, num_train_epochs=2, per_device_train_batch_size=BATCH)
    model = tiny_model()
    counts = count_tower_rows(model)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=synthetic_pairs(NUM_PAIRS), processing_class=processor())
    trainer.train()
    assert sorted(trainer.feature_caches) == ["vision"]
    assert counts == {"vision": NUM_PAIRS, "text": 2 * NUM_PAIRS}


def test_a_second_run_reads_the_first_runs_caches(tmp_path, monkeypatch):
    """`use_feature_caches`: a run given the caches an earlier run on the same data filled runs no tower and decodes
    no image, and trains exactly as a run that fills its own; a tower it does not cache is an error."""
    import trainers.data.collator as collator_module

    data = synthetic_pairs(NUM_PAIRS)
    first, _, _ = train(tmp_path, data, "memory")
    decoded = []
    real_decode = collator_module.decode_image
    monkeypatch.setattr(collator_module, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    model = tiny_model()
    counts = count_tower_rows(model)
    recorder = LossRecorder()
    args = training_args(tmp_path / "shared", num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                         logging_steps=1, freeze_vision_tower=True, freeze_text_tower=True)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=data, processing_class=processor(), callbacks=[recorder])
    trainer.use_feature_caches(first.feature_caches)
    assert trainer.feature_caches["vision"] is first.feature_caches["vision"]
    trainer.train()
    assert counts == {"vision": 0, "text": 0} and decoded == []
    own = train(tmp_path, data, "memory")
    assert_same_training((trainer, recorder.losses, counts), own)
    text_only = NLIPTrainer(model=tiny_model(), args=training_args(tmp_path / "text", freeze_text_tower=True),
                            train_dataset=data, processing_class=processor())
    with pytest.raises(ValueError, match="this trainer has no locked, cached 'vision' tower \\(cached: \\['text'\\]\\)"):
        text_only.use_feature_caches({"vision": first.feature_caches["vision"]})
