import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
GOLDEN_DIRS = sorted(p for p in GOLDENS.iterdir() if (p / "golden.npz").exists())

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


def mesh_script_report(name: str, *args: str, timeout: float = 900) -> dict:
    """Runs tests/mesh_scripts/<name>.py (8 fake CPU devices, set by the script) in a subprocess
    and returns the JSON of its ``RESULT `` line; the script's stderr tail on failure."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, f"tests/mesh_scripts/{name}.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line[len("RESULT ") :])
    assert report["devices"] == 8
    return report
