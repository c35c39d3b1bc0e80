"""Expert parallelism: the all-to-all MoE dispatch equals the single-device layer (issue 10).

The multi-device comparison runs tests/mesh_scripts/expert_parallel.py in a subprocess with 8
fake CPU devices; the full model on expert meshes (loss, gradients, a train step, generate) is
compared in tests/test_mesh.py, where expert meshes now take the all-to-all path by default.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from dsv3_jax import ModelConfig, moe
from dsv3_jax.sharding import MESH_AXES


@pytest.fixture(scope="module")
def report(expert_parallel_report):
    return expert_parallel_report  # started with the session (conftest.MESH_JOBS)


CASES = [
    "expert=8/dropless", "expert=8/capacity", "data=2,expert=4/dropless",
    "data=2,expert=4/capacity", "data=2,expert=4/gspmd", "data=2,expert=4/ragged",
    "fsdp=2,expert=2,tensor=2/dropless", "fsdp=2,expert=2,tensor=2/capacity",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_layer_equals_single_device(report, case):
    got = report["results"][case]
    assert got["out"] < 1e-5 and got["grads"] < 1e-5, got
    assert set(got["grad_names"]) >= {"x", "gate.kernel", "gate_proj", "up_proj", "down_proj"}
    assert got["load_equal"] and got["balance"] < 1e-6  # statistics of the single-device path
    assert got["dropped"] == got["expected_dropped"]  # exact, against the numpy send-order model
    if case.endswith("capacity"):
        assert got["expected_dropped"] > 0  # capacity 1.0 under this skew must drop some
    else:
        assert got["expected_dropped"] == 0
    if case.endswith(("dropless", "capacity")):
        assert got["all_to_all_ops"] >= 4  # tokens out and back, forward and backward
    else:  # the GSPMD reference sorts globally; the ragged case ran the emulated exchange
        assert got["all_to_all_ops"] == 0
    if case.endswith("ragged"):
        assert got["ragged_calls"] == 3  # rows and expert ids out, results back


def test_routing_was_skewed(report):
    assert report["skew"] >= 3.0  # expert 0 took every token: load max/mean of the reference


def _mesh(**sizes) -> AbstractMesh:
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


SMALL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0,
    rope_scaling=None,
)  # fmt: skip


def test_plan_picks_the_all_to_all_path_only_on_expert_meshes():
    plan = moe.expert_parallel_plan(SMALL, _mesh(data=2, expert=4), batch=8)
    assert plan == moe.ExpertParallelPlan(("expert",), ("data", "expert"), (), 4)
    plan = moe.expert_parallel_plan(SMALL, _mesh(fsdp=2, expert=2, tensor=2), batch=8)
    assert plan == moe.ExpertParallelPlan(("expert",), ("fsdp", "expert"), ("tensor",), 2)
    assert moe.expert_parallel_plan(SMALL, _mesh(data=8), batch=8) is None
    assert moe.expert_parallel_plan(SMALL, _mesh(), batch=8) is None  # one device
    gspmd = SMALL.replace(moe_dispatch="gspmd")
    assert moe.expert_parallel_plan(gspmd, _mesh(expert=8), batch=8) is None
    # batch 2 cannot be split 4 ways over the expert axis: auto falls back to the GSPMD path...
    assert moe.expert_parallel_plan(SMALL, _mesh(expert=4), batch=2) is None
    # ... and an explicit request says why
    explicit = SMALL.replace(moe_dispatch="all_to_all")
    with pytest.raises(ValueError, match="moe_dispatch='all_to_all'.*not split over the expert"):
        moe.expert_parallel_plan(explicit, _mesh(expert=4), batch=2)
    with pytest.raises(ValueError, match="n_routed_experts=16 is not a multiple of the 3"):
        moe.expert_parallel_plan(explicit, _mesh(expert=3), batch=6)


def test_ragged_all_to_all_refused_on_cpu_with_a_clear_error():
    config = SMALL.replace(moe_dispatch="ragged_all_to_all")
    plan = moe.ExpertParallelPlan(("expert",), ("expert",), (), 1)
    x = jnp.zeros((1, 2, 32))
    w = jnp.zeros((16, 32, 24))
    with pytest.raises(NotImplementedError, match="ragged_all_to_all.*GPU or TPU.*XLA:CPU"):
        moe.expert_parallel_moe(
            x, jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4), jnp.int32), w, w,
            w.transpose(0, 2, 1), config, plan,
        )  # fmt: skip


@pytest.mark.parametrize(
    "field, value", [("moe_dispatch", "alltoall"), ("moe_capacity_factor", 0.0)]
)
def test_config_rejects_bad_dispatch_settings(field, value):
    with pytest.raises(ValueError, match=field):
        SMALL.replace(**{field: value})


def test_capacity():
    # dropless: a token sends at most min(k, e / ep) rows to one peer
    assert moe.ep_capacity(tokens=96, k=4, ep=8, experts_per_device=2, capacity_factor=None) == 192
    assert moe.ep_capacity(96, 4, 8, 2, 1.0) == 48  # ceil(1.0 * 96 * 4 / 8)
    assert moe.ep_capacity(96, 4, 8, 2, 1.3) == 63  # ceil(62.4)
    assert moe.ep_capacity(96, 4, 8, 2, 100.0) == 192  # never above the worst case


@pytest.mark.parametrize("ep", [2, 4, 8, 16])
def test_node_limited_routing_bounds_device_groups(ep):
    """No token's experts span more than topk_group device groups (V3 section 2.1.2)."""
    rng = np.random.default_rng(ep)
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(512, 16)) * 3, jnp.float32))
    bias = jnp.asarray(rng.normal(size=16) * 0.5, jnp.float32)
    _, idx = moe.route(scores, bias, SMALL)  # n_group 4, topk_group 2
    groups = np.asarray(moe.device_group(idx, SMALL, ep))  # [T, k]
    spans = np.array([len(set(row)) for row in groups])
    assert spans.max() <= SMALL.topk_group
    # the bound is the routing's doing: without the group limit tokens reach more device groups
    _, free = moe.route(scores, bias, SMALL.replace(topk_group=4))
    free_groups = np.asarray(moe.device_group(free, SMALL, ep))
    if min(ep, SMALL.n_group) > SMALL.topk_group:  # more device groups than the bound
        assert max(len(set(row)) for row in free_groups) > SMALL.topk_group
    # device groups are contiguous devices: expert i on device i // (e / ep)
    dest = np.asarray(moe.destination(idx, 16, ep))
    np.testing.assert_array_equal(dest, np.asarray(idx) // (16 // ep))


def test_ten_train_steps_on_data2_expert4_equal_one_device(report):
    """configs/tiny.py's model, AdamW, MTP, balance loss and bias updates (gamma 1e-2)."""
    got = report["train"]
    assert len(got["mesh"]) == len(got["single"]) == 10
    assert got["loss_rel"] < 1e-5, got
    assert got["bias"] < 1e-5 and got["bias_moved"] > 0  # the biases moved, and moved alike
    assert got["dropped"] == 0  # the default capacity drops nothing


def test_generate_is_dropless_and_leaves_the_model_alone():
    from flax import nnx

    from dsv3_jax import DeepseekV3, generate

    model = DeepseekV3(SMALL.replace(moe_capacity_factor=1.0), rngs=nnx.Rngs(0))
    out = generate(model, [[1, 2, 3]], 3)
    assert model.config.moe_capacity_factor == 1.0  # the caller's model keeps its setting
    plain = DeepseekV3(SMALL, rngs=nnx.Rngs(0))
    assert out == generate(plain, [[1, 2, 3]], 3)
