"""The main demo (`make demo`): plain CLIP vs NLIP on Fashion-MNIST with 40% of the captions shuffled.

Trains the same small model twice through `nlip-train` — a plain contrastive (`clip`) dual encoder, and NLIP
(noise-harmonised contrastive `nitc` + the concept-conditioned captioner, `--model_type pretraining`) — then prints
the zero-shot accuracy of both on the clean test split and NLIP's noise-detection ROC-AUC, writes a plot of the
per-pair loss distribution with the fitted GMM and the injected noise marked, saves the NLIP checkpoint with its model
card, and captions a few test images with `nlip-caption`. Every figure printed is measured in this run.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from nlip_cli import caption as caption_script
from nlip_cli import train as train_script
from trainers.noise.plot import plot_loss_distribution
from trainers.noise.state import NoiseState
from trainers.data.real_datasets import FASHION_MNIST_CLASSES, load_fashion_mnist


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="Where checkpoints, the plot and the summary go.")
    parser.add_argument("--train_samples", type=int, default=8000, help="Fashion-MNIST training pairs used.")
    parser.add_argument("--eval_samples", type=int, default=1000, help="Clean test images for zero-shot accuracy.")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of each run (the first is warm-up).")
    parser.add_argument("--noise_ratio", type=float, default=0.4, help="Fraction of training captions shuffled.")
    parser.add_argument("--model_size", default="tiny", help="nlip-train size preset (tiny: 2-layer 32-dim towers).")
    parser.add_argument("--num_captions", type=int, default=6, help="Test images captioned at the end.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(method: str, model_type: str, args: argparse.Namespace) -> dict:
    """One `nlip-train` run on noisy Fashion-MNIST; returns its report."""
    return train_script.main([
        "--dataset", "fashion_mnist", "--noise_ratio", str(args.noise_ratio), "--noise_seed", str(args.seed),
        "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
        "--model_size", args.model_size, "--model_type", model_type, "--method", method,
        "--num_train_epochs", str(args.epochs), "--noise_warmup_epochs", "1",
        "--per_device_train_batch_size", "64", "--learning_rate", "1e-3", "--weight_decay", "0.05",
        "--warmup_steps", "20", "--output_dir", os.path.join(args.output_dir, method),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--report_to", "none",
        "--seed", str(args.seed), "--use_cpu", "true", "--dataloader_num_workers", "0",
    ])


def metric(report: dict, fragment: str) -> float | None:
    """The first eval metric whose name contains `fragment` (e.g. 'top1')."""
    return next((v for k, v in report["eval_metrics"].items() if fragment in k), None)


def plot_noise(nlip_dir: str, args: argparse.Namespace) -> str:
    """Loss distribution of the NLIP run's loss bank, the refitted GMM and the injected-noise ground truth."""
    from trainers.noise.injection import inject_caption_noise

    state = NoiseState(0, growable=True)
    state.load(nlip_dir)
    losses = state.loss_bank.losses.numpy()
    train = inject_caption_noise(load_fashion_mnist(max_samples_per_split=args.train_samples)["train"], args.noise_ratio, seed=args.seed)
    is_noisy = np.asarray(train.with_format("numpy")["is_noisy"], dtype=bool)[: len(losses)]
    estimate = state.estimator.predict(losses)
    return plot_loss_distribution(losses, estimate, os.path.join(args.output_dir, "nlip_loss_distribution.png"),
                                  is_noisy=is_noisy, title=f"NLIP on Fashion-MNIST, {args.noise_ratio:.0%} shuffled captions")


def caption_test_images(nlip_dir: str, args: argparse.Namespace) -> list[dict]:
    """Save a few clean test images and caption them with the NLIP checkpoint."""
    folder = os.path.join(args.output_dir, "test_images")
    os.makedirs(folder, exist_ok=True)
    test = load_fashion_mnist(max_samples_per_split=args.num_captions)["test"]
    truth = {}
    for row in test:
        name = f"{row['index']:03d}_{FASHION_MNIST_CLASSES[row['label']].replace(' ', '_')}.png"
        row["image"].save(os.path.join(folder, name))
        truth[name] = FASHION_MNIST_CLASSES[row["label"]]
    report = caption_script.main(["--model_name_or_path", nlip_dir, "--image_dir", folder, "--num_beams", "3",
                                  "--output_file", os.path.join(args.output_dir, "captions.jsonl"), "--quiet", "true"])
    return [{"image": os.path.basename(r["file"]), "true_class": truth[os.path.basename(r["file"])], "caption": r["caption"],
             "concepts": [c["concept"] for c in r["concepts"]]} for r in report["records"]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    clip = train("clip", "dual", args)
    nlip = train("nlip", "pretraining", args)
    nlip_dir = nlip["output_dir"]
    plot = plot_noise(nlip_dir, args)
    captions = caption_test_images(nlip_dir, args)
    summary = {
        "data": f"Fashion-MNIST, {args.train_samples} training pairs with {args.noise_ratio:.0%} shuffled captions, "
                f"{args.eval_samples} clean test images",
        "model": f"nlip-train preset '{args.model_size}', {args.epochs} epochs, same seed for both runs",
        "zero_shot_top1": {"clip": metric(clip, "top1"), "nlip": metric(nlip, "top1")},
        "retrieval_rsum": {"clip": metric(clip, "rsum"), "nlip": metric(nlip, "rsum")},
        "nlip_noise_detection": nlip["noise_statistics"],
        "loss_distribution_plot": plot,
        "nlip_checkpoint": nlip_dir,
        "model_card": os.path.join(nlip_dir, "README.md"),
        "captions": captions,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(args.output_dir, "demo_summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2, default=float)
    print("\n================ nlip demo summary (all figures measured in this run) ================")
    print(json.dumps({k: v for k, v in summary.items() if k != "captions"}, indent=2, default=float))
    print("captions of clean test images:")
    for entry in captions:
        print(f"  [{entry['true_class']:>10}] {entry['caption']}   (concepts: {', '.join(entry['concepts'])})")
    return summary


if __name__ == "__main__":
    main()
