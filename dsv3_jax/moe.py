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

Dispatch is dropless: assignments are sorted by expert and run as one grouped matmul, with
``jax.lax.ragged_dot`` on GPU/TPU and, on CPU (where ragged_dot is a dense masked product, e times
the work), a blocked path that pads each expert's rows to whole blocks and does at most about twice
the real work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, dtype_of, eager_sharding, param
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

    Static sizes: block = ceil(m / e) rounded up to 8; blocks <= ceil(m / block) + min(e, m), so
    the padded work is at most about twice the real work whatever the routing.
    """

    def __init__(self, group_sizes: jax.Array, m: int, e: int):
        self.block = max(8, -(-math.ceil(m / e) // 8) * 8)
        self.num_blocks = -(-m // self.block) + min(e, m)
        padded = -(-group_sizes // self.block) * self.block  # [e]
        pad_end = jnp.cumsum(padded)
        pad_start = pad_end - padded
        start = jnp.cumsum(group_sizes) - group_sizes
        expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)  # [m]
        self.dest = pad_start[expert_of_row] + jnp.arange(m) - start[expert_of_row]  # [m]
        block_start = jnp.arange(self.num_blocks) * self.block
        self.block_expert = jnp.minimum(
            jnp.searchsorted(pad_end, block_start, side="right"), e - 1
        )  # [n]

    def pad(self, x: jax.Array) -> jax.Array:  # [m, d] -> [n, block, d]
        out = jnp.zeros((self.num_blocks * self.block, x.shape[-1]), x.dtype).at[self.dest].set(x)
        return out.reshape(self.num_blocks, self.block, -1)

    def unpad(self, y: jax.Array) -> jax.Array:  # [n, block, d] -> [m, d]
        return y.reshape(self.num_blocks * self.block, -1)[self.dest]

    def matmul(self, x: jax.Array, w: jax.Array, dtype) -> jax.Array:  # [n, B, i] x [e, i, o]
        w = jnp.take(w, self.block_expert, axis=0).astype(dtype)  # [n, i, o]
        return jnp.einsum(
            "nbi,nio->nbo", x.astype(dtype), w, preferred_element_type=jnp.float32
        ).astype(dtype)


def expert_ffn(
    x_sorted: jax.Array,
    group_sizes: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype,
    impl: str = "auto",
) -> jax.Array:
    """SwiGLU experts on rows sorted by expert: down_e(silu(gate_e(x)) * up_e(x)).

    Args:
      x_sorted: [m, d] rows grouped by expert (expert 0's rows first).
      group_sizes: int32 [e], rows per expert, summing to m.
      w_gate, w_up: [e, d, f]; w_down: [e, f, d].
      impl: "ragged" (lax.ragged_dot), "blocked" (padded blocks; the CPU path) or "auto".
    Returns:
      [m, d] in ``dtype``.
    """
    m, e = x_sorted.shape[0], w_gate.shape[0]
    if _resolve_impl(impl) == "blocked":
        layout = _BlockLayout(group_sizes, m, e)
        xb = layout.pad(x_sorted)  # [n, B, d]
        h = jax.nn.silu(layout.matmul(xb, w_gate, dtype)) * layout.matmul(xb, w_up, dtype)
        return layout.unpad(layout.matmul(h, w_down, dtype))  # [m, d]

    def gmm(a, w):
        return jax.lax.ragged_dot(
            a.astype(dtype), w.astype(dtype), group_sizes, preferred_element_type=jnp.float32
        ).astype(dtype)

    return gmm(jax.nn.silu(gmm(x_sorted, w_gate)) * gmm(x_sorted, w_up), w_down)


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
    ids are all-gathered and every device sorts all rows); an explicit all-to-all dispatch would
    replace :func:`dispatch` and :func:`combine` and keep :func:`expert_ffn`.
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
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), config)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), config)
        self.down_proj = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), config)
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
        highest biased score first).
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
            )  # [m, d]
        with jax.named_scope("combine"):
            routed = combine(y, weights, sent, b * s).reshape(b, s, d)
        out = constrain(routed.astype(x.dtype), TOKENS, rules)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = {
            "load": sent.group_sizes.astype(jnp.float32),
            "balance": sequence_balance_loss(scores, idx.reshape(b, s, k), e),
            "experts": idx.reshape(b, s, k),
        }
        return out, aux
