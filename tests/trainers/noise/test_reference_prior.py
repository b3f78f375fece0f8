"""The reference prior: debiased reference cosines (or neighbour agreement) → clean probabilities, the random-pair
mean, state round trip."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from trainers.evaluation.embeddings import PairEmbeddings
from trainers.noise.reference_prior import ReferencePrior, combine_noise, neighbour_agreement, random_pair_cosine


def _aligned_pairs(count=400, dim=32, noise_rate=0.4, seed=0):
    """Pairs whose text embedding is its image's plus noise; a `noise_rate` fraction get another pair's text."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    text = image + 0.7 * torch.randn(count, dim, generator=generator, dtype=torch.float64)
    noisy = torch.rand(count, generator=generator) < noise_rate
    picked = torch.nonzero(noisy).flatten()
    text[picked] = text[picked.roll(1)]
    return image, text, noisy


def test_random_pair_cosine_exact_and_sampled():
    image, text, _ = _aligned_pairs(count=50)
    unit_i, unit_t = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    exact = sum(float(unit_i[i] @ unit_t[j]) for i in range(50) for j in range(50) if i != j) / (50 * 49)
    assert math.isclose(random_pair_cosine(image, text), exact, rel_tol=1e-9, abs_tol=1e-12)
    sampled = random_pair_cosine(image, text, num_pairs=500, seed=1)
    assert abs(sampled - exact) < 0.03 and sampled == random_pair_cosine(image, text, num_pairs=500, seed=1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        random_pair_cosine(image[:1], text[:1])


def test_prior_separates_mismatched_pairs_and_scores_by_index():
    image, text, noisy = _aligned_pairs()
    index = torch.randperm(400, generator=torch.Generator().manual_seed(3)) + 5  # indices 5..404, shuffled
    embeddings = PairEmbeddings(image[index - 5], text[index - 5], index)
    prior = ReferencePrior.from_embeddings(embeddings, num_samples=410)
    beta = random_pair_cosine(image[index - 5], text[index - 5])
    unit = torch.nn.functional.normalize
    expected = (unit(image, dim=-1) * unit(text, dim=-1)).sum(-1) - beta
    torch.testing.assert_close(prior.score[5:405], expected.float())
    assert torch.isnan(prior.score[:5]).all() and (prior.clean_prob[:5] == 1).all()  # unscored: no evidence
    assert roc_auc_score(noisy.numpy(), prior.noise_prob[5:405].numpy()) > 0.97
    assert (prior.clean_prob[5:405][prior.score[5:405] <= 0] == 0).all()
    summary = prior.summary()
    assert summary["num_scored"] == 400 and summary["random_pair_cosine"] == pytest.approx(beta)


def test_neighbour_agreement_is_the_mean_caption_cosine_of_the_nearest_images():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(30, 6, generator=generator), torch.randn(30, 5, generator=generator)
    unit_i, unit_t = torch.nn.functional.normalize(image.double(), dim=-1), torch.nn.functional.normalize(text.double(), dim=-1)
    expected = []
    for i in range(30):
        similarity = [(float(unit_i[i] @ unit_i[j]), j) for j in range(30) if j != i]
        nearest = [j for _, j in sorted(similarity, reverse=True)[:4]]
        expected.append(sum(float(unit_t[i] @ unit_t[j]) for j in nearest) / 4)
    for chunk_size in (7, 4096):  # chunked rows give the same answer
        torch.testing.assert_close(neighbour_agreement(image, text, 4, chunk_size=chunk_size),
                                   torch.tensor(expected, dtype=torch.float64))
    for bad in (0, 30):
        with pytest.raises(ValueError, match=rf"1 <= neighbours < the number of pairs \(30\); got {bad}"):
            neighbour_agreement(image, text, bad)


def test_neighbour_prior_finds_class_noise_that_no_alignment_shows():
    """Ten classes of images (clusters) with one caption embedding per class, the text space unrelated to the image
    space (no alignment: the image-text cosine is useless); 70 % of the captions are shuffled. The neighbours' captions
    still agree with a clean pair's own, far less with a noisy one's."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(600) % 10
    image = 3 * torch.randn(10, 16, generator=generator)[labels] + torch.randn(600, 16, generator=generator)
    caption_class = labels.clone()
    picked = torch.randperm(600, generator=generator)[:420]
    caption_class[picked] = caption_class[picked[torch.randperm(420, generator=generator)]]
    text = torch.randn(10, 16, generator=generator)[caption_class] + 0.1 * torch.randn(600, 16, generator=generator)
    wrong = (caption_class != labels).numpy()
    embeddings = PairEmbeddings(image, text, torch.arange(600))
    cosine = ReferencePrior.from_embeddings(embeddings, num_samples=600)
    neighbours = ReferencePrior.from_embeddings(embeddings, num_samples=600, neighbours=20)
    assert abs(roc_auc_score(wrong, cosine.noise_prob.numpy()) - 0.5) < 0.1
    assert roc_auc_score(wrong, -neighbours.score.numpy()) > 0.95
    assert neighbours.random_pair_cosine == pytest.approx(random_pair_cosine(text, text))
    torch.testing.assert_close(neighbours.score, (neighbour_agreement(image, text, 20)
                                                  - neighbours.random_pair_cosine).float())
    with pytest.raises(ValueError, match="noise_prior_neighbours=600 needs more scored pairs than that; the training "
                                         "set has 600"):
        ReferencePrior.from_embeddings(embeddings, num_samples=600, neighbours=600)


def test_state_round_trip_and_size_check():
    image, text, _ = _aligned_pairs(count=60)
    prior = ReferencePrior.from_embeddings(PairEmbeddings(image, text, torch.arange(60)), num_samples=60)
    restored = ReferencePrior.from_state_dict(prior.state_dict(), num_samples=60)
    assert torch.equal(restored.clean_prob, prior.clean_prob)
    torch.testing.assert_close(restored.score, prior.score, equal_nan=True)
    with pytest.raises(ValueError, match="covers 60 pairs, but the training data has 50"):
        ReferencePrior.from_state_dict(prior.state_dict(), num_samples=50)
    with pytest.raises(ValueError, match=r"missing \['clean_prob'\]"):
        ReferencePrior.from_state_dict({k: v for k, v in prior.state_dict().items() if k != "clean_prob"}, 60)
    with pytest.raises(ValueError, match=r"indices outside \[0, 10\)"):
        ReferencePrior.from_embeddings(PairEmbeddings(image, text, torch.arange(60)), num_samples=10)


def test_combine_noise():
    prior, loss = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    assert torch.equal(combine_noise(None, prior, 0.3), prior)
    torch.testing.assert_close(combine_noise(loss, prior, 0.25), torch.tensor([0.75, 0.25, 0.5]))
    with pytest.raises(ValueError, match=r"`prior_weight` must be in \[0, 1\]"):
        combine_noise(loss, prior, 1.5)
