"""Audit a dataset with a trained model: which image-text pairs are likely mismatched, and what they show (`nlip-audit`).

    nlip-audit --model_name_or_path outputs/nlip-pretrain --train_dir crawled_pairs/ --output_dir audit/

Every pair is scored (see `scripts/pair_scoring.py`): the cosine similarity of its image and caption, its contrastive
loss against one fixed random set of negatives, and the noise probability a 2-component GMM over those losses gives
it. The image's top concepts are retrieved from the model's concept bank (or a mined/given vocabulary), and pairs
flagged as likely noisy get a suggested caption when a captioner is available (the checkpoint itself when it has a
decoder, or --captioner_name_or_path).

Writes into --output_dir: `audit.parquet` and `audit.csv` (one row per pair, most suspicious first),
`audit_report.html` (self-contained: summary numbers, then the most suspicious pairs with thumbnails, their caption
and the suggested one) and `audit_summary.json`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import jinja2
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from scripts.data_arguments import SPLITS, DataArguments, iter_captions, load_pairs
from scripts.evaluate import generate_captions
from scripts.model_arguments import concept_vocabulary, load_checkpoint
from scripts.pair_scoring import PairScores, concept_bank, score_pairs, top_concepts
from trainers.data import column_values, decode_image, non_empty_captions, to_rgb
from trainers.metrics import noise_detection_metrics

logger = logging.getLogger("nlip.audit")

DESCRIPTION = (
    "Score every image-text pair of a dataset with a trained NLIP/CLIP model (noise probability, similarity, "
    "retrieved concepts, a suggested caption for likely-noisy pairs) and write a Parquet/CSV table and a "
    "self-contained HTML report listing the most suspicious pairs first."
)
# Columns copied from the data into the table when present: they tell the user which file a pair is.
ID_COLUMNS = ("file_name", "key", "category", "label", "emoji")
TABLE_NAME, REPORT_NAME, SUMMARY_NAME = "audit", "audit_report.html", "audit_summary.json"


@dataclass
class AuditArguments:
    """What to audit with which model, and what to write."""

    model_name_or_path: str = field(
        metadata={"help": "Trained checkpoint (folder or Hub id) with a dual encoder: an NLIP dual encoder or "
                          "pre-training checkpoint, or a CLIP model."}
    )
    output_dir: str = field(metadata={"help": "Folder for audit.parquet, audit.csv, audit_report.html and "
                                              "audit_summary.json (created if missing)."})
    split: str = field(default="train", metadata={"help": "Split of the data to audit: 'train' or 'eval'."})
    captioner_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint that writes the suggested captions (NLIPForCaptioning or NLIPForPreTraining). "
                          "Default: the audited checkpoint when it has a captioning decoder; otherwise none are written."},
    )
    num_negatives: int = field(
        default=256,
        metadata={"help": "Size of the fixed random set of other pairs every pair's contrastive loss is computed "
                          "against (larger: steadier scores, linear cost)."},
    )
    num_concepts: int = field(default=5, metadata={"help": "Concepts retrieved per image (0: none)."})
    concept_vocabulary: str = field(
        default="auto",
        metadata={"help": "Concepts to retrieve from: 'auto' (the model's concept bank, else 'mined'), 'mined' (the "
                          "most frequent content words of the audited captions), 'default' (the shipped COCO + "
                          "common-objects list), 'none', or a text file with one concept per line."},
    )
    max_concepts: int = field(default=200, metadata={"help": "The most concepts a mined vocabulary holds."})
    suggest_threshold: float = field(
        default=0.5, metadata={"help": "Pairs with a noise probability at or above this get a suggested caption."}
    )
    max_suggestions: int = field(
        default=200, metadata={"help": "The most suggested captions written (to the most suspicious pairs first)."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beam width of the suggested captions (1: greedy)."})
    max_new_tokens: int = field(default=20, metadata={"help": "The most tokens of a suggested caption."})
    report_rows: int = field(
        default=200, metadata={"help": "Pairs shown in the HTML report, most suspicious first (the tables hold all)."}
    )
    thumbnail_size: int = field(default=96, metadata={"help": "Longest side of the report's thumbnails, in pixels."})
    batch_size: int = field(default=64, metadata={"help": "Pairs per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Seed of the negative set and of the noise GMM."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {list(SPLITS)}, got {self.split!r}.")
        if not 0.0 <= self.suggest_threshold <= 1.0:
            raise ValueError(f"--suggest_threshold must be in [0, 1], got {self.suggest_threshold}.")
        for name in ("num_negatives", "report_rows", "thumbnail_size", "batch_size", "num_beams", "max_new_tokens",
                     "max_concepts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("num_concepts", "max_suggestions"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def retrieved_concepts(checkpoint, dataset: datasets.Dataset, scores: PairScores, args: AuditArguments) -> list[list[str]] | None:
    """Top `num_concepts` concept names of each scored image (None when there is no vocabulary)."""
    if args.num_concepts == 0:
        return None
    bank_model = checkpoint.concept_bank_model if args.concept_vocabulary == "auto" else None
    if bank_model is not None:
        bank = concept_bank(bank_model, checkpoint.processor, None)
    else:
        choice = "mined" if args.concept_vocabulary == "auto" else args.concept_vocabulary
        vocabulary = concept_vocabulary(choice, iter_captions(dataset), args.max_concepts)
        bank = concept_bank(checkpoint.encoder, checkpoint.processor, vocabulary) if vocabulary else None
    return None if bank is None else top_concepts(scores.image_embeds, bank, args.num_concepts)


def suggested_captions(args: AuditArguments, checkpoint, dataset: datasets.Dataset, rows: list[int]) -> dict[int, str]:
    """A generated caption for each dataset row in `rows` (`{row: caption}`), or `{}` without a captioner."""
    if args.captioner_name_or_path is not None:
        captioning = load_checkpoint(args.captioner_name_or_path, "--captioner_name_or_path").to(args.device)
        if captioning.captioner is None:
            raise ValueError(
                f"--captioner_name_or_path {args.captioner_name_or_path!r} has no captioning decoder (it is a "
                f"{captioning.architecture}); pass an NLIPForCaptioning or NLIPForPreTraining checkpoint."
            )
    elif checkpoint.captioner is not None:
        captioning = checkpoint
    else:
        logger.info("No captioner (the checkpoint has no decoder and no --captioner_name_or_path): no suggested captions.")
        return {}
    if not rows:
        return {}
    captions = generate_captions(
        captioning.captioner, captioning.processor, dataset.select(rows), batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, progress=not args.disable_tqdm,
    )
    return dict(zip(rows, captions))


def dataset_rows(dataset: datasets.Dataset, indices: np.ndarray) -> list[int]:
    """The rows of `dataset` holding the examples with these `index` values."""
    row_of_index = {int(index): row for row, index in enumerate(column_values(dataset, "index"))}
    return [row_of_index[int(index)] for index in indices]


def suspicion_order(scores: PairScores) -> np.ndarray:
    """Positions of the scored pairs, most suspicious first: by noise probability, ties (e.g. at the GMM's clipped
    ends) by loss."""
    return np.lexsort((-scores.loss, -scores.noise_prob))


def build_table(
    dataset: datasets.Dataset, scores: PairScores, concepts: list[list[str]] | None, suggestions: dict[int, str]
) -> pd.DataFrame:
    """One row per scored pair, most suspicious first; `row` is the pair's row in `dataset`."""
    order = suspicion_order(scores)
    rows = dataset_rows(dataset, scores.index[order])
    texts = column_values(dataset, "text")
    table = pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1),
        "row": rows,
        "index": scores.index[order].astype(np.int64),
        "caption": [" | ".join(non_empty_captions(texts[row])) for row in rows],
        "noise_prob": scores.noise_prob[order].astype(np.float64),
        "loss": scores.loss[order].astype(np.float64),
        "similarity": scores.similarity[order].astype(np.float64),
    })
    if concepts is not None:
        table["concepts"] = [concepts[position] for position in order]
    table["suggested_caption"] = [suggestions.get(row) for row in rows]
    paths = [value.get("path") for value in
             column_values(dataset.cast_column("image", datasets.Image(decode=False)), "image")]
    if any(paths):
        table["image_file"] = [paths[row] for row in rows]
    for column in (*ID_COLUMNS, "is_noisy"):
        if column in dataset.column_names:
            values = column_values(dataset, column)
            feature = dataset.features[column]
            if isinstance(feature, datasets.ClassLabel):
                values = [feature.int2str(value) for value in values]
            table[column] = [values[row] for row in rows]
    return table


def audit_summary(table: pd.DataFrame, scores: PairScores, num_pairs: int, args: AuditArguments) -> dict[str, Any]:
    """Summary numbers of the audit, with noise-detection metrics when the `is_noisy` ground truth is known."""
    flagged = table["noise_prob"] > 0.5
    summary: dict[str, Any] = {
        "model_name_or_path": args.model_name_or_path,
        "pairs_in_data": num_pairs,
        "pairs_scored": len(table),
        "pairs_not_scored": num_pairs - len(table),
        "estimated_noisy_fraction": float(flagged.mean()),
        "estimated_noisy_pairs": int(flagged.sum()),
        "mean_noise_prob": float(table["noise_prob"].mean()),
        "mean_similarity": float(table["similarity"].mean()),
        "gmm_loss_means": list(scores.estimate.means) if scores.estimate.means else None,
        "gmm_loss_threshold": scores.estimate.loss_threshold,
        "gmm_fallback_reason": scores.estimate.reason,
        "num_negatives": min(args.num_negatives, len(table)),
        "suggested_captions": int(table["suggested_caption"].notna().sum()),
    }
    if "is_noisy" in table and table["is_noisy"].nunique() == 2:
        truth = np.array(table["is_noisy"], dtype=bool)
        detection = noise_detection_metrics(np.array(table["noise_prob"], dtype=np.float64), truth)
        top = min(args.report_rows, len(table))
        summary.update({
            "true_noisy_fraction": detection["true_noisy_fraction"],
            # Ranking quality: the table's order (noise probability, ties by loss) follows the loss.
            "roc_auc": float(roc_auc_score(truth, np.array(table["loss"]))),
            "precision": detection["precision"],
            "recall": detection["recall"],
            "f1": detection["f1"],
            f"noisy_fraction_in_top_{top}": float(truth[:top].mean()),
        })
    return summary


def thumbnail_uri(value: Any, size: int) -> str | None:
    """The image as a base64 PNG data URI, at most `size` px on its longer side (None when it cannot be decoded)."""
    image, _, _ = decode_image(value)
    if image is None:
        return None
    image = to_rgb(image).copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


REPORT_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>NLIP dataset audit: {{ dataset }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #1f2328; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; }
.meta { color: #59636e; margin-bottom: 1.5rem; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin-bottom: 1.5rem; }
.card { border: 1px solid #d1d9e0; border-radius: 6px; padding: .6rem .9rem; min-width: 9rem; }
.card .value { font-size: 1.3rem; font-weight: 600; }
.card .label { font-size: .8rem; color: #59636e; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #d1d9e0; padding: .45rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { display: block; border-radius: 4px; }
.bar { background: #eff2f5; border-radius: 3px; height: .45rem; width: 6rem; margin-top: .25rem; }
.bar span { display: block; height: 100%; border-radius: 3px; background: #cf222e; }
.suggested { color: #1a7f37; }
.concepts { color: #59636e; font-size: .9rem; }
.tag { border-radius: 1rem; padding: .05rem .5rem; font-size: .8rem; }
.tag.noisy { background: #ffebe9; color: #a40e26; }
.tag.clean { background: #dafbe1; color: #116329; }
.note { color: #59636e; font-size: .85rem; margin-top: 1rem; }
</style>
</head>
<body>
<h1>Dataset audit: {{ dataset }}</h1>
<div class="meta">Model <code>{{ summary.model_name_or_path }}</code> &middot; split <code>{{ split }}</code></div>
<div class="cards">
{% for label, value in cards %}<div class="card"><div class="value">{{ value }}</div><div class="label">{{ label }}</div></div>
{% endfor %}</div>
<table>
<thead><tr><th>#</th><th>Image</th><th>Caption</th><th>Noise prob.</th><th>Similarity</th>{% if has_concepts %}<th>Concepts</th>{% endif %}<th>Suggested caption</th>{% if has_truth %}<th>Ground truth</th>{% endif %}<th>Pair</th></tr></thead>
<tbody>
{% for row in rows %}<tr>
<td class="num">{{ row.rank }}</td>
<td>{% if row.thumbnail %}<img src="{{ row.thumbnail }}" alt="pair {{ row.index }}">{% else %}(undecodable){% endif %}</td>
<td>{{ row.caption }}</td>
<td class="num">{{ "%.3f"|format(row.noise_prob) }}<div class="bar"><span style="width: {{ (100 * row.noise_prob)|round(1) }}%"></span></div></td>
<td class="num">{{ "%.3f"|format(row.similarity) }}</td>
{% if has_concepts %}<td class="concepts">{{ row.concepts|join(", ") }}</td>{% endif %}
<td class="suggested">{{ row.suggested_caption or "" }}</td>
{% if has_truth %}<td><span class="tag {{ 'noisy' if row.is_noisy else 'clean' }}">{{ 'noisy' if row.is_noisy else 'clean' }}</span></td>{% endif %}
<td>{{ row.name }}</td>
</tr>
{% endfor %}</tbody>
</table>
<p class="note">Showing the {{ rows|length }} most suspicious of {{ summary.pairs_scored }} pairs; all are in audit.parquet / audit.csv.
Noise probability: posterior of the high-loss component of a 2-component Gaussian mixture fit to each pair's contrastive
loss against {{ summary.num_negatives }} fixed random negatives.</p>
</body>
</html>
""")


def render_report(table: pd.DataFrame, dataset: datasets.Dataset, summary: dict[str, Any], args: AuditArguments,
                  dataset_name: str) -> str:
    """The self-contained HTML report of the first `report_rows` rows of `table` (thumbnails inlined)."""
    shown = table.head(args.report_rows)
    images = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    rows = []
    for record in tqdm(shown.to_dict("records"), desc="Report thumbnails", disable=args.disable_tqdm):
        name = next((str(record[c]) for c in ("file_name", "key", "image_file") if record.get(c)), f"index {record['index']}")
        rows.append({**record, "name": name, "thumbnail": thumbnail_uri(images[int(record["row"])]["image"], args.thumbnail_size)})
    cards = [("pairs scored", f"{summary['pairs_scored']:,}"),
             ("estimated noisy fraction", f"{summary['estimated_noisy_fraction']:.1%}"),
             ("pairs flagged (p > 0.5)", f"{summary['estimated_noisy_pairs']:,}"),
             ("mean noise probability", f"{summary['mean_noise_prob']:.3f}")]
    if summary["pairs_not_scored"]:
        cards.append(("pairs not scored (broken)", f"{summary['pairs_not_scored']:,}"))
    if "roc_auc" in summary:
        top = next(key for key in summary if key.startswith("noisy_fraction_in_top_"))
        cards += [("ROC-AUC vs. ground truth", f"{summary['roc_auc']:.3f}"),
                  (f"truly noisy among the top {top.rsplit('_', 1)[-1]}", f"{summary[top]:.1%}"),
                  ("true noisy fraction", f"{summary['true_noisy_fraction']:.1%}")]
    if summary["suggested_captions"]:
        cards.append(("suggested captions", f"{summary['suggested_captions']:,}"))
    return REPORT_TEMPLATE.render(dataset=dataset_name, split=args.split, summary=summary, cards=cards, rows=rows,
                                  has_concepts="concepts" in table, has_truth="is_noisy" in table)


def write_outputs(table: pd.DataFrame, html: str, summary: dict[str, Any], output_dir: str) -> dict[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    paths = {kind: os.path.join(output_dir, name) for kind, name in (
        ("parquet", f"{TABLE_NAME}.parquet"), ("csv", f"{TABLE_NAME}.csv"), ("html", REPORT_NAME), ("summary", SUMMARY_NAME))}
    table.to_parquet(paths["parquet"], index=False)
    flat = table.copy()
    if "concepts" in flat:
        flat["concepts"] = flat["concepts"].map("; ".join)
    flat.to_csv(paths["csv"], index=False)
    with open(paths["html"], "w", encoding="utf-8") as file:
        file.write(html)
    with open(paths["summary"], "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((AuditArguments, DataArguments), prog="nlip-audit", description=DESCRIPTION)
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    if args.disable_tqdm:
        datasets.disable_progress_bars()
    set_seed(args.seed)
    checkpoint = load_checkpoint(args.model_name_or_path).to(args.device)
    if checkpoint.encoder is None:
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r} is a captioner only ({checkpoint.architecture}); "
            "nlip-audit scores pairs with a dual encoder: pass an NLIPModel, NLIPForPreTraining or CLIP checkpoint "
            "(and the captioner as --captioner_name_or_path)."
        )
    data = load_pairs(data_args, noise_split=args.split)
    dataset = data.split(args.split)
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("nlip-audit needs map-style data to look pairs up: drop --streaming.")

    scores = score_pairs(checkpoint.encoder, checkpoint.processor, dataset, num_negatives=args.num_negatives,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.disable_tqdm)
    concepts = retrieved_concepts(checkpoint, dataset, scores, args)
    order = suspicion_order(scores)
    flagged = order[scores.noise_prob[order] >= args.suggest_threshold][: args.max_suggestions]
    candidates = dataset_rows(dataset, scores.index[flagged])
    suggestions = suggested_captions(args, checkpoint, dataset, candidates)
    table = build_table(dataset, scores, concepts, suggestions)
    summary = audit_summary(table, scores, len(dataset), args)
    html = render_report(table, dataset, summary, args, data.name)
    paths = write_outputs(table, html, summary, args.output_dir)

    print(f"Audited {summary['pairs_scored']} pairs of {data.name} ({args.split}) with {args.model_name_or_path}")
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"  {key:<32} {value:.4f}")
    columns = [c for c in ("rank", "noise_prob", "similarity", "caption", "suggested_caption", "is_noisy") if c in table]
    print("Most suspicious pairs:")
    print(table[columns].head(10).to_string(index=False, max_colwidth=48))
    print("Wrote " + ", ".join(paths.values()))
    report = {"summary": summary, "paths": paths}
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
