"""Smoke demo: build a small NLIP model, save it, reload it (Auto classes and remote code), run zero-shot on real photos.

The model is UNTRAINED: the scores show that the plumbing works, not that the model knows anything.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from PIL import Image
from skimage import data as skdata
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, CLIPImageProcessorPil, PreTrainedTokenizerFast, pipeline

from modeling_nlip import NLIPConfig, NLIPModel, NLIPProcessor

LABELS = ["astronaut", "coffee", "cat", "rocket"]


def build_processor() -> NLIPProcessor:
    words = "[PAD] [UNK] [BOS] [EOS] a an the of this is photo picture . astronaut coffee cat rocket".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=16)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return NLIPProcessor(image_processor=image_processor, tokenizer=fast)


def main() -> None:
    torch.manual_seed(0)
    processor = build_processor()
    config = NLIPConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=dict(model_type="clip_text_model", vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        projection_dim=32,
    )
    model = NLIPModel(config)
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee()), Image.fromarray(skdata.chelsea()),
              Image.fromarray(skdata.rocket())]
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        print(f"saved checkpoint: {sorted(os.listdir(checkpoint))}")
        reloaded = AutoModel.from_pretrained(checkpoint)
        print(f"AutoModel.from_pretrained -> {type(reloaded).__name__}")
        remote = textwrap.dedent(f"""
            import sys; sys.modules["modeling_nlip"] = None
            from transformers import AutoModel
            m = AutoModel.from_pretrained({checkpoint!r}, trust_remote_code=True)
            print(type(m).__module__ + "." + type(m).__name__)
        """)
        out = subprocess.run([sys.executable, "-c", remote], capture_output=True, text=True, check=True)
        print(f"remote code (package not importable) -> {out.stdout.strip().splitlines()[-1]}")
        classifier = pipeline("zero-shot-image-classification", model=checkpoint)
        results = classifier(images, candidate_labels=LABELS)
    print("\nzero-shot scores of an UNTRAINED model (plumbing check, not accuracy):")
    for name, result in zip(["astronaut", "coffee", "chelsea (cat)", "rocket"], results):
        print(f"  {name:14s} " + json.dumps({r["label"]: round(r["score"], 3) for r in result}))


if __name__ == "__main__":
    main()
