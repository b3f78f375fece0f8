import numpy as np
import pytest
import torch

from trainers.noise.loss_bank import LossBank


def _values(bank):
    return [None if np.isnan(x) else round(x, 6) for x in bank.losses.tolist()]


def test_new_bank_is_unseen_and_8_bytes_per_sample():
    bank = LossBank(10)
    assert len(bank) == 10
    assert bank.losses.dtype == torch.float32 and torch.isnan(bank.losses).all()
    assert not bank.seen.any()
    assert bank.nbytes == 80


def test_update_accepts_tensors_arrays_and_lists():
    bank = LossBank(6)
    bank.update(torch.tensor([0, 2]), torch.tensor([0.5, 1.5]), step=0)
    bank.update(np.array([3]), np.array([2.5]), step=1)
    bank.update([5], [3.5], step=2)
    assert _values(bank) == [0.5, None, 1.5, 2.5, None, 3.5]
    assert bank.seen.tolist() == [True, False, True, True, False, True]
    assert bank.steps.tolist() == [0, -1, 0, 1, -1, 2]


def test_update_latest_step_wins_and_counter_defaults():
    bank = LossBank(3)
    bank.update([1], [1.0], step=5)
    bank.update([1], [9.0], step=3)  # older: ignored
    assert _values(bank)[1] == 1.0
    bank.update([1], [2.0], step=7)
    assert _values(bank)[1] == 2.0
    # Without a step, each call is later than every step seen so far.
    bank.update([1], [4.0])
    bank.update([1], [3.0])
    assert _values(bank)[1] == 3.0 and bank.steps[1] == 9


def test_repeated_index_in_one_update_keeps_largest_loss():
    bank = LossBank(3)
    bank.update([2, 0, 2, 2], [0.3, 1.0, 0.9, float("nan")], step=0)
    assert _values(bank) == [1.0, None, 0.9]


def test_update_errors():
    bank = LossBank(10)
    with pytest.raises(IndexError, match=r"valid indices 0\.\.9\); got index 10"):
        bank.update([3, 10], [1.0, 2.0])
    with pytest.raises(IndexError, match=r"must be >= 0"):
        bank.update([-1], [1.0])
    with pytest.raises(TypeError, match="integer dataset indices"):
        bank.update(torch.tensor([1.0]), [1.0])
    with pytest.raises(ValueError, match="same length"):
        bank.update([1, 2], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        bank.update([[1]], [[1.0]])
    assert not bank.seen.any()  # failed updates leave the bank untouched


def _rank_banks():
    """Two simulated processes: disjoint indices, plus index 2 seen by both at different steps and index 3 at the same
    step (a distributed sampler's padding)."""
    rank0, rank1 = LossBank(6), LossBank(6)
    rank0.update([0, 2, 3], [0.1, 0.2, 0.3], step=4)
    rank1.update([1, 3], [1.1, 1.3], step=4)
    rank1.update([2, 5], [1.2, 1.5], step=6)
    return rank0, rank1


def test_merge_latest_wins_and_is_order_independent():
    rank0, rank1 = _rank_banks()
    rank0.merge(rank1)
    assert _values(rank0) == [0.1, 1.1, 1.2, 1.3, None, 1.5]
    assert rank0.steps.tolist() == [4, 4, 6, 4, -1, 6]
    other0, other1 = _rank_banks()
    other1.merge(other0)
    assert _values(other1) == _values(rank0)
    assert torch.equal(other1.steps, rank0.steps)


def test_merge_size_mismatch():
    with pytest.raises(ValueError, match="Cannot merge a LossBank of 4 samples into one of 6"):
        LossBank(6).merge(LossBank(4))
    with pytest.raises(TypeError, match="LossBank"):
        LossBank(6).merge({"losses": torch.zeros(6)})


def test_growable_bank():
    bank = LossBank(0, growable=True)
    bank.update([3], [0.5], step=0)
    assert len(bank) == 4 and _values(bank) == [None, None, None, 0.5]
    bank.update([5000], [1.5], step=1)
    assert len(bank) == 5001 and _values(bank)[3] == 0.5 and _values(bank)[5000] == 1.5
    bank.update([5001], [2.5], step=2)  # full: capacity doubles
    assert bank.nbytes == 8 * 10_002 and len(bank) == 5002
    bank.update([10_001], [3.5], step=3)  # within capacity: no reallocation
    assert bank.nbytes == 8 * 10_002 and len(bank) == 10_002
    fixed = LossBank(2)
    fixed.update([1], [1.0], step=0)
    bank.merge(fixed)
    assert _values(bank)[1] == 1.0
    small = LossBank(2, growable=True)
    small.merge(bank)
    assert len(small) == 10_002 and _values(small)[5001] == 2.5


def test_state_dict_and_file_round_trip(tmp_path):
    rank0, rank1 = _rank_banks()
    rank0.merge(rank1)
    path = tmp_path / "loss_bank.safetensors"
    rank0.save(path)
    restored = LossBank.load(path)
    assert _values(restored) == _values(rank0)
    assert torch.equal(restored.steps, rank0.steps)
    # The step counter is restored too: an update without a step is later than everything saved.
    restored.update([2], [7.0])
    assert _values(restored)[2] == 7.0 and restored.steps[2] == 7
    copy = LossBank(1)
    copy.load_state_dict(rank0.state_dict())
    assert _values(copy) == _values(rank0)
    with pytest.raises(ValueError, match=r"missing \['counter'\]"):
        copy.load_state_dict({"losses": torch.zeros(2), "steps": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match="No LossBank file"):
        LossBank.load(tmp_path / "missing.safetensors")
