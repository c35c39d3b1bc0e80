"""The report's training schedules (V3 section 4.2) in the data pipeline and the run config."""

import grain
import numpy as np
import pytest

from dsv3_jax import data, train_lib


def test_batch_size_ramp_draws_the_same_window_stream_and_resumes():
    tokens = np.arange(3000)
    ramp = train_lib.batch_size_stages(8, 2, ramp_steps=6, stages=3, unit=2)  # 2, 4, 6 then 8
    assert ramp == ((0, 2), (2, 4), (4, 6), (6, 8))
    ds = data.make_train_dataset(tokens, 8, 8, seed=3, ramp=ramp)
    steps = [ds[j] for j in range(9)]
    assert [len(b) for b in steps] == [train_lib.batch_size_at(ramp, j) for j in range(9)]
    # Reference: the no-ramp stream's windows, in order, without gaps or repeats.
    plain = data.make_train_dataset(tokens, 8, 1, seed=3)
    rows = np.concatenate(steps)
    np.testing.assert_array_equal(rows, np.concatenate([plain[i] for i in range(len(rows))]))
    # Each process's rows make up the step's batch.
    parts = [
        data.make_train_dataset(tokens, 8, 8, 3, grain.sharding.ShardOptions(k, 2), ramp=ramp)
        for k in range(2)
    ]
    for j in range(9):
        np.testing.assert_array_equal(np.concatenate([p[j] for p in parts]), steps[j])
    # A restored iterator continues on the ramp.
    it = iter(ds)
    for _ in range(5):
        next(it)
    again = iter(ds)
    again.set_state(it.get_state())
    np.testing.assert_array_equal(next(again), steps[5])


def test_ramp_must_end_at_the_batch_size():
    with pytest.raises(ValueError, match="batch_size=8"):
        data.make_train_dataset(np.arange(100), 8, 8, 0, ramp=((0, 2), (4, 4)))
