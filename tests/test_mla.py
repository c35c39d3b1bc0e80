"""One MLA layer against a float64 numpy reference written from the V2/V3 equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, kv_cache_bytes_per_token, rope
from dsv3_jax.config import RopeScaling
from dsv3_jax.mla import MLA, LatentCache, init_cache


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


@pytest.mark.parametrize("decode", ["absorbed", "naive"])
@pytest.mark.parametrize("q_lora, v_dim, yarn", [(10, 8, True), (None, 5, False)])
def test_latent_cache_decode_equals_full_forward(q_lora, v_dim, yarn, decode):
    cfg = make_cfg(q_lora, v_dim, yarn).replace(mla_decode=decode)
    mla = MLA(cfg, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 24)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    full, _ = mla(x, pos)
    cache = init_cache(cfg, 1, 2, 16)
    cache = type(cache)(cache.c_kv[0], cache.k_rope[0])
    prefill, cache = mla(x[:, :3], pos[:, :3], cache, prefill=True)  # 3, then one at a time
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


@pytest.mark.parametrize("q_lora, v_dim", [(10, 8), (None, 5), (10, 11)])
def test_absorbed_equals_naive_over_a_ragged_cache(q_lora, v_dim):
    """Absorbed MLA (kv_b folded into q and out) equals the naive form to 1e-5 in float32.

    Random cache contents, per-row query positions (a row of 3 queries, as when verifying drafts),
    and large garbage beyond each row's position, which both forms must mask.
    """
    cfg = make_cfg(q_lora, v_dim, True)
    absorbed = MLA(cfg, rngs=nnx.Rngs(2))
    naive = MLA(cfg.replace(mla_decode="naive"), rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    b, s, t = 3, 3, 20
    start = np.array([0, 6, 14])
    pos = jnp.asarray(start[:, None] + np.arange(s), jnp.int32)  # [b, s]
    c_kv = rng.normal(size=(b, t, cfg.kv_lora_rank))
    k_rope = rng.normal(size=(b, t, cfg.qk_rope_head_dim))
    for i, p0 in enumerate(start):
        c_kv[i, p0 + s :] = 1e4  # beyond the row's last query: never visible
        k_rope[i, p0 + s :] = -1e4
    cache = LatentCache(jnp.asarray(c_kv, jnp.float32), jnp.asarray(k_rope, jnp.float32))
    x = jnp.asarray(rng.normal(size=(b, s, 24)), jnp.float32)
    out_a, cache_a = absorbed(x, pos, cache)
    out_n, cache_n = naive(x, pos, cache)
    assert np.abs(np.asarray(out_n)).max() > 0.1
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_n), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache_a.c_kv), np.asarray(cache_n.c_kv))


def test_kv_cache_bytes_per_token():
    from configs import deepseek_v3_671b

    v3 = ModelConfig(**deepseek_v3_671b.get_config().model)
    # V3 report / deepseek_v3.md: (512 + 64) x 61 layers x 2 bytes = 70,272 bytes per token in bf16.
    assert kv_cache_bytes_per_token(v3, jnp.bfloat16) == 70_272
    cfg = make_cfg(10, 8, False).replace(num_hidden_layers=3, first_k_dense_replace=1)
    from dsv3_jax import DeepseekV3

    model = DeepseekV3(cfg, rngs=nnx.Rngs(0), mtp=False)
    cache = model.init_cache(2, 10, jnp.bfloat16)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert kv_cache_bytes_per_token(cfg, jnp.bfloat16) == nbytes // (2 * 10)
