import ctypes
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
GOLDEN_DIRS = sorted(p for p in GOLDENS.iterdir() if (p / "golden.npz").exists())

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache per test session, empty at its start, shared by this
# process and every subprocess (they inherit the environment): the many train.py / sample.py runs
# of configs/tiny.py compile the same programs, which each fresh process would otherwise compile
# again (about two thirds of a tiny run's CPU time). Set here, before any test module imports jax.
# A hit loads the serialised executable of the same program: nothing a test checks changes.
_XLA_CACHE_PREFIX = "dsv3_jax_tests_xla_"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _session_compilation_cache() -> str:
    """A new folder named after this process; removes those of sessions that were killed before
    their pytest_unconfigure."""
    for old in pathlib.Path(tempfile.gettempdir()).glob(_XLA_CACHE_PREFIX + "*"):
        pid = old.name[len(_XLA_CACHE_PREFIX) :].split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_XLA_CACHE_PREFIX}{os.getpid()}_")


# (not again if this file is imported a second time under another name)
if f"{_XLA_CACHE_PREFIX}{os.getpid()}_" not in os.environ.get("JAX_COMPILATION_CACHE_DIR", ""):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_compilation_cache()
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def tol(dtype: str) -> float:
    """Max-abs tolerance by computation dtype, for comparisons against references."""
    return {"float32": 1e-4, "float64": 1e-10, "bfloat16": 3e-2}[dtype]


@pytest.fixture(params=GOLDEN_DIRS, ids=lambda p: p.name)
def golden_dir(request) -> pathlib.Path:
    return request.param


def load_safetensors(path) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file`` with FP8 (F8_E4M3) tensors too: those are read from the
    file's bytes as dsv3_jax.hf_io reads them (safetensors' numpy reader looks F8_E4M3 up on
    numpy, which does not define it)."""
    from safetensors import safe_open

    from dsv3_jax.hf_io import data_offsets, read_fp8

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            if sl.get_dtype() == "F8_E4M3":
                out[name] = read_fp8(str(path), data_offsets(str(path))[name][0], sl.get_shape())
            else:
                out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="session")
def fp8_dir(tmp_path_factory) -> pathlib.Path:
    """The official-layout FP8 checkpoint tests/goldens/fp8_checkpoint.py builds (the bytes
    tests/goldens/fp8_official.npz was made from). Read-only: copy it to change it."""
    if str(GOLDENS) not in sys.path:
        sys.path.insert(0, str(GOLDENS))
    import fp8_checkpoint

    path = tmp_path_factory.mktemp("fp8") / "hf"
    sha = fp8_checkpoint.build(path)
    assert sha == str(np.load(GOLDENS / "fp8_official.npz")["files_sha256"]), "other bytes"
    return path


@pytest.fixture(scope="session")
def fp8_converted(fp8_dir, tmp_path_factory) -> pathlib.Path:
    """``fp8_dir`` converted to float32 (``hf_to_orbax``, FP8 dequantized)."""
    from dsv3_jax import convert_hf

    out = tmp_path_factory.mktemp("conv") / "f32"
    convert_hf.hf_to_orbax(fp8_dir, out, dtype="float32", progress=False)
    return out


def run_script(args, env, **kw) -> subprocess.CompletedProcess:
    """Runs ``python *args`` in the repository root, capturing text output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def train_args(workdir, env, steps=8) -> list[str]:
    """train.py arguments for a tiny run (configs/tiny.py) with the token cache in env's DSV3_CACHE."""
    return [
        "train.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        f"--config.data.cache_dir={env['DSV3_CACHE']}",
    ]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """Environment for scripts: CPU, unbuffered, a fresh token cache folder in DSV3_CACHE."""
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["DSV3_CACHE"] = str(tmp_path_factory.mktemp("tokens"))
    return e


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli_env):
    """(workdir, CompletedProcess) of one 8-step tiny training run, shared by the session's tests.

    Tests may read it and rerun train.py on it only in ways that change nothing saved.
    """
    workdir = tmp_path_factory.mktemp("straight")
    r = run_script(train_args(workdir, cli_env), cli_env)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drops jax's compiled programs after each test module.

    XLA:CPU maps a few memory regions for each compiled program and jax keeps every program
    alive in its caches; over the whole suite (about 480 tests) the process would pass Linux's
    limit of 65,530 mappings (vm.max_map_count), and the next compile dies inside LLVM (a
    segfault or abort, not a Python error). Within a module programs stay cached.
    """
    yield
    import gc

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


# ----------------------------------------------------------------------------- mesh scripts
# The multi-device checks run tests/mesh_scripts/*.py in subprocesses with 8 fake CPU devices.
# They need nothing from the rest of the session, so each one its selected tests need starts with
# the session's first test and runs alongside them, niced: most of the session keeps one core
# busy (XLA compiles on one thread), and the scripts take the other. The fixture that reads a
# script's results waits for it, first giving it back the session's priority where allowed.
MESH_JOBS = {  # job: tests/mesh_scripts/ script and arguments ({out}: a file for its results)
    "expert_parallel": ["expert_parallel.py"],
    "parity_a": ["parity.py", "data=8", "fsdp=2,tensor=4", "other_rules"],  # two halves: about
    "parity_b": ["parity.py", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"],  # 2 min each
    "plan": ["plan.py"],
    "loading": ["loading.py", "{out}"],
}
_JOBS_OF_FIXTURE = {  # the session fixtures below and the jobs each one reads
    "expert_parallel_report": ["expert_parallel"],
    "parity_report": ["parity_a", "parity_b"],
    "plan_report": ["plan"],
    "mesh_loading_results": ["loading"],
}


MESH_JOBS_NICE = 10
try:  # Linux: a job dies with this process (PR_SET_PDEATHSIG), even if it is killed
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _in_job_child() -> None:
    """Runs in a job's process before it starts: niced, and killed when this process ends."""
    os.nice(MESH_JOBS_NICE)
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _unnice(pid: int) -> None:
    """Every thread of ``pid`` back to this process's priority (Linux; root only, else a no-op)."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), mine)
    except OSError:  # not Linux, the process has ended, or no permission to raise priority
        pass


class MeshJobs:
    """The session's mesh-script subprocesses, each started at most once; output in files."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def out(self, job: str) -> pathlib.Path:
        return self.folder / f"{job}.out.json"

    def start(self, job: str) -> None:
        if job in self.procs:
            return
        script, *args = MESH_JOBS[job]
        argv = [sys.executable, f"tests/mesh_scripts/{script}"]
        argv += [a.format(out=self.out(job)) for a in args]
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=flags.strip())
        with open(self.folder / f"{job}.stdout", "w") as out:
            with open(self.folder / f"{job}.stderr", "w") as err:
                self.procs[job] = subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    preexec_fn=_in_job_child,
                )  # fmt: skip

    def result(self, job: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """Waits (``timeout`` seconds from now at most) for ``job``, starting it if need be."""
        self.start(job)
        proc = self.procs[job]
        _unnice(proc.pid)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"mesh script job {job} did not end within {timeout} s")
        read = lambda name: (self.folder / f"{job}.{name}").read_text()
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, read("stdout"), read("stderr")
        )

    def report(self, job: str) -> dict:
        """The JSON of the job's ``RESULT `` line; its stderr tail when it failed."""
        proc = self.result(job)
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        report = json.loads(line[len("RESULT ") :])
        assert report["devices"] == 8
        return report

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session", autouse=True)
def mesh_jobs(request, tmp_path_factory):
    """Starts the mesh scripts the session's selected tests need; stops any left at its end."""
    jobs = MeshJobs(tmp_path_factory.mktemp("mesh_scripts"))
    needed = {
        job
        for item in request.session.items
        for name in getattr(item, "fixturenames", ())
        for job in _JOBS_OF_FIXTURE.get(name, ())
    }
    for job in sorted(needed):
        jobs.start(job)
    yield jobs
    jobs.stop()


@pytest.fixture(scope="session")
def expert_parallel_report(mesh_jobs) -> dict:
    """tests/mesh_scripts/expert_parallel.py's report (tests/test_moe_ep.py)."""
    return mesh_jobs.report("expert_parallel")


@pytest.fixture(scope="session")
def parity_report(mesh_jobs) -> dict:
    """tests/mesh_scripts/parity.py's report, from its two halves (tests/test_mesh.py)."""
    report = {"meshes": {}}
    for job in _JOBS_OF_FIXTURE["parity_report"]:
        part = mesh_jobs.report(job)
        report["meshes"].update(part["meshes"])
        report.update({k: v for k, v in part.items() if k == "other_rules"})
    return report


@pytest.fixture(scope="session")
def plan_report(mesh_jobs) -> dict:
    """tests/mesh_scripts/plan.py's report (tests/test_plan.py)."""
    return mesh_jobs.report("plan")


@pytest.fixture(scope="session")
def mesh_loading_results(mesh_jobs) -> dict:
    """tests/mesh_scripts/loading.py's results file (tests/test_mesh_loading.py)."""
    r = mesh_jobs.result("loading")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(mesh_jobs.out("loading").read_text())
