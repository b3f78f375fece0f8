"""CIDEr for image captioning as coco-caption reports it (pycocoevalcap's CiderScorer, which is CIDEr-D: clipped
n-gram counts, Gaussian length penalty sigma=6, x10 scaling, document frequencies from the evaluated references), on
captions tokenized by `trainers.evaluation.metric_modules.tokenize_caption`. Needs several images: with a single image every
n-gram has zero idf and the score is 0."""

import evaluate
from pycocoevalcap.cider.cider import Cider as CocoCider

from trainers.evaluation.metric_modules import caption_features, coco_inputs

_DESCRIPTION = "Corpus CIDEr-D (coco-caption's scorer) of predicted captions against one or more references each."
_CITATION = "Vedantam et al., CIDEr: Consensus-based Image Description Evaluation, CVPR 2015."
_INPUTS = """
Args:
    predictions: list of predicted captions (str).
    references: list of reference captions, each a str or a list of str.
Returns:
    cider (float, 0 to ~10; papers usually print it x100).
"""


class Cider(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS, features=caption_features()
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        gts, res = coco_inputs(predictions, references)
        score, _ = CocoCider().compute_score(gts, res)
        return {"cider": float(score)}
