"""train.py on a device mesh and in several processes (issue 9).

The pytest process keeps one device: every multi-device run is a subprocess with fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count), and two processes meet on 127.0.0.1. The
runs train configs/tiny.py like the session's single-device ``tiny_run`` (8 steps, batch 4), on
the mesh expert=4 x tensor=2, so the losses of all three can be compared step by step.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from conftest import ROOT, run_script, train_args

from dsv3_jax import data, distributed, sharding

MESH = ["--config.mesh.expert=4", "--config.mesh.tensor=2"]  # 8 devices; the batch over 4


def _env(env: dict, devices: int) -> dict:
    flag = f"--xla_force_host_platform_device_count={devices}"
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {flag}".strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(log: str) -> dict[int, float]:
    return {int(s): float(x) for s, x in re.findall(r"step (\d+) \| loss ([0-9.]+)", log)}


def _assert_same_losses(a: dict, b: dict, steps) -> None:
    for step in steps:  # printed with 4 decimals
        assert abs(a[step] - b[step]) <= 1e-4 + 1e-9, (step, a, b)


class _Job:
    """Processes of one job started with Popen; output in files; ``stop`` kills what is left."""

    def __init__(self, tmp_path, name: str, argvs: list[list[str]], env: dict, devices: int):
        self.logs = [tmp_path / f"{name}.{i}.log" for i in range(len(argvs))]
        self.procs = []
        for argv, log in zip(argvs, self.logs, strict=True):
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        cwd=ROOT,
                        env=_env(env, devices),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"no exit within {timeout} s:\n" + self.log(0)[-3000:])
        return [p.returncode for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _two_processes(args: list[str], heartbeat: int | None = None) -> list[list[str]]:
    port = _free_port()
    extra = [] if heartbeat is None else [f"--heartbeat_timeout={heartbeat}"]
    return [
        [*args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}", "--initialization_timeout=60", *extra]
        for i in range(2)
    ]  # fmt: skip


# ----------------------------------------------------------------------------- in this process
def test_process_shards_make_up_the_one_process_batches():
    tokens = np.arange(3000)
    whole = iter(data.make_train_dataset(tokens, seq_len=8, batch_size=8, seed=3))
    parts = [
        iter(data.make_train_dataset(tokens, 8, 8, seed=3, shard=grain.sharding.ShardOptions(k, 4)))
        for k in range(4)
    ]
    for _ in range(60):  # past an epoch (374 windows / 8 per batch)
        expected = next(whole)
        got = np.concatenate([next(p) for p in parts])  # [8, 9]
        np.testing.assert_array_equal(got, expected)


def test_mesh_axis_of_minus_one_takes_the_rest():
    n = jax.device_count()
    assert sharding.make_mesh({"data": -1}).shape["data"] == n
    assert sharding.make_mesh({"expert": -1, "tensor": 1}).shape["expert"] == n
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sharding.make_mesh({"data": -1, "expert": -1})
    with pytest.raises(ValueError, match=r"needs a multiple of \d+ devices for data=-1"):
        sharding.make_mesh({"data": -1, "expert": n + 1})
    with pytest.raises(ValueError, match="positive int size"):
        sharding.make_mesh({"data": 0})


@pytest.mark.parametrize(
    "kwargs, env, fault",
    [
        (dict(num_processes=2, process_id=0), {}, "--coordinator_address"),
        (dict(coordinator_address="127.0.0.1:1234", process_id=0), {}, "--num_processes"),
        (dict(coordinator_address="127.0.0.1:1234", num_processes=2), {}, "--process_id"),
        (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), {}, "host:port"),
        (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), {}, "[0, 2)"),
        (dict(num_processes=0), {}, "--num_processes must be >= 1"),
        (dict(process_id=1), {}, "--process_id=1 needs --num_processes"),
        (dict(), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
        (dict(), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=2 needs"),
    ],
)
def test_bad_process_arguments_are_named(monkeypatch, kwargs, env, fault):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(fault)):
        distributed.initialize(**kwargs)


def test_one_process_needs_no_coordinator(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1, process_id=0) is False


# ----------------------------------------------------------------------------- subprocesses
@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory, cli_env, tiny_run):
    """(workdir, stderr) of the tiny run on 8 fake devices in one process, logging every step."""
    workdir = tmp_path_factory.mktemp("mesh8")
    args = [*train_args(workdir, cli_env), *MESH, "--config.train.log_every=1"]
    r = run_script(args, _env(cli_env, 8))
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stderr


def test_one_process_mesh_trains_like_one_device(mesh_run, tiny_run):
    _, log = mesh_run
    assert "mesh (data=1, fsdp=1, expert=4, tensor=2) over 8 cpu devices (process 0: 8)" in log
    assert "-> P(None, 'expert'" in log  # the routed experts are split
    assert len([line for line in log.splitlines() if " -> P(" in line]) < 60  # condensed
    mesh, single = _losses(log), _losses(tiny_run[1].stderr)
    assert sorted(mesh) == list(range(1, 9)) and sorted(single) == [1, 2, 4, 6, 8]
    _assert_same_losses(mesh, single, single)


def test_two_processes_train_like_one(tmp_path, cli_env, mesh_run, tiny_run):
    workdir = tmp_path / "two"
    args = [*train_args(workdir, cli_env), *MESH, "--config.train.log_every=1"]
    job = _Job(tmp_path, "two", _two_processes(args), cli_env, devices=4)
    try:
        codes = job.wait(timeout=480)
    finally:
        job.stop()
    log0, log1 = job.log(0), job.log(1)
    assert codes == [0, 0], log0[-3000:] + log1[-3000:]
    assert "(process 0: 4, process 1: 4)" in log0
    assert "[process 1]" not in log0 and "step 1 |" not in log1  # process 0 logs, 1 is quiet
    two = _losses(log0)
    assert sorted(two) == list(range(1, 9))
    _assert_same_losses(two, _losses(mesh_run[1]), range(1, 9))
    # One checkpoint for the job (one data-iterator state per process), loadable in one process.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]
    assert sorted(f for f in os.listdir(workdir / "checkpoints" / "8" / "data") if "-of-" in f) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    from dsv3_jax import load_checkpoint

    a, meta = load_checkpoint(workdir)
    b, _ = load_checkpoint(tiny_run[0])
    assert meta["step"] == 8
    from flax import nnx

    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_a_killed_process_stops_the_other(tmp_path, cli_env, tiny_run):
    workdir = tmp_path / "killed"
    args = [*train_args(workdir, cli_env, steps=100), *MESH]
    job = _Job(tmp_path, "killed", _two_processes(args, heartbeat=10), cli_env, devices=4)
    try:
        deadline = time.time() + 400
        while "step 1 |" not in job.log(0):  # the job is training
            assert job.procs[0].poll() is None, job.log(0)[-3000:]
            assert time.time() < deadline, "no step 1 in 400 s"
            time.sleep(0.2)
        os.killpg(job.procs[1].pid, signal.SIGKILL)
        killed = time.time()
        code = job.procs[0].wait(timeout=120)
        seconds = time.time() - killed
    finally:
        job.stop()
    assert code != 0
    assert seconds < 120
    log = job.log(0)  # a reset connection is seen at once; a silent peer after the heartbeat
    assert "[process 0] error: lost contact with another process" in log or (
        "another task died" in log
    ), log[-3000:]


def test_bad_mesh_and_batch_fail_fast(tmp_path, cli_env):
    start = time.time()
    r = run_script([*train_args(tmp_path / "a", cli_env), "--config.mesh.data=3"], _env(cli_env, 8))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    message = "error: config.mesh: mesh (data=3, fsdp=1, expert=1, tensor=1) has 3 devices but"
    assert f"{message} there are 8" in r.stderr, r.stderr[-2000:]
    r = run_script(
        [*train_args(tmp_path / "b", cli_env), "--config.mesh.expert=8"], _env(cli_env, 8)
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: config.train.batch_size=4 must be a multiple of 8" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert time.time() - start < 120


def test_processes_with_different_configs_fail_fast(tmp_path, cli_env):
    args = _two_processes(train_args(tmp_path / "w", cli_env))
    args[1].append("--config.train.lr=0.001")
    start = time.time()
    job = _Job(tmp_path, "differ", args, cli_env, devices=1)
    try:
        codes = job.wait(timeout=120)
    finally:
        job.stop()
    assert time.time() - start < 120
    for i in range(2):
        log = job.log(i)
        assert codes[i] != 0 and "Traceback" not in log, log[-3000:]
        assert f"[process {i}] error: the processes were started with different configs" in log
        assert "process 1 differs from process 0 in config.train.lr (0.003 vs 0.001)" in log


def test_sample_on_a_mesh_prints_the_single_device_text(cli_env, mesh_run):
    """sample.py --mesh (8 devices, 2 prompts padded to the 4 batch shards) = one device."""
    args = [
        "sample.py", f"--workdir={mesh_run[0]}", "--prompt=ROMEO:", "--prompt=JULIET: O",
        "--max_new_tokens=12", "--temperature=0", "--speculative_mtp",
    ]  # fmt: skip
    one = run_script(args, cli_env)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = run_script([*args, "--mesh=expert:4,tensor:2", "--verbose"], _env(cli_env, 8))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "mesh (data=1, fsdp=1, expert=4, tensor=2)" in sharded.stderr
    assert "-> P(None, 'expert'" in sharded.stderr  # the parameter groups' shardings
    assert sharded.stdout == one.stdout and one.stdout.count("ROMEO:") == 1
