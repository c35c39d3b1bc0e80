"""Sharded vs single-device values on 8 fake CPU devices (run by tests/test_mesh.py).

``python parity.py [mesh names...] [other_rules]`` (default: all). Prints one JSON object: for
each mesh (and the custom-rules run) the largest relative error of
logits, loss, every gradient, one full train step (params, AdamW moments, correction biases),
whether greedy generate gave the same tokens, and a few parameter specs.
"""

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import sharding, train_lib  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.model import DeepseekV3, init_model  # noqa: E402
from dsv3_jax.sampling import generate  # noqa: E402

# q_lora on, 2 dense + 2 MoE layers, 8 routed experts in 4 groups, MTP; moe_intermediate_size 24
# is not a multiple of (tensor size x 128).
CONFIG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
    num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    num_nextn_predict_layers=1, max_position_embeddings=64, rope_scaling=None,
    initializer_range=0.1,
)  # fmt: skip
MESHES = {
    "data=8": {"data": 8},
    "fsdp=2,tensor=4": {"fsdp": 2, "tensor": 4},
    "data=2,expert=4": {"data": 2, "expert": 4},
    "fsdp=2,expert=2,tensor=2": {"fsdp": 2, "expert": 2, "tensor": 2},
}
# A second table: experts over (expert, tensor) together, everything else replicated, the batch
# over data only.
OTHER_RULES = (("experts", ("expert", "tensor")), ("batch", "data"), ("layers", None))
WEIGHTS = train_lib.LossWeights(mtp_lambda=0.3, balance_alpha=1e-2, bias_gamma=1e-2)
B1 = 0.9
# AdamW's first step moves each weight by about lr * g / (|g| + eps): with eps far below the
# smallest gradients, float32 rounding of g changes the update of near-zero entries by a few
# 1e-5 relative; eps=1e-3 keeps the comparison about the sharding, not that conditioning.
TX = train_lib.make_optimizer(1e-2, b1=B1, eps=1e-3, weight_decay=0.1, clip=1e9)


def values(model, tokens, prompts):
    """Logits, loss, gradients, one train step and greedy tokens (numpy), under the model's mesh.

    The gradients are read from the first AdamW step's moment mu = (1 - b1) g (no clipping at
    this scale: clip is 1e9), so one compiled train step checks loss, every gradient, the update
    and the bias update (from the global batch's expert loads).
    """
    t = time.time()
    out, stats = generate(model, prompts, 6, return_stats=True)  # before the train step (donates)
    print(f"  generate {time.time() - t:.1f} s", file=sys.stderr)
    t = time.time()
    graphdef, params, biases = train_lib.split_model(model)
    rules = model.config.sharding_rules
    with sharding.use_mesh_of(model):
        logits = jax.jit(lambda p, b: nnx.merge(graphdef, p, b).forward(tokens).logits)(
            params, biases
        )
        logits.block_until_ready()
        print(f"  forward {time.time() - t:.1f} s", file=sys.stderr)
        t = time.time()
        opt = train_lib.init_opt_state(TX, params, rules)
        p2, b2, opt2, metrics = train_lib.train_step(
            graphdef, TX, WEIGHTS, params, biases, opt, tokens
        )
    mu = opt2[1][0].mu
    jax.block_until_ready(mu)
    print(f"  train step {time.time() - t:.1f} s", file=sys.stderr)
    specs = {
        ".".join(map(str, k)): _spec(v.get_value())
        for k, v in nnx.to_flat_state(p2)
        if k[-1] in ("kernel", "gate_proj", "embedding")
    }
    return {
        "logits": np.asarray(logits),
        "loss": np.asarray(metrics["loss"]),
        "grads": [np.asarray(g) / (1 - B1) for g in jax.tree.leaves(mu)],
        "params": [np.asarray(x) for x in jax.tree.leaves(p2)],
        "biases": [np.asarray(x) for x in jax.tree.leaves(b2)],
        "tokens": [list(map(int, r)) for r in out],
        "generate_stats": list(stats),  # the mesh's padding rows are not counted
        "specs": specs,
        "opt_specs_match": all(
            _spec(m) == _spec(p)
            for m, p in zip(jax.tree.leaves(mu), jax.tree.leaves(p2), strict=True)
        ),
    }


def _spec(x) -> str:
    return str(getattr(x.sharding, "spec", "single device"))


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(got, ref) -> dict:
    return {
        "logits": rel(got["logits"], ref["logits"]),
        "loss": rel(got["loss"], ref["loss"]),
        "grads": max(rel(a, b) for a, b in zip(got["grads"], ref["grads"], strict=True)),
        "params": max(rel(a, b) for a, b in zip(got["params"], ref["params"], strict=True)),
        "biases": max(rel(a, b) for a, b in zip(got["biases"], ref["biases"], strict=True)),
        "biases_moved": all(np.abs(b).max() > 0 for b in got["biases"]),
        "tokens_equal": got["tokens"] == ref["tokens"],
        "stats_equal": got["generate_stats"] == ref["generate_stats"],
        "specs": got["specs"],
        "opt_specs_match": got["opt_specs_match"],
    }


def main() -> None:
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (8, 17)), jnp.int32)  # [b, s + 1]
    prompts = [list(map(int, rng.integers(1, CONFIG.vocab_size, n))) for n in (3, 5, 4)]
    t0 = time.time()
    ref = values(DeepseekV3(CONFIG, rngs=nnx.Rngs(0)), tokens, prompts)
    print("reference", f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    report = {"devices": jax.device_count(), "meshes": {}}
    only = sys.argv[1:] or [*MESHES, "other_rules"]
    for name in (n for n in only if n in MESHES):
        mesh = sharding.make_mesh(MESHES[name])
        if "expert" in MESHES[name]:  # created in its shards (one jitted initialiser)
            model = init_model(CONFIG, 0, mesh=mesh)
        else:  # created on one device, then placed
            model = sharding.shard_model(DeepseekV3(CONFIG, rngs=nnx.Rngs(0)), mesh)
        report["meshes"][name] = compare(values(model, tokens, prompts), ref)
        print(name, f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if "other_rules" in only:
        mesh = sharding.make_mesh(MESHES["fsdp=2,expert=2,tensor=2"])
        model = sharding.shard_model(DeepseekV3(CONFIG, rngs=nnx.Rngs(0)), mesh, OTHER_RULES)
        report["other_rules"] = compare(values(model, tokens, prompts), ref)
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
