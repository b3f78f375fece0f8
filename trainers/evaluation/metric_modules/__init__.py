"""Local `evaluate` metric modules (`bleu/`, `cider/`): the Hub's metric scripts are unreachable offline, so
`trainers.evaluation.metrics` loads these files with `evaluate.load(<path>)`. They score with `pycocoevalcap`'s pure-Python
BLEU and CIDEr-D scorers after `tokenize_caption` (coco-caption's PTB tokenizer needs Java)."""

import re

_WORD = re.compile(r"\w+(?:['-]\w+)*")


def tokenize_caption(text: str) -> str:
    """Lower-case and keep words only (punctuation dropped, intra-word hyphens/apostrophes kept: "t-shirt", "don't").

    Stand-in for coco-caption's PTB tokenizer, which also drops punctuation but splits clitics ("don't" -> "do n't"),
    so scores can differ slightly from the official toolkit's on such captions.
    """
    return " ".join(_WORD.findall(text.lower()))


def coco_inputs(predictions: list[str], references: list[str | list[str]]) -> tuple[dict, dict]:
    """Tokenized `(gts, res)` dicts in pycocoevalcap's format: `{i: [reference, ...]}` and `{i: [prediction]}`."""
    gts = {
        i: [tokenize_caption(r) for r in ([refs] if isinstance(refs, str) else refs)]
        for i, refs in enumerate(references)
    }
    res = {i: [tokenize_caption(prediction)] for i, prediction in enumerate(predictions)}
    return gts, res


def caption_features() -> list:
    """`evaluate` input features: one prediction string against one reference string or a list of them."""
    import datasets

    return [
        datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
        ),
        datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    ]
