"""Exact resume: a run interrupted at a checkpoint and resumed by a new trainer ends with the same weights and noise
state as the uninterrupted run."""

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nlip_testing import noise_state_snapshot, processor, single_thread, synthetic_pairs, tiny_model, training_args
from trainers.noise.state import NOISE_STATE_JSON, NOISE_STATE_TENSORS, NoiseState
from trainers.objectives.base import objective_state_paths
from trainers.objectives.npc import NPC_SIBLING_OPTIMIZER_NAME
from trainers.trainer import NLIPTrainer


# 64 pairs in batches of 16: 4 steps per epoch, 3 epochs; the GMM is first fit at the start of epoch 1 (step 4).
NUM_PAIRS, BATCH, EPOCHS = 64, 16, 3


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _two_captions_each():
    """Pairs with two captions each: the random caption of every step must also come back on resume."""
    return synthetic_pairs(NUM_PAIRS).map(lambda row: {"text": [row["text"], " ".join(reversed(row["text"].split()))]})


# Per configuration: the method and its overrides. Random pairs give no confidently clean ones: NPC's clean set is
# taken at p > 0.5. `nlip-averaged` fits the mixture on losses averaged over the fits (their average is resumed too).
CONFIGURATIONS = {
    "nlip": ("nlip", {}),
    "npc": ("npc", {"npc_clean_threshold": 0.5}),
    "nlip-averaged": ("nlip", {"noise_loss_momentum": 0.5}),
}


def _run(output_dir, configuration, resume_from=None):
    method, overrides = CONFIGURATIONS[configuration]
    args = training_args(
        output_dir, method=method, per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, noise_warmup_epochs=1,
        save_strategy="steps", save_steps=2, learning_rate=3e-3, **overrides,
    )
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=_two_captions_each(), processing_class=processor())
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def _assert_same_run(trainer, reference):
    for (name, param), reference_param in zip(trainer.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(param, reference_param, rtol=1e-5, atol=1e-6, msg=f"weight {name}")
    state, reference_state = noise_state_snapshot(trainer.noise_state), noise_state_snapshot(reference.noise_state)
    assert state["tensors"].keys() == reference_state["tensors"].keys()
    for name, tensor in state["tensors"].items():
        torch.testing.assert_close(tensor, reference_state["tensors"][name], rtol=1e-5, atol=1e-6, msg=f"noise state {name}")
    _assert_close_values(state["metadata"], reference_state["metadata"], "metadata")


def _assert_close_values(value, reference, where):
    """Nested dicts/lists equal, floats to a relative 1e-4 (the mixture is fit on losses equal to float tolerance)."""
    if isinstance(value, dict):
        assert value.keys() == reference.keys(), where
        for key in value:
            _assert_close_values(value[key], reference[key], f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        assert len(value) == len(reference), where
        for position, (item, reference_item) in enumerate(zip(value, reference)):
            _assert_close_values(item, reference_item, f"{where}[{position}]")
    elif isinstance(value, float):
        assert value == pytest.approx(reference, rel=1e-4, abs=1e-7, nan_ok=True), where
    else:
        assert value == reference, where


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def uninterrupted(request, tmp_path_factory):
    configuration = request.param
    with single_thread():
        return configuration, _run(tmp_path_factory.mktemp(f"full-{configuration}"), configuration)


@pytest.mark.parametrize("step", [4, 6])  # an epoch boundary (the fit happens after resuming) and the middle of epoch 1
def test_resumed_run_equals_uninterrupted_run(uninterrupted, step, tmp_path):
    configuration, reference = uninterrupted
    checkpoint = os.path.join(reference.args.output_dir, f"checkpoint-{step}")
    assert NoiseState.exists(checkpoint) and os.path.isfile(os.path.join(checkpoint, NOISE_STATE_JSON))
    if configuration == "nlip-averaged":  # the average the next fit continues is part of the checkpoint
        saved = load_file(os.path.join(checkpoint, NOISE_STATE_TENSORS))
        assert ("fit_losses" in saved) == (step > 4)  # checkpoint-4 precedes the first fit
        assert reference.noise_state.fit_losses is not None
    if configuration == "npc":
        npc = reference.objectives["npc"]
        assert npc.memory_bank is not None and npc.memory_epoch >= 1
        assert os.path.isfile(os.path.join(checkpoint, NPC_SIBLING_OPTIMIZER_NAME)) == (step > 4)
    assert reference.noise_state.num_fits == 3  # epochs 1 and 2, and the final fit

    resumed = _run(tmp_path, configuration, resume_from=checkpoint)
    assert resumed.state.global_step == EPOCHS * NUM_PAIRS // BATCH
    _assert_same_run(resumed, reference)


def test_resume_without_noise_state_diverges(uninterrupted, tmp_path, caplog):
    """The negative control: the same resume without the saved noise state ends elsewhere."""
    configuration, reference = uninterrupted
    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(os.path.join(reference.args.output_dir, "checkpoint-6"), checkpoint)
    objective_files = [path for name in reference.objectives for path in objective_state_paths(checkpoint, name)]
    for name in (NOISE_STATE_TENSORS, NOISE_STATE_JSON, NPC_SIBLING_OPTIMIZER_NAME, *objective_files):
        (checkpoint / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="trainers.trainer"):
        resumed = _run(tmp_path / "run", configuration, resume_from=str(checkpoint))
    assert "has no noise state; noise estimation starts afresh" in caplog.text
    with pytest.raises(AssertionError):
        _assert_same_run(resumed, reference)
