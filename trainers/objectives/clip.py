"""`clip`: the plain symmetric InfoNCE loss over the (global) batch, the baseline every method is measured against."""

from __future__ import annotations

from .base import MethodCard, Objective


class CLIPObjective(Objective):
    """Contributes nothing: the combined loss of no contribution is the batch's mean InfoNCE."""

    name = "clip"
    standalone = True
    combination_rule = "'clip' is the plain contrastive loss and cannot be combined"
    card = MethodCard(
        "CLIP contrastive loss (baseline)",
        "the plain symmetric InfoNCE loss over the batch, with no noise handling",
        "Radford et al., ICML 2021",
        "Radford et al. *Learning Transferable Visual Models From Natural Language Supervision.* ICML 2021.",
    )
