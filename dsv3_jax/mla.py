"""Multi-head Latent Attention (DeepSeek-V2 report section 2.1; V3 section 2.1.1, eqs. 1-11).

Glossary: b batch, s query positions, t key/cache positions, d hidden_size, h heads,
n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim, q q_lora_rank, c kv_lora_rank.

  q        = q_b(RMSNorm(q_a(x)))  (or q_proj(x) when q_lora_rank is None)   -> [q_nope ; q_rope]
  [c; k_r] = kv_a_proj_with_mqa(x);  c = RMSNorm(c)                            (the cached latent)
  [k_n; v] = kv_b(c)                                                           (per head)
  key      = [k_n ; rope(k_r)]  (one rope key shared by all heads),  value = v

The cache holds only c (after its norm) and the roped k_r: (c + r) numbers per token per layer.
Training and prefill run the naive form (kv_b expanded over the keys); attention over the
cache runs the absorbed form by default (``ModelConfig.mla_decode``), where kv_b's key half is
folded into the query and its value half applied after attention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import rope
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels.flash_attention import flash_attention
from dsv3_jax.kernels.mla_decode import latent_attention
from dsv3_jax.layers import Linear, RMSNorm, dtype_of
from dsv3_jax.sharding import constrain

HEADS = ("batch", "seq", "act_heads", None)  # [b, s, h, .] activations: heads over tensor
CACHE = ("batch", "cache_seq", "cache_latent")  # one layer's latent cache [b, t, .]

# The latent norms use RMSNorm's default eps whatever rms_norm_eps says (official model.py and HF).
LATENT_NORM_EPS = 1e-6


class LatentCache(NamedTuple):
    """Per-layer latent KV cache. c_kv: [b, t, c] (normed); k_rope: [b, t, r] (roped)."""

    c_kv: jax.Array
    k_rope: jax.Array


def write_cache(
    cache: LatentCache, c_kv: jax.Array, k_rope: jax.Array, start: jax.Array
) -> LatentCache:
    """Writes [b, s, .] entries at cache slots start[b] .. start[b] + s - 1 of each row."""

    def one(buf, new, i):
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (i, 0))

    return LatentCache(
        jax.vmap(one)(cache.c_kv, c_kv, start), jax.vmap(one)(cache.k_rope, k_rope, start)
    )


class MLA(nnx.Module):
    """MLA self-attention with an optional latent cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h = config.hidden_size, config.num_attention_heads
        n, r, v, c = (
            config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank,
        )  # fmt: skip
        if config.q_lora_rank is None:
            self.q_proj = Linear(d, h * (n + r), ("embed", "q_heads"), config, rngs=rngs)
        else:
            q = config.q_lora_rank
            self.q_a_proj = Linear(d, q, ("embed", "q_lora"), config, rngs=rngs)
            self.q_a_layernorm = RMSNorm(q, "q_lora", config, eps=LATENT_NORM_EPS)
            self.q_b_proj = Linear(q, h * (n + r), ("q_lora", "q_heads"), config, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(d, c + r, ("embed", "kv_lora"), config, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(c, "kv_lora", config, eps=LATENT_NORM_EPS)
        self.kv_b_proj = Linear(c, h * (n + v), ("kv_lora", "kv_heads"), config, rngs=rngs)
        self.o_proj = Linear(h * v, d, ("o_heads", "embed"), config, rngs=rngs)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        return rope.apply_rope(
            x,
            positions,
            rope.rope_inv_freq(cfg),
            rope.rope_attention_factor(cfg),
            cfg.rope_interleave,
        )

    def latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, s, d] -> (c_kv [b, s, c] normed, k_rope [b, s, r] roped): what the cache stores."""
        cfg = self.config
        kv = checkpoint_name(self.kv_a_proj_with_mqa(x), "kv_a")  # [b, s, c + r]: c_KV, k_R
        c_kv = self.kv_a_layernorm(kv[..., : cfg.kv_lora_rank])
        k_rope = self._rope(kv[..., None, cfg.kv_lora_rank :], positions)[:, :, 0]  # [b, s, r]
        return c_kv, k_rope

    def queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, s, d] -> (q_nope [b, s, h, n], q_rope [b, s, h, r] roped)."""
        cfg = self.config
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(checkpoint_name(self.q_a_proj(x), "q_a")))
        q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)  # [b, s, h, n + r]
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        q_rope = self._rope(q_rope, positions)
        rules = cfg.sharding_rules
        return constrain(q_nope, HEADS, rules), constrain(q_rope, HEADS, rules)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LatentCache | None = None,
        *,
        prefill: bool = False,
    ) -> tuple[jax.Array, LatentCache | None]:
        """Causal MLA.

        Three uses:
          * no cache (training): attention among the s new tokens, key t' visible to query s'
            when positions[t'] <= positions[s'].
          * cache and ``prefill=True``: the same, and the new latents are written to the cache.
            Only right for rows whose cache is empty before the call (positions start at 0).
          * cache and ``prefill=False`` (decode, speculative verification): the new latents are
            written, then each query attends over cache slots t' <= its position, in the form
            ``config.mla_decode`` selects (absorbed or naive; equal up to rounding).

        Args:
          x: [b, s, d] hidden states (computation dtype).
          positions: int32 [b, s] absolute positions, consecutive per row; row b is written at
            slots positions[b, 0] .. positions[b, 0] + s - 1. Slots past a row's position may hold
            anything (padding, rejected drafts): they are masked until overwritten.
          cache: optional LatentCache with t slots.
          prefill: see above.

        Returns:
          ([b, s, d], the updated cache or None).
        """
        cfg = self.config
        with jax.named_scope("q_proj"):
            q_nope, q_rope = self.queries(x, positions)
        with jax.named_scope("kv_latent"):
            c_kv, k_rope = self.latent(x, positions)
        if cache is not None:
            cache = write_cache(cache, c_kv, k_rope, positions[:, 0])
            cache = LatentCache(*(constrain(x, CACHE, cfg.sharding_rules) for x in cache))
        if cache is None or prefill:
            out = self._attend_new(q_nope, q_rope, c_kv, k_rope, positions)
        elif cfg.mla_decode == "absorbed":
            out = self._attend_cache_absorbed(q_nope, q_rope, cache, positions)
        else:
            out = self._attend_cache_naive(q_nope, q_rope, cache, positions)
        out = self.o_proj(checkpoint_name(out, "attn_out").reshape(*x.shape[:2], -1))  # [b, s, d]
        return out, cache

    def _expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """kv_b: c_kv [b, t, c] -> (k_nope [b, t, h, n], value [b, t, h, v])."""
        cfg = self.config
        with jax.named_scope("kv_expand"):
            kv = self.kv_b_proj(c_kv).reshape(
                *c_kv.shape[:2], cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim
            )  # [b, t, h, n + v]
        kv = constrain(kv, HEADS, cfg.sharding_rules)
        return kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]

    def _attend_new(self, q_nope, q_rope, c_kv, k_rope, positions) -> jax.Array:
        """Naive MLA among the new tokens (training, prefill) -> [b, s, h, v]."""
        cfg = self.config
        k_nope, value = self._expand(c_kv)
        with jax.named_scope("attention"):
            if cfg.attention_kernel == "pallas":
                # The kernel masks by index (query i sees keys j <= i): positions are 0..s-1 here.
                q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [b, s, h, n + r]
                k_r = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))
                k = jnp.concatenate([k_nope, k_r], axis=-1)  # [b, t, h, n + r]
                return flash_attention(
                    q, k, value, scale=rope.softmax_scale(cfg), causal=True, impl="pallas"
                )
            return _dense_attention(
                q_nope, q_rope, k_nope, k_rope, value, positions, positions, cfg
            )

    def _attend_cache_naive(self, q_nope, q_rope, cache: LatentCache, positions) -> jax.Array:
        """Naive MLA over the cache: kv_b expanded over all t slots -> [b, s, h, v]."""
        dtype = q_nope.dtype
        c_kv, k_rope = cache.c_kv.astype(dtype), cache.k_rope.astype(dtype)
        k_nope, value = self._expand(c_kv)
        slots = jnp.broadcast_to(jnp.arange(c_kv.shape[1]), c_kv.shape[:2])  # [b, t]
        with jax.named_scope("attention"):
            return _dense_attention(
                q_nope, q_rope, k_nope, k_rope, value, positions, slots, self.config
            )

    def _attend_cache_absorbed(self, q_nope, q_rope, cache: LatentCache, positions) -> jax.Array:
        """Absorbed MLA over the cache (DeepSeek-V2 report section 2.1.2) -> [b, s, h, v].

        With kv_b's kernel split per head into W_UK [c, h, n] and W_UV [c, h, v]:
          q_c = q_nope W_UK^T (bshn,chn->bshc); scores = q_c . c_kv + q_rope . k_rope;
          o_c = softmax(scores) c_kv (multi-query attention over the [c + r]-wide latent);
          out = o_c W_UV (bshc,chv->bshv).
        kv_b is never applied to the t cached tokens. FP8 weights (``fp8_weights``): kv_b is
        dequantised for the two einsums, as DeepSeek's inference code does in its absorb mode
        (``weight_dequant`` of wkv_b); the activations stay in the computation dtype.
        """
        cfg = self.config
        dtype = q_nope.dtype
        h, n = cfg.num_attention_heads, cfg.qk_nope_head_dim
        w = self.kv_b_proj.weight(dtype).reshape(cfg.kv_lora_rank, h, -1)  # [c, h, n+v]
        with jax.named_scope("absorb_q"):
            q_c = jnp.einsum(
                "bshn,chn->bshc", q_nope, w[..., :n], preferred_element_type=jnp.float32
            ).astype(dtype)  # [b, s, h, c]
        with jax.named_scope("latent_attention"):
            o_c = latent_attention(
                q_c,
                q_rope,
                cache.c_kv.astype(dtype),
                cache.k_rope.astype(dtype),
                positions,
                scale=rope.softmax_scale(cfg),
                impl=cfg.attention_kernel,
            )  # f32 [b, s, h, c]
        with jax.named_scope("absorb_out"):
            return jnp.einsum("bshc,chv->bshv", o_c.astype(dtype), w[..., n:])  # [b, s, h, v]


def _dense_attention(q_nope, q_rope, k_nope, k_rope, value, q_pos, k_pos, cfg) -> jax.Array:
    """Softmax attention with key t' visible to query s' when k_pos[t'] <= q_pos[s'].

    q_nope [b, s, h, n], q_rope [b, s, h, r], k_nope [b, t, h, n], k_rope [b, t, r] (shared by the
    heads), value [b, t, h, v]; q_pos [b, s], k_pos [b, t]. Scores and softmax in float32.
    Returns [b, s, h, v] in q_nope's dtype.
    """
    f32 = jnp.float32
    # One product over [n ; r] (the rope key broadcast over heads) instead of two [b, h, s, t]
    # products and their sum; the scale goes on the (smaller) queries.
    q = jnp.concatenate([q_nope, q_rope], axis=-1) * rope.softmax_scale(cfg)  # [b, s, h, n + r]
    k_r = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))
    k = jnp.concatenate([k_nope, k_r.astype(k_nope.dtype)], axis=-1)  # [b, t, h, n + r]
    scores = jnp.einsum("bshy,bthy->bhst", q, k, preferred_element_type=f32)  # y = n + r
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]  # [b, 1, s, t]
    scores = jnp.where(mask, scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_nope.dtype)
    return jnp.einsum("bhst,bthv->bshv", probs, value)  # [b, s, h, v]


def init_cache(
    config: ModelConfig, num_layers: int, batch: int, max_len: int, dtype=None
) -> LatentCache:
    """Zero cache for ``num_layers`` stacked layers: c_kv [l, b, t, c], k_rope [l, b, t, r].

    ``config`` is a ModelConfig or a mapping of its fields; ``dtype`` defaults to config.dtype.
    """
    config = ModelConfig.coerce(config)
    dtype = dtype_of(config.dtype) if dtype is None else dtype
    return LatentCache(
        jnp.zeros((num_layers, batch, max_len, config.kv_lora_rank), dtype),
        jnp.zeros((num_layers, batch, max_len, config.qk_rope_head_dim), dtype),
    )


def kv_cache_bytes_per_token(config: ModelConfig, dtype=None) -> int:
    """Bytes the latent cache holds per token: (kv_lora_rank + qk_rope_head_dim) x layers x itemsize.

    Main-model layers only (the MTP module's cache is not counted). ``dtype`` defaults to the
    config's computation dtype. For the 671B config in bfloat16: (512 + 64) x 61 x 2 = 70,272 bytes
    (V3 report section 2.1.1). ``config`` may be a mapping of the fields (``ModelConfig.coerce``).

    Raises:
      TypeError: ``config`` is neither a ModelConfig nor a mapping.
    """
    config = ModelConfig.coerce(config)
    dtype = dtype_of(config.dtype) if dtype is None else dtype
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return width * config.num_hidden_layers * jnp.dtype(dtype).itemsize
