"""Evaluation: embedding a dataset (`embeddings`), retrieval / zero-shot / captioning / noise-detection metrics
(`metrics`) and the local `evaluate` modules BLEU and CIDEr (`metric_modules`)."""
