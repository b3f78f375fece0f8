import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.noise.memory_bank import MemoryBank, build_memory_bank


def _features(num_samples=37, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(num_samples, dim, generator=generator) * torch.rand(num_samples, 1, generator=generator) * 5
    text = torch.randn(num_samples, dim, generator=generator)
    clean_prob = torch.rand(num_samples, generator=generator)
    return image, text, clean_prob


def _brute_force(features, clean_indices, exclude_self):
    normalised = features / features.norm(dim=1, keepdim=True)
    similarity = normalised @ normalised[clean_indices].T
    if exclude_self:
        similarity[clean_indices, torch.arange(len(clean_indices))] = float("-inf")
    return clean_indices[similarity.argmax(dim=1)]


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("chunk_size, key_chunk_size", [(5, 7), (4096, None), (1, 3)])
def test_neighbors_equal_brute_force(exclude_self, chunk_size, key_chunk_size):
    image, text, clean_prob = _features()
    bank = build_memory_bank(
        image,
        text,
        clean_prob,
        threshold=0.6,
        chunk_size=chunk_size,
        key_chunk_size=key_chunk_size,
        exclude_self=exclude_self,
        progress_bar=False,
    )
    expected_clean = torch.nonzero(clean_prob > 0.6).squeeze(1)
    assert torch.equal(bank.clean_indices, expected_clean) and len(expected_clean) % 7 != 0
    assert torch.equal(bank.image_neighbors, _brute_force(image, expected_clean, exclude_self))
    assert torch.equal(bank.text_neighbors, _brute_force(text, expected_clean, exclude_self))
    assert bank.image_neighbors.dtype == torch.int64 and bank.threshold == 0.6
    on_self = bank.image_neighbors[expected_clean] == expected_clean
    assert on_self.all() if not exclude_self else not on_self.any()


def test_accepts_numpy_probabilities_and_half_features():
    image, text, clean_prob = _features(num_samples=20, seed=1)
    bank = build_memory_bank(
        image.bfloat16(),
        text.bfloat16(),
        clean_prob.numpy(),
        threshold=0.5,
        chunk_size=6,
        progress_bar=False,
        device="cpu",
    )
    clean = torch.nonzero(clean_prob > 0.5).squeeze(1)
    assert torch.equal(bank.text_neighbors, _brute_force(text.bfloat16().float(), clean, True))


def test_clean_set_too_small_raises():
    image, text, _ = _features(num_samples=10)
    with pytest.raises(
        ValueError, match=r"clean set has 0 pair\(s\) with clean_prob > threshold=0.9 \(max clean_prob 0.5000"
    ):
        build_memory_bank(image, text, torch.full((10,), 0.5), progress_bar=False)
    one_clean = torch.zeros(10)
    one_clean[3] = 1.0
    with pytest.raises(ValueError, match="at least 2 with exclude_self=True"):
        build_memory_bank(image, text, one_clean, progress_bar=False)
    bank = build_memory_bank(image, text, one_clean, exclude_self=False, progress_bar=False)
    assert (bank.image_neighbors == 3).all() and (bank.text_neighbors == 3).all()


def test_min_clean_fraction_takes_the_most_probably_clean_pairs():
    image, text, _ = _features(num_samples=10)
    clean_prob = torch.tensor([0.2, 0.95, 0.5, 0.0, 0.7, 0.1, 0.3, 0.0, 0.6, 0.0])
    # One pair passes 0.9; a floor of 40 % takes the 4 highest clean probabilities instead.
    bank = build_memory_bank(image, text, clean_prob, min_clean_fraction=0.4, progress_bar=False)
    assert bank.clean_indices.tolist() == [1, 2, 4, 8]
    # Enough pairs pass the threshold: the floor changes nothing.
    bank = build_memory_bank(image, text, clean_prob, threshold=0.25, min_clean_fraction=0.4, progress_bar=False)
    assert bank.clean_indices.tolist() == [1, 2, 4, 6, 8]
    # Pairs with clean probability 0 (e.g. unseen ones) never enter: 7 are positive, a floor of 90 % takes those 7.
    bank = build_memory_bank(image, text, clean_prob, min_clean_fraction=0.9, progress_bar=False)
    assert bank.clean_indices.tolist() == [0, 1, 2, 4, 5, 6, 8]
    with pytest.raises(ValueError, match=r"`min_clean_fraction` must be in \[0, 1\); got 1.0"):
        build_memory_bank(image, text, clean_prob, min_clean_fraction=1.0, progress_bar=False)


def test_bad_shapes():
    image, text, clean_prob = _features(num_samples=10)
    with pytest.raises(ValueError, match="same N"):
        build_memory_bank(image, text[:9], clean_prob)
    with pytest.raises(ValueError, match=r"one value per pair \(10\)"):
        build_memory_bank(image, text, clean_prob[:9])
    text[[2, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"`text_features` has non-finite values \(first rows: \[2, 7\]\)"):
        build_memory_bank(image, text, torch.ones(10), progress_bar=False)


def test_state_dict_round_trip(tmp_path):
    image, text, clean_prob = _features()
    bank = build_memory_bank(image, text, clean_prob, threshold=0.7, progress_bar=False)
    path = tmp_path / "memory_bank.safetensors"
    save_file(bank.state_dict(), path)
    restored = MemoryBank.from_state_dict(load_file(path))
    for name in ("clean_indices", "image_neighbors", "text_neighbors"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    assert restored.threshold == 0.7
    with pytest.raises(ValueError, match=r"missing \['threshold'\]"):
        MemoryBank.from_state_dict({k: v for k, v in bank.state_dict().items() if k != "threshold"})
