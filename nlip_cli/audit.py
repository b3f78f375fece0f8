"""Audit a dataset with a trained model: which image-text pairs are likely mismatched, and what they show (`nlip-audit`).

    nlip-audit --model_name_or_path outputs/nlip-pretrain --train_dir crawled_pairs/ --output_dir audit/

Every pair is scored (see `trainers/noise/pair_scoring.py`): the cosine similarity of its image and caption, its contrastive
loss against one fixed random set of negatives, and the noise probability a 2-component GMM over those losses gives
it; with `--neighbours k` also the caption agreement of its k nearest images (`neighbour_agreement`, alignment-free,
see `trainers/noise/reference_prior.py`). The image's top concepts are retrieved from the model's concept bank (or a
mined/given vocabulary), and pairs flagged as likely noisy get a suggested caption when a captioner is available (the
checkpoint itself when it has a decoder, or --captioner_name_or_path). Each suggested caption is scored like the
original one (its similarity to the image under the scoring model), so the report shows whether it fits the image
better.

Writes into --output_dir:

- `audit.parquet`: one row per pair, most suspicious first, with the pair's image as a `datasets.Image` feature
  (`datasets.load_dataset("parquet", data_files="audit/audit.parquet")` gives the images back; `--export_images
  false` leaves them out); `audit.csv`: the same without images (cells that a spreadsheet would run as a formula are
  prefixed with a quote);
- `audit_report.html`: one self-contained page (no network access: images, plot and script are inlined) with the
  summary, the loss distribution with the fitted mixture, and the most suspicious pairs in a table that sorts (click a
  header), filters (noise probability, ground truth, suggested captions) and searches; click an image to enlarge it;
- `audit_loss_distribution.png` (the plot) and `audit_summary.json`.
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

from nlip_cli.cli import add_version_argument, parse_command_line
from nlip_cli.audit_report import REPORT_HTML
from trainers.data.sources import SPLITS, DataArguments, iter_captions, load_pairs
from nlip_cli.evaluate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_BEAMS, generate_captions
from trainers.models import concept_vocabulary, load_checkpoint
from trainers.noise.pair_scoring import PairScores, concept_bank, score_pairs, top_concepts
from trainers.data.pairs import column_values, decode_image, non_empty_captions, to_rgb
from trainers.evaluation.embeddings import compute_text_embeddings
from trainers.evaluation.metrics import noise_detection_metrics
from trainers.noise.plot import plot_loss_distribution
from trainers.noise.reference_prior import neighbour_agreement

logger = logging.getLogger("nlip.audit")

DESCRIPTION = (
    "Score every image-text pair of a dataset with a trained NLIP/CLIP model (noise probability, similarity, "
    "retrieved concepts, a suggested caption for likely-noisy pairs) and write a Parquet/CSV table and a "
    "self-contained HTML report listing the most suspicious pairs first."
)
# Columns copied from the data into the table when present: they tell the user which file a pair is.
ID_COLUMNS = ("file_name", "key", "category", "label", "emoji")
TABLE_NAME, REPORT_NAME, SUMMARY_NAME = "audit", "audit_report.html", "audit_summary.json"
PLOT_NAME = "audit_loss_distribution.png"
# First characters that make a spreadsheet read a CSV cell as a formula (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


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
    num_beams: int = field(
        default=DEFAULT_NUM_BEAMS,
        metadata={"help": "Beam width of the suggested captions (1: greedy); the same default in nlip-caption, "
                          "nlip-eval and nlip-audit."},
    )
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "The most tokens of a suggested caption."})
    report_rows: int = field(
        default=200, metadata={"help": "Pairs shown in the HTML report, most suspicious first (the tables hold all)."}
    )
    thumbnail_size: int = field(default=96, metadata={"help": "Longest side of the report's thumbnails, in pixels."})
    enlarged_size: int = field(
        default=384,
        metadata={"help": "Longest side, in pixels, of the image embedded per report row and shown when it is clicked "
                          "(smaller images are shown scaled up)."},
    )
    export_images: bool = field(
        default=True,
        metadata={"help": "Store each pair's image in audit.parquet as a datasets Image feature (False: a smaller "
                          "table without images)."},
    )
    neighbours: int = field(
        default=0,
        metadata={"help": "Also score each pair by the caption agreement of its k nearest images (the mean cosine of "
                          "its caption with theirs; low: suspicious; it needs no image-text alignment; an exact "
                          "O(N²) search): the neighbour_agreement column, and its ROC-AUC in the summary when the "
                          "ground truth is known. 0: off."},
    )
    batch_size: int = field(default=64, metadata={"help": "Pairs per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Seed of the negative set and of the noise GMM."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {list(SPLITS)}, got {self.split!r}.")
        if not 0.0 <= self.suggest_threshold <= 1.0:
            raise ValueError(f"--suggest_threshold must be in [0, 1], got {self.suggest_threshold}.")
        for name in ("num_negatives", "report_rows", "thumbnail_size", "enlarged_size", "batch_size", "num_beams",
                     "max_new_tokens", "max_concepts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("num_concepts", "max_suggestions", "neighbours"):
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


def load_captioner(args: AuditArguments, checkpoint):
    """The checkpoint that writes suggested captions (`--captioner_name_or_path`, else the audited one when it has a
    decoder) and its name, or `(None, None)`."""
    if args.captioner_name_or_path is not None:
        captioning = load_checkpoint(args.captioner_name_or_path, "--captioner_name_or_path").to(args.device)
        if captioning.captioner is None:
            raise ValueError(
                f"--captioner_name_or_path {args.captioner_name_or_path!r} has no captioning decoder (it is a "
                f"{captioning.architecture}); pass an NLIPForCaptioning or NLIPForPreTraining checkpoint."
            )
        return captioning, args.captioner_name_or_path
    if checkpoint.captioner is not None:
        return checkpoint, args.model_name_or_path
    logger.info("No captioner (the checkpoint has no decoder and no --captioner_name_or_path): no suggested captions.")
    return None, None


def suggested_captions(args: AuditArguments, captioning, dataset: datasets.Dataset, rows: list[int]) -> dict[int, str]:
    """A generated caption for each dataset row in `rows` (`{row: caption}`), or `{}` without a captioner."""
    if captioning is None or not rows:
        return {}
    captions = generate_captions(
        captioning.captioner, captioning.processor, dataset.select(rows), batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, progress=not args.disable_tqdm,
    )
    return dict(zip(rows, captions))


def suggestion_similarities(checkpoint, scores: PairScores, dataset: datasets.Dataset, suggestions: dict[int, str],
                            args: AuditArguments) -> dict[int, float]:
    """`{row: cosine similarity of the suggested caption and the row's image}` under the scoring model, comparable
    with the `similarity` of the pair's own caption."""
    if not suggestions:
        return {}
    rows = list(suggestions)
    texts = compute_text_embeddings(checkpoint.encoder, [suggestions[row] for row in rows], checkpoint.processor,
                                    batch_size=args.batch_size, progress=False)
    indices = np.asarray(column_values(dataset, "index"), dtype=np.int64)[rows]
    positions = np.searchsorted(scores.index, indices)
    images = scores.image_embeds[torch.as_tensor(positions)].float()
    return dict(zip(rows, (images * texts.to(images.device)).sum(-1).tolist()))


def dataset_rows(dataset: datasets.Dataset, indices: np.ndarray) -> list[int]:
    """The rows of `dataset` holding the examples with these `index` values."""
    row_of_index = {int(index): row for row, index in enumerate(column_values(dataset, "index"))}
    return [row_of_index[int(index)] for index in indices]


def suspicion_order(scores: PairScores) -> np.ndarray:
    """Positions of the scored pairs, most suspicious first: by noise probability, ties (e.g. at the GMM's clipped
    ends) by loss."""
    return np.lexsort((-scores.loss, -scores.noise_prob))


def relative_path(path: str | None, roots: list[str]) -> str | None:
    """`path` relative to the first of `roots` (the data folders) holding it; unchanged when none does."""
    if not path:
        return None
    absolute = os.path.abspath(path)
    for root in roots:
        root = os.path.abspath(root)
        if os.path.commonpath([absolute, root]) == root:
            return os.path.relpath(absolute, root).replace(os.sep, "/")
    return path


def data_roots(data_args: DataArguments) -> list[str]:
    """Folders that image paths are shown relative to: --eval_dir, --train_dir, a local --dataset_name folder."""
    candidates = [getattr(data_args, name, None) for name in ("eval_dir", "train_dir", "dataset_name")]
    return [path for path in candidates if path and os.path.isdir(path)]


def build_table(
    dataset: datasets.Dataset,
    scores: PairScores,
    concepts: list[list[str]] | None,
    suggestions: dict[int, str],
    suggestion_scores: dict[int, float] | None = None,
    roots: list[str] | None = None,
    agreement: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per scored pair, most suspicious first; `row` is the pair's row in `dataset`. Pairs without a
    suggested caption hold None (not NaN) there. `agreement`: each scored pair's neighbour agreement (rows as in
    `scores`), the `neighbour_agreement` column."""
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
    if agreement is not None:
        table["neighbour_agreement"] = np.asarray(agreement, dtype=np.float64)[order]
    if concepts is not None:
        table["concepts"] = [concepts[position] for position in order]
    table["suggested_caption"] = pd.Series([suggestions.get(row) for row in rows], dtype=object)
    suggestion_scores = suggestion_scores or {}
    suggested = np.array([suggestion_scores.get(row, np.nan) for row in rows], dtype=np.float64)
    table["suggested_similarity"] = suggested
    table["similarity_gain"] = suggested - table["similarity"].to_numpy()
    paths = [value.get("path") for value in
             column_values(dataset.cast_column("image", datasets.Image(decode=False)), "image")]
    if any(paths):
        table["image_file"] = pd.Series([relative_path(paths[row], roots or []) for row in rows], dtype=object)
    for column in (*ID_COLUMNS, "is_noisy"):
        if column in dataset.column_names:
            values = column_values(dataset, column)
            feature = dataset.features[column]
            if isinstance(feature, datasets.ClassLabel):
                values = [feature.int2str(value) for value in values]
            table[column] = [values[row] for row in rows]
    return table


def audit_summary(table: pd.DataFrame, scores: PairScores, num_pairs: int, args: AuditArguments,
                  captioner_name: str | None = None, architectures: dict[str, str] | None = None) -> dict[str, Any]:
    """Summary numbers of the audit, with noise-detection metrics when the `is_noisy` ground truth is known."""
    flagged = table["noise_prob"] > 0.5
    with_suggestion = table["suggested_caption"].notna()
    gains = table.loc[with_suggestion, "similarity_gain"].dropna()
    architectures = architectures or {}
    summary: dict[str, Any] = {
        "model_name_or_path": args.model_name_or_path,
        "scorer": {"name_or_path": args.model_name_or_path, "architecture": architectures.get("scorer")},
        "captioner": ({"name_or_path": captioner_name, "architecture": architectures.get("captioner"),
                       "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
                      if captioner_name else None),
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
        "suggested_captions": int(with_suggestion.sum()),
        "suggested_captions_more_similar": int((gains > 0).sum()),
        "mean_similarity_gain_of_suggestions": float(gains.mean()) if len(gains) else None,
    }
    if "is_noisy" in table and table["is_noisy"].nunique() == 2:
        truth = np.array(table["is_noisy"], dtype=bool)
        detection = noise_detection_metrics(np.array(table["noise_prob"], dtype=np.float64), truth)
        summary.update({
            "true_noisy_fraction": detection["true_noisy_fraction"],
            # Ranking quality: the table's order (noise probability, ties by loss) follows the loss.
            "roc_auc": float(roc_auc_score(truth, np.array(table["loss"]))),
            "precision": detection["precision"],
            "recall": detection["recall"],
            "f1": detection["f1"],
        })
        if "neighbour_agreement" in table:  # low agreement: suspicious
            summary["neighbour_roc_auc"] = float(roc_auc_score(truth, -np.array(table["neighbour_agreement"])))
        top = min(args.report_rows, len(table))
        if top < len(table):  # with every pair shown, "noisy among the top N" is the true noisy fraction again
            summary[f"noisy_fraction_in_top_{top}"] = float(truth[:top].mean())
    return summary


def image_uri(value: Any, size: int) -> str | None:
    """The image as a base64 data URI (PNG, or JPEG for photos larger than 64 px), at most `size` px on its longer
    side (None when it cannot be decoded)."""
    image, _, _ = decode_image(value)
    if image is None:
        return None
    image = to_rgb(image).copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    kind = "png" if max(image.size) <= 64 else "jpeg"
    image.save(buffer, format=kind.upper(), **({"quality": 88} if kind == "jpeg" else {}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# Kept for callers of the previous name.
def thumbnail_uri(value: Any, size: int) -> str | None:
    return image_uri(value, size)


def _known(value: Any) -> Any:
    """None for missing values (None, NaN, pandas NA), the value otherwise: what the report template may print."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):
        return value


REPORT_TEMPLATE = jinja2.Environment(autoescape=True).from_string(REPORT_HTML)


def _plot_uri(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as file:
        return "data:image/png;base64," + base64.b64encode(file.read()).decode("ascii")


def _cards(summary: dict[str, Any]) -> list[tuple[str, str]]:
    cards = [("pairs scored", f"{summary['pairs_scored']:,}"),
             ("estimated noisy fraction", f"{summary['estimated_noisy_fraction']:.1%}"),
             ("pairs flagged (p > 0.5)", f"{summary['estimated_noisy_pairs']:,}"),
             ("mean noise probability", f"{summary['mean_noise_prob']:.3f}")]
    skipped = _skipped_block(summary)
    not_scored = max(summary["pairs_not_scored"], skipped["total"] if skipped else 0)
    if not_scored:
        cards.append(("pairs not scored (broken, see below)", f"{not_scored:,}"))
    if "roc_auc" in summary:
        cards.append(("ROC-AUC vs. ground truth", f"{summary['roc_auc']:.3f}"))
        top = next((key for key in summary if key.startswith("noisy_fraction_in_top_")), None)
        if top is not None:
            cards.append((f"truly noisy among the top {top.rsplit('_', 1)[-1]}", f"{summary[top]:.1%}"))
        cards.append(("true noisy fraction", f"{summary['true_noisy_fraction']:.1%}"))
        if "neighbour_roc_auc" in summary:
            cards.append(("neighbour-agreement ROC-AUC", f"{summary['neighbour_roc_auc']:.3f}"))
    if summary["suggested_captions"]:
        cards.append(("suggested captions", f"{summary['suggested_captions']:,}"))
        cards.append(("suggestions closer to the image than the caption",
                      f"{summary['suggested_captions_more_similar']:,} of {summary['suggested_captions']:,}"))
    return cards


def _skipped_block(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The load-time skip counts (`summary["skipped_pairs"]`: reason -> count, plus `files`), or None when there are
    none to show."""
    skipped = summary.get("skipped_pairs")
    if not isinstance(skipped, dict):
        return None
    reasons = [(str(reason), int(count)) for reason, count in skipped.items()
               if reason != "files" and isinstance(count, (int, float)) and not isinstance(count, bool) and count > 0]
    files = [str(path) for path in skipped.get("files") or []]
    if not reasons and not files:
        return None
    return {"reasons": reasons, "total": sum(count for _, count in reasons), "files": files}


def render_report(table: pd.DataFrame, dataset: datasets.Dataset, summary: dict[str, Any], args: AuditArguments,
                  dataset_name: str, plot_path: str | None = None) -> str:
    """The self-contained HTML report of the first `report_rows` rows of `table` (images, plot and script inlined)."""
    shown = table.head(args.report_rows)
    images = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    rows = []
    for record in tqdm(shown.to_dict("records"), desc="Report images", disable=args.disable_tqdm):
        record = {key: _known(value) for key, value in record.items()}
        name = next((str(record[c]) for c in ("file_name", "key", "image_file") if record.get(c)), f"index {record['index']}")
        rows.append({**record, "name": name, "image": image_uri(images[int(record["row"])]["image"], args.enlarged_size)})
    has_truth = "is_noisy" in table
    return REPORT_TEMPLATE.render(
        dataset=dataset_name, split=args.split, summary=summary, cards=_cards(summary), rows=rows,
        has_concepts="concepts" in table, has_truth=has_truth, has_suggestions=bool(summary["suggested_captions"]),
        thumbnail_size=args.thumbnail_size, plot=_plot_uri(plot_path), skipped=_skipped_block(summary),
        all_shown=len(rows) == len(table),
    )


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (starting with = + - @, tab or carriage return) prefixed
    with a single quote, as OWASP recommends against CSV injection; other values unchanged."""
    if isinstance(value, str) and value[:1] in FORMULA_PREFIXES:
        return "'" + value
    return value


def table_dataset(table: pd.DataFrame, dataset: datasets.Dataset) -> datasets.Dataset:
    """The table as a `datasets.Dataset` with each pair's image (encoded bytes) as an `Image` feature."""
    images = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    values = []
    for row, path in zip(table["row"], table.get("image_file", [None] * len(table))):
        value = dict(images[int(row)]["image"] or {})
        data = value.get("bytes")
        if data is None and value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as file:
                data = file.read()
        values.append({"bytes": data, "path": _known(path) or None} if data is not None else None)
    frame = table.copy()
    for column in frame.columns:
        if frame[column].dtype == object or str(frame[column].dtype).startswith(("string", "str")):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    exported = datasets.Dataset.from_pandas(frame, preserve_index=False)
    return exported.add_column("image", values, feature=datasets.Image())


def write_outputs(table: pd.DataFrame, html: str, summary: dict[str, Any], output_dir: str,
                  dataset: datasets.Dataset | None = None) -> dict[str, str]:
    """Write the Parquet table (with images when `dataset` is given), the CSV, the report and the summary."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {kind: os.path.join(output_dir, name) for kind, name in (
        ("parquet", f"{TABLE_NAME}.parquet"), ("csv", f"{TABLE_NAME}.csv"), ("html", REPORT_NAME), ("summary", SUMMARY_NAME))}
    if dataset is not None:
        table_dataset(table, dataset).to_parquet(paths["parquet"])
    else:
        table.to_parquet(paths["parquet"], index=False)
    flat = table.copy()
    if "concepts" in flat:
        flat["concepts"] = flat["concepts"].map(lambda names: "; ".join(names) if isinstance(names, (list, tuple, np.ndarray)) else names)
    for column in flat.columns:
        if not pd.api.types.is_numeric_dtype(flat[column]) or pd.api.types.is_bool_dtype(flat[column]):
            flat[column] = flat[column].astype(object).map(csv_safe)
    # RFC 4180 line ends: a caption holding a carriage return is then quoted, not split across rows
    flat.to_csv(paths["csv"], index=False, lineterminator="\r\n")
    with open(paths["html"], "w", encoding="utf-8") as file:
        file.write(html)
    with open(paths["summary"], "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_version_argument(
        HfArgumentParser((AuditArguments, DataArguments), prog="nlip-audit", description=DESCRIPTION)
    )
    (args, data_args), _ = parse_command_line(parser, argv)
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
    data = load_pairs(data_args, noise_split=args.split, splits=(args.split,))
    dataset = data.split(args.split)
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("nlip-audit needs map-style data to look pairs up: drop --streaming.")

    scores = score_pairs(checkpoint.encoder, checkpoint.processor, dataset, num_negatives=args.num_negatives,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.disable_tqdm)
    agreement = None
    if args.neighbours:
        if args.neighbours >= len(scores.index):
            raise ValueError(f"--neighbours {args.neighbours} needs more scored pairs than that; the {args.split} "
                             f"split has {len(scores.index)}.")
        agreement = neighbour_agreement(scores.image_embeds, scores.text_embeds, args.neighbours).numpy()
    concepts = retrieved_concepts(checkpoint, dataset, scores, args)
    order = suspicion_order(scores)
    flagged = order[scores.noise_prob[order] >= args.suggest_threshold][: args.max_suggestions]
    candidates = dataset_rows(dataset, scores.index[flagged])
    captioning, captioner_name = load_captioner(args, checkpoint)
    suggestions = suggested_captions(args, captioning, dataset, candidates)
    suggestion_scores = suggestion_similarities(checkpoint, scores, dataset, suggestions, args)
    table = build_table(dataset, scores, concepts, suggestions, suggestion_scores, data_roots(data_args), agreement)
    architectures = {"scorer": checkpoint.architecture,
                     "captioner": captioning.architecture if captioning is not None else None}
    summary = audit_summary(table, scores, len(dataset), args, captioner_name, architectures)
    # The pairs the loader left out (missing / undecodable / too large images, empty captions, unlisted images,
    # truncated shards): reason -> count, plus the broken files.
    report = data.skip_reports.get(args.split)
    summary["skipped_pairs"] = report.to_dict() if report is not None else {"files": []}
    os.makedirs(args.output_dir, exist_ok=True)
    plot_path = os.path.join(args.output_dir, PLOT_NAME)
    truth = np.asarray(column_values(dataset, "is_noisy"), dtype=bool)[dataset_rows(dataset, scores.index)] \
        if "is_noisy" in dataset.column_names else None
    plot_loss_distribution(scores.loss, scores.estimate, plot_path, is_noisy=truth,
                           title=f"Per-pair loss against {summary['num_negatives']} fixed negatives and the fitted GMM",
                           xlabel="per-pair contrastive loss")
    html = render_report(table, dataset, summary, args, data.name, plot_path)
    paths = write_outputs(table, html, summary, args.output_dir, dataset if args.export_images else None)
    paths["plot"] = plot_path

    print(f"Audited {summary['pairs_scored']} pairs of {data.name} ({args.split}) with {args.model_name_or_path}")
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"  {key:<36} {value:.4f}")
    columns = [c for c in ("rank", "noise_prob", "similarity", "caption", "suggested_caption", "is_noisy") if c in table]
    print("Most suspicious pairs:")
    print(table[columns].head(10).to_string(index=False, max_colwidth=48))
    print("Wrote " + ", ".join(paths.values()))
    report = {"summary": summary, "paths": paths}
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
