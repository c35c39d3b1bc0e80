"""Expert-parallel MoE layer vs the single-device layer on 8 fake CPU devices (tests/test_moe_ep.py).

``python expert_parallel.py`` prints one JSON line ``RESULT {...}``: for each mesh and case the
largest relative error of the layer's output and of the gradients (input, router, experts, shared
experts) against the single-device layer, the dropped-assignment count against a numpy count,
and the loads / balance loss against the single-device ones.

Cases:
  dropless    routing skewed (expert 0 is every token's first pick), moe_capacity_factor None.
  capacity    the same skew with moe_capacity_factor 1.0: assignments over a peer's capacity are
              dropped; the reference is the single-device layer with those assignments' gates
              zeroed, the drops picked by an independent numpy model of the send order.
  gspmd       moe_dispatch "gspmd" (the reference path) on a mesh.
  ragged      moe_dispatch "ragged_all_to_all" with lax.ragged_all_to_all replaced by an
              all_gather emulation (XLA:CPU lacks the op): checks the offsets arithmetic.
"""

import json
import math
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from dsv3_jax import moe, sharding, train_lib  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.model import init_model  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    num_nextn_predict_layers=0, max_position_embeddings=64, rope_scaling=None,
    initializer_range=0.2,
)  # fmt: skip
MESHES = {
    "expert=8": {"expert": 8},
    "data=2,expert=4": {"data": 2, "expert": 4},
    "fsdp=2,expert=2,tensor=2": {"fsdp": 2, "expert": 2, "tensor": 2},
}
B, S = 8, 12
EMULATED = []  # one entry per traced ragged_all_to_all


def build(config):
    layer = moe.MoE(config, rngs=nnx.Rngs(0))
    bias = np.zeros(config.n_routed_experts, np.float32)
    bias[0] = 10.0  # expert 0 wins every token's selection: one device gets most rows
    layer.gate.e_score_correction_bias[...] = jnp.asarray(bias)
    return layer


def loss_and_grads(layer, x, cot, mask=None):
    """(out, aux, grads of sum(out * cot) w.r.t. x and every parameter) for ``layer``.

    ``mask`` float32 [b, s, k] multiplies the gates (the reference for dropped assignments)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(params, x):
        model = nnx.merge(graphdef, params, rest)
        if mask is None:
            out, aux = model(x)
        else:
            out, aux = _masked_call(model, x, mask)
        return (out * cot).sum(), (out, aux)

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    hlo = step.lower(params, x).compile().as_text()
    (_, (out, aux)), (gp, gx) = step(params, x)
    grads = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(gp)}
    grads["x"] = np.asarray(gx)
    aux = jax.tree.map(np.asarray, aux)
    aux["all_to_all_ops"] = hlo.count(" all-to-all(")  # forward and backward exchanges
    return np.asarray(out), aux, grads


def _masked_call(model, x, mask):
    """The single-device layer with gates multiplied by ``mask`` (dispatch/combine reference)."""
    cfg = model.config
    b, s, d = x.shape
    e = cfg.n_routed_experts
    scores = model.gate(x)
    weights, idx = moe.route(scores.reshape(-1, e), model.gate.e_score_correction_bias[...], cfg)
    weights = weights * mask.reshape(-1, cfg.num_experts_per_tok)
    sent = moe.dispatch(x.reshape(-1, d), idx, e)
    y = moe.expert_ffn(
        sent.x_sorted, sent.group_sizes, model.gate_proj[...], model.up_proj[...],
        model.down_proj[...], jnp.float32, cfg.moe_impl,
    )  # fmt: skip
    out = moe.combine(y, weights, sent, b * s).reshape(b, s, d) + model.shared_experts(x)
    return out, {}


def numpy_keep(idx: np.ndarray, shards: int, ep: int, e: int, cap: int) -> np.ndarray:
    """Which assignments the capacity-padded all-to-all keeps (independent numpy model).

    The batch [b, s, k] is split in ``shards`` contiguous row blocks (one per token shard); each
    block sends its assignments to device expert // (e / ep) in (expert, token, slot) order, and
    the first ``cap`` to each device are kept."""
    b, s, k = idx.shape
    keep = np.zeros(idx.shape, bool)
    rows = b // shards
    for blk in range(shards):
        part = idx[blk * rows : (blk + 1) * rows].reshape(-1)  # flat order t * k + j
        taken = {}
        for flat in sorted(range(part.size), key=lambda n: (part[n], n)):
            dev = part[flat] // (e // ep)
            if taken.get(dev, 0) < cap:
                taken[dev] = taken.get(dev, 0) + 1
                t, j = divmod(flat, k)
                keep[blk * rows + t // s, t % s, j] = True
    return keep


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(got, ref) -> dict:
    out, aux, grads = got
    rout, raux, rgrads = ref
    return {
        "out": rel(out, rout),
        "grads": max(rel(grads[n], rgrads[n]) for n in rgrads),
        "grad_names": sorted(rgrads),
        "load_equal": bool(np.array_equal(aux["load"], raux["load"])) if "load" in raux else None,
        "balance": rel(aux["balance"], raux["balance"]) if "balance" in raux else None,
        "dropped": float(aux["dropped"]),
        "all_to_all_ops": aux["all_to_all_ops"],
    }


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """lax.ragged_all_to_all's semantics from all_gathers (for XLA:CPU, which lacks the op)."""
    del recv_sizes
    EMULATED.append(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, m, ...]
    starts = jax.lax.all_gather(input_offsets, axis_name)  # [ep src, ep dst]
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    dests = jax.lax.all_gather(output_offsets, axis_name)
    me = jax.lax.axis_index(axis_name)
    r = jnp.arange(output.shape[0])
    for q in range(ops.shape[0]):
        lo, n, src = dests[q, me], sizes[q, me], starts[q, me]
        inside = (r >= lo) & (r < lo + n)
        rows = jnp.take(ops[q], jnp.clip(r - lo + src, 0, ops.shape[1] - 1), axis=0)
        shape = (-1,) + (1,) * (output.ndim - 1)
        output = jnp.where(inside.reshape(shape), rows, output)
    return output


def train_steps(mesh_axes: dict | None, steps: int = 10) -> tuple[list[float], list, dict]:
    """(losses, final correction biases, metric sums) of ``steps`` train steps of configs/tiny.py's
    model (vocabulary cut to 512 ids) on batches of 8 x 33 random tokens, on one device or a mesh."""
    cfg = tiny.get_config()
    config = ModelConfig.from_dict(dict(cfg.model, vocab_size=512))
    t = cfg.train
    mesh = None if mesh_axes is None else sharding.make_mesh(mesh_axes)
    model = init_model(config, 0, mesh=mesh)
    tx = train_lib.make_optimizer(t.lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, clip=t.clip)
    weights = train_lib.LossWeights(t.mtp_lambda, t.balance_alpha, 1e-2)  # visible bias moves
    graphdef, params, biases = train_lib.split_model(model)
    rng = np.random.default_rng(1)
    losses = []
    with sharding.use_mesh_of(model):
        opt = train_lib.init_opt_state(tx, params, config.sharding_rules)
        for _ in range(steps):
            batch = jnp.asarray(rng.integers(0, 512, (8, 33)), jnp.int32)
            if mesh is not None:
                spec = sharding.logical_to_spec(("batch", None), None, batch.shape, mesh)
                batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, spec))
            params, biases, opt, metrics = train_lib.train_step(
                graphdef, tx, weights, params, biases, opt, batch
            )
            losses.append(float(metrics["loss"]))
    return losses, [np.asarray(b) for b in jax.tree.leaves(biases)], float(metrics["dropped"])


def main() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, S, CONFIG.hidden_size)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(B, S, CONFIG.hidden_size)), jnp.float32)
    ref_layer = build(CONFIG)
    ref = loss_and_grads(ref_layer, x, cot)
    idx = ref[1]["experts"]  # [b, s, k] as route picked them
    report = {"devices": jax.device_count(), "results": {}}
    e, k = CONFIG.n_routed_experts, CONFIG.num_experts_per_tok
    report["skew"] = float(ref[1]["load"].max() / ref[1]["load"].mean())
    for name, axes in MESHES.items():
        mesh = sharding.make_mesh(axes)
        ep, shards = axes["expert"], math.prod(axes.values()) // axes.get("tensor", 1)
        cases = {"dropless": CONFIG, "capacity": CONFIG.replace(moe_capacity_factor=1.0)}
        if name == "data=2,expert=4":
            cases["gspmd"] = CONFIG.replace(moe_dispatch="gspmd")
            cases["ragged"] = CONFIG.replace(moe_dispatch="ragged_all_to_all")
        for case, config in cases.items():
            layer = build(config)
            nnx.update(layer, sharding.place(nnx.state(layer), mesh))
            mask, expected_drops = None, 0
            if case == "capacity":
                t_local = B * S // shards
                cap = moe.ep_capacity(t_local, k, ep, e // ep, 1.0)
                keep = numpy_keep(idx, shards, ep, e, cap)
                mask, expected_drops = jnp.asarray(keep, jnp.float32), int((~keep).sum())
            with jax.set_mesh(mesh):
                got = loss_and_grads(layer, x, cot)
            reference = ref if mask is None else loss_and_grads(ref_layer, x, cot, mask)
            result = compare(got, reference)
            if mask is not None:  # the masked reference has no aux: loads from the plain layer
                result["load_equal"] = bool(np.array_equal(got[1]["load"], ref[1]["load"]))
                result["balance"] = rel(got[1]["balance"], ref[1]["balance"])
            result["expected_dropped"] = expected_drops
            result["ragged_calls"] = len(EMULATED)
            report["results"][f"{name}/{case}"] = result
            print(name, case, result["out"], result["grads"], file=sys.stderr, flush=True)
    single, single_bias, _ = train_steps(None)
    mesh_losses, mesh_bias, dropped = train_steps({"data": 2, "expert": 4})
    report["train"] = {
        "single": single,
        "mesh": mesh_losses,
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(mesh_losses, single, strict=True)),
        "bias": max(rel(a, b) for a, b in zip(mesh_bias, single_bias, strict=True)),
        "bias_moved": min(float(np.abs(b).max()) for b in single_bias),
        "dropped": dropped,
    }
    print("train", report["train"], file=sys.stderr)
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    # XLA:CPU has no ragged-all-to-all: the "ragged" case runs the emulation above.
    jax.lax.ragged_all_to_all = emulated_ragged_all_to_all
    moe._ragged_all_to_all_supported = lambda: True
    main()
