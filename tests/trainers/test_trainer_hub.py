"""`push_to_hub=True` and `trainer.push_to_hub()` against the local Hub: weights, config, processor, remote code (from
the first push on), the model card and `nlip_training_summary.json`; the pushed repo loads back in a fresh process
through its remote code."""

import json

import pytest
import torch

from hub_server import local_hub, run_python  # noqa: F401  (local_hub is a fixture)
from nlip_testing import TESTS_DIR


REPO = "nlip-tester/tiny-noisy-nlip"
CODE_FILES = {"modeling_nlip.py", "configuration_nlip.py", "processing_nlip.py"}

TRAIN_AND_PUSH = """
import json, sys
import torch
sys.path.insert(0, {tests_dir!r})
torch.set_num_threads(1)
from nlip_testing import processor, synthetic_pairs, tiny_model, training_args
from trainers.data.collator import ImageTextCollator
from trainers.trainer import NLIPTrainer

pairs = synthetic_pairs(32)
args = training_args({output_dir!r}, method="nlip", per_device_train_batch_size=8, num_train_epochs=2,
                     noise_warmup_epochs=1, save_strategy="epoch", push_to_hub=True, hub_model_id={repo!r},
                     eval_strategy="epoch")
trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, eval_dataset=pairs.select(range(16)),
                      processing_class=processor())
trainer.train()
trainer.push_to_hub(dataset="synthetic-noisy-pairs")
batch = ImageTextCollator(processor(), caption_choice="first")([pairs[i] for i in range(4)])
trainer.model.eval()
with torch.no_grad():
    out = trainer.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"])
torch.save({{"inputs": dict(batch), "image_embeds": out.image_embeds, "text_embeds": out.text_embeds}}, {expected!r})
print(json.dumps(trainer.noise_state.statistics))
"""

LOAD_BACK = """
import json, sys
sys.modules["modeling_nlip"] = None  # a user without the package: only the repo's remote code
sys.modules["trainers"] = None
import torch
from huggingface_hub import HfApi
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({repo!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({repo!r}, trust_remote_code=True)
expected = torch.load({expected!r}, weights_only=False)
inputs = expected["inputs"]
with torch.no_grad():
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
torch.testing.assert_close(out.image_embeds, expected["image_embeds"])
torch.testing.assert_close(out.text_embeds, expected["text_embeds"])
api = HfApi()
print(json.dumps({{"model_class": type(model).__module__, "processor": type(processor).__name__,
                  "readme": open(api.hf_hub_download({repo!r}, "README.md")).read(),
                  "summary": json.load(open(api.hf_hub_download({repo!r}, "nlip_training_summary.json")))}}))
"""


@pytest.mark.slow
def test_push_to_hub_and_load_back(local_hub, tmp_path):
    tests_dir = str(TESTS_DIR)
    expected = str(tmp_path / "expected.pt")
    code = TRAIN_AND_PUSH.format(tests_dir=tests_dir, output_dir=str(tmp_path / "run"), repo=REPO, expected=expected)
    statistics = json.loads(run_python(code, local_hub.env(tmp_path / "home_train")).strip().splitlines()[-1])

    # Every push that carried weights also carried the remote code, the card and the summary: from the first on.
    state = local_hub.store.load("model", REPO)
    commits = sorted(state["commits"].values(), key=lambda commit: commit["number"])
    pushes = [commit for commit in commits if "model.safetensors" in commit["files"]]
    assert len(pushes) >= 2, [commit["summary"] for commit in commits]
    assert pushes[0]["summary"].startswith("Training in progress")
    required = CODE_FILES | {"config.json", "processor_config.json", "README.md", "nlip_training_summary.json"}
    for commit in pushes:
        assert required <= set(commit["files"]), (commit["summary"], sorted(commit["files"]))
    assert not any(path.startswith("checkpoint-") for path in commits[-1]["files"])

    result = json.loads(run_python(LOAD_BACK.format(repo=REPO, expected=expected), local_hub.env(tmp_path / "home_load"))
                        .strip().splitlines()[-1])
    assert result["model_class"].startswith("transformers_modules.")  # loaded through the pushed remote code
    assert result["processor"] == "NLIPProcessor"
    summary, readme = result["summary"], result["readme"]
    assert summary["method"] == "nlip" and summary["datasets"] == ["synthetic-noisy-pairs"]
    assert summary["noise_settings"]["nitc_strength"] == 0.1 and summary["noise_settings"]["injected_noisy_fraction"] == 0.25
    stats = summary["noise_statistics"]
    assert stats["mean_noise_probability"] == pytest.approx(statistics["noise/mean_noise_prob"])
    assert stats["roc_auc"] == pytest.approx(statistics["noise/roc_auc"]) and stats["num_pairs"] == 32
    assert "loss" in summary["evaluation_results"]["evaluation"]
    assert "# tiny-noisy-nlip" in readme and "Method: `nlip`." in readme
    assert "| Mean noise probability `ε` |" in readme and "| `nitc_strength` | 0.1 |" in readme
    assert "synthetic-noisy-pairs" in readme and f'from_pretrained("{REPO}"' in readme
    assert torch.load(expected, weights_only=False)["image_embeds"].shape == (4, 16)
