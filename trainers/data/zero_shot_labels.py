"""Class labels of webdataset shards for zero-shot evaluation (`--label_column` with `--train_shards`/`--eval_shards`).

webdataset keeps a sample's class in a `KEY.cls` file (an integer as text) or in a field of its `KEY.json`; both are
read here by sample key (`shard.tar/KEY`, the `key` column of `trainers.data.pairs.load_webdataset_pairs`).
"""

from __future__ import annotations

import json

from trainers.data.shards import iter_shard_samples, resolve_shards, shard_name


def _parse(data: bytes | None, field: str, from_json: bool) -> str | int | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
        value = json.loads(text).get(field) if from_json else text.strip()
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(value, bool) or value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    value = str(value).strip()
    return int(value) if value.lstrip("-").isdigit() else value


def webdataset_labels(shards: str, column: str) -> dict[str, str | int]:
    """`{key: label}` of every sample of `shards` (a directory, glob or file) that has a `KEY.<column>` file or a
    `column` field in its `KEY.json`; integer-looking values become ints."""
    labels: dict[str, str | int] = {}
    extension = column.lower()
    for shard in resolve_shards(shards):
        name = shard_name(shard)
        for key, fields in iter_shard_samples(shard, warn=False):
            value = _parse(fields.get(extension), column, from_json=False)
            if value is None:
                value = _parse(fields.get("json"), column, from_json=True)
            if value is not None:
                labels[f"{name}/{key}"] = value
    return labels


__all__ = ["webdataset_labels"]
