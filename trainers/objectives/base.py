"""The objective protocol: what a noise-robust method is to the trainer.

A method is one `Objective` subclass in its own file (`clip.py`, `nlip.py`, `npc.py`, `srcl.py`, `rcl.py`), registered
by name (`trainers.objectives.register_objective`). The trainer names no method; each training step it

1. asks every objective for `extra_inputs` (more texts or pairs to embed in the same forward: NLIP's synthetic
   captions, NPC's memory entries),
2. embeds the batch and the extras, gathers the batch over processes (`EncodedBatch`),
3. collects each objective's `contribute(batch, context)` (a `Contribution`: sample weights, negative weights, noise
   probabilities, extra loss terms, metrics),
4. combines them with `trainers.losses.combine_contributions`, the one place the loss algebra is composed.

Epoch- and step-level work (NPC's memory bank, noise completion's captions, SRCL's α schedule) runs in
`on_epoch_begin` / `on_step_begin`, called by one callback in a fixed order (`trainers.callbacks`). An objective sees
the run through a `TrainingContext` (`trainers.context`), never the trainer. Whatever it must carry across a resume it
returns from `state_dict` and takes back in `load_state_dict`; it is written to `nlip_objective_<name>.{json,
safetensors}` in every checkpoint (`save_objective_state` / `load_objective_state`, versioned).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from ..losses import Contribution


if TYPE_CHECKING:
    from ..context import TrainingContext

# The name of the batch's synthetic captions among the extra inputs (NLIP's noise completion): the pre-training
# model embeds them itself, and SRCL re-weights their negatives too.
SYNTHETIC_TEXTS = "synthetic"
OBJECTIVE_STATE_VERSION = 1


@dataclass(frozen=True)
class MethodCard:
    """How a method is described on a model card: title, what it does, the short and the full citation; and, when
    the method is combined with others, the per-pair weight it contributes (`combined_weight`) or a clause on how it
    enters the objective (`combined_clause`)."""

    title: str
    description: str
    citation: str
    reference: str
    combined_weight: str | None = None
    combined_clause: str | None = None


@dataclass
class ExtraTexts:
    """A second caption for every example of the (local) batch, row-aligned with it (e.g. synthetic captions)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class ExtraPairs:
    """Other training pairs to embed in the same forward (e.g. NPC's memory entries), with their dataset `index`."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor


@dataclass
class EncodedExtra:
    """The (local) embeddings of one extra input; `gathered_text_embeds`: an `ExtraTexts`' embeddings gathered over
    processes with gradient, row-aligned with `EncodedBatch.text_embeds` (None for `ExtraPairs`)."""

    inputs: ExtraTexts | ExtraPairs
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor | None = None
    gathered_text_embeds: torch.Tensor | None = None


@dataclass
class EncodedBatch:
    """One training batch after the forward, as every objective sees it.

    Attributes:
        inputs: the local batch (`pixel_values`, `input_ids`, `attention_mask`, `index`, ...).
        sizes: the batch size of every process (for gathering more tensors like the batch).
        index: the global batch's dataset indices.
        image_embeds, text_embeds: the global batch's normalised embeddings, gathered with gradient.
        logit_scale: `1/τ`.
        per_sample: the plain symmetric InfoNCE `CE_i` of the global batch (what the loss bank records).
        extra: the embedded extra inputs by name.
        training: whether the model is in training mode.
    """

    inputs: dict[str, Any]
    sizes: list[int]
    index: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    per_sample: torch.Tensor
    extra: dict[str, EncodedExtra] = field(default_factory=dict)
    training: bool = True


class Objective:
    """One noise-robust method. Subclasses set `name` and `card`, and override the hooks they need.

    Class attributes:
        name: the name in `--method` (lower case).
        card: the model card's description (`MethodCard`).
        standalone: the method does not combine with others (`clip`).
        shapes_positive_term: the method replaces the positive InfoNCE term (`nlip`: NITC, `rcl`: complementary); at
            most one per combination.
        combines_with: when set, the only other methods it combines with.
        combination_rule: the error message's reason when a combination breaks `standalone` / `combines_with`.
        uses_noise_estimate: the loss reads the noise estimate (a warm-up that outlasts training makes it plain CLIP).

    Args:
        args: the run's `NLIPTrainingArguments` (read only).
    """

    name: ClassVar[str]
    card: ClassVar[MethodCard]
    standalone: ClassVar[bool] = False
    shapes_positive_term: ClassVar[bool] = False
    combines_with: ClassVar[frozenset[str] | None] = None
    combination_rule: ClassVar[str | None] = None
    uses_noise_estimate: ClassVar[bool] = False

    def __init__(self, args: Any):
        self.args = args

    # ------------------------------------------------------------------------------------------------- set-up
    def setup(self, context: TrainingContext) -> None:
        """Load what the method needs (a reference model, a captioner) once the trainer exists."""

    def map_style_requirement(self) -> str | None:
        """Why the method needs map-style data it can look examples up in (None: streaming works)."""
        return None

    def reads_batch_pixels(self) -> bool:
        """Whether the method reads the batch's pixels beyond the image tower (False lets a cached locked image
        tower skip decoding cached images)."""
        return False

    def uses_train_set_features(self) -> bool:
        """Whether the method's epoch work needs the whole training set's features (so a state pass keeps them)."""
        return False

    # ------------------------------------------------------------------------------------------------ per step
    def extra_inputs(self, inputs: dict[str, Any], context: TrainingContext) -> dict[str, ExtraTexts | ExtraPairs]:
        """More texts or pairs to embed with the (local) batch in the same forward, by name."""
        return {}

    def caption_weights(self, inputs: dict[str, Any], context: TrainingContext) -> torch.Tensor | None:
        """`[B]` weights of a pre-training model's captioning term for the (local) batch (None: unweighted)."""
        return None

    def contribute(self, batch: EncodedBatch, context: TrainingContext) -> Contribution:
        """The method's part of the loss of `batch`."""
        return Contribution()

    # --------------------------------------------------------------------------------------------- schedule
    def on_epoch_begin(self, epoch: int, context: TrainingContext) -> None:
        """Epoch-level work; record the epoch it ran for in the state, so a resumed run neither repeats nor skips it."""

    def on_step_begin(self, global_step: int, max_steps: int, context: TrainingContext) -> None:
        """Step-level schedule, before each optimizer step (a function of the step, so a resume continues it)."""

    # ----------------------------------------------------------------------------------------- reporting
    def settings(self) -> dict[str, Any]:
        """The method's settings for the model card and the training summary."""
        return {}

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """`(tensors, metadata)` to carry across a resume: safetensors-compatible tensors and JSON values."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *, where: str) -> None:
        """Restore `state_dict()` output; errors name `where` (the file)."""

    def upgrade_legacy_state(self, legacy: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """This method's state from a checkpoint written before objectives had their own files (noise state schema
        1-2, which held NPC's memory bank and the synthetic captions): `legacy` is `{"tensors", "metadata"}` of that
        noise state. None when the old state held nothing of this method."""
        return None

    def save_files(self, directory: str) -> None:
        """Write state that is not tensors or JSON (an optimizer) into the checkpoint `directory`."""

    def load_files(self, directory: str) -> None:
        """Read what `save_files` wrote (a checkpoint without it: start that state afresh)."""


def objective_state_paths(directory: str | os.PathLike, name: str) -> tuple[str, str]:
    """`nlip_objective_<name>.safetensors` and `.json` in `directory`."""
    stem = os.path.join(directory, f"nlip_objective_{name}")
    return f"{stem}.safetensors", f"{stem}.json"


def save_objective_state(objective: Objective, directory: str | os.PathLike) -> None:
    """Write `objective.state_dict()` (nothing when it is empty) and its `save_files`."""
    tensors, metadata = objective.state_dict()
    if tensors or metadata:
        tensors_path, json_path = objective_state_paths(directory, objective.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tensors_path)
        with open(json_path, "w", encoding="utf-8") as file:
            json.dump({"schema_version": OBJECTIVE_STATE_VERSION, "objective": objective.name, "state": metadata}, file)
    objective.save_files(str(directory))


def load_objective_state(objective: Objective, directory: str | os.PathLike, legacy: dict[str, Any] | None) -> bool:
    """Restore `objective` from `directory` (its own files, else the `legacy` noise state's part); whether anything
    was restored. A damaged or foreign file raises a ValueError naming it."""
    tensors_path, json_path = objective_state_paths(directory, objective.name)
    restored = None
    where = f"{tensors_path} / {json_path}"
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as file:
                saved = json.load(file)
            tensors = load_file(tensors_path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{where}: not a readable objective state ({type(error).__name__}: {error}).") from None
        if not isinstance(saved, dict) or saved.get("schema_version") != OBJECTIVE_STATE_VERSION \
                or saved.get("objective") != objective.name:
            raise ValueError(
                f"{json_path}: expected the state of objective {objective.name!r}, schema version "
                f"{OBJECTIVE_STATE_VERSION}; found {({k: saved.get(k) for k in ('objective', 'schema_version')} if isinstance(saved, dict) else type(saved).__name__)}."
            )
        restored = (tensors, saved["state"])
    elif legacy is not None:
        restored = objective.upgrade_legacy_state(legacy)
        where = f"the legacy noise state in {directory}"
    if restored is not None:
        objective.load_state_dict(*restored, where=where)
    objective.load_files(str(directory))
    return restored is not None
