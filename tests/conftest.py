import os
import pathlib

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
