"""Every code block of README.md runs as written, in order, in one empty folder (no Hub, no download).

Python blocks run in one shared namespace (as a user pasting them into one session); bash blocks run with
`bash -euo pipefail` and the virtual environment's `nlip-*` console scripts on the PATH. A block preceded by a line
`<!-- readme-test: skip (REASON) -->` is not run: the test of that block is skipped with REASON (blocks that need
the Hub, a GPU, or that set up the environment). Any other language is an error, so that a new block is either
runnable or marked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
RUNNABLE = ("python", "bash", "sh", "shell")
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>.+?)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```\s*$", re.S | re.M)
BLOCK_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


@dataclass
class Block:
    number: int
    line: int
    language: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"block{self.number:02d}-{self.language or 'text'}-line{self.line}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks of the README, with the skip reason of those marked not to run."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks = []
    for number, match in enumerate(FENCE.finditer(text), start=1):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP_MARKER.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(number, line, match.group("lang").lower(), match.group("code"),
                            marker.group("reason") if marker else None))
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_blocks_and_every_block_is_runnable_or_marked():
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        assert block.skip_reason or block.language in RUNNABLE, (
            f"README.md line {block.line}: a ```{block.language} block is neither runnable ({RUNNABLE}) nor marked "
            "<!-- readme-test: skip (reason) -->")
    quick_start = [b for b in BLOCKS if b.skip_reason is None]
    assert any("nlip-train" in b.code for b in quick_start) and any("nlip-audit" in b.code for b in quick_start)
    assert any("pipeline(" in b.code for b in quick_start) and any("NLIPTrainer" in b.code for b in quick_start)
    # nothing that runs may need the Hub: no Hub model ids, no placeholders
    for block in quick_start:
        for needle in ("openai/", "sentence-transformers/", "<your-username>", "my_imagefolder", "--push_to_hub"):
            assert needle not in block.code, f"README.md line {block.line}: runnable block uses {needle!r}"


def test_skip_markers_are_parsed():
    text = "a\n<!-- readme-test: skip (needs the Hub) -->\n```python\nx = 1\n```\n\n```bash\necho hi\n```\n"
    first, second = readme_blocks(text)
    assert (first.language, first.skip_reason, first.code) == ("python", "needs the Hub", "x = 1\n")
    assert (second.language, second.skip_reason, second.line) == ("bash", None, 7)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The empty folder every block runs in, the Python namespace the blocks share, and the environment."""
    root = tmp_path_factory.mktemp("readme")
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / ".hf_home"),
        "NLIP_CACHE": str(root / ".nlip_cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")]),
    }
    return {"dir": root, "namespace": {"__name__": "__readme__"}, "env": env, "failed": []}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block: Block, workdir, monkeypatch):
    if block.skip_reason:
        pytest.skip(f"README.md line {block.line}: {block.skip_reason}")
    if workdir["failed"]:
        pytest.fail(f"an earlier README block failed ({workdir['failed'][0]}); this one depends on it")
    monkeypatch.chdir(workdir["dir"])
    try:
        if block.language == "python":
            for key, value in workdir["env"].items():
                if key.startswith(("HF_", "NLIP_")):
                    monkeypatch.setenv(key, value)
            exec(compile(block.code, f"README.md:{block.line}", "exec"), workdir["namespace"])
        else:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir["dir"],
                                    env=workdir["env"], capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            assert result.returncode == 0, (
                f"README.md line {block.line} exited with {result.returncode}:\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-6000:]}")
    except BaseException:
        workdir["failed"].append(block.id)
        raise
    _check_outputs(block, workdir)


def _check_outputs(block: Block, workdir) -> None:
    """What the quick start promises, checked after the block that produces it."""
    root: Path = workdir["dir"]
    namespace = workdir["namespace"]
    if "nlip-train --train_dir quickstart/pairs --model_size tiny" in block.code:
        assert (root / "quickstart/nlip/model.safetensors").is_file()
        for name in ("train_results.json", "eval_results.json", "all_results.json", "README.md"):
            assert (root / "quickstart/nlip" / name).is_file(), name
        results = json.loads((root / "quickstart/nlip/all_results.json").read_text())
        assert "eval_zero_shot_top1" in results  # the string labels of metadata.jsonl work for zero-shot
    if "classify = pipeline(" in block.code:
        assert type(namespace["model"]).__name__ in ("NLIPForCaptioning", "NLIPForPreTraining")
        assert type(namespace["processor"]).__name__ == "NLIPProcessor"
    if "nlip-audit" in block.code and "quickstart/audit" in block.code:
        import datasets

        report = (root / "quickstart/audit/audit_report.html").read_text(encoding="utf-8")
        assert "<table id=\"pairs\"" in report and "loss-plot" in report
        pairs = datasets.load_dataset("parquet", data_files=str(root / "quickstart/audit/audit.parquet"), split="train")
        assert len(pairs) == 120 and isinstance(pairs.features["image"], datasets.Image)
    if "trainer.train()" in block.code:
        noise_prob = namespace["trainer"].noise_state.noise_prob
        assert noise_prob.shape == (120,) and bool(((noise_prob >= 0) & (noise_prob <= 1)).all())
    if "quickstart/args.yaml" in block.code:
        assert (root / "quickstart/clip/model.safetensors").is_file()
        assert (root / "quickstart/lora/lora_adapter/adapter_config.json").is_file()
        assert (root / "quickstart/lora-eval/eval_results.json").is_file()
        assert not (root / "quickstart/lora-eval/train_results.json").exists()
    if "torchrun --standalone --nproc_per_node 2" in block.code:
        # The streaming recipe: 2 gloo processes, checkpoints every 4 steps, then a resume of checkpoint-8 to step 12.
        assert "--ddp_backend gloo" in block.code and "--resume_from_checkpoint latest" in block.code
        output = root / "quickstart/stream"
        assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == \
            ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
        assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 12
        noise = json.loads((output / "nlip_noise_state.json").read_text())
        assert noise["data_fingerprint"]["kind"] == "stream" and noise["data_fingerprint"]["num_shards"] == 4
        assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
