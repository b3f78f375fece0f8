"""Epoch arithmetic shared by the objectives' schedules."""

from __future__ import annotations


def is_due(epoch: int, last: int | None, start: int, every: int) -> bool:
    """Whether an action run every `every` epochs from epoch `start`, last run at epoch `last`, is due at `epoch`."""
    if epoch < start or last == epoch:
        return False
    return last is None or epoch - last >= every
