"""The project's requirements without their version ranges, for `make test-latest` (the newest release of each).

    python .ci/unpinned_requirements.py [EXTRA ...]   # names of the core dependencies and of the given extras
    python .ci/unpinned_requirements.py --versions    # the installed version of each of them (all extras)

Extras that name the project itself (`nlip[data,bench]`) are followed. Standard library only: it runs in a fresh venv.
"""

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?")


def requirement_names(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    names, pending, seen = [], list(project["dependencies"]), set()
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{PYPROJECT}: no optional dependency group {extra!r} (have: {', '.join(optional)}).")
        pending += optional[extra]
    while pending:
        name, nested = NAME.match(pending.pop(0)).groups()
        if name == project["name"]:
            pending += [req for extra in (nested or "").split(",") for req in optional[extra.strip()]]
        elif name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def main() -> None:
    if sys.argv[1:] == ["--versions"]:
        project = tomllib.loads(PYPROJECT.read_text())["project"]
        for name in requirement_names(list(project.get("optional-dependencies", {}))):
            try:
                print(f"{name}=={version(name)}")
            except PackageNotFoundError:
                print(f"{name}: not installed")
        print(f"python=={sys.version.split()[0]}")
        return
    print(" ".join(requirement_names(sys.argv[1:])))


if __name__ == "__main__":
    main()
