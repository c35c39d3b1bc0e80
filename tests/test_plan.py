"""dsv3_jax.plan: per-device bytes against real sharded arrays, parameter totals, the CLI's errors.

The sharded comparison runs in a subprocess with 8 fake CPU devices (tests/mesh_scripts/plan.py)
so this process keeps its single device. The activation measurement (four full-width compiles)
is not run here.
"""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from configs import deepseek_v3_671b
from dsv3_jax import plan
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import count_params

V3 = ModelConfig.coerce(dict(deepseek_v3_671b.get_config().model))


@pytest.fixture(scope="module")
def sharded(plan_report):
    return plan_report  # started with the session (conftest.MESH_JOBS)


def test_plan_bytes_equal_the_sharded_arrays(sharded):
    from tests.mesh_scripts.plan import CONFIG, MESHES  # noqa: PLC0415

    assert len(sharded["meshes"]) == len(MESHES)
    for mesh, got in sharded["meshes"].items():
        assert got["plan"] == got["actual"], mesh  # params, MTP, biases, AdamW, KV cache
        assert got["main_count"] == count_params(CONFIG)[0], mesh
        assert got["actual"]["mtp_params"] > 0 and got["actual"]["kv_cache"] > 0


def test_671b_totals_equal_count_params():
    state = plan.state_bytes(V3, {"fsdp": 16, "expert": 64})
    assert state["main_count"] == count_params(V3)[0]
    assert 11e9 < state["mtp_count"] < 12e9  # "about 11.5B" (the hub's 685B - 671B)
    single = plan.state_bytes(V3, {})
    total = state["main_count"] + state["mtp_count"]
    assert single["params"] == 4 * total  # float32 master weights, unsharded
    assert state["params"] < single["params"] / 64  # experts split 1024 ways, the rest 16


def test_671b_kv_cache_and_fp8_scales():
    p = plan.make_plan(V3, {}, 1, 16, infer_batch=1, context=1)
    assert p.kv_cache == 70_272  # bf16 latent cache per token (V3 report 2.1.1)
    assert p.ep == 1 and p.a2a_padded == 0 and p.a2a_ragged == 0  # no expert axis
    # kv_a_proj_with_mqa: 576 outputs give 5 scale rows (partial edge block), 7168 inputs 56
    assert plan._fp8_bytes((7168, 576), (7168, 576)) == 7168 * 576 + 4 * 56 * 5
    assert plan._fp8_bytes((7168, 72), (7168, 576)) == (7168 * 576 + 4 * 56 * 5) / 8
    s = plan.state_bytes(V3, {})
    assert 0.5 * s["weights_bf16"] < s["weights_fp8"] < 0.6 * s["weights_bf16"]


def test_all_to_all_bytes():
    d = V3.hidden_size
    p = plan.make_plan(V3, {"expert": 64}, 64, 512, 1, 1)  # 512 tokens per device
    assert p.tokens_per_device == 512 and p.ep == 64
    assert (
        p.capacity == 512 * 4
    )  # dropless: every token may send 4 rows (e / ep = 4 experts) to a peer
    assert p.a2a_padded == 2 * 64 * 2048 * d * 2 + 64 * 2048 * 4
    assert p.a2a_ragged == 2 * 512 * 8 * 63 / 64 * d * 2
    capped = dataclasses.replace(V3, moe_capacity_factor=1.0)
    p = plan.make_plan(capped, {"expert": 64}, 64, 512, 1, 1)
    assert p.capacity == math.ceil(512 * 8 / 64)


def test_batch_axes_that_do_not_divide_are_dropped():
    # 8 rows on data=4 x expert=8: 'expert' is dropped (as for real arrays), so the 8 rows split
    # 4 ways and, tokens differing only over data, the MoE takes the GSPMD dispatch (no all-to-all)
    p = plan.make_plan(V3, {"data": 4, "expert": 8}, 8, 100, 1, 1)
    assert p.tokens_per_device == 200
    assert p.ep == 1 and p.a2a_padded == 0 and p.a2a_buffers == 0
    p = plan.make_plan(V3, {"data": 4, "expert": 8}, 32, 100, 1, 1)
    assert p.tokens_per_device == 100 and p.ep == 8


@pytest.mark.parametrize("text", ["data=2,expert=4", "data:2,expert:4", " data=2 , expert:4 "])
def test_parse_mesh_accepts_both_separators(text):
    assert plan.parse_mesh(text) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


@pytest.mark.parametrize(
    "text, named",
    [("data=2,experts=4", "'experts'"), ("tensor=0", "'tensor'"), ("fsdp=two", "'fsdp'"),
     ("data", "axis=size"), ("data=2,data=4", "'data' given twice")],
)  # fmt: skip
def test_parse_mesh_errors_name_the_axis(text, named):
    with pytest.raises(ValueError, match=named):
        plan.parse_mesh(text)


def test_cli_bad_mesh_is_one_line_naming_the_axis():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3_jax.plan", "--config=configs/tiny.py", "--mesh=fsdp=2,foo=4",
         "--no_measure"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: mesh 'fsdp=2,foo=4': unknown axis 'foo'" in proc.stderr
    assert "Traceback" not in proc.stderr
