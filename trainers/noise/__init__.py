"""Noise estimation: the per-pair loss bank, the two-component mixture over it (`estimation`), the reference prior,
the noise state saved in checkpoints (`state`) and the tracker that owns it during training (`tracker`); NPC's clean
memory bank; caption-noise injection for experiments (`injection`); and offline pair scoring for the audit."""
