"""The README's streaming and multi-process CPU recipe runs as written: its runnable blocks of the "Scaling out and
streaming web-scale shards" section, in order, in an empty folder (4 shards with sidecars, a loopback `http.server`,
`torchrun --nproc_per_node 2 ... --ddp_backend gloo --use_cpu true`, then `--resume_from_checkpoint latest`)."""

import json
import os
import subprocess
import sys

from test_readme import README, readme_blocks

SECTION = "### Scaling out and streaming web-scale shards"


def section_blocks():
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start)
    return [block for block in readme_blocks(text[start:end]) if block.skip_reason is None]


def test_streaming_recipe_runs_as_written(tmp_path):
    blocks = section_blocks()
    assert [block.language for block in blocks] == ["python", "bash"]
    assert "torchrun --standalone --nproc_per_node 2" in blocks[1].code and "--ddp_backend gloo" in blocks[1].code
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / ".hf_home"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    for block in blocks:
        command = [sys.executable, "-c", block.code] if block.language == "python" else \
            ["bash", "-euo", "pipefail", "-c", block.code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"README.md block at line {block.line}:\n{result.stdout[-3000:]}\n" \
            f"{result.stderr[-6000:]}"
    output = tmp_path / "quickstart" / "stream"
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == \
        ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    noise = json.loads((output / "nlip_noise_state.json").read_text())
    assert noise["data_fingerprint"]["kind"] == "stream" and noise["data_fingerprint"]["num_shards"] == 4
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
