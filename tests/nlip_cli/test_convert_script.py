"""`nlip-convert`: a CLIP checkpoint on disk becomes an NLIP checkpoint with identical embeddings."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoProcessor, CLIPConfig, CLIPModel, CLIPProcessor

from nlip_cli.convert_clip_to_nlip import main, parity_inputs
from nlip_testing import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


def test_convert_script_round_trip(tmp_path):
    torch.manual_seed(0)
    drop_type = lambda config: {k: v for k, v in config.items() if k != "model_type"}  # noqa: E731
    clip = CLIPModel(CLIPConfig(vision_config=drop_type(tiny_vision_config()), text_config=drop_type(tiny_text_config()), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    clip_processor = CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer())
    clip_processor.save_pretrained(tmp_path / "clip")

    report = main(["--clip_model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "nlip")])
    assert report["image_embeds_max_abs_diff"] < 1e-5 and report["text_embeds_max_abs_diff"] < 1e-5

    nlip = AutoModel.from_pretrained(tmp_path / "nlip").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "nlip")
    assert type(nlip).__name__ == "NLIPModel" and type(processor).__name__ == "NLIPProcessor"
    inputs = parity_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(nlip(**inputs).text_embeds, clip.eval()(**inputs).text_embeds, atol=1e-5, rtol=0)


def test_convert_script_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(OSError):
        main(["--clip_model", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])


def test_convert_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "nlip_cli.convert_clip_to_nlip", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--clip_model", "--output_dir", "--tolerance", "--skip_processor"):
        assert option in out
    assert "CLIPModel" in out and "embedding difference" in out
