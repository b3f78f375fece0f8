"""The noise-robust methods, one `Objective` per file, and their registry (see `base` for the protocol).

A new method is its own file with an `Objective` subclass, one `register_objective` line here (or in the user's own
code: registration works from outside the package) and its test.
"""

from ..losses import Contribution
from .base import (
    SYNTHETIC_TEXTS,
    EncodedBatch,
    EncodedExtra,
    ExtraPairs,
    ExtraTexts,
    MethodCard,
    Objective,
    load_objective_state,
    save_objective_state,
)
from .clip import CLIPObjective
from .nlip import NLIPObjective
from .npc import NPCObjective
from .rcl import RCLObjective
from .registry import (
    build_objectives,
    method_names,
    objective_class,
    parse_method,
    register_objective,
    registered_objectives,
    valid_methods_help,
)
from .srcl import SRCLObjective


register_objective(CLIPObjective)
register_objective(NLIPObjective)
register_objective(NPCObjective)
register_objective(SRCLObjective)
register_objective(RCLObjective)

__all__ = [
    "CLIPObjective",
    "Contribution",
    "EncodedBatch",
    "EncodedExtra",
    "ExtraPairs",
    "ExtraTexts",
    "MethodCard",
    "NLIPObjective",
    "NPCObjective",
    "Objective",
    "RCLObjective",
    "SRCLObjective",
    "SYNTHETIC_TEXTS",
    "build_objectives",
    "load_objective_state",
    "method_names",
    "objective_class",
    "parse_method",
    "register_objective",
    "registered_objectives",
    "save_objective_state",
    "valid_methods_help",
]
