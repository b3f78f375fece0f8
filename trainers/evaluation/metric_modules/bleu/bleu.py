"""BLEU-4 for image captioning as coco-caption computes it (pycocoevalcap's BleuScorer: corpus-level, closest
reference length for the brevity penalty), on captions tokenized by `trainers.evaluation.metric_modules.tokenize_caption`."""

import evaluate
from pycocoevalcap.bleu.bleu import Bleu as CocoBleu

from trainers.evaluation.metric_modules import caption_features, coco_inputs

_DESCRIPTION = "Corpus BLEU-1..4 (coco-caption's scorer) of predicted captions against one or more references each."
_CITATION = "Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, ACL 2002."
_INPUTS = """
Args:
    predictions: list of predicted captions (str).
    references: list of reference captions, each a str or a list of str.
Returns:
    bleu4 (float in [0, 1]), and bleu1..bleu3.
"""


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS, features=caption_features()
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        gts, res = coco_inputs(predictions, references)
        scores, _ = CocoBleu(4).compute_score(gts, res, verbose=0)
        return {f"bleu{n}": float(score) for n, score in enumerate(scores, start=1)}
