"""train.py and sample.py used as a user would: kill a run, rerun the command, it resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_script, train_args

pytestmark = pytest.mark.slow


_run = run_script


@pytest.fixture(scope="module")
def env(cli_env):
    return cli_env


@pytest.fixture(scope="module")
def straight_run(tiny_run):
    return tiny_run


def test_train_writes_checkpoints_metrics_and_tensorboard(straight_run):
    workdir, r = straight_run
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    assert metrics["step"] == 8 and 3 < metrics["val_loss"] < 11
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]  # keep=2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tb"))
    log = r.stderr
    for word in (
        "loss",
        "mtp",
        "lr",
        "grad_norm",
        "tok/s",
        "expert load max/mean",
        "validation loss",
    ):
        assert word in log


def test_killed_run_resumes_to_the_same_result(tmp_path, env, straight_run):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *train_args(workdir, env)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "run ended before its step-4 checkpoint"
        )
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps and steps[-1] < 8
    r = _run(train_args(workdir, env), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {steps[-1]}" in r.stderr  # resumed, not restarted
    # Same data order and same updates: the resumed run ends where the uninterrupted one did.
    import jax

    from dsv3_jax import load_checkpoint

    a, _ = load_checkpoint(straight_run[0])
    b, meta = load_checkpoint(workdir)
    assert meta["step"] == 8
    from flax import nnx

    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_sample_streams_text_from_the_checkpoint(straight_run, env):
    workdir, _ = straight_run
    args = [
        "sample.py",
        f"--workdir={workdir}",
        "--prompt=ROMEO:",
        "--max_new_tokens=12",
        "--temperature=0.8",
        "--top_k=20",
        "--seed=1",
    ]
    r = _run(args, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.strip()) > len("ROMEO:")
    assert _run(args, env).stdout == r.stdout  # same seed, same text


def test_sample_batches_speculates_and_reports_the_cache(straight_run, env):
    workdir, _ = straight_run
    base = ["sample.py", f"--workdir={workdir}", "--max_new_tokens=10"]
    one = _run([*base, "--prompt=KING:"], env)
    assert one.returncode == 0, one.stderr[-3000:]
    # A batch of prompts of different lengths: each row as if alone (greedy).
    many = _run([*base, "--prompt=First Citizen:", "--prompt=KING:"], env)
    assert many.returncode == 0, many.stderr[-3000:]
    assert "--- [1]\n" + one.stdout.strip() in many.stdout
    # Speculative decoding with the MTP module: same greedy text, acceptance reported.
    spec = _run([*base, "--prompt=KING:", "--speculative_mtp", "--verbose"], env)
    assert spec.returncode == 0, spec.stderr[-3000:]
    assert spec.stdout == one.stdout
    assert "drafts accepted" in spec.stderr
    # tiny config: (16 + 8) x 3 layers x 4 bytes (float32)
    assert "latent KV cache: 288 bytes per token" in spec.stderr
    naive = _run([*base, "--prompt=KING:", "--mla_decode=naive"], env)
    assert naive.stdout == one.stdout
    # The demo's compact vocabulary has no chat tokens: a clear error, nothing printed.
    chat = _run([*base, "--prompt=Hi", "--chat"], env)
    assert chat.returncode != 0 and "--chat needs a checkpoint with the full" in chat.stderr
    assert chat.stdout == ""


def test_rerun_with_another_model_is_refused(straight_run, env):
    workdir, _ = straight_run
    before = sorted(os.listdir(workdir / "checkpoints"))
    r = _run([*train_args(workdir, env, steps=10), "--config.model.hidden_size=48"], env)
    assert r.returncode != 0 and "another model" in r.stderr and "hidden_size" in r.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing saved is touched


def test_sample_errors_name_the_fault(straight_run, env):
    workdir, _ = straight_run
    step_dir = workdir / "checkpoints" / "8"
    r = _run(["sample.py", f"--checkpoint={step_dir}", "--max_new_tokens=3"], env)
    assert r.returncode == 0 and "step 8" in r.stderr  # a step folder loads that step
    r = _run(["sample.py", f"--workdir={workdir}", "--step=2"], env)
    assert r.returncode != 0 and "kept steps: [6, 8]" in r.stderr
    r = _run(["sample.py", f"--workdir={workdir}", "--top_p=1.5"], env)
    assert r.returncode != 0 and "top_p" in r.stderr and r.stdout == ""  # nothing printed first
    r = _run(["sample.py", f"--workdir={workdir}", "--max_new_tokens=400"], env)
    assert r.returncode != 0 and "max_position_embeddings" in r.stderr and r.stdout == ""
    r = _run(["sample.py", f"--workdir={workdir}", "--prompt=Hello, 2024 emoji \N{ROCKET}"], env)
    assert r.returncode != 0 and "never saw in training" in r.stderr and "Traceback" not in r.stderr


def test_sample_names_a_damaged_checkpoint_and_an_earlier_step(straight_run, env, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(straight_run[0], workdir)
    data_files = sorted((workdir / "checkpoints" / "8" / "model").rglob("d/*"))
    biggest = max(data_files, key=lambda f: f.stat().st_size)
    biggest.write_bytes(b"\0" * biggest.stat().st_size)  # a disk error: same size, zeros
    r = _run(["sample.py", f"--workdir={workdir}", "--max_new_tokens=3"], env)
    assert r.returncode != 0 and r.stdout == "" and "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "TensorStore" not in r.stderr, r.stderr[-3000:]
    assert error[0].startswith(
        f"error: checkpoint step 8 at {workdir / 'checkpoints' / '8'} cannot be read, its files "
        "are damaged or incomplete ("
    )
    assert error[0].endswith("; kept steps: [6, 8]; sample an earlier one with --step=6")
    r = _run(["sample.py", f"--workdir={workdir}", "--max_new_tokens=3", "--step=6"], env)
    assert r.returncode == 0 and "[checkpoint step 6," in r.stderr  # the suggestion works
    from dsv3_jax import checkpoint

    with pytest.raises(checkpoint.DamagedCheckpointError, match="step 8 at .* cannot be read") as e:
        checkpoint.load_checkpoint(workdir)
    assert (e.value.step, e.value.earlier_steps) == (8, [6])


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.train.steps=-3", "train.steps"),
        ("--config.train.batch_size=0", "train.batch_size"),
        ("--config.data.seq_len=512", "max_position_embeddings"),
    ],
)
def test_bad_run_settings_fail_before_any_work(tmp_path, env, override, field):
    r = _run([*train_args(tmp_path / "run", env), override], env)
    assert r.returncode != 0 and field in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_rerun_of_a_finished_run_rewrites_nothing(straight_run, env):
    workdir, _ = straight_run
    files = {f: (workdir / f).read_bytes() for f in ("config.json", "final_metrics.json")}
    r = _run([*train_args(workdir, env), "--config.data.seq_len=16"], env)
    assert r.returncode == 0 and "already at step 8 of 8" in r.stderr and "data.seq_len" in r.stderr
    assert {f: (workdir / f).read_bytes() for f in files} == files


def test_unknown_override_fails_with_the_absl_error(tmp_path, env):
    r = _run(
        ["train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.stepz=3"],
        env,
    )
    assert r.returncode != 0 and "stepz" in r.stderr


def test_sample_without_checkpoint_fails_clearly(tmp_path, env):
    r = _run(["sample.py", f"--workdir={tmp_path}"], env)
    assert r.returncode != 0 and "no checkpoints" in r.stderr
