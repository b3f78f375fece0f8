"""What every `nlip-*` command shares on its command line: `--version`, arguments from a JSON/YAML file, and knowing
which options the user gave (so that per-preset defaults apply only to the others).

    nlip-train args.yaml                        # every option from the file (keys: the option names without --)
    nlip-train args.json --learning_rate 1e-4   # the file, then command-line options on top of it

As in transformers' example scripts (`HfArgumentParser.parse_yaml_file` / `parse_json_file`), a file named as the
only argument is read whole; unlike them, options given after it override the file's values. Unknown keys are an
error naming them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

ARGS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def nlip_version() -> str:
    """The installed nlip version (from the package metadata; the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nlip")
    except PackageNotFoundError:  # running from a source tree that is not installed
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M) if pyproject.is_file() else None
        return match.group(1) if match else "unknown"


def version_string() -> str:
    import torch
    import transformers

    return f"nlip {nlip_version()} (transformers {transformers.__version__}, torch {torch.__version__})"


def add_version_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--version` (prints nlip's, transformers' and torch's versions and exits)."""
    parser.add_argument("--version", action="version", version=version_string(),
                        help="Print the versions of nlip, transformers and torch, and exit.")
    return parser


def read_args_file(path: str) -> dict[str, Any]:
    """The options of a JSON or YAML arguments file: a mapping of option name (without `--`) to value."""
    with open(path, encoding="utf-8") as file:
        if path.lower().endswith(".json"):
            data = json.load(file)
        else:
            import yaml

            data = yaml.safe_load(file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"Arguments file {path!r} must hold a mapping of option names to values, got "
                         f"{type(data).__name__}.")
    return {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}


def split_args_file(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`(file, remaining argv)` when the first argument is a JSON/YAML file, else `(None, argv)`."""
    argv = list(argv)
    if argv and argv[0].lower().endswith(ARGS_FILE_SUFFIXES) and not argv[0].startswith("-"):
        if not os.path.isfile(argv[0]):
            raise FileNotFoundError(f"Arguments file {argv[0]!r} does not exist.")
        return argv[0], argv[1:]
    return None, argv


def _apply_file_defaults(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> None:
    """Make the file's values the parser's defaults (and its required options optional)."""
    actions = {action.dest: action for action in parser._actions if action.dest != argparse.SUPPRESS}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"Arguments file {source!r} has unknown options {unknown}; see --help for the options.")
    for dest, value in values.items():
        action = actions[dest]
        action.required = False
        # argparse converts string defaults with the option's type; lists and numbers are used as they are.
        action.default = value


class _Missing:
    def __repr__(self) -> str:
        return "<not given>"


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str], file_values: dict[str, Any] | None = None) -> set[str]:
    """The destinations of the options the user set, on the command line (abbreviations included) or in the
    arguments file."""
    missing = _Missing()
    saved = [(action, action.default, action.required) for action in parser._actions]
    try:
        for action, _, _ in saved:
            if action.dest not in ("help", "version") and action.default is not argparse.SUPPRESS:
                action.default, action.required = missing, False
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    given = {dest for dest, value in vars(namespace).items() if value is not missing}
    return given | set(file_values or {})


def parse_command_line(parser, argv: Sequence[str] | None = None) -> tuple[tuple, set[str]]:
    """Parse `argv` (default `sys.argv[1:]`) with an `HfArgumentParser`, reading a leading JSON/YAML arguments file
    first; returns `(dataclasses, names of the options the user gave)`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = split_args_file(argv)
    values = read_args_file(path) if path else {}
    if values:
        _apply_file_defaults(parser, values, path)
    parsed = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    return tuple(parsed), given_options(parser, rest, values)


__all__ = ["add_version_argument", "given_options", "nlip_version", "parse_command_line", "read_args_file",
           "split_args_file", "version_string"]
