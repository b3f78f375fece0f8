"""The transformers releases nlip is tested with, and a warning when the installed one lies outside them.

`TESTED_TRANSFORMERS` is the `transformers` range of `pyproject.toml` (a test keeps the two equal). Installing outside
it (e.g. `pip install --no-deps`, or a newer transformers than the lock) still imports, with one warning naming both
versions, because upstream minor releases have changed APIs the models rely on (5.24 renamed `past_key_values` to
`cache`).
"""

import warnings

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

TESTED_TRANSFORMERS = SpecifierSet(">=5.25,<5.26")


def warn_if_untested_transformers(installed: str = transformers.__version__) -> bool:
    """Warn (a `UserWarning`) when `installed` is outside `TESTED_TRANSFORMERS`; returns whether it is inside."""
    if Version(installed) in TESTED_TRANSFORMERS:
        return True
    warnings.warn(
        f"nlip is tested with transformers{TESTED_TRANSFORMERS}, but transformers {installed} is installed; models or "
        "training may break. Install the tested versions with `pip install -c constraints.txt -e .` (the lock in the "
        "nlip repository), or run `make test-latest` to check this release.",
        UserWarning,
        stacklevel=3,
    )
    return False
