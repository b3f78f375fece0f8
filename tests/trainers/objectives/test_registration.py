"""A method added from outside the package: one `Objective` subclass and one `register_objective` line, here in the
test. It trains through `NLIPTrainer` by name, alone and combined with a built-in method, its epoch hook runs, its
contribution reaches the loss and the logs, and its state is saved in the checkpoint and restored on resume."""

import os

import pytest
import torch

from nlip_testing import embed_batch, processor, synthetic_pairs, tiny_model, training_args
from trainers.losses import Contribution, contrastive_loss, nitc_loss
from trainers.objectives import MethodCard, Objective, method_names, register_objective
from trainers.objectives.base import objective_state_paths
from trainers.trainer import NLIPTrainer


class HalfWeightObjective(Objective):
    """Weighs every pair by 1/2 and counts the epochs it saw (its state)."""

    name = "halfweight"
    card = MethodCard("Half weight (a test method)", "every pair's term is halved", "a test", "A test.")

    def __init__(self, args):
        super().__init__(args)
        self.epochs_seen: list[int] = []

    def on_epoch_begin(self, epoch, context):
        self.epochs_seen.append(epoch)

    def contribute(self, batch, context):
        return Contribution(sample_weights=torch.full_like(batch.per_sample, 0.5),
                            metrics={"halfweight/batch_size": torch.tensor(float(batch.index.numel()))})

    def settings(self):
        return {"halfweight_factor": 0.5}

    def state_dict(self):
        return {}, {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, tensors, metadata, *, where):
        self.epochs_seen = list(metadata["epochs_seen"])


register_objective(HalfWeightObjective)


def test_a_registered_method_is_parsed_combined_and_validated():
    assert method_names("halfweight+nlip") == ["nlip", "halfweight"]
    with pytest.raises(ValueError, match="is already registered"):
        register_objective(type("Other", (HalfWeightObjective,), {}))
    register_objective(HalfWeightObjective)  # the same class again: a no-op
    with pytest.raises(ValueError, match="lower-case `name` without"):
        register_objective(type("Bad", (Objective,), {"name": "a+b", "card": HalfWeightObjective.card}))


def test_a_registered_method_trains_alone_and_combined(tmp_path):
    pairs = synthetic_pairs(16)
    batch = None
    for method in ("halfweight", "halfweight+nlip"):
        args = training_args(tmp_path / method, method=method, per_device_train_batch_size=8, num_train_epochs=2,
                             noise_warmup_epochs=1, logging_steps=1, nitc_form="paper")
        trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
        batch = batch or trainer._prepare_inputs(trainer.data_collator([pairs[i] for i in range(8)]))
        with torch.no_grad():
            images, texts, scale = embed_batch(trainer.model, batch)
        half = torch.full((8,), 0.5)
        expected = contrastive_loss(images, texts, scale, sample_weights=half) if method == "halfweight" else \
            nitc_loss(images, texts, scale, torch.zeros(8), form="paper", sample_weights=half)
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)
        trainer.train()
        assert trainer.objectives["halfweight"].epochs_seen == [0, 1]
        assert any(entry.get("halfweight/batch_size") == 8.0 for entry in trainer.state.log_history)
        assert trainer.training_summary().noise_settings["halfweight_factor"] == 0.5


def test_a_registered_methods_state_is_checkpointed_and_restored(tmp_path):
    pairs = synthetic_pairs(16)

    def run(resume=None):
        args = training_args(tmp_path, method="halfweight", per_device_train_batch_size=8, num_train_epochs=3,
                             save_strategy="steps", save_steps=2)
        trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    checkpoint = os.path.join(tmp_path, "checkpoint-4")
    assert all(os.path.isfile(path) for path in objective_state_paths(checkpoint, "halfweight"))
    resumed = run(resume=checkpoint)  # resumed at the start of epoch 2: epochs 0-1 come from the checkpoint
    assert resumed.objectives["halfweight"].epochs_seen == full.objectives["halfweight"].epochs_seen == [0, 1, 2]
