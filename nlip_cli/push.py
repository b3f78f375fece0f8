"""Push a local NLIP checkpoint folder to the Hugging Face Hub (`nlip-push`).

    nlip-push --checkpoint_dir outputs/nlip-fmnist --repo_id my-name/nlip-fmnist

The folder is uploaded as it is (weights, config, the remote-code files, processor files), with a README model card:
one rendered from its `nlip_training_summary.json` (written by the trainer, schema:
`trainers.model_card.TrainingSummary`) with the repo id in its loading snippets, unless the folder's README.md was
written by hand (then it is kept as it is), or a minimal card when there is no summary. That README is written into
the folder before the upload.

Hub problems (offline, no or a read-only token, no access to the namespace) end the command with a one-line error and
exit status 1, not a traceback.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from transformers import HfArgumentParser

from nlip_cli.cli import add_version_argument
from trainers.model_card import TRAINING_SUMMARY_NAME, TrainingSummary

# First line of every card nlip renders (trainers/model_card_template.md): such a README may be re-rendered.
GENERATED_CARD_MARKER = "<!-- nlip-model-card"

logger = logging.getLogger("nlip.push")

DESCRIPTION = (
    "Push a local NLIP checkpoint folder to the Hugging Face Hub. The pushed README.md model card is the folder's own "
    f"README.md if it has one, else one rendered from {TRAINING_SUMMARY_NAME} (written by the trainer), else a minimal "
    "card; a generated card is also written into the folder. Intermediate checkpoint-*/ folders are not pushed."
)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
# Intermediate Trainer checkpoints inside an output folder are not part of the pushed model.
IGNORE_PATTERNS = ["checkpoint-*/"]


@dataclass
class PushArguments:
    checkpoint_dir: str = field(
        metadata={"help": "Local folder written by save_pretrained: config.json, model.safetensors (or a sharded "
                          "model.safetensors.index.json), the NLIP code files, and processor files."}
    )
    repo_id: str = field(
        metadata={"help": "Hub repo to push to, 'namespace/name' or 'name' (your own namespace); created if missing."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo as private (no effect if it already exists)."})
    commit_message: str = field(default="Upload NLIP checkpoint", metadata={"help": "Message of the Hub commit."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to push to, created from main if missing; main when not given."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token with write access; when not given, $HF_TOKEN or the token saved by `hf auth login`."},
    )


def check_checkpoint(checkpoint_dir: Path) -> dict:
    """The folder's config.json, after checking it holds what a loadable checkpoint needs (raises FileNotFoundError)."""
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint_dir {str(checkpoint_dir)!r} is not an existing folder.")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint_dir {str(checkpoint_dir)!r} has no config.json; save the model with "
                                "save_pretrained first.")
    if not any((checkpoint_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"checkpoint_dir {str(checkpoint_dir)!r} has no weights: expected one of "
                                f"{list(WEIGHT_FILES)}.")
    configs = {name: _read_json(checkpoint_dir / name) for name in ("config.json", *PROCESSOR_FILES)
               if (checkpoint_dir / name).is_file()}
    # auto_map values are "module.Class" (or lists of them for tokenizers); the modules must ship with the weights.
    references = [(name, ref) for name, config in configs.items() for value in config.get("auto_map", {}).values()
                  for ref in ([value] if isinstance(value, str) else value)]
    modules = {f"{ref.split('.')[0]}.py": name for name, ref in references if ref and "--" not in ref}
    if missing := sorted(module for module in modules if not (checkpoint_dir / module).is_file()):
        raise FileNotFoundError(f"{str(checkpoint_dir)!r}: the auto_map of {sorted({modules[m] for m in missing})} needs "
                                f"{missing}, which are missing; re-save with save_pretrained after `import modeling_nlip`.")
    if not any((checkpoint_dir / name).is_file() for name in PROCESSOR_FILES):
        logger.warning("%s has no processor files (%s); users will need their own processor.", checkpoint_dir,
                       ", ".join(PROCESSOR_FILES))
    return configs["config.json"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None


def card_summary(checkpoint_dir: Path, config: dict) -> tuple[TrainingSummary | None, str]:
    """What to render the README model card from (None: keep the folder's README.md), and where it came from."""
    readme = checkpoint_dir / "README.md"
    generated = readme.is_file() and GENERATED_CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace")
    if readme.is_file() and not generated:
        return None, "kept the folder's README.md"
    if (checkpoint_dir / TRAINING_SUMMARY_NAME).is_file():
        return TrainingSummary.load(checkpoint_dir), f"rendered from {TRAINING_SUMMARY_NAME}"
    if readme.is_file():
        return None, "kept the folder's README.md"
    captioner = any("Captioning" in name for name in config.get("architectures") or [])
    summary = TrainingSummary(pipeline_tag="image-to-text" if captioner else "zero-shot-image-classification")
    return summary, f"minimal card (no {TRAINING_SUMMARY_NAME})"


def push_checkpoint(args: PushArguments) -> tuple[CommitInfo, str]:
    """Check the folder, create the repo (and branch) if needed, write the model card, upload the folder; returns the
    commit and where the card came from. Nothing is created on the Hub when the folder or its summary is invalid."""
    checkpoint_dir = Path(args.checkpoint_dir)
    summary, card_source = card_summary(checkpoint_dir, check_checkpoint(checkpoint_dir))
    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    if args.revision is not None:
        api.create_branch(repo_id, branch=args.revision, exist_ok=True)
    if summary is not None:
        summary.model_name = summary.model_name or repo_id.split("/")[-1]
        summary.to_model_card(repo_id=repo_id).save(checkpoint_dir / "README.md")
    logger.info("Model card: %s.", card_source)
    commit = api.upload_folder(folder_path=checkpoint_dir, repo_id=repo_id, revision=args.revision,
                               commit_message=args.commit_message, ignore_patterns=IGNORE_PATTERNS)
    return commit, card_source


def hub_error_message(error: Exception, repo_id: str) -> str | None:
    """One line saying what went wrong with the Hub and what to do, or None for errors that are not the Hub's."""
    if isinstance(error, OfflineModeIsEnabled):
        return ("the Hugging Face Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1). Unset it, connect to "
                "the network and run nlip-push again.")
    if isinstance(error, LocalTokenNotFoundError):
        return "no Hugging Face token: run `hf auth login`, set $HF_TOKEN, or pass --token."
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if status in (401, 403):
            return (f"the Hub refused the push to {repo_id!r} (HTTP {status}): the token is missing, invalid or has no "
                    f"write access to that namespace. {first}")
        return f"the Hub answered with an error for {repo_id!r}: {first}"
    module = type(error).__module__ or ""
    if isinstance(error, (ConnectionError, TimeoutError)) or module.startswith(("httpx", "httpcore", "requests", "urllib3")):
        return f"cannot reach the Hugging Face Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the network, then run nlip-push again."
    return None


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_version_argument(HfArgumentParser(PushArguments, prog="nlip-push", description=DESCRIPTION))
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        commit, card_source = push_checkpoint(args)
    except Exception as error:  # noqa: BLE001 - Hub and network errors become one line; anything else re-raises
        message = hub_error_message(error, args.repo_id)
        if message is None:
            raise
        print(f"nlip-push: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    report = {"repo_id": commit.repo_url.repo_id, "revision": args.revision or "main", "commit": commit.oid,
              "commit_url": commit.commit_url, "model_card": card_source}
    print(json.dumps(report, indent=2))
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
