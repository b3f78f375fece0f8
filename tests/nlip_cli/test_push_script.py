"""`nlip-push`: --help, checkpoint checks, model card choice, and a real push to the local Hub loaded back."""

import dataclasses
import json
import textwrap
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

from hub_server import local_hub, run_python  # noqa: F401  (local_hub is a fixture)
from modeling_nlip import NLIPModel
from nlip_cli.push import PushArguments, card_summary, main
from nlip_testing import REPO_ROOT, tiny_nlip_config, tiny_processor
from trainers.model_card import TrainingSummary

SUMMARY = TrainingSummary(
    method="nlip", noise_settings={"noise_rate": 0.5}, datasets=["fashion_mnist"],
    noise_statistics={"mean_noise_probability": 0.4721, "estimated_noisy_fraction": 0.5125, "roc_auc": 0.8875},
    evaluation_results={"fashion_mnist test": {"top1": 42.5}}, training_hyperparameters={"learning_rate": 0.001},
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny NLIPModel + processor, and its embeddings on two random images and captions."""
    torch.manual_seed(0)
    model = NLIPModel(tiny_nlip_config()).eval()
    processor = tiny_processor()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = processor(images=images, text=["a photo of a dog", "a blue house"], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return path, dict(inputs), outputs


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: nlip-push") and "nlip_training_summary.json" in text
    for field in dataclasses.fields(PushArguments):
        assert f"--{field.name}" in text and " ".join(field.metadata["help"].split()) in text
    assert entry_points(group="console_scripts")["nlip-push"].value == "nlip_cli.push:main"


def test_checkpoint_errors_come_before_any_hub_call(tmp_path, checkpoint):
    path, _, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        main(["--checkpoint_dir", str(tmp_path / "missing"), "--repo_id", "x"])
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        main(["--checkpoint_dir", str(tmp_path), "--repo_id", "x"])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"has no weights: expected one of \['model.safetensors'"):
        main(["--checkpoint_dir", str(tmp_path), "--repo_id", "x"])
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"auto_map of \['config.json'\] needs \['configuration_nlip.py', "
                                                 r"'modeling_nlip.py'\], which are missing"):
        main(["--checkpoint_dir", str(tmp_path), "--repo_id", "x"])
    for name in ("configuration_nlip.py", "modeling_nlip.py", "processor_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    with pytest.raises(FileNotFoundError, match=r"auto_map of \['processor_config.json'\] needs \['processing_nlip.py'\]"):
        main(["--checkpoint_dir", str(tmp_path), "--repo_id", "x"])
    (tmp_path / "processing_nlip.py").write_text((path / "processing_nlip.py").read_text())
    (tmp_path / "nlip_training_summary.json").write_text('{"method": "nlip+magic"}')
    with pytest.raises(ValueError, match=r"method`='nlip\+magic' has unknown name"):
        main(["--checkpoint_dir", str(tmp_path), "--repo_id", "x"])


def test_card_summary_choice(tmp_path):
    config = {"architectures": ["NLIPModel"]}
    summary, source = card_summary(tmp_path, config)
    assert source == "minimal card (no nlip_training_summary.json)" and summary.method is None and summary.datasets == []
    assert card_summary(tmp_path, {"architectures": ["NLIPForCaptioning"]})[0].pipeline_tag == "image-to-text"
    SUMMARY.save(tmp_path)
    summary, source = card_summary(tmp_path, config)
    assert source == "rendered from nlip_training_summary.json" and summary == SUMMARY
    (tmp_path / "README.md").write_text("# my own card\n")
    assert card_summary(tmp_path, config) == (None, "kept the folder's README.md")


@pytest.mark.slow
def test_push_to_local_hub_and_load_back(local_hub, checkpoint, tmp_path):
    path, inputs, outputs = checkpoint
    folder = tmp_path / "to_push"
    folder.mkdir()
    for file in path.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    SUMMARY.save(folder)
    (folder / "checkpoint-10").mkdir()  # an intermediate Trainer checkpoint: not pushed
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    push = textwrap.dedent(
        f"""
        import json
        from huggingface_hub import HfApi
        from nlip_cli.push import main
        first = main(["--checkpoint_dir", {str(folder)!r}, "--repo_id", "pushed", "--private"])
        second = main(["--checkpoint_dir", {str(folder)!r}, "--repo_id", "nlip-tester/pushed", "--revision", "dev",
                       "--commit_message", "to dev"])
        api = HfApi()
        info = api.model_info("nlip-tester/pushed")
        readme = open(api.hf_hub_download("nlip-tester/pushed", "README.md")).read()
        print(json.dumps({{"first": first, "second": second, "files": api.list_repo_files("nlip-tester/pushed"),
                          "dev_files": api.list_repo_files("nlip-tester/pushed", revision="dev"),
                          "private": info.private, "tags": info.tags, "readme": readme}}))
        """
    )
    result = json.loads(run_python(push, local_hub.env(tmp_path / "home_push")).strip().splitlines()[-1])
    first, second = result["first"], result["second"]
    assert first["repo_id"] == "nlip-tester/pushed" and first["revision"] == "main"
    assert first["model_card"] == "rendered from nlip_training_summary.json"
    assert first["commit_url"] == f"{local_hub.url}/nlip-tester/pushed/commit/{first['commit']}"
    # the README nlip generated at the first push is re-rendered (with the repo id); a hand-written one would be kept
    assert second["revision"] == "dev" and second["model_card"] == "rendered from nlip_training_summary.json"
    expected = {".gitattributes", "README.md", "nlip_training_summary.json", *(f.name for f in path.iterdir())}
    assert set(result["files"]) == expected == set(result["dev_files"]) and not any("checkpoint-10" in f for f in result["files"])
    assert {"modeling_nlip.py", "configuration_nlip.py", "processing_nlip.py", "processor_config.json"} <= expected
    assert result["private"] is True and result["tags"][:2] == ["nlip", "noisy-correspondence"]
    readme = result["readme"]
    assert readme == (folder / "README.md").read_text()
    assert "# pushed\n" in readme and "| Noise-detection ROC-AUC vs. ground truth | 0.8875 |" in readme
    assert "| fashion_mnist test | `top1` | 42.5 |" in readme and 'from_pretrained("nlip-tester/pushed"' in readme

    torch.save(inputs, tmp_path / "inputs.pt")
    load = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None  # load as a user without the package, as the card's snippet says
        sys.modules["trainers"] = None
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained("nlip-tester/pushed", trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save({{"image": out.image_embeds, "text": out.text_embeds}}, {str(tmp_path / "out.pt")!r})
        classifier = pipeline("zero-shot-image-classification", model="nlip-tester/pushed", trust_remote_code=True)
        scores = classifier(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)), candidate_labels=["cat", "dog"])
        assert sorted(s["label"] for s in scores) == ["cat", "dog"], scores
        """
    )
    run_python(load, local_hub.env(tmp_path / "home_load"))
    remote = torch.load(tmp_path / "out.pt")
    # Another process may use another thread count and so another summation order: float32 rounding only.
    torch.testing.assert_close(remote["image"], outputs.image_embeds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(remote["text"], outputs.text_embeds, rtol=1e-6, atol=1e-7)


def _push_subprocess(checkpoint_dir, env):
    import os
    import subprocess
    import sys

    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nlip_cli.push", "--checkpoint_dir", str(checkpoint_dir),
                           "--repo_id", "nlip-tester/refused"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_offline_or_unauthorised_push_is_a_one_line_error(checkpoint, local_hub, tmp_path):
    import os

    path, _, _ = checkpoint
    offline = _push_subprocess(path, {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home1")})
    no_token = local_hub.env(tmp_path / "home2", token="")
    no_token.pop("HF_TOKEN", None)
    unauthorised = _push_subprocess(path, no_token)
    for result, expected in ((offline, "offline mode is on"), (unauthorised, "token")):
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("nlip-push: error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert "Traceback" not in result.stderr, result.stderr
