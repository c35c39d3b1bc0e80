"""train.py faults, used as a user would: non-finite steps, settings that cannot work, config-flag
errors, fine-tuning from a workdir, a kill -9 in the middle of a checkpoint save."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, run_script, train_args
from flax import nnx

from dsv3_jax import load_checkpoint

pytestmark = pytest.mark.slow

NAN_LR = ["--config.train.lr=1e6", "--config.train.min_lr=0"]  # NaN gradients from step 2
EACH_STEP = ["--config.train.save_every=1", "--config.train.keep=10", "--config.train.log_every=1"]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def _leaves(workdir, step=None):
    model, meta = load_checkpoint(workdir, step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))], meta


def _raw_manager(workdir):
    """An orbax manager over a workdir's model, opt and meta items (no data iterator needed)."""
    import orbax.checkpoint as ocp

    handlers = {k: ocp.StandardCheckpointHandler() for k in ("model", "opt")}
    return ocp.CheckpointManager(
        workdir / "checkpoints", item_handlers=handlers | {"meta": ocp.JsonCheckpointHandler()}
    )


def _raw_restore(manager, step) -> dict:
    import orbax.checkpoint as ocp

    args = {k: ocp.args.StandardRestore() for k in ("model", "opt")}
    return manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))


def _all_finite(leaves) -> bool:
    return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))


# ----------------------------------------------------------------------------- non-finite steps
@pytest.fixture(scope="module")
def nan_stopped(tmp_path_factory, cli_env):
    workdir = tmp_path_factory.mktemp("nan") / "run"
    r = run_script([*train_args(workdir, cli_env, steps=6), *NAN_LR, *EACH_STEP], cli_env)
    return workdir, r


def test_nonfinite_step_stops_the_run_before_saving_it(nan_stopped):
    workdir, r = nan_stopped
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: step 2: the loss or gradient norm is not finite" in r.stderr
    assert "the latest checkpoint is step 1" in r.stderr
    assert _steps(workdir) == [1]  # step 1 was finite; nothing after it is saved
    leaves, _ = _leaves(workdir)
    assert _all_finite(leaves)
    assert not (workdir / "final_metrics.json").exists()


def test_resuming_from_a_nonfinite_checkpoint_is_refused(nan_stopped, cli_env, tmp_path):
    """A NaN checkpoint as older versions wrote them: step 2 = step 1 with NaN weights."""
    import orbax.checkpoint as ocp

    workdir = tmp_path / "run"
    shutil.copytree(nan_stopped[0], workdir)
    ckpt = workdir / "checkpoints"
    with _raw_manager(workdir) as manager:
        saved = _raw_restore(manager, 1)
        nan_model = jax.tree.map(lambda x: np.full_like(x, np.nan), saved["model"])
        manager.save(
            2,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(nan_model),
                opt=ocp.args.StandardSave(saved["opt"]),
                meta=ocp.args.JsonSave(saved["meta"]),
            ),
        )
    shutil.copytree(ckpt / "1" / "data", ckpt / "2" / "data")
    r = run_script(train_args(workdir, cli_env, steps=6), cli_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "the latest checkpoint, step 2 in" in r.stderr and "non-finite" in r.stderr
    assert f"delete {ckpt / '2'} to resume from step 1" in r.stderr
    assert _steps(workdir) == [1, 2]


@pytest.fixture(scope="module")
def nan_skipped(tmp_path_factory, cli_env):
    workdir = tmp_path_factory.mktemp("skip") / "run"
    skip = ["--config.train.skip_nonfinite=True", "--config.train.max_consecutive_skips=10"]
    r = run_script([*train_args(workdir, cli_env, steps=4), *NAN_LR, *EACH_STEP, *skip], cli_env)
    return workdir, r


def test_skipped_steps_change_nothing_and_metrics_stay_strict_json(nan_skipped):
    workdir, r = nan_skipped
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 1 step(s) with a non-finite loss or gradient norm by step 2" in r.stderr
    metrics = _strict_json((workdir / "final_metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["skipped_steps"] == 3
    assert metrics["grad_norm"] is None  # NaN is written as null
    assert _steps(workdir) == [1, 2, 3, 4]
    first, _ = _leaves(workdir, 1)
    assert _all_finite(first)
    for step in (2, 3, 4):  # params and expert biases as after step 1, bit for bit
        later, _ = _leaves(workdir, step)
        for a, b in zip(first, later, strict=True):
            np.testing.assert_array_equal(a, b)
    with _raw_manager(workdir) as manager:  # the optimizer state too, its step count included
        opt = [jax.tree.leaves(_raw_restore(manager, s)["opt"]) for s in (1, 4)]
    assert len(opt[0]) > 3
    for a, b in zip(*opt, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_too_many_consecutive_skips_stop_the_run(nan_skipped, cli_env, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(nan_skipped[0], workdir)
    r = run_script(
        [*train_args(workdir, cli_env, steps=8), *NAN_LR, *EACH_STEP,
         "--config.train.skip_nonfinite=True", "--config.train.max_consecutive_skips=1"],
        cli_env,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "2 steps in a row up to step 6" in r.stderr
    assert "more than config.train.max_consecutive_skips=1" in r.stderr
    assert _steps(workdir) == [1, 2, 3, 4, 5]  # step 5 (skipped, unchanged state) was saved


# ----------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.clip=-1.0", "config.train.clip must be a finite number > 0, got -1.0"),
        ("--config.train.lr=inf", "config.train.lr must be a finite number > 0, got inf"),
        ("--config.train.mtp_lambda=-0.3",
         "config.train.mtp_lambda must be a finite number >= 0, got -0.3"),
        ("--config.train.b1=1.0", "config.train.b1 must be in [0, 1), got 1.0"),
        ("--config.train.b2=-0.1", "config.train.b2 must be in [0, 1), got -0.1"),
        ("--config.train.weight_decay=-0.1",
         "config.train.weight_decay must be a finite number >= 0, got -0.1"),
        ("--config.train.seed=-1", "config.train.seed must be in [0, 2**32), got -1"),
        ("--config.train.max_consecutive_skips=-1", "max_consecutive_skips must be a finite"),
        ("--config.model.n_group=3", "config.model: ModelConfig.n_routed_experts (8) must be "
         "divisible by n_group (3)"),
        ("--config.data.cache_dir=train.py/tokens", "is under a file"),
        ("--config.init_from=/nonexistent/run", "config.init_from /nonexistent/run does not exist"),
        ("--config.model.initializer_range=-1.0", "ModelConfig.initializer_range must be a finite"),
        ("--config.model.routed_scaling_factor=nan",
         "ModelConfig.routed_scaling_factor must be a finite"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_fail_before_any_work(tmp_path, cli_env, override, message):
    r = run_script([*train_args(tmp_path / "run", cli_env), override], cli_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "token cache" not in r.stdout  # no data work happened
    assert not (tmp_path / "run").exists()


def test_cache_dir_that_is_a_file_is_named(tmp_path, cli_env):
    args = [*train_args(tmp_path / "run", cli_env), "--config.data.cache_dir=train.py"]
    r = run_script(args, cli_env)
    assert r.returncode != 0 and not (tmp_path / "run").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: config.data.cache_dir {ROOT / 'train.py'} exists and is not a directory"
    )


def test_workdir_that_cannot_be_written_is_refused(tmp_path, cli_env):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = run_script(train_args(blocker / "run", cli_env), cli_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"error: --workdir {blocker / 'run'} is under a file, {blocker}" in r.stderr
    if os.geteuid() != 0:  # root writes in a chmod-read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        r = run_script(train_args(locked / "run", cli_env), cli_env)
        assert r.returncode != 0 and f"--workdir {locked / 'run'} is not writable" in r.stderr
        assert not (locked / "run").exists()


def test_data_ids_beyond_vocab_size_are_refused_before_the_model(tiny_run, tmp_path, cli_env):
    args = ["--config.data.compact_vocab=False", "--config.model.vocab_size=1000"]
    r = run_script([*train_args(tmp_path / "run", cli_env), *args], cli_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    found = re.search(
        r"error: the data holds token id (\d+) but config.model.vocab_size is 1000; set it above "
        r"\1 or set config.data.compact_vocab=True",
        r.stderr,
    )
    top = int(found[1])
    assert 1000 <= top < 129280
    assert "train tokens" not in r.stderr  # refused before the model is built
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- config flags
@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.stepz=3", "error: --config.train.stepz: no such config field ('stepz' is "
         "not in configs/tiny.py); did you mean --config.train.steps?"),
        ("--config.trian.steps=3", "error: --config.trian.steps: no such config field ('trian' is "
         "not in configs/tiny.py); did you mean --config.train.steps?"),
        ("--config.train.foo=1", "error: --config.train.foo: no such config field ('foo' is not "
         "in configs/tiny.py)"),
    ],
)  # fmt: skip
def test_unknown_config_field_is_one_line(tmp_path, cli_env, override, message):
    r = run_script(
        ["train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", override], cli_env
    )
    assert r.returncode != 0 and r.stderr.strip() == message


def test_unknown_config_file_is_one_line(tmp_path, cli_env):
    r = run_script(["train.py", "--config=configs/nope.py", f"--workdir={tmp_path}"], cli_env)
    assert r.returncode != 0 and r.stderr.strip() == (
        "error: --config=configs/nope.py: cannot load the config file: [Errno 2] No such file or "
        "directory: 'configs/nope.py'"
    )


# ----------------------------------------------------------------------------- fine-tuning
def test_init_from_a_training_workdir(tiny_run, tmp_path, cli_env):
    source, _ = tiny_run
    workdir = tmp_path / "finetune"
    r = run_script(
        [*train_args(workdir, cli_env, steps=1), f"--config.init_from={source}"], cli_env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised from {source} (with MTP)" in r.stderr
    # Step 1 starts from the tiny run's step-8 weights: its loss is the tiny run's level.
    fresh = float(tiny_run[1].stderr.split("step 1 | loss ")[1].split()[0])
    tuned = float(r.stderr.split("step 1 | loss ")[1].split()[0])
    assert tuned < fresh - 0.1


# ----------------------------------------------------------------------------- kill -9 mid-save
def test_kill_during_a_checkpoint_save_resumes_bit_exactly(tiny_run, tmp_path, cli_env):
    workdir = tmp_path / "killed"
    env = dict(cli_env, DSV3_TEST_KILL_IN_SAVE="6")  # SIGKILL while step 6 is being written
    proc = subprocess.run(
        [sys.executable, *train_args(workdir, env)], cwd=ROOT, env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    names = os.listdir(workdir / "checkpoints")
    assert any(n.startswith("6.") and "tmp" in n for n in names), names  # killed mid-save
    assert _steps(workdir) == [2, 4]
    r = run_script(train_args(workdir, cli_env), cli_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stderr
    a, _ = _leaves(tiny_run[0])
    b, meta = _leaves(workdir)
    assert meta["step"] == 8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
