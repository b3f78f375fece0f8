"""Resume safety (issue 17): a checkpoint records a fingerprint of its training data and refuses other data at once,
saying what changed; damaged noise-state files are named; `resume_from_checkpoint=True`/"latest" finds the newest
checkpoint; old checkpoints without a fingerprint still resume (with a warning); an all-invalid streaming batch is
skipped and counted, and a resume after it stays exact."""

import io
import json
import logging
import os
import shutil
import tarfile

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from nlip_testing import add_file, processor, single_thread, synthetic_pairs, tiny_model, training_args
from trainers.data.pairs import load_webdataset_pairs
from trainers.noise.state import NOISE_STATE_JSON, NOISE_STATE_TENSORS, NoiseStateError
from trainers.trainer import NLIPTrainer

NUM_PAIRS, BATCH = 60, 20  # 3 steps per epoch


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _trainer(output_dir, pairs, **overrides):
    options = dict(method="nlip", per_device_train_batch_size=BATCH, num_train_epochs=2, noise_warmup_epochs=1,
                   save_strategy="steps", save_steps=2)
    options.update(overrides)
    return NLIPTrainer(model=tiny_model(), args=training_args(output_dir, **options), train_dataset=pairs,
                       processing_class=processor())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 60-pair run with checkpoints at steps 2, 4 and 6."""
    output_dir = tmp_path_factory.mktemp("sixty")
    with single_thread():
        _trainer(output_dir, synthetic_pairs(NUM_PAIRS)).train()
    return output_dir


def _copy_checkpoint(trained, tmp_path, step=4):
    target = tmp_path / "run" / f"checkpoint-{step}"
    shutil.copytree(trained / f"checkpoint-{step}", target)
    return target


@pytest.mark.parametrize("num_pairs, change", [(50, r"trained on 60 pairs, the training data now has 50 \(-10 pairs\)"),
                                               (80, r"trained on 60 pairs, the training data now has 80 \(\+20 pairs\)")])
def test_resume_on_fewer_or_more_pairs_fails_at_once(trained, tmp_path, num_pairs, change):
    """Before: 60 -> 50 trained half an epoch, then IndexError in compute_statistics; 60 -> 80 failed at step 1."""
    checkpoint = _copy_checkpoint(trained, tmp_path)
    trainer = _trainer(tmp_path / "run", synthetic_pairs(num_pairs))
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-4 on other training data: the checkpoint was {change}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0  # nothing was trained


def test_resume_on_other_pairs_of_the_same_size_fails(trained, tmp_path):
    checkpoint = _copy_checkpoint(trained, tmp_path)
    other = synthetic_pairs(NUM_PAIRS, seed=1)  # other images (hashed: in-memory images have no path)
    with pytest.raises(ValueError, match=r"the same number of pairs \(60\) but a different index -> image map"):
        _trainer(tmp_path / "run", other).train(resume_from_checkpoint=str(checkpoint))


def test_resume_latest_and_true(trained, tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        _copy_checkpoint(trained, tmp_path, step)
    for value in (True, "True", "latest"):
        trainer = _trainer(run, synthetic_pairs(NUM_PAIRS))
        assert trainer.resolve_checkpoint(value) == str(run / "checkpoint-4")
    trainer = _trainer(run, synthetic_pairs(NUM_PAIRS))
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"resumes the newest checkpoint in output_dir, but .*empty' holds no checkpoint"):
        _trainer(empty, synthetic_pairs(NUM_PAIRS)).train(resume_from_checkpoint=True)


def test_old_checkpoint_without_fingerprint_still_resumes(trained, tmp_path, caplog):
    checkpoint = _copy_checkpoint(trained, tmp_path)
    path = checkpoint / NOISE_STATE_JSON
    metadata = json.loads(path.read_text())
    for key in ("data_fingerprint", "batch_skips"):
        metadata.pop(key)
    metadata["schema_version"] = 1
    path.write_text(json.dumps(metadata))
    with caplog.at_level(logging.WARNING, logger="trainers.trainer"):
        trainer = _trainer(tmp_path / "run", synthetic_pairs(NUM_PAIRS))
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "has no data fingerprint" in caplog.text and "cannot be verified" in caplog.text
    assert trainer.state.global_step == 6
    # Without a fingerprint, a size change is still caught when the noise state is loaded, naming the file.
    with pytest.raises(NoiseStateError, match=r"nlip_noise_state\.safetensors.*holds 60 per-sample entries but the "
                       r"training data has 50 indices"):
        _trainer(tmp_path / "run", synthetic_pairs(50)).train(resume_from_checkpoint=str(checkpoint))


def test_damaged_noise_state_files_are_named(trained, tmp_path):
    checkpoint = _copy_checkpoint(trained, tmp_path)
    json_path, tensors_path = checkpoint / NOISE_STATE_JSON, checkpoint / NOISE_STATE_TENSORS
    original_json, original_tensors = json_path.read_text(), tensors_path.read_bytes()

    def resume():
        _trainer(tmp_path / "run", synthetic_pairs(NUM_PAIRS)).train(resume_from_checkpoint=str(checkpoint))

    json_path.write_text(original_json[: len(original_json) // 2])  # JSONDecodeError before
    with pytest.raises(NoiseStateError, match=r"nlip_noise_state\.json: not valid JSON"):
        resume()
    metadata = json.loads(original_json)
    del metadata["estimator"]  # KeyError before
    json_path.write_text(json.dumps(metadata))
    with pytest.raises(NoiseStateError, match=r"nlip_noise_state\.json: missing entries \['estimator'\]"):
        resume()
    json_path.write_text(original_json)
    tensors_path.write_bytes(original_tensors[:100])
    with pytest.raises(NoiseStateError, match=r"nlip_noise_state\.safetensors: not a readable safetensors file"):
        resume()
    tensors = load_file(str(trained / "checkpoint-4" / NOISE_STATE_TENSORS))
    tensors["noise_prob"] = tensors["noise_prob"][:7]  # zero-padded silently before
    save_file(tensors, str(tensors_path))
    with pytest.raises(NoiseStateError, match=r"per-sample tensors must be 1-D of one length; found noise_prob \(7,\)"):
        resume()


# ------------------------------------------------------------------------------------- streaming empty batches


def _png(value):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_shard(path):
    """48 samples: 24 good, then 8 undecodable (a whole batch of 8), then 16 good."""
    with tarfile.open(path, "w") as tar:
        for i in range(48):
            bad = 24 <= i < 32
            add_file(tar, f"{i:05d}.png", _png(5 * i)[: 30 if bad else None])
            add_file(tar, f"{i:05d}.txt", f"a photo of a thing {i}".encode())


def _stream_run(output_dir, shard, resume=None):
    args = training_args(output_dir, method="clip", per_device_train_batch_size=8, max_steps=5, noise_warmup_epochs=0,
                         save_strategy="steps", save_steps=4, learning_rate=3e-3)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=load_webdataset_pairs(shard, streaming=True),
                          processing_class=processor())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_all_invalid_streaming_batch_is_skipped_counted_and_resumes_exactly(tmp_path):
    """Before: `InvalidPairError: Every example of a batch of 8 was invalid` raised inside the DataLoader."""
    shard = tmp_path / "00000.tar"
    _write_shard(shard)
    full = _stream_run(tmp_path / "full", shard)
    assert full.state.global_step == 5
    skipped = full.skipped_pairs()
    assert skipped["undecodable image"] == 8 and skipped["empty_batches"] == 1
    assert full.noise_state.loss_bank.seen.sum() == 40  # 5 batches of good pairs: 24 before, 16 after the bad ones
    summary = full.training_summary()
    assert summary.skipped_pairs["undecodable image"] == 8
    card = str(summary.to_model_card())
    assert "Training pairs left out" in card and "batches with no valid pair (skipped whole) | 1" in card

    resumed = _stream_run(tmp_path / "resumed", shard, resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.state.global_step == 5
    for (name, param), reference in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-5, atol=1e-6, msg=f"weight {name}")
    assert resumed.skipped_pairs() == skipped
    assert torch.equal(resumed.noise_state.loss_bank.seen, full.noise_state.loss_bank.seen)


def test_streaming_checkpoint_refuses_other_shards(tmp_path):
    shard = tmp_path / "00000.tar"
    _write_shard(shard)
    _stream_run(tmp_path / "full", shard)
    other = tmp_path / "other" / "00001.tar"
    other.parent.mkdir()
    shutil.copy(shard, other)
    args = training_args(tmp_path / "again", method="clip", per_device_train_batch_size=8, max_steps=5)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=load_webdataset_pairs(other, streaming=True),
                          processing_class=processor())
    with pytest.raises(ValueError, match=r"same number of shards \(1\) but other shard names"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert os.path.isdir(tmp_path / "full" / "checkpoint-4")


# ------------------------------------------------------------------------------------------ early argument errors


@pytest.mark.parametrize("name", ["per_device_train_batch_size", "gradient_accumulation_steps",
                                  "per_device_eval_batch_size"])
def test_zero_batch_size_or_accumulation_is_an_early_named_error(tmp_path, name):
    """Before: batch size 0 failed inside torch's sampler after data and model were built; accumulation 0 was a
    ZeroDivisionError inside transformers."""
    with pytest.raises(ValueError, match=rf"`{name}` \(--{name}\) must be a positive integer; got 0"):
        training_args(tmp_path, **{name: 0})


def test_warmup_longer_than_training_warns(tmp_path, caplog):
    """Before: a warm-up longer than training silently never estimated the noise."""
    trainer = _trainer(tmp_path, synthetic_pairs(NUM_PAIRS), num_train_epochs=2, noise_warmup_epochs=2,
                       save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="trainers.trainer"):
        trainer._warn_if_warmup_outlasts_training()
    assert "noise_warmup_epochs=2 >= the 2 epoch(s) this run trains: the noise is never estimated (method 'nlip' " \
        "then trains as plain 'clip')" in caplog.text
    caplog.clear()
    trainer = _trainer(tmp_path, synthetic_pairs(NUM_PAIRS), max_steps=9, noise_warmup_epochs=2, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="trainers.trainer"):
        trainer._warn_if_warmup_outlasts_training()  # 9 steps = 3 epochs of 3 steps: estimated from epoch 2 on
    assert "never estimated" not in caplog.text
