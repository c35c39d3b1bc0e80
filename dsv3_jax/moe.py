"""DeepSeekMoE with auxiliary-loss-free balancing (V3 report section 2.1.2, eqs. 12-20).

Glossary: b batch, s positions, d hidden_size, e routed experts, k experts per token,
g expert groups, f expert width (moe_intermediate_size), m = tokens * k routed assignments.

  s_i   = sigmoid(u W_i)                      router in float32, whatever the model dtype
  pick  = top-k of (s_i + b_i) within the topk_group best groups (group score: sum of its top-2),
          all other experts masked to -inf (biased scores can be negative)
  g_i   = s_i / sum_{j in pick} s_j (if norm_topk_prob), times routed_scaling_factor once
  out   = shared_experts(u) + sum_{i in pick} g_i * expert_i(u)

The bias b (``e_score_correction_bias``) only steers selection: it is an :class:`ExpertBias`
variable, not an ``nnx.Param``, so it gets no gradient, no optimizer state and no weight decay; the
trainer updates it after each step with :func:`update_expert_bias`.

On one device dispatch is dropless: assignments are sorted by expert and run as one grouped matmul, with
``jax.lax.ragged_dot`` on GPU/TPU and, on CPU (where ragged_dot is a dense masked product, e times
the work), a blocked path that pads each expert's rows to whole blocks and does at most about 1.5 times
the real work.

Expert parallelism (V3 sections 2.1.2 and 3.2.2): on a mesh whose ``expert`` axis is larger than 1,
:func:`expert_parallel_moe` replaces :func:`dispatch` / :func:`combine` with one ``shard_map``: each
device sorts its own tokens' assignments by destination device, exchanges them by all-to-all, runs
its e / ep local experts (:func:`expert_ffn`) and sends the results back. Routing, the expert loads
(bias update) and the balance loss stay outside it, computed from the same global arrays as on one
device. Experts are split in contiguous slices, so with ``n_group`` groups laid on the expert axis
a token reaches at most ``topk_group`` device groups (:func:`destination`): node-limited routing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, dtype_of, eager_sharding, kernel_params, param, product
from dsv3_jax.sharding import constrain

TOKENS = ("batch", "seq", "act_embed")  # [b, s, d] entering and leaving the layer


class ExpertBias(nnx.Variable):
    """e_score_correction_bias b [e], float32: selection-only, updated outside the optimizer."""


# ----------------------------------------------------------------------------- routing
def route(scores: jax.Array, bias: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-k selection on biased scores, gates from unbiased scores.

    Args:
      scores: float32 [m, e] sigmoid affinities s.
      bias: float32 [e] correction bias b (selection only).
      config: n_group, topk_group, num_experts_per_tok, norm_topk_prob, routed_scaling_factor.

    Returns:
      (weights float32 [m, k], expert ids int32 [m, k]); matches HF ``DeepseekV3TopkRouter``.

    Raises:
      TypeError: ``config`` is neither a ModelConfig nor a mapping of its fields.
    """
    config = ModelConfig.coerce(config)
    e, g = config.n_routed_experts, config.n_group
    biased = scores + bias  # [m, e]
    if g > 1:
        grouped = biased.reshape(-1, g, e // g)  # [m, g, e/g]
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [m, g]
        _, top_groups = jax.lax.top_k(group_scores, config.topk_group)  # [m, topk_group]
        keep = jax.nn.one_hot(top_groups, g, dtype=jnp.bool_).any(axis=1)  # [m, g]
        keep = jnp.repeat(keep, e // g, axis=1)  # [m, e]
        biased = jnp.where(keep, biased, -jnp.inf)
    _, idx = jax.lax.top_k(biased, config.num_experts_per_tok)  # [m, k]
    weights = jnp.take_along_axis(scores, idx, axis=-1)  # unbiased s of the chosen experts
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, idx.astype(jnp.int32)


def sequence_balance_loss(scores: jax.Array, idx: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-wise balance loss without alpha, averaged over sequences (V3 eqs. 17-20).

    f_i = e / (k T) * #{t : i in topk(t)},  P_i = mean_t s_{i,t} / sum_j s_{j,t},  L = sum_i f_i P_i.

    Args:
      scores: float32 [b, s, e]. idx: int32 [b, s, k].
    Returns:
      float32 scalar, mean over the b sequences (1.0 for perfectly uniform routing).
    """
    k, t = idx.shape[-1], idx.shape[1]
    counts = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32).sum(axis=(1, 2))  # [b, e]
    f = counts * num_experts / (k * t)
    p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)  # [b, e]
    return (f * p).sum(-1).mean()


def update_expert_bias(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
    """Aux-loss-free balancing: b_i += gamma * sign(mean(load) - load_i) (V3 section 2.1.2).

    Args:
      bias: float32 [..., e]. load: [..., e] tokens routed to each expert over the global batch.
    """
    load = load.astype(jnp.float32)
    return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)


# ----------------------------------------------------------------------------- grouped matmul
def _resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged"
    return impl


class _BlockLayout:
    """Row layout that pads each expert's (sorted) rows up to whole blocks of ``block`` rows.

    Static sizes: block = ceil(m / 2e) rounded up to 8; blocks <= ceil(m / block) + min(e, m), so
    the padded work is at most about 1.5 times the real work whatever the routing (blocks of
    ceil(m / e) rows: twice, and 1.36x slower forward + backward on the CPU train bench; smaller
    blocks gain nothing more there and gather more weight copies). Rows past sum(group_sizes) (an
    expert-parallel receive buffer's padding) are left out and give zeros.
    """

    def __init__(self, group_sizes: jax.Array, m: int, e: int):
        self.block = max(8, -(-math.ceil(m / (2 * e)) // 8) * 8)
        self.num_blocks = -(-m // self.block) + min(e, m)
        padded = -(-group_sizes // self.block) * self.block  # [e]
        pad_end = jnp.cumsum(padded)
        pad_start = pad_end - padded
        start = jnp.cumsum(group_sizes) - group_sizes
        expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)  # [m]
        dest = pad_start[expert_of_row] + jnp.arange(m) - start[expert_of_row]  # [m]
        valid = jnp.arange(m) < group_sizes.sum()
        self.dest = jnp.where(valid, dest, self.num_blocks * self.block)  # padding: out of range
        block_start = jnp.arange(self.num_blocks) * self.block
        self.block_expert = jnp.minimum(
            jnp.searchsorted(pad_end, block_start, side="right"), e - 1
        )  # [n]

    def pad(self, x: jax.Array) -> jax.Array:  # [m, d] -> [n, block, d]
        out = jnp.zeros((self.num_blocks * self.block, x.shape[-1]), x.dtype)
        out = out.at[self.dest].set(x, mode="drop")
        return out.reshape(self.num_blocks, self.block, -1)

    def unpad(self, y: jax.Array) -> jax.Array:  # [n, block, d] -> [m, d]
        flat = y.reshape(self.num_blocks * self.block, -1)
        return jnp.take(flat, self.dest, axis=0, mode="fill", fill_value=0)

    def matmul(self, x: jax.Array, w: jax.Array, dtype, config=None, scale=None) -> jax.Array:
        """[n, B, i] x [e, i, o] -> [n, B, o]: each block times its expert's weight.

        With ``config``: through ``layers.product`` (FP8 training, or FP8 weights with ``scale``
        [e, ceil(i/128), ceil(o/128)]), one product per block.
        """
        w = jnp.take(w, self.block_expert, axis=0)  # [n, i, o]
        if config is not None:
            s = None if scale is None else jnp.take(scale, self.block_expert, axis=0)
            return product(x, w, config, scale_inv=s)
        return jnp.einsum(
            "nbi,nio->nbo", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
        ).astype(dtype)


def expert_ffn(
    x_sorted: jax.Array,
    group_sizes: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype,
    impl: str = "auto",
    config: ModelConfig | None = None,
    scales: tuple | None = None,
) -> jax.Array:
    """SwiGLU experts on rows sorted by expert: down_e(silu(gate_e(x)) * up_e(x)).

    Args:
      x_sorted: [m, d] rows grouped by expert (expert 0's rows first).
      group_sizes: int32 [e], rows per expert, summing to m or less (rows past the sum are
        padding: the blocked path skips them and returns zeros; ragged_dot leaves them to the
        backend, so callers mask them, as :func:`expert_parallel_moe` does).
      w_gate, w_up: [e, d, f]; w_down: [e, f, d].
      impl: "ragged" (lax.ragged_dot), "blocked" (padded blocks; the CPU path) or "auto".
      config: with ``fp8_training`` set, or with ``scales`` (the three weights' FP8
        ``scale_inv``, ``fp8_weights``), the products run as FP8 GEMMs (``layers.product``) on
        the blocked layout (one GEMM per block of rows; ragged_dot takes no block scales).
    Returns:
      [m, d] in ``dtype``.
    """
    m, e = x_sorted.shape[0], w_gate.shape[0]
    fp8 = config is not None and (config.fp8_training or scales is not None)
    if fp8 or _resolve_impl(impl) == "blocked":
        layout = _BlockLayout(group_sizes, m, e)
        xb = layout.pad(x_sorted)  # [n, B, d]
        cfg = config if fp8 else None
        s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
        gate = checkpoint_name(layout.matmul(xb, w_gate, dtype, cfg, s_gate), "mlp_gate")
        h = jax.nn.silu(gate) * checkpoint_name(layout.matmul(xb, w_up, dtype, cfg, s_up), "mlp_up")
        return layout.unpad(layout.matmul(h, w_down, dtype, cfg, s_down))  # [m, d]

    def gmm(a, w):
        return jax.lax.ragged_dot(
            a.astype(dtype), w.astype(dtype), group_sizes, preferred_element_type=jnp.float32
        ).astype(dtype)

    gate, up = checkpoint_name(gmm(x_sorted, w_gate), "mlp_gate"), gmm(x_sorted, w_up)
    return gmm(jax.nn.silu(gate) * checkpoint_name(up, "mlp_up"), w_down)


# ----------------------------------------------------------------------------- dispatch / combine
class Dispatch(NamedTuple):
    """Where each routed assignment went: rows sorted by expert (see :func:`dispatch`)."""

    x_sorted: jax.Array  # [m, d] token rows grouped by expert (expert 0's rows first)
    group_sizes: jax.Array  # int32 [e] rows per expert (the expert load), summing to m
    order: jax.Array  # int32 [m]: sorted row r is flat assignment order[r] (token order // k)
    token: jax.Array  # int32 [m]: the source token of each sorted row


def dispatch(x: jax.Array, idx: jax.Array, num_experts: int) -> Dispatch:
    """Groups the k copies of each token by expert (dropless; stable, so ties keep token order).

    Args:
      x: [T, d] tokens. idx: int32 [T, k] routed experts of each token (``route``).
      num_experts: e.
    Returns:
      :class:`Dispatch` with m = T * k rows.

    Under a sharded mesh this is the global sort GSPMD partitions as it sees fit (the routing
    ids are all-gathered and every device sorts all rows): ``moe_dispatch="gspmd"``. The
    expert-parallel path (:func:`expert_parallel_moe`) replaces :func:`dispatch` and
    :func:`combine` and keeps :func:`expert_ffn`.
    """
    k = idx.shape[-1]
    flat = idx.reshape(-1)  # [m]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [e]
    return Dispatch(x[token], group_sizes, order, token)


def combine(y: jax.Array, weights: jax.Array, d: Dispatch, num_tokens: int) -> jax.Array:
    """sum over a token's k rows of gate * expert output (V3 eq. 12's routed sum).

    Args:
      y: [m, d] expert outputs in :func:`dispatch` order. weights: float32 [T, k] gates g.
      d: the Dispatch. num_tokens: T.
    Returns:
      float32 [T, d].
    """
    y = y.astype(jnp.float32) * weights.reshape(-1)[d.order][:, None]
    return jnp.zeros((num_tokens, y.shape[-1]), jnp.float32).at[d.token].add(y)


# ----------------------------------------------------------------------------- expert parallelism
def ep_capacity(
    tokens: int, k: int, ep: int, experts_per_device: int, capacity_factor: float | None
) -> int:
    """Rows one device sends to one peer in the capacity-padded all-to-all.

    Args:
      tokens: tokens on the sending device (T). k: num_experts_per_tok. ep: expert-parallel
        devices. experts_per_device: e / ep. capacity_factor: None for dropless.

    Returns:
      ceil(capacity_factor * T * k / ep), at most the worst case T * min(k, e / ep) (a token
      sends at most one row per expert it picked, and a peer holds e / ep experts); the worst case
      itself when ``capacity_factor`` is None, so no assignment is ever dropped.
    """
    worst = tokens * min(k, experts_per_device)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * tokens * k / ep)))


def destination(idx: jax.Array, num_experts: int, ep: int) -> jax.Array:
    """The expert-parallel device (index along the expert axis) holding each routed expert.

    Experts are stacked [e, ...] and split in ``ep`` contiguous slices, so expert i lives on device
    i // (e / ep). With ``n_group`` groups of e / n_group consecutive experts:
      * ep >= n_group (n_group | ep): group j is held by the ep / n_group consecutive devices
        j * ep / n_group ...; those devices are group j's *device group* (a node in the report).
      * ep < n_group (ep | n_group): each device holds n_group / ep whole groups.
    Either way a token's experts lie in at most ``topk_group`` groups, so it sends to at most
    ``topk_group`` device groups: node-limited routing (V3 section 2.1.2, M = topk_group = 4 nodes
    when n_group = 8 groups are 8 nodes of 8 devices).

    Args:
      idx: int [...] expert ids. num_experts: e. ep: devices on the expert axis (divides e).
    Returns:
      int32 [...] device index in [0, ep).
    """
    return (idx // (num_experts // ep)).astype(jnp.int32)


def device_group(idx: jax.Array, config: ModelConfig, ep: int) -> jax.Array:
    """The device group each expert id's rows travel to (see :func:`destination`).

    n_group < ep (ep / n_group devices per group): the expert's group, i.e. its device // (ep /
    n_group). n_group >= ep (whole groups per device): the device itself.

    Raises:
      ValueError: neither of n_group and ep divides the other.
    """
    config = ModelConfig.coerce(config)
    g = config.n_group
    if g % ep and ep % g:
        raise ValueError(
            f"n_group={g} and the {ep} expert-parallel devices must divide one another"
        )
    if g >= ep:
        return destination(idx, config.n_routed_experts, ep)
    return destination(idx, config.n_routed_experts, ep) // (ep // g)


class ExpertParallelPlan(NamedTuple):
    """How a MoE layer runs on a mesh (static; see :func:`expert_parallel_plan`)."""

    ep_axes: tuple[str, ...]  # mesh axes the routed experts are split over (all-to-all axes)
    token_axes: tuple[str, ...]  # mesh axes the tokens' batch dimension is split over
    tp_axes: tuple[str, ...]  # mesh axes the expert width f is split over (psum at the end)
    ep: int  # devices along ep_axes


def expert_parallel_plan(config: ModelConfig, mesh, batch: int) -> ExpertParallelPlan | None:
    """The expert-parallel layout for ``config.moe_dispatch`` on ``mesh``, or None for the
    GSPMD dispatch (no mesh, "gspmd", or "auto" with no expert axis larger than 1 / tokens not
    split over it).

    Raises:
      ValueError: an all-to-all dispatch was asked for but the rules/mesh cannot run it (names
        the experts / batch / expert_mlp axes and what is wrong).
    """
    from dsv3_jax.sharding import logical_to_spec, mesh_axes, spec_axes  # noqa: PLC0415

    mode = config.moe_dispatch
    if mode == "gspmd" or mesh is None or mesh.empty or mesh.size == 1:
        return None
    rules, e = config.sharding_rules, config.n_routed_experts
    ep_axes = mesh_axes("experts", rules, mesh)
    ep = math.prod(mesh.shape[a] for a in ep_axes)

    def axes_of(name: str, size: int) -> tuple[str, ...]:
        spec = logical_to_spec((name,), rules, (size,), mesh)
        return spec_axes(spec[0] if len(spec) else None)

    token_axes = axes_of("batch", batch)
    tp_axes = axes_of("expert_mlp", config.moe_intermediate_size)
    problem = None
    if not ep_axes:
        problem = "the sharding rules put 'experts' on no mesh axis larger than 1"
    elif e % ep:
        problem = f"n_routed_experts={e} is not a multiple of the {ep} devices of {ep_axes}"
    elif not set(ep_axes) <= set(token_axes):
        problem = (
            f"the batch ({batch} rows) is not split over the expert axes {ep_axes} (batch axes "
            f"used: {token_axes}); tokens must differ between expert-parallel devices"
        )
    elif set(tp_axes) & set(token_axes):
        problem = f"'expert_mlp' axes {tp_axes} also split the batch ({token_axes})"
    if problem is None:
        return ExpertParallelPlan(ep_axes, token_axes, tp_axes, ep)
    if mode == "auto":
        return None
    raise ValueError(f"ModelConfig.moe_dispatch={mode!r} cannot run on this mesh: {problem}")


def _ragged_all_to_all_supported() -> bool:
    """XLA:CPU has no ragged-all-to-all (it fails at compile time with UNIMPLEMENTED)."""
    return jax.default_backend() != "cpu"


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _local_experts(rows, local_ids, e_local, w_gate, w_up, w_down, dtype, impl, config=None):
    """Runs received rows through this device's experts; local id e_local marks padding."""
    order = jnp.argsort(local_ids, stable=True)  # padding (id e_local) last
    sizes = jnp.bincount(local_ids, length=e_local).astype(jnp.int32)  # padding not counted
    y = expert_ffn(rows[order], sizes, w_gate, w_up, w_down, dtype, impl, config)
    y = jnp.zeros_like(y).at[order].set(y)  # back to the received order
    return jnp.where((local_ids < e_local)[:, None], y, 0)


def expert_parallel_moe(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    config: ModelConfig,
    plan: ExpertParallelPlan,
) -> tuple[jax.Array, jax.Array]:
    """The routed experts' sum with explicit all-to-all token dispatch (one ``shard_map``).

    Each device (a slice of the batch, a slice of the experts) sorts its T * k assignments by
    expert, hence by destination device d = expert // (e / ep), exchanges them over the expert axes
    with an all-to-all, runs its local experts' grouped matmul (:func:`expert_ffn`), sends the
    results back with the reverse all-to-all and combines them with the gates; with the expert
    width split over ``tensor`` each device computes its slice and the sums are psum-ed.

    Variants (``config.moe_dispatch``):
      all_to_all: ``lax.all_to_all`` of [ep, C, d] buffers, C = :func:`ep_capacity`; with
        ``moe_capacity_factor`` set, the assignments past a peer's C (in expert, then token order)
        are dropped: they add nothing to the token's output.
      ragged_all_to_all: ``lax.ragged_all_to_all`` of exactly the rows each peer gets (GPU/TPU).

    Args:
      x: [b, s, d] tokens (model dtype). weights: float32 [b, s, k] gates. idx: int32 [b, s, k].
      w_gate, w_up: [e, d, f]; w_down: [e, f, d] (the stacked expert weights).
      config: the model config. plan: :func:`expert_parallel_plan`'s layout (mesh in context).

    Returns:
      (float32 [b, s, d] routed output, float32 scalar: assignments dropped over the whole batch).

    Raises:
      NotImplementedError: ragged_all_to_all on CPU (XLA:CPU has no ragged-all-to-all).
    """
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    ragged = config.moe_dispatch == "ragged_all_to_all"
    if ragged and not _ragged_all_to_all_supported():
        raise NotImplementedError(
            "ModelConfig.moe_dispatch='ragged_all_to_all' needs a GPU or TPU: XLA:CPU has no "
            "ragged-all-to-all; use 'all_to_all' (capacity-padded) on CPU"
        )
    e, k = config.n_routed_experts, config.num_experts_per_tok
    ep, ep_axes = plan.ep, plan.ep_axes
    e_local = e // ep
    dtype, impl = dtype_of(config.dtype), config.moe_impl
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes
    tok = P(plan.token_axes or None)
    tp = plan.tp_axes or None
    w_in, w_out = P(ep_axes, None, tp), P(ep_axes, tp, None)

    def local(x, weights, idx, w_gate, w_up, w_down):
        b, s, d = x.shape
        t = b * s
        flat = idx.reshape(-1)  # [m], m = t * k
        order = jnp.argsort(flat, stable=True)  # by expert, so by destination device
        sorted_e = flat[order]
        dest = destination(sorted_e, e, ep)  # [m]
        counts = jnp.bincount(dest, length=ep).astype(jnp.int32)  # [ep] rows for each peer
        start = _exclusive_cumsum(counts)
        token = order // k
        rows = x.reshape(t, d)[token]  # [m, d] sorted by destination
        if ragged:
            back, dropped = _ragged_exchange(
                rows, sorted_e % e_local, counts, start, t, e_local, ep_name,
                lambda r, ids: _local_experts(
                    r, ids, e_local, w_gate, w_up, w_down, dtype, impl, config
                ),
            )  # fmt: skip
        else:
            cap = ep_capacity(t, k, ep, e_local, config.moe_capacity_factor)
            rank = jnp.arange(flat.shape[0]) - start[dest]
            keep = rank < cap
            slot = jnp.where(keep, dest * cap + rank, ep * cap)  # out of range: dropped
            send = jnp.zeros((ep * cap, d), x.dtype).at[slot].set(rows, mode="drop")
            ids = (
                jnp.full((ep * cap,), e_local, jnp.int32)
                .at[slot]
                .set(sorted_e % e_local, mode="drop")
            )
            recv = jax.lax.all_to_all(send.reshape(ep, cap, d), ep_name, 0, 0, tiled=True)
            recv_ids = jax.lax.all_to_all(ids.reshape(ep, cap), ep_name, 0, 0, tiled=True)
            y = _local_experts(
                recv.reshape(ep * cap, d), recv_ids.reshape(-1), e_local,
                w_gate, w_up, w_down, dtype, impl, config,
            )  # fmt: skip
            y = jax.lax.all_to_all(y.reshape(ep, cap, d), ep_name, 0, 0, tiled=True)
            back = jnp.take(y.reshape(ep * cap, d), slot, axis=0, mode="fill", fill_value=0)
            dropped = (~keep).sum()
        gates = weights.reshape(-1)[order][:, None]  # [m, 1] float32
        out = jnp.zeros((t, d), jnp.float32).at[token].add(back.astype(jnp.float32) * gates)
        if plan.tp_axes:
            out = jax.lax.psum(out, plan.tp_axes)
        dropped = dropped.astype(jnp.float32)
        if plan.token_axes:
            dropped = jax.lax.psum(dropped, plan.token_axes)
        return out.reshape(b, s, d), dropped

    return jax.shard_map(
        local,
        in_specs=(tok, tok, tok, w_in, w_in, w_out),
        out_specs=(tok, P()),
    )(x, weights, idx, w_gate, w_up, w_down)


def _varying(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` typed as varying over the mesh axes ``like`` varies over: ragged_all_to_all's result
    takes its ``output`` buffer's type, and a buffer typed the same on every device would make
    shard_map's autodiff psum the cotangents across devices."""
    axes = tuple(getattr(jax.typeof(like), "vma", ()))
    if not axes:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # jax < 0.12


def _ragged_exchange(rows, local_ids, counts, start, t, e_local, axis, experts):
    """Dropless exchange with ``lax.ragged_all_to_all``: rows [m, d] sorted by destination,
    ``counts`` [ep] rows per peer starting at ``start``; returns (expert outputs [m, d] in the same
    order, 0 dropped). The receive buffer holds the worst case, ep * t * min(k, e_local) rows."""
    m, d = rows.shape
    ep = counts.shape[0]
    me = jax.lax.axis_index(axis)
    table = jax.lax.all_gather(counts, axis)  # [ep src, ep dst]: rows src sends to dst
    recv_sizes = table[:, me]  # [ep]: rows each peer sends me
    # where my chunk lands in peer p's receive buffer: after the chunks of the peers before me
    out_offsets = _exclusive_cumsum(table, axis=0)[me]  # [ep]
    cap = ep * t * min(m // t, e_local)
    recv = jax.lax.ragged_all_to_all(
        rows, _varying(jnp.zeros((cap, d), rows.dtype), rows), start, counts, out_offsets,
        recv_sizes,
        axis_name=axis,
    )  # fmt: skip
    recv_ids = jax.lax.ragged_all_to_all(
        local_ids.astype(jnp.int32), _varying(jnp.full((cap,), e_local, jnp.int32), rows), start,
        counts, out_offsets, recv_sizes, axis_name=axis,
    )  # fmt: skip
    y = experts(recv, recv_ids)  # [cap, d], padding rows zero
    # back: my received chunk from peer p sits at recv_start[p]; it lands at p's start[me]
    recv_start = _exclusive_cumsum(recv_sizes)
    their_start = _exclusive_cumsum(table, axis=1)[:, me]  # [ep]: peer p's offset for rows to me
    back = jax.lax.ragged_all_to_all(
        y, _varying(jnp.zeros((m, d), y.dtype), y), recv_start, recv_sizes, their_start, counts,
        axis_name=axis,
    )  # fmt: skip
    return back, jnp.zeros((), jnp.int32)


# ----------------------------------------------------------------------------- module
class Router(nnx.Module):
    """The gate: kernel [d, e] float32 (HF ``mlp.gate.weight`` transposed) and the correction bias."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = param(
            rngs,
            (config.hidden_size, config.n_routed_experts),
            ("embed", "router"),
            config.replace(param_dtype="float32"),
        )
        self.e_score_correction_bias = ExpertBias(
            jnp.zeros((config.n_routed_experts,), jnp.float32),
            out_sharding=("router",),
            eager_sharding=eager_sharding(),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> sigmoid affinities float32 [..., e]."""
        logits = jnp.einsum(
            "...d,de->...e", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32)
        )
        return jax.nn.sigmoid(logits)


class MoE(nnx.Module):
    """DeepSeekMoE layer: shared experts plus routed experts stored stacked [e, d, f]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate = Router(config, rngs=rngs)
        self.gate_proj, self.gate_proj_scale_inv = kernel_params(
            rngs, (e, d, f), ("experts", "embed", "expert_mlp"), config
        )
        self.up_proj, self.up_proj_scale_inv = kernel_params(
            rngs, (e, d, f), ("experts", "embed", "expert_mlp"), config
        )
        self.down_proj, self.down_proj_scale_inv = kernel_params(
            rngs, (e, f, d), ("experts", "expert_mlp", "embed"), config
        )
        if config.n_shared_experts:
            self.shared_experts = MLP(
                config, config.n_shared_experts * f, rngs=rngs, width="shared_mlp"
            )
        else:
            self.shared_experts = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [b, s, d] -> (out [b, s, d], aux): route -> dispatch -> expert_ffn -> combine.

        aux: ``load`` float32 [e] (assignments per expert in this call, over the whole global
        batch under a mesh), ``balance`` (the sequence-wise balance loss without alpha) and
        ``experts`` int32 [b, s, k] (the routed experts of each token, as ``route`` picked them:
        highest biased score first) and ``dropped`` float32 (assignments over the expert-parallel
        capacity, counted over the global batch; 0 unless ``moe_capacity_factor`` is set).

        On a mesh the dispatch follows ``config.moe_dispatch`` (:func:`expert_parallel_plan`):
        the all-to-all path replaces dispatch/combine; routing, loads and the balance loss are
        computed from the same global scores either way.
        """
        cfg = self.config
        rules = cfg.sharding_rules
        b, s, d = x.shape
        k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
        x = constrain(x, TOKENS, rules)
        with jax.named_scope("router"):
            scores = self.gate(x)  # [b, s, e]
            weights, idx = route(
                scores.reshape(-1, e), self.gate.e_score_correction_bias[...], cfg
            )  # [b*s, k]
        plan = expert_parallel_plan(cfg, jax.sharding.get_abstract_mesh(), b)
        scales = None
        if cfg.fp8_weights:
            scales = tuple(
                v[...] for v in (
                    self.gate_proj_scale_inv, self.up_proj_scale_inv, self.down_proj_scale_inv
                )
            )  # fmt: skip
        if plan is not None and scales is not None:
            raise NotImplementedError(
                "FP8 weights (fp8_weights) with the expert-parallel all-to-all dispatch: set "
                "moe_dispatch='gspmd' or load without fp8"
            )
        if plan is not None:
            with jax.named_scope("expert_parallel"):
                routed, dropped = expert_parallel_moe(
                    x, weights.reshape(b, s, k), idx.reshape(b, s, k), self.gate_proj[...],
                    self.up_proj[...], self.down_proj[...], cfg, plan,
                )  # fmt: skip
        else:
            with jax.named_scope("dispatch"):
                sent = dispatch(x.reshape(-1, d), idx, e)
            with jax.named_scope("experts"):
                y = expert_ffn(
                    sent.x_sorted,
                    sent.group_sizes,
                    self.gate_proj[...],
                    self.up_proj[...],
                    self.down_proj[...],
                    dtype_of(cfg.dtype),
                    cfg.moe_impl,
                    cfg,
                    scales,
                )  # [m, d]
            with jax.named_scope("combine"):
                routed = combine(y, weights, sent, b * s).reshape(b, s, d)
            dropped = jnp.zeros((), jnp.float32)
        out = constrain(routed.astype(x.dtype), TOKENS, rules)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = {
            "load": jnp.bincount(idx.reshape(-1), length=e).astype(jnp.float32),
            "dropped": dropped,
            "balance": sequence_balance_loss(scores, idx.reshape(b, s, k), e),
            "experts": idx.reshape(b, s, k),
        }
        return out, aux
