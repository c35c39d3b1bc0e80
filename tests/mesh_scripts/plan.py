"""dsv3_jax.plan's per-device bytes vs real sharded arrays on 8 fake CPU devices (tests/test_plan.py).

``python plan.py`` prints one line ``RESULT {json}``: for each mesh, the plan's per-device bytes
and the sums of ``addressable_shards[0].data.nbytes`` over the arrays ``init_model`` places on
the first mesh and ``shard_model`` re-places on the others (parameters, MTP share, correction
biases), ``init_opt_state`` makes (AdamW moments) and ``init_cache`` pins (the latent KV cache,
bfloat16).
"""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import plan, sharding, train_lib  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.model import init_model  # noqa: E402
from dsv3_jax.moe import ExpertBias  # noqa: E402

# MoE, q_lora, MTP; moe_intermediate_size 24 and 6 heads do not split 4 ways (axes dropped).
CONFIG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
    num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=6, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    num_nextn_predict_layers=1, max_position_embeddings=64, rope_scaling=None,
)  # fmt: skip
MESHES = [
    {"fsdp": 2, "expert": 2, "tensor": 2},  # init_model(mesh=...) (about 20 s to compile)
    {"fsdp": 8},  # the others: the same model re-placed by sharding.shard_model (same rules)
    {"data": 2, "expert": 4},
    {"fsdp": 2, "tensor": 4},
]
INFER_BATCH, CONTEXT = 8, 16


def shard_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def one(axes: dict, model=None) -> dict:
    mesh = sharding.make_mesh(axes)
    if model is None:
        model = init_model(CONFIG, 0, mesh=mesh)
    else:
        sharding.shard_model(model, mesh)
    with jax.set_mesh(mesh):
        graphdef, params, biases = train_lib.split_model(model)
        tx = train_lib.make_optimizer(1e-3)
        opt = train_lib.init_opt_state(tx, params, model.config.sharding_rules)
        cache = model.init_cache(INFER_BATCH, CONTEXT, jnp.bfloat16)
    moments = [x for x in jax.tree.leaves(opt) if x.ndim > 0]  # mu, nu (not the step counts)
    mtp = nnx.state(model.mtp, nnx.Param)
    p = plan.make_plan(CONFIG, axes, None, 8, INFER_BATCH, CONTEXT)
    return model, {
        "actual": {
            "params": shard_bytes(params),
            "mtp_params": shard_bytes(mtp),
            "biases": shard_bytes(nnx.state(model, ExpertBias)),
            "adam": shard_bytes(moments),
            "kv_cache": shard_bytes(cache),
        },
        "plan": {
            "params": p.state["params"],
            "mtp_params": p.state["mtp_params"],
            "biases": p.state["biases"],
            "adam": p.state["adam"],
            "kv_cache": p.kv_cache,
        },
        "main_count": p.state["main_count"],
    }


if __name__ == "__main__":
    out = {"devices": jax.device_count(), "meshes": {}}
    model = None
    for axes in MESHES:
        model, out["meshes"][plan.describe(axes)] = one(axes, model)
    print("RESULT " + json.dumps(out))
