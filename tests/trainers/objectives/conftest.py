"""Fixtures of the per-method tests: one torch thread, and a tiny batch of 8 synthetic pairs."""

import pytest

from nlip_testing import single_thread, tiny_pair_batch


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def tiny_batch():
    """8 synthetic pairs and their whole batch (first captions)."""
    return tiny_pair_batch()
