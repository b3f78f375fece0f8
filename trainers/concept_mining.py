"""Mine a concept vocabulary from training captions: their most frequent content words.

The mined names feed `model.build_concept_bank(vocabulary, processor)`; the shipped default vocabulary is
`modeling_nlip.DEFAULT_CONCEPT_VOCABULARY`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

# Words that describe the picture rather than what is in it; removed along with the English stop words by default.
CAPTION_BOILERPLATE = frozenset({"photo", "photograph", "picture", "image", "shot", "view", "close", "showing", "shows"})
DEFAULT_STOP_WORDS = frozenset(ENGLISH_STOP_WORDS) | CAPTION_BOILERPLATE
# Letter-only words, hyphens inside allowed ("t-shirt"); numbers are not concepts, nor are single letters (filtered).
WORD_PATTERN = r"(?u)\b[^\W\d_]+(?:-[^\W\d_]+)*\b"


def mine_concepts(
    captions: Iterable[str],
    top_k: int = 500,
    min_count: int = 2,
    stop_words: Iterable[str] | None = None,
) -> list[str]:
    """
    The `top_k` content words that occur in the most captions, most frequent first (ties alphabetical).

    Args:
        captions: caption strings (e.g. `dataset["text"]`).
        top_k: how many words to return at most.
        min_count: minimum number of captions a word must occur in.
        stop_words: words never returned (case-insensitive); default `DEFAULT_STOP_WORDS` (scikit-learn's English stop
            words plus caption boilerplate such as "photo", "picture").

    Counting is by caption (a word repeated in one caption counts once), after lower-casing.
    """
    if isinstance(captions, str):
        raise TypeError("`captions` must be an iterable of caption strings, not a single string.")
    captions = list(captions)
    if not all(isinstance(caption, str) for caption in captions):
        raise TypeError("`captions` must contain only strings.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"`min_count` must be a positive integer, got {min_count!r}.")
    stop_words = DEFAULT_STOP_WORDS if stop_words is None else frozenset(word.lower() for word in stop_words)
    if not any(caption.strip() for caption in captions):
        return []
    vectorizer = CountVectorizer(lowercase=True, token_pattern=WORD_PATTERN, binary=True, min_df=1)
    try:
        counts = vectorizer.fit_transform(captions).sum(axis=0).A1
    except ValueError:  # no word at all in any caption
        return []
    ranked = sorted(
        ((word, int(count)) for word, count in zip(vectorizer.get_feature_names_out(), counts)
         if count >= min_count and len(word) > 1 and word not in stop_words),
        key=lambda item: (-item[1], item[0]),
    )
    return [word for word, _ in ranked[:top_k]]


__all__ = ["CAPTION_BOILERPLATE", "DEFAULT_STOP_WORDS", "mine_concepts"]
