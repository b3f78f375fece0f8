"""`BatchSkips`: what the training batches skipped, per process, so that the summary, the model card and an exact
resume know it.

A collator drops invalid pairs and reports them in the batch (`SKIPPED_KEY`); a batch whose every pair was invalid (a
run of broken samples in a stream) is skipped whole and counted, never fatal. The counts travel in the noise state of
every checkpoint; a run resumed in the middle of an epoch skips as many extra batches as the interrupted run skipped
whole in that epoch, on top of the Trainer's own batch skipping, so it stays aligned with the run it continues.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch

from .collator import SKIPPED_KEY
from .pairs import SkipReport


logger = logging.getLogger(__name__)


class BatchSkips:
    """Batch-time skip counts of this process: `{"skipped_pairs": SkipReport.to_dict(), "empty_batches": n,
    "epoch": e, "empty_in_epoch": those of epoch e}`.

    Args:
        process_index, world_size: this process and how many there are.
    """

    def __init__(self, process_index: int = 0, world_size: int = 1):
        self.process_index, self.world_size = process_index, world_size
        self.counts: dict[str, Any] = {"skipped_pairs": {}, "empty_batches": 0, "epoch": 0, "empty_in_epoch": 0}
        self._pending_empty: tuple[int, int] | None = None
        self.all_processes: list[dict[str, Any]] | None = None  # every process's counts, gathered after training

    def set_epoch(self, epoch: int) -> None:
        if self.counts["epoch"] != epoch:
            self.counts.update(epoch=epoch, empty_in_epoch=0)
        if self._pending_empty is not None and self._pending_empty[0] != epoch:
            self._pending_empty = None  # resumed at an epoch boundary: nothing to skip

    def count(self, batch: Any) -> bool:
        """Count a batch's skipped pairs (removing them from it); False for a batch with no pair left."""
        if not isinstance(batch, dict):
            return True
        skipped = batch.pop(SKIPPED_KEY, None)
        if skipped:
            report = SkipReport.from_dict(self.counts["skipped_pairs"])
            report.update(skipped)
            self.counts["skipped_pairs"] = report.to_dict()
        if "pixel_values" in batch or "input_ids" in batch:
            return True
        self.counts["empty_batches"] += 1
        self.counts["empty_in_epoch"] += 1
        logger.warning("Skipping a batch in which every pair was invalid (%s).",
                       ", ".join(f"{count} {reason}" for reason, count in (skipped or {}).items() if reason != "files"))
        return False

    def kept_batches(self, iterator) -> Iterator:
        """`iterator` without the batches that kept no pair (counted), after the extra batches a resumed run skips."""
        while self._pending_empty is not None:
            epoch, count = self._pending_empty
            self._pending_empty = (epoch, count - 1) if count > 1 else None
            next(iterator)  # consumed by the interrupted run in this epoch, uncounted here (restored counts)
        for batch in iterator:
            if self.count(batch):
                yield batch

    def gather(self) -> list[dict[str, Any]]:
        """Every process's counts, in process order (a collective: every process must call it)."""
        local = copy.deepcopy(self.counts)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
            return gathered
        return [local]

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Take back the counts a checkpoint saved (`gather()` output); from another number of processes they are
        merged into process 0's (warned: a resume that skipped empty batches may then not be exact)."""
        if not saved:
            return
        if len(saved) != self.world_size:
            logger.warning("The checkpoint's batch-time skip counts come from %d processes, this run has %d: they are "
                           "kept as process 0's; a resume that skipped empty batches may not be exact.",
                           len(saved), self.world_size)
            merged = SkipReport()
            for entry in saved:
                merged.update(entry.get("skipped_pairs", {}))
            first = self.process_index == 0
            entry = {"skipped_pairs": merged.to_dict() if first else {},
                     "empty_batches": sum(e.get("empty_batches", 0) for e in saved) if first else 0,
                     "epoch": saved[0].get("epoch", 0), "empty_in_epoch": 0}
        else:
            entry = dict(saved[self.process_index])
        self.counts = entry
        if entry.get("empty_in_epoch"):
            self._pending_empty = (entry["epoch"], entry["empty_in_epoch"])

    def summary(self, load_report: SkipReport | None) -> dict[str, Any] | None:
        """Every skipped pair, by reason, with the broken files: load time (`load_report`) plus batch time on every
        process; `empty_batches`: batches skipped whole. None when nothing is known to have been skipped."""
        merged = SkipReport()
        if load_report is not None:
            merged.update(load_report)
        entries = self.all_processes if self.all_processes is not None else [self.counts]
        for entry in entries:
            merged.update(entry.get("skipped_pairs", {}))
        empty = sum(int(entry.get("empty_batches", 0)) for entry in entries)
        if not merged.skipped and not empty and load_report is None:
            return None
        return {**merged.to_dict(), "empty_batches": empty}
