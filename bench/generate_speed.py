"""Caption generation speed of `NLIPForCaptioning`, with and without the KV cache (not a test).

A small captioner (4-layer, 128-dim BERT decoder with cross-attention; 2-layer, 128-dim CLIP ViT on 32-px images)
generates `--new-tokens` tokens (forced: `min_new_tokens`) greedily for a batch of `--batch-size` images after a
5-concept prefix. Reports generated tokens per second (batch × new tokens / wall time, median of `--repeats` runs after
one warm-up) and checks that both modes produce the same tokens. Prints a JSON summary and writes it to
`bench/results/generate_speed.json`.

    python bench/generate_speed.py [--device cpu] [--batch-size 8] [--new-tokens 20] [--threads 2]

With so small a model and 20 tokens, a decoding step is dominated by per-step overhead, so the cache gains little;
the gap grows with the sequence (`--new-tokens 100`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from modeling_nlip import NLIPConfig, NLIPForCaptioning

VOCAB_SIZE, PAD, BOS, EOS = 1000, 0, 2, 3


def build_model(layers: int, hidden: int, device: str) -> NLIPForCaptioning:
    tower = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 32)
    config = NLIPConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, num_hidden_layers=2, **tower),
        text_config=dict(model_type="clip_text_model", vocab_size=VOCAB_SIZE, num_hidden_layers=2, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS, **tower),
        decoder_config=dict(model_type="bert", vocab_size=VOCAB_SIZE, num_hidden_layers=layers, is_decoder=True,
                            add_cross_attention=True, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS,
                            eos_token_id=EOS, **tower),
        projection_dim=64,
    )
    torch.manual_seed(0)
    return NLIPForCaptioning(config).to(device).eval()


def time_generate(model, pixel_values, concepts, new_tokens: int, use_cache: bool, repeats: int) -> tuple[list[float], torch.Tensor]:
    kwargs = dict(pixel_values=pixel_values, concept_input_ids=concepts, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, use_cache=use_cache, do_sample=False)
    model.generate(**kwargs)  # warm-up
    times, sequences = [], None
    for _ in range(repeats):
        if pixel_values.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sequences = model.generate(**kwargs)
        if pixel_values.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, sequences


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--concept-tokens", type=int, default=10, help="concept prefix length (5 concepts + separators)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.layers, args.hidden, args.device)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(args.device)
    concepts = torch.randint(4, VOCAB_SIZE, (args.batch_size, args.concept_tokens), generator=generator).to(args.device)

    results, outputs = {}, {}
    for use_cache in (True, False):
        times, outputs[use_cache] = time_generate(model, pixel_values, concepts, args.new_tokens, use_cache, args.repeats)
        median = statistics.median(times)
        results["with_cache" if use_cache else "without_cache"] = {
            "median_seconds": round(median, 4),
            "tokens_per_second": round(args.batch_size * args.new_tokens / median, 1),
            "runs_seconds": [round(t, 4) for t in times],
        }
    summary = {
        "benchmark": "NLIPForCaptioning.generate greedy tokens/s",
        "decoder": f"bert {args.layers} layers x {args.hidden} dim, cross-attention to 17 image tokens",
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "concept_prefix_tokens": args.concept_tokens,
        **results,
        "cache_speedup": round(results["with_cache"]["tokens_per_second"] / results["without_cache"]["tokens_per_second"], 2),
        "same_tokens": outputs[True].tolist() == outputs[False].tolist(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    print(json.dumps(summary, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
