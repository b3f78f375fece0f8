"""The declared dependencies match what the code imports, the lock satisfies the declared ranges, and the tested
transformers window (`modeling_nlip.TESTED_TRANSFORMERS`) is the one pyproject.toml admits."""

import ast
import re
import sys
import tomllib
import warnings
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import modeling_nlip

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
INSTALLED_PACKAGES = ("modeling_nlip", "trainers", "nlip_cli")
FIRST_PARTY = set(INSTALLED_PACKAGES)
# Declared but imported only by other packages on the user's behalf.
INDIRECT = {
    "torchvision": "timm's layers and transformers' fast image processors import it; declared to pin a build that matches torch",
}


def _requirements(extra: str | None = None) -> list[Requirement]:
    requirements = [Requirement(r) for r in (PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra])]
    return [r for r in requirements if r.name != PROJECT["name"]]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> tuple[set[str], set[str]]:
    """Third-party top-level modules imported by the installed packages: (at module level, anywhere)."""
    module_level, anywhere = set(), set()
    for package in INSTALLED_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                top = {n.split(".")[0] for n in names} - FIRST_PARTY - set(sys.stdlib_module_names)
                anywhere |= top
                if node in tree.body:
                    module_level |= top
    return module_level, anywhere


def _distribution(module: str) -> str:
    distributions = packages_distributions().get(module)
    assert distributions, f"`import {module}` in the package code, but no installed distribution provides it"
    return _normalise(distributions[0])


def test_every_import_is_declared():
    core = {_normalise(r.name) for r in _requirements()}
    extras = {_normalise(r.name) for extra in PROJECT["optional-dependencies"] for r in _requirements(extra)}
    module_level, anywhere = _imports()
    undeclared_core = sorted(m for m in module_level if _distribution(m) not in core)
    assert not undeclared_core, f"imported at module level but not in [project].dependencies: {undeclared_core}"
    undeclared = sorted(m for m in anywhere if _distribution(m) not in core | extras)
    assert not undeclared, f"imported (lazily) but declared nowhere in pyproject.toml: {undeclared}"


def test_every_core_dependency_is_imported():
    _, anywhere = _imports()
    imported = {_distribution(m) for m in anywhere}
    unused = sorted(r.name for r in _requirements() if _normalise(r.name) not in imported and r.name not in INDIRECT)
    assert not unused, f"declared in [project].dependencies but never imported by the package code: {unused}"


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact `name==version` pin"
            pins[_normalise(name)] = Version(pinned.split("+")[0])
    return pins


def test_lock_pins_every_requirement_inside_its_range():
    pins = _lock()
    everything = _requirements() + [r for extra in PROJECT["optional-dependencies"] for r in _requirements(extra)]
    for requirement in everything:
        name = _normalise(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_tested_transformers_window_is_the_declared_range():
    declared = next(r for r in _requirements() if r.name == "transformers")
    assert str(declared.specifier) == str(modeling_nlip.TESTED_TRANSFORMERS)


@pytest.mark.parametrize("installed, inside", [("5.25.0", True), ("5.25.3", True), ("5.24.0", False), ("5.26.0", False)])
def test_import_time_warning_outside_the_tested_window(installed, inside):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert modeling_nlip.warn_if_untested_transformers(installed) is inside
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if inside:
        assert messages == []
    else:
        assert len(messages) == 1 and f"transformers {installed} is installed" in messages[0]
        assert "transformers<5.26,>=5.25" in messages[0] or "transformers>=5.25,<5.26" in messages[0]
