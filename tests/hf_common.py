"""Runs transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, ...) against our models.

The transformers wheel ships no `tests/`, but the PyPI source distribution of the same version does. At test time
`load_hf_test_utils()` fetches it once with `pip download --no-deps --no-binary :all: transformers==<installed>`,
extracts only its `tests/` tree into a cache and imports the mixins from there:

- Cache: `$NLIP_HF_TESTS_CACHE`, else `~/.cache/nlip/transformers-tests`, then `<version>/`. The tree is built in a
  temporary folder and moved into place with one `os.replace` under a `filelock.FileLock`, so parallel runs neither
  download twice nor see a half-written tree; a present tree is reused as is.
- Package name: the tree is imported under the unique name `transformers_sdist_tests` through
  `importlib.util.spec_from_file_location` (its folder is never put on `sys.path`). The mixins only use relative
  imports, so they load unchanged, and our own top-level `tests/` folder (no `__init__.py`, on `sys.path` through
  `conftest.py`) can never shadow them or be shadowed by them.
- Stubs: modules the mixins import but the sdist lacks get a minimal stand-in, written only where the sdist has no
  such file: `generation/test_utils.py` (`GenerationTesterMixin`, reported as `None` in `HFTestUtils`, because the
  real generate tests are not in the sdist), `exporters/test_export.py` (`ExportTesterMixin`: the torch.export tests
  are lost), `utils/test_configuration_utils.py` (`config_common_kwargs`: non-default values for every field of
  `PreTrainedConfig`) and the repository-level `utils/fetch_hub_objects_for_ci.py` (`url_to_local_path` returns the
  URL unchanged; processor tests that open those Hub URLs need the Hub).

A test module calls `hf = require_hf_test_utils()` at import time and subclasses `hf.ModelTesterMixin`. When PyPI is
unreachable the module is skipped with a one-line reason, unless `NLIP_REQUIRE_HF_TESTS=1` (set it in CI), which makes
the failure an error instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import torch
import transformers
from filelock import FileLock
from transformers import PreTrainedConfig

PACKAGE_NAME = "transformers_sdist_tests"
STUB_MARKER = "NLIP_STUB"

# Modules the sdist's mixins import that the sdist does not ship, relative to the root that holds the package folder.
STUBS = {
    f"{PACKAGE_NAME}/generation/__init__.py": "",
    f"{PACKAGE_NAME}/generation/test_utils.py": f'''"""Stand-in: the sdist has no generation tests."""

{STUB_MARKER} = True


class GenerationTesterMixin:
    """Placeholder so `test_modeling_common` imports; no generate tests run."""
''',
    f"{PACKAGE_NAME}/exporters/__init__.py": "",
    f"{PACKAGE_NAME}/exporters/test_export.py": f'''"""Stand-in: the sdist has no export tests."""

{STUB_MARKER} = True


class ExportTesterMixin:
    """Placeholder base of `ModelTesterMixin`; no torch.export tests run."""
''',
    f"{PACKAGE_NAME}/utils/__init__.py": "",
    f"{PACKAGE_NAME}/utils/test_configuration_utils.py": f'''"""Stand-in: non-default values for every field of `PreTrainedConfig`."""

{STUB_MARKER} = True

config_common_kwargs = {{
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {{0: "label"}},
    "label2id": {{"label": 0}},
    "problem_type": "regression",
}}
''',
    "utils/fetch_hub_objects_for_ci.py": f'''"""Stand-in: no pre-fetched Hub files; URLs stay URLs."""

{STUB_MARKER} = True


def url_to_local_path(url, return_url_if_not_found=True):
    return url
''',
}


class HFTestsUnavailable(RuntimeError):
    """The transformers source distribution could not be downloaded or read."""


@dataclass(frozen=True)
class HFTestUtils:
    """The pieces of transformers' test suite our model tests build on."""

    ModelTesterMixin: type
    ConfigTester: type
    ids_tensor: Callable[..., torch.Tensor]
    floats_tensor: Callable[..., torch.Tensor]
    random_attention_mask: Callable[..., torch.Tensor]
    _config_zero_init: Callable[[PreTrainedConfig], PreTrainedConfig]
    GenerationTesterMixin: type | None  # None: the sdist has no generation tests (only a stub)
    ProcessorTesterMixin: type
    tests_dir: Path


def hf_tests_cache_dir(version: str | None = None) -> Path:
    """Folder holding the sdist and the extracted tests of transformers `version` (default: the installed one)."""
    base = os.environ.get("NLIP_HF_TESTS_CACHE") or Path.home() / ".cache" / "nlip" / "transformers-tests"
    return Path(base) / (version or transformers.__version__)


def _download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the transformers `version` source distribution into `dest`; returns the archive."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "1",
           "--timeout", "20", "--disable-pip-version-check", "-d", str(dest), f"transformers=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HFTestsUnavailable(f"`pip download transformers=={version}` did not run: {err}") from err
    archives = sorted(dest.glob("transformers-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HFTestsUnavailable(f"`pip download transformers=={version}` (source distribution) failed: {last}")
    return archives[0]


def _extract_tests(archive: Path, dest: Path) -> None:
    """Write the archive's `<top>/tests/**` regular files under `dest`, refusing paths that leave `dest`."""
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, EOFError) as err:
        raise HFTestsUnavailable(
            f"{archive} is not a readable .tar.gz ({type(err).__name__}); delete it to download it again"
        ) from err
    with tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile():
                continue
            rel = parts[2:]
            if any(p in ("..", "") for p in rel) or PurePosixPath(member.name).is_absolute():
                raise HFTestsUnavailable(f"{archive}: unsafe path {member.name!r} in the source distribution")
            target = dest.joinpath(*rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / "test_modeling_common.py").is_file():
        raise HFTestsUnavailable(f"{archive} has no tests/test_modeling_common.py")


def ensure_hf_tests(version: str | None = None) -> Path:
    """Download and extract transformers' tests once; returns the root folder holding `PACKAGE_NAME/`."""
    version = version or transformers.__version__
    cache = hf_tests_cache_dir(version)
    root = cache / "root"
    if (root / PACKAGE_NAME / "__init__.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".lock")):
        if (root / PACKAGE_NAME / "__init__.py").is_file():  # built by another process while we waited
            return root
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            tmp = Path(tmp)
            archives = sorted(cache.glob("transformers-*.tar.gz"))
            if not archives:
                archive = _download_sdist(version, tmp / "download")
                archives = [archive.replace(cache / archive.name)]
            package = tmp / "root" / PACKAGE_NAME
            _extract_tests(archives[0], package)
            (package / "__init__.py").touch()
            for rel, source in STUBS.items():
                target = tmp / "root" / rel
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(source)
            shutil.rmtree(root, ignore_errors=True)  # only a tampered-with tree can be here
            os.replace(tmp / "root", root)
    return root


def _import_package(root: Path):
    """Import `root/PACKAGE_NAME` as the top-level package `PACKAGE_NAME` without touching `sys.path`."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    package_dir = root / PACKAGE_NAME
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_hf_test_utils() -> HFTestUtils:
    """Fetch (once) and import transformers' common test mixins; raises `HFTestsUnavailable` when they cannot be had."""
    root = ensure_hf_tests()
    with warnings.catch_warnings():  # the marks (flash_attn_test, ...) are registered by transformers' own conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        _import_package(root)
        modeling = importlib.import_module(f"{PACKAGE_NAME}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE_NAME}.test_configuration_common")
        generation = importlib.import_module(f"{PACKAGE_NAME}.generation.test_utils")
        processing = importlib.import_module(f"{PACKAGE_NAME}.test_processing_common")
    return HFTestUtils(
        ModelTesterMixin=modeling.ModelTesterMixin,
        ConfigTester=configuration.ConfigTester,
        ids_tensor=modeling.ids_tensor,
        floats_tensor=modeling.floats_tensor,
        random_attention_mask=modeling.random_attention_mask,
        _config_zero_init=modeling._config_zero_init,
        GenerationTesterMixin=None if getattr(generation, STUB_MARKER, False) else generation.GenerationTesterMixin,
        ProcessorTesterMixin=processing.ProcessorTesterMixin,
        tests_dir=root / PACKAGE_NAME,
    )


def require_hf_test_utils() -> HFTestUtils:
    """`load_hf_test_utils()` for a test module's import time: skips the module when PyPI is unreachable, or raises
    when `NLIP_REQUIRE_HF_TESTS=1`."""
    try:
        return load_hf_test_utils()
    except HFTestsUnavailable as err:
        if os.environ.get("NLIP_REQUIRE_HF_TESTS") == "1":
            raise
        pytest.skip(f"transformers' common tests unavailable (PyPI unreachable?): {err}", allow_module_level=True)
