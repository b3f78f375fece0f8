"""NPC's sibling look-ahead step (steps 2–3 of the paper's method; Zhang et al., "Negative Pre-aware for Noisy Cross-modal
Matching", AAAI 2024).

A sibling copy of the model, re-synced to the real model's weights before every step, takes one optimizer step on the
batch; how that step changes the loss of each sample's clean memory entries gives the sample's confidence. The sibling
keeps its own optimizer state across steps (the real optimizer's class and hyper-parameters, the real learning rate of
the moment), and its step costs one forward and one backward on the batch plus one no-grad forward on the memory
entries: the memory losses *before* the step are those of the real model, whose forward on the memory entries the
real update needs anyway. Unlike the official code, the sibling loss is back-propagated once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..distributed import all_reduce_mean_


class NPCSibling:
    """The sibling model and its optimizer.

    Args:
        model: the real (unwrapped) model; it is deep-copied once, sharing the parameters that neither take
            gradients nor are optimized.
        optimizer: the real optimizer (an accelerate wrapper is unwrapped); the sibling's optimizer has its class and
            parameter groups with their hyper-parameters (parameters mapped by name).
        max_grad_norm: gradient clipping of the sibling step (the real step's `max_grad_norm`; <= 0 disables).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0):
        real_optimizer = getattr(optimizer, "optimizer", optimizer)
        optimized = {id(param) for group in real_optimizer.param_groups for param in group["params"]}
        # A parameter that neither takes gradients nor is optimized (a locked tower's) never changes: the sibling
        # shares it rather than copying it, so its memory is the trainable parameters and `sync` copies only those.
        frozen = {id(param): param for param in model.parameters()
                  if not param.requires_grad and id(param) not in optimized}
        self.model = copy.deepcopy(model, memo=dict(frozen))
        self.model.train(model.training)
        self.max_grad_norm = max_grad_norm
        name_of = {id(param): name for name, param in model.named_parameters()}
        sibling_params = dict(self.model.named_parameters())
        groups = []
        for group in real_optimizer.param_groups:
            options = {key: value for key, value in group.items() if key != "params"}
            groups.append({**options, "params": [sibling_params[name_of[id(p)]] for p in group["params"]]})
        # Every group carries all of its hyper-parameters, so the class alone rebuilds the optimizer.
        self.optimizer = type(real_optimizer)(groups)
        self._pairs = [
            (sibling_params[name], param) for name, param in model.named_parameters()
            if name in sibling_params and sibling_params[name] is not param
        ]
        self._buffer_pairs = list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def sync(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Copy the real model's weights (and buffers) and the real optimizer's current learning rates."""
        for sibling_param, param in self._pairs:
            sibling_param.copy_(param)
        for sibling_buffer, buffer in self._buffer_pairs:
            sibling_buffer.copy_(buffer)
        if self.model.training != model.training:
            self.model.train(model.training)
        real_optimizer = getattr(optimizer, "optimizer", optimizer)
        for sibling_group, group in zip(self.optimizer.param_groups, real_optimizer.param_groups):
            sibling_group["lr"] = group["lr"]

    def step(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """One optimizer step of the sibling on `loss_fn(sibling)` (the global-batch contrastive loss); returns it.

        Gradients are averaged over processes (each process back-propagates its share of the gathered global loss,
        as DDP would), so every process's sibling takes the same step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        all_reduce_mean_([p.grad for p in params])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def state_dict(self) -> dict:
        """The sibling's optimizer state (its weights are re-synced every step, so they need no saving)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
