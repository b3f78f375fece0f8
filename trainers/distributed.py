"""Gathers across data-parallel processes: features with gradient (global-batch contrastive losses) and per-sample
state without (so that every process holds the same loss bank and noise estimates); and the process group's end.

Why an autograd-aware gather: every process computes the same global loss from the gathered features, and the
gather's backward (a reduce-scatter sum) hands each process `world_size ×` the gradient of its own rows; DDP's gradient
average then gives exactly the single-process gradient of the global batch. `accelerator.gather` has no gradient, and
re-inserting the local slot into a detached gather loses the cross-process terms.

Batches of different sizes on different processes (an uneven last batch) are padded to the largest, gathered, and
un-padded, so a collective never hangs on mismatched shapes.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives


# Differentiable all-gather along dim 0 (`all_gather_single_autograd` since torch 2.13, before it
# `all_gather_tensor_autograd`); `torch.distributed.nn.functional.all_gather` is deprecated.
_all_gather_autograd = getattr(functional_collectives, "all_gather_single_autograd", None) or (
    functional_collectives.all_gather_tensor_autograd
)

def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_sizes(num_rows: int, device: torch.device) -> list[int]:
    """The first-dimension size of every process's tensor, in rank order (`[num_rows]` without distribution)."""
    if not is_distributed():
        return [num_rows]
    local = torch.tensor([num_rows], dtype=torch.int64, device=device)
    sizes = torch.empty(dist.get_world_size(), dtype=torch.int64, device=device)
    # `all_gather_single` (torch >= 2.13) replaces the deprecated `all_gather_into_tensor`.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(sizes, local)
    return sizes.tolist()


def all_gather_with_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every process's `tensor` along dim 0 (rank order), differentiably.

    Args:
        tensor: `[n, ...]` local rows; `n` may differ between processes.
        sizes: every process's `n` (from `gather_sizes`), to skip that extra collective when it is already known.

    The result is `[Σ n, ...]`; gradients flowing into another process's rows are sent back to it (summed over
    processes) by the backward pass. Returns `tensor` itself without distribution.
    """
    if not is_distributed():
        return tensor
    sizes = list(sizes) if sizes is not None else gather_sizes(tensor.shape[0], tensor.device)
    largest = max(sizes)
    if tensor.shape[0] != largest:
        padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    gathered = _all_gather_autograd(tensor.contiguous(), 0, dist.group.WORLD)
    if isinstance(gathered, functional_collectives.AsyncCollectiveTensor):
        gathered = gathered.wait()
    if all(size == largest for size in sizes):
        return gathered
    return torch.cat([chunk[:size] for chunk, size in zip(gathered.split(largest), sizes)])


@torch.no_grad()
def gather_state(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every process's per-sample `tensor` (indices, losses, ...) along dim 0, without gradient."""
    return all_gather_with_grad(tensor.detach(), sizes)


def gather_objects(objects: list[Any]) -> list[Any]:
    """Concatenate every process's list of picklable objects (e.g. generated captions), in rank order."""
    if not is_distributed():
        return list(objects)
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(objects))
    return [item for part in gathered for item in part]


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors (e.g. a sibling model's gradients) over processes, in place."""
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)


def end_process_group() -> None:
    """Destroy the default process group once every process is done with it (nothing without one).

    Drop the trainer first: DDP's reducer holds the group and a trainer sits in reference cycles, so it is collected
    here; left to the interpreter's shutdown, the group's gloo threads can abort it ("terminate called without an
    active exception")."""
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
