"""`rcl`: the bounded complementary contrastive loss (Hu et al., TPAMI 2023) in place of InfoNCE's positive term;
it needs no noise estimate and no extra pass (`trainers.losses.complementary_contrastive_loss`)."""

from __future__ import annotations

from .base import Contribution, EncodedBatch, MethodCard, Objective


class RCLObjective(Objective):
    name = "rcl"
    shapes_positive_term = True
    combines_with = frozenset({"npc"})
    combination_rule = ("'rcl' replaces the contrastive loss with the complementary one, so it combines only with 'npc' "
                        "(per-sample confidences); 'nlip' and 'srcl' reshape the InfoNCE loss it does not have")
    card = MethodCard(
        "RCL complementary contrastive loss",
        "instead of pulling each image towards its own caption, every non-matching pair is pushed apart with the bounded "
        "complementary loss `−Σ_{j≠i} log(1 − p_ij)`, which a shuffled caption cannot mislead much; it needs no noise "
        "estimate",
        "Hu et al., TPAMI 2023",
        "Hu et al. *Cross-Modal Retrieval with Partially Mismatched Pairs.* TPAMI 2023.",
        combined_clause="RCL's complementary loss replaces the positive contrastive term",
    )

    def contribute(self, batch: EncodedBatch, context) -> Contribution:
        return Contribution(complementary=True)
