"""Convert a transformers `CLIPModel` checkpoint (+ its processor) into an `NLIPModel` checkpoint (`nlip-convert`).

    nlip-convert --clip_model openai/clip-vit-base-patch32 --output_dir clip-b32-nlip

The converted model gives the same image and text embeddings as the CLIP model; the command checks that on a few
inputs and prints the largest difference.
"""

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, HfArgumentParser

from modeling_nlip import convert_clip_processor, convert_clip_to_nlip
from nlip_cli.cli import add_version_argument
from modeling_nlip.conversion_clip import embedding_parity

logger = logging.getLogger("nlip.convert")


@dataclass
class ConvertArguments:
    clip_model: str = field(metadata={"help": "Local folder or Hub id of a transformers CLIPModel checkpoint."})
    output_dir: str = field(metadata={"help": "Folder to write the NLIPModel checkpoint (weights, config, code, processor) to."})
    tolerance: float = field(
        default=1e-5, metadata={"help": "Largest allowed absolute embedding difference between CLIP and NLIP; above it the command fails."}
    )
    skip_processor: bool = field(default=False, metadata={"help": "Do not convert the processor (checkpoints that ship none)."})


def parity_inputs(processor: CLIPProcessor) -> dict:
    """Two random images and two captions, processed the way the checkpoint expects."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(2)]
    return processor(images=images, text=["a photo of a cat", "a diagram"], padding=True, return_tensors="pt")


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_version_argument(HfArgumentParser(ConvertArguments, prog="nlip-convert"))
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    clip = CLIPModel.from_pretrained(args.clip_model).eval()
    nlip = convert_clip_to_nlip(clip)
    nlip.save_pretrained(args.output_dir)
    report = {"clip_model": args.clip_model, "output_dir": args.output_dir}
    if not args.skip_processor:
        processor = CLIPProcessor.from_pretrained(args.clip_model)
        convert_clip_processor(processor).save_pretrained(args.output_dir)
        with torch.no_grad():
            report.update(embedding_parity(clip, nlip, parity_inputs(processor)))
        worst = max(report["image_embeds_max_abs_diff"], report["text_embeds_max_abs_diff"])
        if worst > args.tolerance:
            raise SystemExit(f"Conversion parity failed: max abs embedding difference {worst:.2e} > tolerance {args.tolerance:.0e}.")
    print(json.dumps(report, indent=2))
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
