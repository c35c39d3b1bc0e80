"""One MLA layer against a float64 numpy reference written from the V2/V3 equations."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, rope
from dsv3_jax.config import RopeScaling
from dsv3_jax.mla import MLA, init_cache


def make_cfg(q_lora, v_dim, yarn):
    return ModelConfig(
        vocab_size=32, hidden_size=24, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=3, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=q_lora, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=v_dim, max_position_embeddings=256,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.8, mscale_all_dim=1.0) if yarn else None,
        initializer_range=0.3, rms_norm_eps=1e-5,
    )  # fmt: skip


def np_rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, pos, inv, factor):
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[..., None] * inv) * factor
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def np_mla(p, x, cfg):
    """float64 reference of MLA for one sequence x [s, d] at positions 0..s-1."""
    h, n, r, v, c = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    s = len(x)
    pos = np.arange(s, dtype=np.float64)
    inv = rope.rope_inv_freq(cfg).astype(np.float64)
    af = rope.rope_attention_factor(cfg)
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]["kernel"]
    else:
        q = (
            np_rmsnorm(x @ p["q_a_proj"]["kernel"], p["q_a_layernorm"]["weight"], 1e-6)
            @ p["q_b_proj"]["kernel"]
        )
    q = q.reshape(s, h, n + r)
    q_nope, q_rope = q[..., :n], np_rope(q[..., n:], pos[:, None], inv, af)
    kv = x @ p["kv_a_proj_with_mqa"]["kernel"]
    c_kv = np_rmsnorm(kv[:, :c], p["kv_a_layernorm"]["weight"], 1e-6)
    k_rope = np_rope(kv[:, c:], pos, inv, af)  # one rope key for all heads
    kvb = (c_kv @ p["kv_b_proj"]["kernel"]).reshape(s, h, n + v)
    k_nope, val = kvb[..., :n], kvb[..., n:]
    scores = np.einsum("shn,thn->hst", q_nope, k_nope) + np.einsum("shr,tr->hst", q_rope, k_rope)
    scores = scores * rope.softmax_scale(cfg)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hst,thv->shv", probs, val).reshape(s, h * v)
    return out @ p["o_proj"]["kernel"]


@pytest.mark.parametrize("q_lora, v_dim, yarn", [(10, 8, False), (None, 5, True), (10, 11, True)])
def test_mla_matches_float64_reference(q_lora, v_dim, yarn):
    cfg = make_cfg(q_lora, v_dim, yarn)
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 9, 24))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out, _ = mla(jnp.asarray(x, jnp.float32), pos)
    params = nnx.to_pure_dict(nnx.state(mla))
    params = {
        k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()
    }
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out[b]), np_mla(params, x[b], cfg), atol=1e-5)


@pytest.mark.parametrize("q_lora, v_dim, yarn", [(10, 8, True), (None, 5, False)])
def test_latent_cache_decode_equals_full_forward(q_lora, v_dim, yarn):
    cfg = make_cfg(q_lora, v_dim, yarn)
    mla = MLA(cfg, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 24)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    full, _ = mla(x, pos)
    cache = init_cache(cfg, 1, 2, 16)
    cache = type(cache)(cache.c_kv[0], cache.k_rope[0])
    prefill, cache = mla(x[:, :3], pos[:, :3], cache)  # prefill 3, then one token at a time
    outs = [prefill]
    for t in range(3, 7):
        o, cache = mla(x[:, t : t + 1], pos[:, t : t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
    # The cache holds only (kv_lora_rank + qk_rope_head_dim) numbers per token.
    assert cache.c_kv.shape == (2, 16, cfg.kv_lora_rank) and cache.k_rope.shape == (
        2,
        16,
        cfg.qk_rope_head_dim,
    )
    assert not np.asarray(cache.c_kv[:, 7:]).any()
