"""What training data a run saw, in a few bytes: the checkpoint records it and a resume on other data fails at once.

A map-style dataset is fingerprinted by its size and a SHA-256 of its index -> key map, in index order. A pair's key is
its `key` column (webdataset: `shard.tar/KEY`), else its image file path, else a hash of its image bytes (in-memory
images), else its caption. A streaming webdataset (`trainers.data.pairs.load_webdataset_pairs(streaming=True)`) is
fingerprinted by its list of shard file names: its indices are the shards' offsets plus positions and its keys
`shard name/KEY`, so the same shards in the same order give the same index -> key map, wherever they are served from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import datasets
import numpy as np

from .pairs import images_left_encoded

FINGERPRINT_VERSION = 1
_BATCH = 4096


def _key_column(dataset: datasets.Dataset) -> tuple[str, str]:
    """(column, how) of the per-pair key: `key`, the image `path` (or bytes), or the caption."""
    if "key" in dataset.column_names:
        return "key", "value"
    if "image" in dataset.column_names and isinstance(dataset.features["image"], datasets.Image):
        return "image", "image"
    return "text", "value"


def _keys(dataset: datasets.Dataset) -> tuple[np.ndarray, list[str]]:
    column, how = _key_column(dataset)
    table = dataset.select_columns(["index", column])
    if how == "image":
        table = images_left_encoded(table)
    indices, keys = [], []
    for batch in table.with_format("arrow").iter(batch_size=_BATCH):
        indices.append(batch.column("index").to_numpy(zero_copy_only=False))
        values = batch.column(column)
        if how == "image":
            paths = values.combine_chunks().field("path").to_pylist() if hasattr(values, "combine_chunks") else \
                values.field("path").to_pylist()
            blobs = None
            for row, path in enumerate(paths):
                if path:
                    keys.append(path)
                    continue
                if blobs is None:
                    chunk = values.combine_chunks() if hasattr(values, "combine_chunks") else values
                    blobs = chunk.field("bytes")
                blob = blobs[row].as_py()
                keys.append("sha1:" + hashlib.sha1(blob).hexdigest() if blob is not None else "")
        else:
            keys.extend(json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
                        for value in values.to_pylist())
    return (np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)), keys


def data_fingerprint(dataset: Any) -> dict[str, Any] | None:
    """The fingerprint of a training dataset (None when it cannot be computed, e.g. a foreign iterable dataset)."""
    from .pairs import stream_shards
    from .shards import shard_name

    shards = stream_shards(dataset)
    if shards is not None:
        # Shard file names, not full paths: keys are `name/KEY`, so a moved copy or another mirror is the same data.
        shards = [shard_name(shard) for shard in shards]
        digest = hashlib.sha256("\n".join(shards).encode("utf-8")).hexdigest()
        return {"version": FINGERPRINT_VERSION, "kind": "stream", "num_shards": len(shards),
                "first_shard": shards[0] if shards else None, "last_shard": shards[-1] if shards else None,
                "sha256": digest}
    if not isinstance(dataset, datasets.Dataset) or "index" not in dataset.column_names:
        return None
    indices, keys = _keys(dataset)
    order = np.argsort(indices, kind="stable")
    digest = hashlib.sha256()
    for row in order:
        digest.update(f"{int(indices[row])}\t{keys[row]}\n".encode("utf-8", "surrogatepass"))
    return {
        "version": FINGERPRINT_VERSION,
        "kind": "map",
        "num_samples": int(indices.size),
        "max_index": int(indices.max()) if indices.size else -1,
        "key": _key_column(dataset)[0],
        "sha256": digest.hexdigest(),
    }


def describe_change(saved: dict[str, Any], current: dict[str, Any] | None) -> str | None:
    """None when `current` is the data `saved` describes; else a sentence saying what changed."""
    if current is None:
        return "the training data now cannot be fingerprinted (it is not a datasets.Dataset with an 'index' column)"
    if saved.get("kind") != current.get("kind"):
        return f"the checkpoint was trained on {saved.get('kind')}-style data, the data now is {current.get('kind')}-style"
    if saved.get("sha256") == current.get("sha256"):
        return None
    if current["kind"] == "stream":
        if saved.get("num_shards") != current.get("num_shards"):
            return (f"the checkpoint streamed {saved.get('num_shards')} shards ({saved.get('first_shard')} .. "
                    f"{saved.get('last_shard')}), the data now has {current['num_shards']} shards "
                    f"({current['first_shard']} .. {current['last_shard']})")
        return (f"the same number of shards ({current['num_shards']}) but other shard names or another order "
                f"(checkpoint: {saved.get('first_shard')} .. {saved.get('last_shard')}; now: {current['first_shard']} .. "
                f"{current['last_shard']})")
    before, now = saved.get("num_samples"), current["num_samples"]
    if before != now:
        difference = now - before if isinstance(before, int) else None
        change = f" ({difference:+d} pairs)" if difference is not None else ""
        return f"the checkpoint was trained on {before} pairs, the training data now has {now}{change}"
    return (f"the same number of pairs ({now}) but a different index -> {current.get('key')} map (other files, "
            "captions or order: index -> key hash "
            f"{str(saved.get('sha256'))[:12]} in the checkpoint, {current['sha256'][:12]} now)")
