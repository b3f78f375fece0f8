"""What the noise-estimation mixture is fit on, chosen on the robustness settings' validation splits.

For each setting of `bench/robustness.py`, `nlip` (or `--method npc`) runs with the learning rate and settings its
robustness tuning chose (`bench/results/robustness_<setting>.json`; the grid's middle rate when there is none) at
random noise 0.4 and 0.8, seeds 0-2, with the mixture fit on:

- `latest`: each pair's latest loss (the default, NLIP's and NPC's choice);
- `average 0.5`, `average 0.8`: an exponential moving average of each pair's loss over the fits
  (`--noise_loss_momentum`), which averages out how a pair's InfoNCE loss depends on its batch's negatives;
- `first fit`: the first fit after the warm-up is kept for the rest of training (`--gmm_refit_epochs` = the epochs),
  the early window in which the memorisation effect separates clean from noisy best;
- `separation 1`, `separation 2`: the latest loss, with fits whose components are closer than 1 or 2 in Ashman's D
  not used (`--noise_min_separation`);
- `trust 0.97`, `trust 1`: the latest loss, with the guard against fits that call most pairs noisy raised from 0.9 to
  0.97, or off (`--noise_max_noisy_fraction`).

`--variants` picks some of them (default: all).
It reports the validation headline (mean ± std over seeds), the noise-detection ROC-AUC of the estimate training used,
epoch by epoch, against the injected noise, the mixture's separation by epoch, and the final estimate's ROC-AUC (also
against semantic noise where the captions are class templates). Only the validation split and the training split's
injected mask are read: the test split is never evaluated. JSON, a Markdown table and a plot go to
`bench/results/noise_fit.*` (`noise_fit_npc.*` with `--method npc`).

    python bench/noise_fit.py --settings pretrained_tuxpaint pretrained_emoji  # 23 min on 1 thread
    python bench/noise_fit.py --method npc --settings fashion_mnist --ratios 0.8 \
        --variants latest "separation 1" "separation 2" --threads 2
    python bench/noise_fit.py --settings fashion_mnist --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness  # noqa: E402  (the settings, data splits and one training run of the robustness benchmark)


METHODS = ("nlip", "npc")
DEFAULT_SETTINGS = ("pretrained_tuxpaint", "pretrained_emoji", "fashion_mnist")


def variants(epochs: int) -> dict[str, dict[str, Any]]:
    """The fitting choices compared, as `NLIPTrainingArguments` overrides."""
    return {
        "latest": {},
        "average 0.5": {"noise_loss_momentum": 0.5},
        "average 0.8": {"noise_loss_momentum": 0.8},
        "first fit": {"gmm_refit_epochs": epochs},
        "separation 1": {"noise_min_separation": 1.0},
        "separation 2": {"noise_min_separation": 2.0},
        "trust 0.97": {"noise_max_noisy_fraction": 0.97},
        "trust 1": {"noise_max_noisy_fraction": 1.0},
    }
VARIANTS = tuple(variants(1))


def tuned(method: str, setting_name: str, setting: robustness.Setting,
          results_dir: Path) -> tuple[float, dict[str, Any], str]:
    """`method`'s learning rate and settings from the setting's robustness tuning, and where they came from."""
    path = results_dir / f"robustness_{setting_name}.json"
    if path.exists():
        for record in json.loads(path.read_text())["tuning"]:
            if record["method"] == method and record.get("learning_rate") is not None:
                return record["learning_rate"], record["method_settings"] or {}, str(path.name)
    learning_rate = setting.learning_rates[len(setting.learning_rates) // 2]
    print(f"noise_fit: no tuning of {method} in {path}: {setting_name} runs with the grid's middle learning rate "
          f"{learning_rate} and the method's defaults (copy bench/results/{path.name} into --output_dir to use the "
          "tuned settings)", file=sys.stderr)
    return learning_rate, {}, "the grid's middle learning rate"


def summarise(runs: list[dict[str, Any]], headline: tuple[str, ...]) -> dict[str, Any]:
    """Per variant: validation headline, mean per-epoch ROC-AUC and final ROC-AUCs (mean ± std over seeds), and the
    per-epoch ROC-AUC and separation (Ashman's D of the fits used) averaged over seeds."""
    by_epoch = [r["noise_roc_auc_by_epoch"] for r in runs if r.get("noise_roc_auc_by_epoch")]
    separations = [r.get("noise_separation_by_epoch") or [] for r in runs if not r["error"]]
    detection = [r.get("noise_detection") or {} for r in runs]
    return {
        "val_headline": robustness.mean_std([robustness.value_at(r, ("val", *headline)) for r in runs]),
        "mean_epoch_roc_auc": robustness.mean_std([statistics.fmean(e) for e in by_epoch]),
        "roc_auc_by_epoch": [statistics.fmean(column) for column in zip(*by_epoch)] if by_epoch else [],
        "separation_by_epoch": [[round(value, 3) for value in run] for run in separations],
        "final_roc_auc": robustness.mean_std([d.get("roc_auc") for d in detection]),
        "final_semantic_roc_auc": robustness.mean_std([d.get("semantic_roc_auc") for d in detection]),
        "errors": [r["error"] for r in runs if r["error"]],
    }


def run_setting(method: str, setting_name: str, setting: robustness.Setting, ratios: list[float], seeds: list[int],
                chosen: list[str], results_dir: Path, bar: tqdm) -> dict[str, Any]:
    splits = robustness.load_splits(setting)
    captions = list(robustness.iter_captions(splits.train))
    if setting.model_size is not None:
        splits = robustness.pre_resized(splits, robustness.build_model(setting, captions)[1])
    learning_rate, method_settings, source = tuned(method, setting_name, setting, results_dir)
    cells = []
    for ratio in ratios:
        val = robustness.noisy(splits.val, setting, "random", ratio, seed=10_000)
        for name, overrides in variants(setting.epochs).items():
            if name not in chosen:
                continue
            bar.set_postfix_str(f"{setting_name} {ratio} {name}")
            runs = [robustness.run_one(setting, splits, robustness.noisy(splits.train, setting, "random", ratio, seed),
                                       val, method, learning_rate, seed, captions, evaluate_test=False,
                                       method_settings={**method_settings, **overrides})
                    for seed in seeds]
            cells.append({"noise_ratio": ratio, "variant": name, "settings": overrides, "runs": runs,
                          "summary": summarise(runs, setting.headline)})
            bar.update()
    best = {}  # ties: the earlier variant, i.e. the default first
    for ratio in ratios:
        scored = [c for c in cells if c["noise_ratio"] == ratio and c["summary"]["val_headline"]["mean"] is not None]
        best[str(ratio)] = max(scored, key=lambda c: c["summary"]["val_headline"]["mean"])["variant"] if scored else None
    return {"setting": setting_name, "headline": list(setting.headline), "learning_rate": learning_rate,
            "method_settings": method_settings, "tuned_from": source, "num_train_pairs": len(splits.train),
            "num_val_pairs": len(splits.val), "epochs": setting.epochs, "cells": cells, "best_on_validation": best}


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}` ({results['total_wall_time_s'] / 60:.0f} min; seeds {results['seeds']}; "
             f"`{results['method']}`, random noise; validation split only).", ""]
    for block in results["settings"]:
        tuned_settings = "".join(f", {name}={value}" for name, value in block["method_settings"].items())
        lines += [f"**{block['setting']}** — {block['num_train_pairs']} train / {block['num_val_pairs']} validation "
                  f"pairs, {block['epochs']} epochs, lr {block['learning_rate']:g}{tuned_settings} "
                  f"(from {block['tuned_from']})", "",
                  "| noise | fit on | validation headline | ROC-AUC, mean over epochs | ROC-AUC by epoch | final ROC-AUC "
                  "| final semantic ROC-AUC | separation (D) by epoch, per seed |", "|---|---|---|---|---|---|---|---|"]
        for cell in block["cells"]:
            s = cell["summary"]
            chosen = block["best_on_validation"].get(str(cell["noise_ratio"])) == cell["variant"]
            name = f"**{cell['variant']}**" if chosen else cell["variant"]
            lines.append(
                f"| {cell['noise_ratio']} | {name} | {_number(s['val_headline']['mean'], 1)} ± "
                f"{_number(s['val_headline']['std'], 1)} | {_number(s['mean_epoch_roc_auc']['mean'], 3)} ± "
                f"{_number(s['mean_epoch_roc_auc']['std'], 3)} | "
                f"{' / '.join(f'{v:.2f}' for v in s['roc_auc_by_epoch']) or '—'} | "
                f"{_number(s['final_roc_auc']['mean'], 3)} | {_number(s['final_semantic_roc_auc']['mean'], 3)} | "
                f"{'; '.join(' / '.join(f'{v:.1f}' for v in run) or 'none used' for run in s['separation_by_epoch'])} |")
        lines.append("")
    lines.append("**Bold**: the best validation headline at that noise level.")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["settings"]
    ratios = sorted({c["noise_ratio"] for b in blocks for c in b["cells"]})
    figure, axes = plt.subplots(len(ratios), len(blocks), figsize=(4.5 * len(blocks), 3.2 * len(ratios)),
                                squeeze=False)
    for column, block in enumerate(blocks):
        for row, ratio in enumerate(ratios):
            axis = axes[row][column]
            for cell in (c for c in block["cells"] if c["noise_ratio"] == ratio):
                values = cell["summary"]["roc_auc_by_epoch"]
                epochs = range(block["epochs"] - len(values) + 1, block["epochs"] + 1)
                axis.plot(list(epochs)[: len(values)], values, marker="o", label=cell["variant"])
            axis.set_title(f"{block['setting']}, noise {ratio}")
            axis.set_xlabel("epoch")
            axis.set_ylabel("ROC-AUC of ε")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="nlip", help="the method whose estimate is compared")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the fitting choices to compare (default: all)")
    parser.add_argument("--settings", nargs="+", choices=list(robustness.SETTINGS), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.8], help="random-noise ratios")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="the robustness benchmark's --quick sizes: a smoke run")
    parser.add_argument("--output_dir", type=Path, default=robustness.DEFAULT_OUTPUT_DIR)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            parser.error(f"--ratios must lie in (0, 1), got {ratio}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    bar = tqdm(total=len(args.settings) * len(args.ratios) * len(args.variants), desc="noise fit",
               disable=args.no_progress)
    blocks = []
    for name in args.settings:
        setting = robustness.SETTINGS[name]
        if args.quick:
            setting = replace(setting, **robustness.QUICK_OVERRIDES[name])
        blocks.append(run_setting(args.method, name, setting, args.ratios, args.seeds, args.variants, args.output_dir,
                                  bar))
    bar.close()
    results = {"benchmark": "noise_fit", "method": args.method, "seeds": args.seeds, "ratios": args.ratios,
               "quick": args.quick, "settings": blocks,
               "command": shlex.join(["python", "bench/noise_fit.py", *(sys.argv[1:] if argv is None else argv)]),
               "total_wall_time_s": round(time.perf_counter() - start, 1)}
    name = "noise_fit" if args.method == "nlip" else f"noise_fit_{args.method}"
    return robustness.write_outputs(args.output_dir / f"{name}.json", results, plot, markdown)


if __name__ == "__main__":
    main()
