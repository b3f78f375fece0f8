"""The README's Python quick start runs as written (paths and budget swapped for a tiny model and a few pairs)."""

import re
from pathlib import Path

import numpy as np
import PIL.Image

from trainer_testing import processor, single_thread, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start() -> str:
    match = re.search(r"## Quick start\n.*?```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match, "README.md has no '## Quick start' section with a python block"
    return match.group(1)


def _substitute(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README quick start no longer contains {old!r}; update this test"
        code = code.replace(old, new)
    return code


def test_quick_start_runs(tmp_path, monkeypatch):
    checkpoint = tmp_path / "clip"
    tiny_model().save_pretrained(checkpoint)
    processor().save_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    code = _substitute(_quick_start(), {
        '"outputs/demo/clip"': repr(str(checkpoint)),
        "max_samples_per_split=2000": "max_samples_per_split=96",
        "num_train_epochs=4": "num_train_epochs=2",
        'report_to="none"': 'report_to="none", disable_tqdm=True',
    })
    monkeypatch.chdir(tmp_path)  # "photo.png" and output_dir="out" are relative
    namespace: dict = {}
    with single_thread():
        exec(compile(code, str(README), "exec"), namespace)
    assert type(namespace["model"]).__name__ == "NLIPModel"
    assert type(namespace["processor"]).__name__ == "NLIPProcessor"
    noise_prob = namespace["trainer"].noise_state.noise_prob
    assert noise_prob.shape == (96,) and bool(((noise_prob >= 0) & (noise_prob <= 1)).all())
    assert namespace["trainer"].noise_state.num_fits >= 1
