"""Caption a folder of images with an NLIP captioner, with the concepts it retrieved for each (`nlip-caption`).

    nlip-caption --model_name_or_path outputs/nlip-pretrain --image_dir photos/ --output_file captions.jsonl

Images are found recursively (common extensions, case-insensitive); files that cannot be decoded are reported and
skipped (they appear in the output with an `error` and no caption). Writes JSON Lines (`.jsonl`) or CSV (`.csv`), by
the extension of --output_file, and prints each caption.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from nlip_cli.cli import add_version_argument, parse_command_line
from nlip_cli.evaluate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_BEAMS
from trainers.models import load_checkpoint
from trainers.data.pairs import to_rgb

logger = logging.getLogger("nlip.caption")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
OUTPUT_FORMATS = (".jsonl", ".csv")
DESCRIPTION = (
    "Caption every image of a folder (recursively) with an NLIP captioner (NLIPForCaptioning or NLIPForPreTraining "
    "checkpoint), listing the concepts retrieved for each image; writes JSON Lines or CSV."
)


@dataclass
class CaptionArguments:
    """Which captioner, which images, how to generate and where to write."""

    model_name_or_path: str = field(
        metadata={"help": "Captioner checkpoint (folder or Hub id): NLIPForCaptioning, or NLIPForPreTraining (e.g. "
                          "nlip-train --model_type pretraining)."}
    )
    image_dir: str = field(metadata={"help": f"Folder of images, searched recursively for {list(IMAGE_EXTENSIONS)}."})
    output_file: str = field(
        default="captions.jsonl",
        metadata={"help": f"Where to write the captions; the extension picks the format: {list(OUTPUT_FORMATS)}."},
    )
    batch_size: int = field(default=16, metadata={"help": "Images captioned per generate() call."})
    num_beams: int = field(
        default=DEFAULT_NUM_BEAMS,
        metadata={"help": "Beam width (1: greedy decoding); the same default in nlip-caption, nlip-eval and nlip-audit."},
    )
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "The most tokens of a caption."})
    num_concepts: int = field(
        default=5,
        metadata={"help": "Concepts retrieved from the model's concept bank and listed per image (0: none). Whether "
                          "they condition the caption is the checkpoint's setting (config.num_concepts)."},
    )
    prompt: str | None = field(default=None, metadata={"help": "Text every caption continues, e.g. 'a photo of'."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling, if generation samples)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    quiet: bool = field(default=False, metadata={"help": "Do not print each caption."})

    def __post_init__(self):
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"--image_dir {self.image_dir!r} is not an existing folder.")
        if Path(self.output_file).suffix.lower() not in OUTPUT_FORMATS:
            raise ValueError(f"--output_file {self.output_file!r} must end with one of {list(OUTPUT_FORMATS)}.")
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_concepts < 0:
            raise ValueError(f"--num_concepts must be >= 0, got {self.num_concepts}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def find_images(image_dir: str) -> list[Path]:
    """Image files under `image_dir` (recursive, by extension, case-insensitive), sorted."""
    files = sorted(p for p in Path(image_dir).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--image_dir {image_dir!r} holds no image files (looked for {list(IMAGE_EXTENSIONS)}).")
    return files


def open_image(path: Path) -> tuple[PIL.Image.Image | None, str | None]:
    """The decoded RGB image, or `(None, error)` when the file is corrupt or not an image."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return to_rgb(image), None
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:  # PIL: SyntaxError = bad PNG
        return None, f"{type(err).__name__}: {err}"


@torch.no_grad()
def caption_images(captioner, processor, files: list[Path], args: CaptionArguments) -> list[dict[str, Any]]:
    """One record per file: `file`, `caption` and `concepts` (with their similarities), or `error`."""
    records: list[dict[str, Any]] = []
    use_bank = args.num_concepts > 0 and getattr(captioner, "has_concept_bank", False)
    if args.num_concepts > 0 and not use_bank:
        logger.info("The checkpoint has no concept bank: no concepts are listed.")
    root = Path(args.image_dir)
    for start in tqdm(range(0, len(files), args.batch_size), desc="Captioning", disable=args.disable_tqdm):
        batch, images = [], []
        for path in files[start : start + args.batch_size]:
            image, error = open_image(path)
            record = {"file": path.relative_to(root).as_posix()}
            if image is None:
                logger.warning("Skipping %s: cannot decode it (%s).", path, error)
                records.append({**record, "caption": None, "concepts": [], "error": error})
                continue
            batch.append(record)
            images.append(image)
        if not images:
            continue
        captions = captioner.caption(images, processor, prompt=args.prompt, num_beams=args.num_beams,
                                     max_new_tokens=args.max_new_tokens)
        concepts = [[] for _ in images]
        if use_bank:
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(captioner.device, captioner.dtype)
            names, scores = captioner.retrieve_concepts(pixel_values, top_k=args.num_concepts)
            concepts = [[{"concept": n, "score": round(float(s), 4)} for n, s in zip(row, row_scores)]
                        for row, row_scores in zip(names, scores.tolist())]
        records.extend({**record, "caption": caption, "concepts": found, "error": None}
                       for record, caption, found in zip(batch, captions, concepts))
    return records


def write_records(records: list[dict[str, Any]], output_file: str) -> None:
    """JSON Lines (concepts as objects) or CSV (concepts as 'name (score); ...')."""
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8", newline="") as file:
        if output_file.lower().endswith(".jsonl"):
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        writer = csv.DictWriter(file, fieldnames=["file", "caption", "concepts", "error"])
        writer.writeheader()
        for record in records:
            concepts = "; ".join(f"{c['concept']} ({c['score']:.3f})" for c in record["concepts"])
            writer.writerow({**record, "concepts": concepts})


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_version_argument(HfArgumentParser(CaptionArguments, prog="nlip-caption", description=DESCRIPTION))
    (args,), _ = parse_command_line(parser, argv)
    set_seed(args.seed)
    files = find_images(args.image_dir)
    checkpoint = load_checkpoint(args.model_name_or_path).to(args.device)
    if checkpoint.captioner is None:
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r} is a {checkpoint.architecture} without a captioning "
            "decoder; nlip-caption needs an NLIPForCaptioning or NLIPForPreTraining checkpoint (nlip-train "
            "--model_type pretraining)."
        )
    records = caption_images(checkpoint.captioner, checkpoint.processor, files, args)
    write_records(records, args.output_file)
    failed = [record for record in records if record["error"]]
    if not args.quiet:
        for record in records:
            concepts = ", ".join(c["concept"] for c in record["concepts"])
            text = record["caption"] if record["error"] is None else f"(skipped: {record['error']})"
            print(f"{record['file']}: {text}" + (f"  [{concepts}]" if concepts else ""))
    print(f"Captioned {len(records) - len(failed)} of {len(records)} images ({len(failed)} skipped); "
          f"wrote {args.output_file}")
    report = {"output_file": args.output_file, "num_images": len(records), "num_captioned": len(records) - len(failed),
              "skipped": [record["file"] for record in failed], "records": records}
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
