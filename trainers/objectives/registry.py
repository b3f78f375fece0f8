"""The objectives by name: `register_objective` adds one (also from outside the package), `method_names` /
`parse_method` read a `--method` string such as `"nlip+srcl"`, and `build_objectives` makes a run's objectives."""

from __future__ import annotations

from typing import Any

from .base import Objective


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(objective: type[Objective]) -> type[Objective]:
    """Make `objective` available to `--method` under `objective.name` (usable as a class decorator). Registering
    another class under a taken name is an error; registering the same class again is a no-op."""
    name = getattr(objective, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or "+" in name:
        raise ValueError(f"An objective needs a lower-case `name` without '+'; {objective.__name__} has {name!r}.")
    if not hasattr(objective, "card"):
        raise ValueError(f"Objective {name!r} ({objective.__name__}) needs a `card` (a MethodCard) for its model card.")
    known = _OBJECTIVES.get(name)
    if known is not None and known is not objective:
        raise ValueError(f"An objective named {name!r} is already registered ({known.__module__}.{known.__name__}).")
    _OBJECTIVES[name] = objective
    return objective


def registered_objectives() -> dict[str, type[Objective]]:
    """Every registered objective, in registration order (the order a combination's parts run in)."""
    return dict(_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    return _OBJECTIVES[name]


def valid_methods_help() -> str:
    standalone = ", ".join(repr(name) for name, cls in _OBJECTIVES.items() if cls.standalone)
    combinable = ", ".join(repr(name) for name, cls in _OBJECTIVES.items() if not cls.standalone)
    return f"{standalone}, or one or more of {combinable} joined with '+' (e.g. 'nlip+srcl', 'rcl+npc')"


def method_names(method: str) -> list[str]:
    """The parts of a method string in registration order, validated: known names, none twice, a standalone method
    alone, at most one method that shapes the positive term, and each part's `combines_with`."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"`method` must be {valid_methods_help()}; got {method!r}.")
    names = [name.strip().lower() for name in method.split("+")]
    unknown = [name for name in names if name not in _OBJECTIVES]
    if unknown:
        raise ValueError(f"`method`={method!r} has unknown name(s) {unknown}; valid methods are {valid_methods_help()}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`method`={method!r} names a method twice.")
    classes = [_OBJECTIVES[name] for name in names]
    if len(names) > 1:
        for cls in classes:
            others = set(names) - {cls.name}
            if cls.standalone or (cls.combines_with is not None and not others <= cls.combines_with):
                rule = cls.combination_rule or f"{cls.name!r} does not combine with {sorted(others)}"
                raise ValueError(f"`method`={method!r}: {rule}; valid methods are {valid_methods_help()}.")
        shaping = [cls.name for cls in classes if cls.shapes_positive_term]
        if len(shaping) > 1:
            raise ValueError(f"`method`={method!r}: {' and '.join(map(repr, shaping))} each replace the positive "
                             "contrastive term; combine at most one of them.")
    order = list(_OBJECTIVES)
    return sorted(names, key=order.index)


def parse_method(method: str) -> frozenset[str]:
    """The method's parts as a set, without the standalone baseline: empty for `clip`, `{"nlip", "srcl"}` for
    `nlip+srcl`."""
    return frozenset(name for name in method_names(method) if not _OBJECTIVES[name].standalone)


def build_objectives(args: Any) -> dict[str, Objective]:
    """The objectives of `args.method`, by name, in registration order."""
    return {name: _OBJECTIVES[name](args) for name in method_names(args.method)}
