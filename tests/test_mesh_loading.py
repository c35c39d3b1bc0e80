"""Loading onto a device mesh: ``load_hf_checkpoint`` / ``load_checkpoint`` with ``mesh=`` and
``rules=``, and ``checkpoint.restore_training`` into sharded templates.

The checks need 8 devices while this process keeps its single one, so they all run in one
subprocess on 8 fake CPU devices (tests/mesh_scripts/loading.py, whose docstring lists the
references); each test here reports one of its checks, with the traceback when it failed.
"""

import sys

import numpy as np
import pytest
from conftest import GOLDENS

from dsv3_jax.fp8 import quantize_np
from dsv3_jax.hf_io import dequantize, scale_box

sys.path.insert(0, str(GOLDENS))
import fp8_checkpoint  # noqa: E402

CHECKS = [
    "hf_goldens_match_on_meshes",
    "hf_values_and_named_specs",
    "reads_are_device_slices",
    "custom_rules",
    "training_checkpoint_across_meshes",
    "converted_across_meshes",
    "fp8_model_on_meshes",
]


@pytest.fixture(scope="module")
def mesh_results(mesh_loading_results) -> dict:
    return mesh_loading_results  # started with the session (conftest.MESH_JOBS)


@pytest.mark.parametrize("check", CHECKS)
def test_mesh_loading(mesh_results, check):
    assert check in mesh_results, sorted(mesh_results)
    assert mesh_results[check] == "ok", mesh_results[check]


def test_every_script_check_is_reported(mesh_results):
    ran = set(mesh_results) - {"seconds", "details"}
    assert ran == set(CHECKS), sorted(ran ^ set(CHECKS))


@pytest.mark.parametrize(
    "box",
    [((0, 300), (0, 290)), ((100, 260), (5, 140)), ((128, 256), (256, 290)), ((127, 129), (0, 1))],
)
def test_fp8_slice_dequantizes_like_the_whole_weight(box):
    """A slice with the scale blocks it touches (partial edge blocks, slices across block edges)
    gives the float64 reference's dequantisation of the whole weight, cut to the slice."""
    rng = np.random.default_rng(0)
    q, scale = quantize_np(rng.standard_normal((300, 290)).astype(np.float32), (128, 128))
    cut = tuple(slice(a, b) for a, b in box)
    blocks = tuple(slice(a, b) for a, b in scale_box(box, (128, 128)))
    got = dequantize(q[cut], scale[blocks], (128, 128), offset=(box[0][0], box[1][0]))
    want = fp8_checkpoint.dequantize_f64(q, scale)[cut].astype(np.float32)
    np.testing.assert_array_equal(got, want)
