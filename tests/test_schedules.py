"""The report's training schedules (V3 section 4.2) in the data pipeline and the run config."""

import json
import re
import shutil

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


# ----------------------------------------------------------------------------- train.py
SCHEDULED = [
    "--config.train.microbatches=2", "--config.train.batch_size_ramp_start=2",
    "--config.train.batch_size_ramp_steps=3", "--config.train.mtp_lambda_final_fraction=0.5",
    "--config.train.bias_gamma_final_fraction=0.25", "--config.train.save_every=3",
    "--config.train.keep=3", "--config.train.log_every=1",
]  # fmt: skip


@pytest.mark.slow
def test_scheduled_run_logs_its_schedules_and_resumes_exactly(tmp_path, cli_env):
    import jax
    from conftest import run_script, train_args
    from flax import nnx

    from dsv3_jax import load_checkpoint

    straight = tmp_path / "straight"
    r = run_script([*train_args(straight, cli_env, steps=6), *SCHEDULED], cli_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "schedules: batch size 2 (step 0) -> 4 (step 3); 2 micro-batch(es)" in r.stderr
    final = json.loads((straight / "final_metrics.json").read_text())
    # step 6 of 6: lambda in its final half, gamma in its final quarter (2 steps of 6 -> 0)
    assert (final["batch_size"], final["mtp_lambda"], final["bias_gamma"]) == (4, 0.1, 0.0)
    # Resume from step 3 (on the ramp's last size, lambda still 0.3): the same step-6 model.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    r = run_script([*train_args(resumed, cli_env, steps=6), *SCHEDULED], cli_env)
    assert r.returncode == 0 and "at step 3" in r.stderr, r.stderr[-3000:]
    leaves = [jax.tree.leaves(nnx.state(load_checkpoint(w)[0])) for w in (straight, resumed)]
    for x, y in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Another batch-size ramp on resume is refused, naming the fields.
    shutil.rmtree(resumed / "checkpoints" / "6")
    changed = [*SCHEDULED, "--config.train.batch_size_ramp_steps=5"]
    r = run_script([*train_args(resumed, cli_env, steps=6), *changed], cli_env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "train.batch_size_ramp_steps': (3, 5)" in last, last
    # So is another micro-batch count that rounds the ramp's sizes differently (2, 4 -> 2, 3, 4),
    # before the checkpoint is restored.
    one = [a for a in SCHEDULED if "microbatches" not in a]
    r = run_script([*train_args(resumed, cli_env, steps=6), *one], cli_env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "[[0, 2], [3, 4]]" in last and "[[0, 2], [1, 3], [3, 4]]" in last
    assert "train.microbatches 2 -> 1" in last and "resumed from" not in r.stderr, last


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.microbatches=0", "config.train.microbatches must be an int >= 1, got 0"),
        ("--config.train.microbatches=3", "config.train.batch_size=4 must be a multiple of "
         "config.train.microbatches=3"),
        ("--config.train.batch_size_ramp_start=8", "config.train.batch_size_ramp_start=8 must be "
         "<= config.train.batch_size=4"),
        ("--config.train.mtp_lambda_final_fraction=1.5", "config.train.mtp_lambda_final_fraction "
         "must be in [0, 1], got 1.5"),
        ("--config.train.bias_gamma_final_fraction=-0.1", "config.train.bias_gamma_final_fraction "
         "must be in [0, 1]"),
        ("--config.train.mtp_lambda_final=-1.0", "config.train.mtp_lambda_final must be a finite"),
    ],
)  # fmt: skip
def test_bad_schedule_settings_name_the_field(tmp_path, override, message):
    from configs import tiny
    from dsv3_jax import trainer

    cfg = tiny.get_config()
    name, value = override.removeprefix("--config.").split("=")
    section, field = name.split(".")
    cfg[section][field] = type(cfg[section][field])(float(value))
    with pytest.raises(trainer.RunConfigError, match=re.escape(message)):
        trainer.check_run_config(cfg, str(tmp_path / "run"))


def test_a_ramp_longer_than_the_run_is_refused(tmp_path):
    from configs import tiny
    from dsv3_jax import trainer

    cfg = tiny.get_config()
    cfg.train.update(steps=6, batch_size=4, batch_size_ramp_start=2, batch_size_ramp_steps=100)
    with pytest.raises(trainer.RunConfigError, match=r"batch_size_ramp_steps=100 must be <= "):
        trainer.check_run_config(cfg, str(tmp_path / "run"))
    cfg.train.batch_size_ramp_steps = 6
    trainer.check_run_config(cfg, str(tmp_path / "run"))


def test_micro_batches_must_split_over_the_mesh():
    import jax

    from configs import tiny
    from dsv3_jax import sharding, trainer

    cfg = tiny.get_config()
    cfg.train.update(batch_size=8, microbatches=2)
    mesh = jax.sharding.AbstractMesh((8, 1, 1, 1), sharding.MESH_AXES)  # 8 batch shards
    with pytest.raises(trainer.RunConfigError, match=r"batch_size=8 must be a multiple of 16"):
        trainer.check_batches(cfg, mesh)
    cfg.train.update(batch_size=16, batch_size_ramp_start=8)
    with pytest.raises(trainer.RunConfigError, match=r"batch_size_ramp_start=8 must be a multiple"):
        trainer.check_batches(cfg, mesh)


def test_eta_leaves_out_the_compiles_of_new_batch_sizes():
    from dsv3_jax import trainer

    # First step logged at t=0 (step 1); at step 10, t=20 s, one later step compiled for 9 s:
    # 8 ordinary steps in 11 s -> 1.375 s a step, 90 left -> 123.75 s.
    assert trainer._progress(10, 100, (1, 0.0), 20.0, (1, 32, 9.0)) == "10% of 100, ETA 2m04s"
    assert trainer._progress(10, 100, (1, 0.0), 20.0) == "10% of 100, ETA 3m20s"  # 2.22 s a step
    assert trainer._progress(2, 100, (1, 0.0), 5.0, (1, 32, 4.0)) == "2% of 100"  # none timed yet
