"""`rcl`: the bounded complementary contrastive loss (Hu et al., TPAMI 2023) in place of InfoNCE's positive term,
with an InfoNCE term of weight `--rcl_infonce_weight` β beside it (0: RCL's loss); it needs no noise estimate and no
extra pass (`trainers.losses.complementary_contrastive_loss`)."""

from __future__ import annotations

from typing import Any

from .base import Contribution, EncodedBatch, MethodCard, Objective


class RCLObjective(Objective):
    name = "rcl"
    shapes_positive_term = True
    combines_with = frozenset({"npc"})
    combination_rule = ("'rcl' replaces the contrastive loss with the complementary one, so it combines only with 'npc' "
                        "(per-sample confidences); 'nlip' and 'srcl' reshape the InfoNCE loss it does not have")
    card = MethodCard(
        "RCL complementary contrastive loss",
        "every non-matching pair is pushed apart with the bounded complementary loss `−Σ_{j≠i} log(1 − p_ij)`, which "
        "a shuffled caption cannot mislead much, and an InfoNCE term of weight β pulls each image towards its own "
        "caption (the complementary loss alone is robust but underfits; β = 0 is RCL's loss); it needs no noise "
        "estimate",
        "Hu et al., TPAMI 2023",
        "Hu et al. *Cross-Modal Retrieval with Partially Mismatched Pairs.* TPAMI 2023; the InfoNCE term as in Wang "
        "et al. *Symmetric Cross Entropy for Robust Learning with Noisy Labels.* ICCV 2019.",
        combined_clause="RCL's complementary loss replaces the positive contrastive term",
    )

    def contribute(self, batch: EncodedBatch, context) -> Contribution:
        return Contribution(complementary=True, infonce_weight=self.args.rcl_infonce_weight)

    def settings(self) -> dict[str, Any]:
        return {"rcl_infonce_weight": self.args.rcl_infonce_weight}
