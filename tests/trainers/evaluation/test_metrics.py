"""Metrics on hand-computed cases, the local evaluate modules, and embedding-based evaluation with a tiny CLIPModel."""

import math

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from test_collator import tiny_processor
from transformers import CLIPConfig, CLIPModel, EvalPrediction

from trainers.evaluation.embeddings import (
    PairEmbeddings,
    build_zero_shot_classifier,
    compute_embeddings,
    compute_image_embeddings,
    compute_text_embeddings,
    embedding_tensor,
    evaluate_retrieval,
    evaluate_zero_shot,
)
from trainers.evaluation.metric_modules import tokenize_caption
from trainers.evaluation.metrics import (
    captioning_metrics,
    noise_detection_compute_metrics,
    noise_detection_metrics,
    retrieval_compute_metrics,
    retrieval_metrics,
    zero_shot_accuracy,
)

# ------------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_one_caption_per_image():
    similarity = np.array([[0.9, 0.1, 0.3], [0.2, 0.4, 0.8], [0.5, 0.6, 0.7]])
    # i2t ranks: image 0 -> 0, image 1 -> 1 (text 2 scores 0.8 > 0.4), image 2 -> 0
    # t2i ranks: text 0 -> 0, text 1 -> 1 (image 2: 0.6 > 0.4), text 2 -> 1 (image 1: 0.8 > 0.7)
    metrics = retrieval_metrics(similarity)
    assert metrics == pytest.approx(
        {
            "i2t_R@1": 200 / 3,
            "i2t_R@5": 100,
            "i2t_R@10": 100,
            "t2i_R@1": 100 / 3,
            "t2i_R@5": 100,
            "t2i_R@10": 100,
            "rsum": 500,
        }
    )
    assert retrieval_metrics(torch.tensor(similarity), [0, 1, 2]) == metrics


def test_retrieval_multi_caption():
    similarity = np.array(
        [
            [0.1, 0.8, 0.9, 0.2, 0.3, 0.0],  # image 0, texts 0-1: best positive 0.8, beaten by text 2 -> rank 1
            [0.7, 0.1, 0.2, 0.6, 0.3, 0.1],  # image 1, texts 2-3: best 0.6, beaten by text 0 -> rank 1
            [0.1, 0.55, 0.3, 0.4, 0.5, 0.6],  # image 2, text 4: 0.5, beaten by texts 1 and 5 -> rank 2
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.9],  # image 3, text 5: rank 0
        ]
    )
    # t2i ranks (ties count against the query): text 0: 0.1 vs images 1 (0.7), 2 (0.1 tie) -> 2; text 1 -> 0;
    # text 2: 0.2 vs images 0 (0.9), 2 (0.3), 3 (0.2 tie) -> 3; texts 3, 4, 5 -> 0
    metrics = retrieval_metrics(similarity, [0, 0, 1, 1, 2, 3], ks=(1, 2, 3))
    assert metrics == pytest.approx(
        {
            "i2t_R@1": 25,
            "i2t_R@2": 75,
            "i2t_R@3": 100,
            "t2i_R@1": 400 / 6,
            "t2i_R@2": 400 / 6,
            "t2i_R@3": 500 / 6,
            "rsum": 25 + 75 + 100 + 400 / 6 + 400 / 6 + 500 / 6,
        }
    )
    # chunking does not change the answer
    assert retrieval_metrics(similarity, [0, 0, 1, 1, 2, 3], ks=(1, 2, 3), chunk_size=1) == metrics


def test_retrieval_ties_are_pessimistic_and_errors():
    assert retrieval_metrics(np.ones((4, 4)), ks=(1, 4))["i2t_R@1"] == 0
    assert retrieval_metrics(np.ones((4, 4)), ks=(1, 4))["t2i_R@4"] == 100
    with pytest.raises(ValueError, match="pass text_to_image"):
        retrieval_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"Images \[1\] have no text"):
        retrieval_metrics(np.zeros((2, 3)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="has 3 entries but similarity has 2 texts"):
        retrieval_metrics(np.zeros((2, 2)), [0, 1, 1])


def test_retrieval_compute_metrics_adapter():
    images = np.array([[1.0, 0.0], [0.0, 2.0]])
    texts = np.array([[3.0, 0.1], [0.2, 1.0]])
    metrics = retrieval_compute_metrics(EvalPrediction(predictions=(images, texts), label_ids=None))
    assert metrics["i2t_R@1"] == 100 and metrics["t2i_R@1"] == 100 and metrics["rsum"] == 600


# ------------------------------------------------------------------------------------------------------ zero-shot


def test_zero_shot_accuracy_hand_case():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.4, 1.0], [-1.0, 0.0]])
    classes = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # predictions: 0, 1, 1, 2
    assert zero_shot_accuracy(images, classes, [0, 1, 0, 2]) == {"top1": 75.0}  # no top5 with 3 classes
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 3)
    result = zero_shot_accuracy(torch.zeros(3, 2), lambda embeds: scores, [0, 4, 5])
    assert result == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})
    with pytest.raises(ValueError, match=r"class embeddings must be \[num_classes, 2\]"):
        zero_shot_accuracy(images, np.zeros((3, 5)), [0, 1, 0, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        zero_shot_accuracy(images, classes, [0, 1, 0, 3])


# ----------------------------------------------------------------------------------------------------- captioning


def test_bleu4_matches_the_textbook_formula():
    # "the cat sat on the mat" vs "the cat sat on a mat": clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    metrics = captioning_metrics(["The cat sat on the mat."], [["the cat sat on a mat"]])
    assert metrics["bleu4"] == pytest.approx(expected, rel=1e-6)
    # brevity penalty exp(1 - 6/4) with a 4-word exact prefix
    assert captioning_metrics(["the cat sat on"], ["the cat sat on a mat"])["bleu4"] == pytest.approx(
        math.exp(1 - 6 / 4), rel=1e-6
    )


def test_cider_matches_pycocoevalcap_and_perfect_match():
    predictions = ["a man riding a red horse", "two dogs play with a ball", "a clock on the tower"]
    references = [
        ["a man rides a horse", "a person on a brown horse"],
        ["dogs playing with a ball", "two dogs and a ball on grass"],
        ["a large clock on a tower", "the tower has a clock"],
    ]
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    expected, _ = Cider().compute_score(gts, res)
    metrics = captioning_metrics(predictions, references)
    assert metrics["cider"] == pytest.approx(expected, rel=1e-9) and 0 < metrics["cider"] < 10

    perfect = ["a man riding a red horse", "two dogs play with a ball", "a clock on the old tower"]
    assert captioning_metrics(perfect, perfect) == pytest.approx({"bleu4": 1.0, "cider": 10.0})
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        captioning_metrics(["a", "b"], ["a"])


def test_tokenize_caption():
    assert tokenize_caption("A T-shirt, folded; don't   touch!") == "a t-shirt folded don't touch"


# ------------------------------------------------------------------------------------------------ noise detection


def test_noise_detection_hand_case():
    noise_prob = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2]
    is_noisy = [True, True, True, False, False, False]
    # AUC: of the 9 (noisy, clean) pairs, the noisy one scores higher in 8 (0.3 < 0.6 is the exception)
    # at 0.5: predicted noisy = {0.9, 0.8, 0.6}: TP 2, FP 1, FN 1
    expected = {
        "roc_auc": 8 / 9,
        "precision": 2 / 3,
        "recall": 2 / 3,
        "f1": 2 / 3,
        "estimated_noisy_fraction": 0.5,
        "true_noisy_fraction": 0.5,
    }
    assert noise_detection_metrics(noise_prob, is_noisy) == pytest.approx(expected)
    clean_prob = 1 - np.array(noise_prob)
    assert noise_detection_metrics(clean_prob=clean_prob, is_noisy=is_noisy) == pytest.approx(expected)
    assert noise_detection_metrics(noise_prob, is_noisy, threshold=0.85)["precision"] == 1.0
    adapter = noise_detection_compute_metrics(EvalPrediction(np.array(noise_prob), np.array(is_noisy)))
    assert adapter == pytest.approx(expected)


def test_noise_detection_edge_cases():
    single_class = noise_detection_metrics([0.2, 0.7], [False, False])
    assert math.isnan(single_class["roc_auc"]) and single_class["precision"] == 0.0
    with pytest.raises(ValueError, match="exactly one of noise_prob and clean_prob"):
        noise_detection_metrics([0.1], [True], clean_prob=[0.9])
    with pytest.raises(ValueError, match="2 noise scores but 3 is_noisy"):
        noise_detection_metrics([0.1, 0.2], [True, False, True])
    with pytest.raises(ValueError, match="NaN"):
        noise_detection_metrics([0.1, float("nan")], [True, False])


# ----------------------------------------------------------------------------------------- embedding evaluation


@pytest.fixture(scope="module")
def clip():
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).train(), processor


def colour_pairs(n=6, captions=None):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255), (128, 128, 128)]
    names = ["red", "green", "blue", "black", "white", "large"]
    return datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.new("RGB", (36, 36), colours[i % 6]) for i in range(n)],
            "text": captions or [f"a {names[i % 6]} photo" for i in range(n)],
            "label": [i % 3 for i in range(n)],
            "index": list(range(n)),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.List(datasets.Value("string")) if captions else datasets.Value("string"),
                "label": datasets.ClassLabel(names=["cat", "dog", "car"]),
                "index": datasets.Value("int64"),
            }
        ),
    )


def test_compute_embeddings_matches_direct_calls(clip):
    model, processor = clip
    dataset = colour_pairs()
    embeds = compute_embeddings(model, dataset, processor=processor, batch_size=4, progress=False)
    assert isinstance(embeds, PairEmbeddings) and embeds.index.tolist() == list(range(6))
    assert embeds.image_embeds.shape == (6, 16) and embeds.text_embeds.shape == (6, 16)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        inputs = processor(
            images=list(dataset["image"]), text=list(dataset["text"]), padding=True, return_tensors="pt"
        )
        image = embedding_tensor(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = embedding_tensor(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
    model.train()
    torch.testing.assert_close(embeds.image_embeds, torch.nn.functional.normalize(image, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds.text_embeds, torch.nn.functional.normalize(text, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        compute_image_embeddings(model, dataset, processor, normalize=False, progress=False), image, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        compute_text_embeddings(model, dataset["text"], processor, normalize=False, progress=False),
        text,
        atol=1e-5,
        rtol=0,
    )
    # a DataLoader of collated batches works as well
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=3,
        collate_fn=lambda b: (
            processor(images=[e["image"] for e in b], text=[e["text"] for e in b], padding=True, return_tensors="pt")
            | {"index": torch.tensor([e["index"] for e in b])}
        ),
    )
    from_loader = compute_embeddings(model, loader, progress=False)
    torch.testing.assert_close(from_loader.text_embeds, embeds.text_embeds, atol=1e-5, rtol=0)
    streamed = compute_embeddings(model, dataset.to_iterable_dataset(), processor=processor, progress=False)
    torch.testing.assert_close(streamed.image_embeds, embeds.image_embeds, atol=1e-5, rtol=0)
    assert streamed.index.tolist() == list(range(6))


def test_embedding_tensor_accepts_tensor_and_rejects_others():
    tensor = torch.ones(2, 3)
    assert embedding_tensor(tensor) is tensor
    with pytest.raises(TypeError, match="pooler_output"):
        embedding_tensor((tensor,))


def test_evaluate_retrieval_and_zero_shot(clip):
    model, processor = clip
    dataset = colour_pairs(
        6,
        [
            ["a red photo", "a cat"],
            ["a green photo"],
            ["a blue dog"],
            ["a black car"],
            ["a white photo", "", "a white cat"],
            ["a large photo"],
        ],
    )
    metrics = evaluate_retrieval(model, processor, dataset, batch_size=4, progress=False)
    # same numbers as retrieval_metrics on the embeddings, with the 8 non-empty captions mapped to their images
    texts = [
        "a red photo",
        "a cat",
        "a green photo",
        "a blue dog",
        "a black car",
        "a white photo",
        "a white cat",
        "a large photo",
    ]
    similarity = (
        compute_image_embeddings(model, dataset, processor, progress=False)
        @ compute_text_embeddings(model, texts, processor, progress=False).T
    )
    assert metrics == pytest.approx(retrieval_metrics(similarity, [0, 0, 1, 2, 3, 4, 4, 5]))

    templates = ["a photo of a {}", "a {}"]
    classifier = build_zero_shot_classifier(model, processor, ["cat", "dog", "car"], templates)
    prompts = compute_text_embeddings(model, ["a photo of a dog", "a dog"], processor, progress=False)
    torch.testing.assert_close(classifier[1], torch.nn.functional.normalize(prompts.mean(0), dim=0))
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))
    accuracy = evaluate_zero_shot(model, processor, dataset, templates=templates, progress=False)
    image_embeds = compute_image_embeddings(model, dataset, processor, progress=False)
    assert accuracy == zero_shot_accuracy(image_embeds, classifier, dataset["label"])
    with pytest.raises(ValueError, match="no column 'category'"):
        evaluate_zero_shot(model, processor, dataset, label_column="category")
