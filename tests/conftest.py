import os
import sys

# Tests never touch the network: no Hub downloads, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
# The repository root as well, wherever pytest runs from: its packages must win over the tests' folders that mirror
# them (tests/trainers, tests/modeling_nlip, ...; namespace folders lose to a regular package found anywhere on the path).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import logging  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402


PROJECT_LOGGERS = ("nlip", "trainers", "nlip_cli")


@pytest.fixture(autouse=True)
def _restore_log_levels():
    """Scripts run in-process set the project's and transformers' log levels (as their CLIs should); restore them so
    a later test's `caplog` sees the warnings it checks for."""
    levels = {name: logging.getLogger(name).level for name in PROJECT_LOGGERS}
    verbosity = transformers.logging.get_verbosity()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    transformers.logging.set_verbosity(verbosity)


# The README's blocks run in order in one worker (`make test`: pytest-xdist, one file per worker) and are the longest
# file: collected first, it starts first, and the other worker takes the rest of the suite meanwhile.
LONGEST_FILE = "test_readme.py"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name != LONGEST_FILE)  # stable: every file keeps its own order
