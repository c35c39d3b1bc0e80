"""Training: losses, optimizer, the jitted train/eval steps and the aux-loss-free bias update.

Loss (V3 report sections 2.1.2 and 2.2):
  L = CE(main) + lambda / D * sum_k CE(MTP_k) + alpha * sum_{MoE layers} L_bal
After each optimizer step every correction bias moves by gamma * sign(mean load - load), with the
loads of that step's whole batch (:func:`dsv3_jax.moe.update_expert_bias`).

The hot loop jits pure functions over (params, biases, opt_state); the model object is split once.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.model import DeepseekV3
from dsv3_jax.moe import ExpertBias, update_expert_bias
from dsv3_jax.sharding import constrain, constrain_tree, no_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The loss and bias-update weights of one step: a pytree of float32 scalars (Python floats
    or arrays), traced by :func:`train_step`, so a schedule that changes them never recompiles."""

    mtp_lambda: float | jax.Array = 0.3  # lambda (0.3 for the first 10T tokens in the report)
    balance_alpha: float | jax.Array = 1e-4  # alpha of the sequence-wise balance loss
    bias_gamma: float | jax.Array = 1e-3  # gamma of the aux-loss-free bias update (0 at the end)


# ----------------------------------------------------------------------------- optimizer
def lr_schedule(
    peak_lr: float, min_lr: float, warmup_steps: int, decay_start: int, total_steps: int
):
    """Learning rate for optimizer step ``count`` (0-based), as in V3 section 4.2.

    Linear warmup peak_lr * (count + 1) / warmup_steps (so the first step already learns), then
    constant until ``decay_start``, then cosine to ``min_lr`` at ``total_steps``.
    """
    decay_start = max(decay_start, warmup_steps)
    decay = optax.cosine_decay_schedule(
        peak_lr, max(total_steps - decay_start, 1), alpha=min_lr / peak_lr
    )
    if warmup_steps < 1:
        return optax.join_schedules([optax.constant_schedule(peak_lr), decay], [decay_start])
    warmup = optax.linear_schedule(peak_lr / warmup_steps, peak_lr, max(warmup_steps - 1, 1))
    return optax.join_schedules(
        [warmup, optax.constant_schedule(peak_lr), decay], [warmup_steps, decay_start]
    )


def final_stretch_value(
    step: int, value: float, final_value: float, final_fraction: float, total_steps: int
) -> float:
    """``value`` for 0-based step ``step`` before the run's final stretch, ``final_value`` in it.

    The final stretch is the last ``round(final_fraction * total_steps)`` steps (none at 0). It
    gives the report's step schedules (V3 section 4.2): the MTP weight lambda 0.3 for the first
    10T of 14.8T tokens then 0.1 (``final_fraction`` 4.8/14.8), and the bias update speed gamma
    0.001 then 0 for the last 500B tokens (``final_fraction`` 0.5/14.8). Here steps stand for
    tokens (equal when the batch size is constant).
    """
    first_final = total_steps - round(final_fraction * total_steps)
    return final_value if step >= first_final else value


def batch_size_stages(
    batch_size: int, start: int, ramp_steps: int, stages: int, unit: int = 1
) -> tuple[tuple[int, int], ...]:
    """The batch-size ramp: ((first step, rows), ...) sorted by step, ending at ``batch_size``.

    The report ramps 3,072 -> 15,360 sequences over the first 469B tokens (V3 section 4.2); here
    the ramp goes from ``start`` rows at step 0 to ``batch_size`` at step ``ramp_steps`` in
    ``stages`` equal spans of steps, span i at start + (batch_size - start) * i / stages rows
    rounded down to a multiple of ``unit`` (micro-batches x the mesh's batch shards), so the train
    step compiles once per distinct size. ``start`` 0 or ``ramp_steps`` 0: no ramp,
    ((0, batch_size),).

    Raises:
      ValueError: ``start`` above ``batch_size`` or not a multiple of ``unit``; ``stages`` < 1.
    """
    if not start or not ramp_steps or start == batch_size:
        return ((0, batch_size),)
    if start > batch_size or start % unit or stages < 1:
        raise ValueError(
            f"a batch-size ramp needs 0 < start <= batch_size, start a multiple of {unit} and "
            f"stages >= 1, got start={start}, batch_size={batch_size}, stages={stages}"
        )
    out = []
    for i in range(stages):
        rows = start + (batch_size - start) * i // stages
        rows -= rows % unit
        first = ramp_steps * i // stages
        if out and out[-1][0] == first:
            out.pop()
        if not out or out[-1][1] != rows:
            out.append((first, rows))
    if out[-1][1] != batch_size:
        out.append((ramp_steps, batch_size))
    return tuple(out)


def batch_size_at(stages: tuple[tuple[int, int], ...], step: int) -> int:
    """Rows of 0-based step ``step`` under :func:`batch_size_stages`' ``stages``."""
    return next(rows for first, rows in reversed(stages) if step >= first)


def decay_mask(params: nnx.State, decay_embeddings: bool = False) -> Any:
    """True for weight-decayed params: matrices only; not norms, biases, or (by default) embeddings."""

    def keep(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        if "embed_tokens" in names and not decay_embeddings:
            return False
        is_stacked = names[0] in ("dense_layers", "moe_layers")
        return x.ndim - int(is_stacked) >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    schedule, *, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0, mask=None,
    moment_dtype=None,
) -> optax.GradientTransformation:  # fmt: skip
    """Gradient clipping at ``clip`` (global norm) then AdamW (V3 section 4.2).

    ``moment_dtype`` (e.g. "bfloat16", as FP8 training keeps them: report 3.3.3) stores both
    AdamW moments in that dtype (:func:`scale_by_adam_stored`); None: optax's adamw, moments in
    the parameters' dtype.
    """
    if moment_dtype is None:
        adam = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    else:
        adam = optax.chain(
            scale_by_adam_stored(b1, b2, eps, moment_dtype),
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        )
    return optax.chain(optax.clip_by_global_norm(clip), adam)


class AdamStoredState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_stored(b1, b2, eps, moment_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu and nu stored in ``moment_dtype``: each step updates them in
    float32 from the stored values, uses the float32 values for the step and stores them rounded
    (report 3.3.3: BF16 AdamW moments, FP32 master weights)."""
    moment_dtype = jnp.dtype(moment_dtype)

    def init(params):
        def zeros():  # two distinct trees: a train step donates both
            return jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype), params)

        return AdamStoredState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        f32 = jnp.float32
        mu = jax.tree.map(lambda m, g: b1 * m.astype(f32) + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(
            lambda v, g: b2 * v.astype(f32) + (1 - b2) * jnp.square(g), state.nu, updates
        )
        c1 = 1 - b1 ** count.astype(f32)
        c2 = 1 - b2 ** count.astype(f32)
        out = jax.tree.map(
            lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates
        )
        store = functools.partial(jax.tree.map, lambda x: x.astype(moment_dtype))
        return out, AdamStoredState(count, store(mu), store(nu))

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- losses
@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] = logsumexp(logits) - logits[target], float32 [b, s].

    logits float32 [b, s, w], targets int [b, s]. The backward is the closed form
    g * (softmax(logits) - onehot(target)): one fused pass over [b, s, w], where autodiff of
    log_softmax + take_along_axis makes several and scatters into a zero [b, s, w] buffer.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, s]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, s]
    return lse - picked, (logits, lse, targets)


def _token_nll_bwd(res, g):
    logits, lse, targets = res
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)  # [b, s, w]
    probs = jnp.exp(logits - lse[..., None])
    return (probs - onehot) * g[..., None], None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Sum of token cross-entropies (nats) and the token count. logits [b, s, w], targets [b, s]."""
    nll = token_nll(logits.astype(jnp.float32), targets)  # [b, s]
    if mask is None:
        mask = jnp.ones_like(nll)
    return (nll * mask).sum(), mask.sum()


def loss_fn(params, biases, graphdef, tokens, weights: LossWeights):
    """Training loss of a batch of token windows int32 [b, s + 1].

    Returns:
      (loss, metrics) with metrics: ce, mtp_ce, balance, main_load [l, e], mtp_loads [D, e],
      dropped (routed assignments over the expert-parallel capacity, all MoE layers; 0 unless
      ``moe_capacity_factor`` is set).
    """
    model: DeepseekV3 = nnx.merge(graphdef, params, biases)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model.forward(inputs)
    ce_sum, n = cross_entropy(out.logits, targets)
    ce = ce_sum / n
    loss = ce
    balance = out.aux["balance"].sum() if out.aux else jnp.float32(0)
    metrics = {"ce": ce, "main_load": out.aux.get("load", jnp.zeros((0,)))}
    dropped = out.aux["dropped"].sum() if out.aux else jnp.float32(0)
    if model.num_mtp:
        mtp_logits, mtp_aux = model.mtp_forward(inputs, out.hidden)
        mtp_ces = []
        for k, logits in enumerate(mtp_logits, start=1):
            s, c = cross_entropy(logits, targets[:, k:])  # row t predicts token t + k + 1
            mtp_ces.append(s / c)
        mtp_ce = jnp.mean(jnp.stack(mtp_ces))
        loss = loss + weights.mtp_lambda * mtp_ce
        balance = balance + sum(a["balance"] for a in mtp_aux)
        dropped = dropped + sum(a["dropped"] for a in mtp_aux)
        metrics["mtp_ce"] = mtp_ce
        metrics["mtp_loads"] = jnp.stack([a["load"] for a in mtp_aux])
    loss = loss + weights.balance_alpha * balance
    metrics["balance"] = balance
    metrics["dropped"] = dropped
    return loss, metrics


def apply_bias_update(biases: nnx.State, metrics: dict, gamma: float) -> nnx.State:
    """Moves every correction bias by gamma * sign(mean load - load) with this step's loads."""
    flat = []
    for path, var in nnx.to_flat_state(biases):
        if path[0] == "moe_layers":
            load = metrics["main_load"]  # [l, e]
        elif path[0] == "mtp":
            load = metrics["mtp_loads"][path[1]]  # [e]
        else:
            raise ValueError(f"no load for correction bias {path}")
        flat.append((path, var.replace(update_expert_bias(var[...], load, gamma))))
    return nnx.from_flat_state(flat)


def split_model(model: DeepseekV3):
    """(graphdef, params, biases): trainable nnx.Param state and the ExpertBias state."""
    return nnx.split(model, nnx.Param, ExpertBias)


# Donation saves a copy on GPU/TPU; the CPU backend ignores it (and would warn each compile).
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# Metrics of loss_fn that add up over micro-batches (counts); the others are per-token or
# per-sequence means over equal-sized micro-batches, so their mean is the whole batch's.
_SUMMED_METRICS = ("main_load", "mtp_loads", "dropped")


def _split_microbatches(tokens: jax.Array, microbatches: int, rules=None) -> jax.Array:
    """[b, s + 1] -> [m, b / m, s + 1]: micro-batch j holds rows j, m + j, 2m + j, ...

    Strided, so that when the batch rows are split over the mesh's batch shards in contiguous
    blocks (b / m a multiple of the shard count), every micro-batch keeps an equal part on each
    shard and the split is a local transpose.
    """
    b = tokens.shape[0]
    if b % microbatches:
        raise ValueError(f"batch of {b} rows is not a multiple of microbatches={microbatches}")
    micro = tokens.reshape(b // microbatches, microbatches, *tokens.shape[1:])  # [b/m, m, s+1]
    return constrain(jnp.swapaxes(micro, 0, 1), (None, "batch", None), rules)  # [m, b/m, s+1]


def _accumulated_grads(params, biases, graphdef, tokens, weights, microbatches: int, rules=None):
    """value_and_grad of :func:`loss_fn` over the whole batch, ``microbatches`` at a time.

    One ``lax.scan`` over micro-batches sums the gradients (in float32) and the metrics; the
    loss, the gradients and the mean metrics are averaged (every micro-batch has the same token
    and sequence count, so the means are the whole batch's), the expert loads and dropped counts
    summed: the bias update sees the loads of the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn(params, biases, graphdef, tokens, weights)
    micro = _split_microbatches(tokens, microbatches, rules)
    shapes = jax.eval_shape(lambda t: grad_fn(params, biases, graphdef, t, weights), micro[0])
    f32 = jnp.float32
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, f32), shapes)

    def body(acc, mb):
        out = grad_fn(params, biases, graphdef, mb, weights)
        return jax.tree.map(lambda a, x: a + x.astype(f32), acc, out), None

    ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, micro)
    scale = 1.0 / microbatches
    metrics = {k: v if k in _SUMMED_METRICS else v * scale for k, v in metrics.items()}
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    return (loss * scale, metrics), grads


@functools.partial(
    jax.jit,
    static_argnums=(0, 1),
    static_argnames=("skip_nonfinite", "microbatches"),
    donate_argnums=(3, 4, 5),
)
def train_step(
    graphdef, tx, weights: LossWeights, params, biases, opt_state, tokens, skip_nonfinite=False,
    microbatches: int = 1,
):  # fmt: skip
    """One optimizer step on a batch of token windows int32 [b, s + 1].

    Returns (params, biases, opt_state, metrics).

    ``weights`` (:class:`LossWeights`) is traced: schedules of lambda and gamma never recompile.
    ``microbatches`` (gradient accumulation) splits the batch into that many micro-batches of
    b / m rows run one after the other inside this one program (``lax.scan``); the loss, the
    gradients, the metrics and the expert loads of the bias update (which moves once, with the
    summed loads) are those of the whole batch (V3 section 2.1.2: loads over the global batch).

    ``metrics``: scalars loss, ce, mtp_ce (with MTP), balance, dropped, grad_norm,
    load_max_over_mean, finite; and the step's expert loads (routed assignments per expert over
    the global batch, float32): ``main_load`` [l, e] (the MoE layers) and ``mtp_loads`` [D, e].

    ``metrics["finite"]`` (bool scalar) says whether the loss and the gradient norm are finite. With
    ``skip_nonfinite`` a non-finite step changes nothing: params, biases and optimizer state (its
    step count included) come back as they went in.

    Under a mesh (``jax.set_mesh``), gradients, the new parameters and the AdamW moments are pinned
    to the parameters' shardings (the model config's sharding rules); the expert loads behind the
    bias update are those of the whole global batch (the program is global), so every replica
    applies the same update.

    Raises:
      ValueError: b is not a multiple of ``microbatches``.
    """
    rules = nnx.merge(graphdef, params, biases).config.sharding_rules
    (loss, metrics), grads = _accumulated_grads(
        params, biases, graphdef, tokens, weights, microbatches, rules
    )
    grads = constrain_tree(grads, rules)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (
        optax.apply_updates(params, updates),
        apply_bias_update(biases, metrics, weights.bias_gamma),
        new_opt_state,
    )
    if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, biases, opt_state))
    params, biases, opt_state = constrain_tree(new, rules)
    load = metrics["main_load"]
    out = {
        "loss": loss,
        "ce": metrics["ce"],
        "balance": metrics["balance"],
        "dropped": metrics["dropped"],
        "grad_norm": grad_norm,
        "load_max_over_mean": (load.max(-1) / load.mean(-1)).max() if load.size else jnp.float32(1),
        "finite": finite,
    }
    if "mtp_ce" in metrics:
        out["mtp_ce"] = metrics["mtp_ce"]
    # Expert loads for the run's log, replicated (every process can read them at a log point).
    out["main_load"] = constrain(load, (None,) * load.ndim)  # [l, e]
    if "mtp_loads" in metrics:
        out["mtp_loads"] = constrain(metrics["mtp_loads"], (None, None))  # [D, e]
    return params, biases, opt_state, out


def init_opt_state(tx: optax.GradientTransformation, params: nnx.State, rules=None):
    """``tx.init(params)`` with the moments placed like the parameters (under the mesh in context;
    ``rules``: the model config's ``sharding_rules``)."""
    return jax.jit(lambda p: constrain_tree(tx.init(p), rules))(params)


def new_nonfinite_tracker() -> dict:
    """Device-side record of non-finite steps, updated by :func:`track_nonfinite`."""
    zero = jnp.zeros((), jnp.int32)
    nan = jnp.full((), jnp.nan, jnp.float32)
    return {"skipped": zero, "run": zero, "stop_step": zero, "stop_loss": nan, "stop_grad": nan}


@jax.jit
def track_nonfinite(tracker: dict, metrics: dict, step, limit):
    """Counts non-finite steps without a host sync; marks the step where the run must stop.

    Args:
      tracker: from :func:`new_nonfinite_tracker`: ``skipped`` (non-finite steps so far), ``run``
        (consecutive non-finite steps up to now), ``stop_step`` (0, or the first step at which
        ``run`` exceeded ``limit``) with that step's ``stop_loss`` and ``stop_grad`` (grad norm).
      metrics: a :func:`train_step` output (``finite``, ``loss``, ``grad_norm``).
      step: the 1-based step just taken.
      limit: consecutive non-finite steps allowed (0: stop at the first).
    """
    bad = ~metrics["finite"]
    loss, grad_norm = (metrics[k].astype(jnp.float32) for k in ("loss", "grad_norm"))
    run = jnp.where(bad, tracker["run"] + 1, 0)
    stop = (tracker["stop_step"] == 0) & (run > limit)
    return {
        "skipped": tracker["skipped"] + bad.astype(jnp.int32),
        "run": run,
        "stop_step": jnp.where(stop, step, tracker["stop_step"]),
        "stop_loss": jnp.where(stop, loss, tracker["stop_loss"]),
        "stop_grad": jnp.where(stop, grad_norm, tracker["stop_grad"]),
    }


@jax.jit
def all_finite(tree) -> jax.Array:
    """True if every float array of ``tree`` (params, optimizer state, ...) is finite."""
    checks = [
        jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


@functools.partial(jax.jit, static_argnums=0)
def eval_step(graphdef, params, biases, tokens, mask):
    """Masked next-token CE: (sum of nats, count) over windows int32 [b, s + 1], mask [b, s]."""
    model = nnx.merge(graphdef, params, biases)
    out = model.forward(tokens[:, :-1])
    return cross_entropy(out.logits, tokens[:, 1:], mask)


def lower_train_step(config, batch: int, seq_len: int) -> jax.stages.Lowered:
    """:func:`train_step` lowered for one device on abstract inputs (nothing is allocated): the
    model of ``config`` (a ModelConfig: its dtype and remat apply), AdamW with the decay mask,
    int32 tokens [batch, seq_len + 1]. ``.compile()`` gives XLA's compile time and
    ``memory_analysis()`` (used by dsv3_jax.plan and bench/compile_bench.py)."""
    with no_mesh():
        abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0)))
    graphdef, params, biases = split_model(abstract)
    tx = make_optimizer(1e-4, mask=decay_mask(params))
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    return train_step.lower(graphdef, tx, LossWeights(), params, biases, opt_state, tokens)
