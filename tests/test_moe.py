"""DeepSeekMoE against a float64 numpy reference written from the V3 report (section 2.1.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_jax import ModelConfig
from dsv3_jax.moe import MoE, expert_ffn, route, sequence_balance_loss, update_expert_bias

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

jax.config.update("jax_enable_x64", False)


def np_route(s, b, cfg):
    """Per-token float64 reference: group-limited top-k on s + b, gates from s."""
    e, g, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    idx_all, w_all = [], []
    for s_t in s.astype(np.float64):
        biased = s_t + b
        groups = biased.reshape(g, e // g)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
        kept = np.argsort(-group_score, kind="stable")[: cfg.topk_group]
        allowed = np.isin(np.arange(e) // (e // g), kept)
        masked = np.where(allowed, biased, -np.inf)
        idx = np.argsort(-masked, kind="stable")[:k]
        w = s_t[idx]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        idx_all.append(idx)
        w_all.append(w * cfg.routed_scaling_factor)
    return np.array(idx_all), np.array(w_all)


def cfg_for(e, g, topk_group, k, norm, rsf, shared=1):
    return ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, n_routed_experts=e, num_experts_per_tok=k,
        n_group=g, topk_group=topk_group, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        max_position_embeddings=32, norm_topk_prob=norm, routed_scaling_factor=rsf,
        n_shared_experts=shared, rope_scaling=None,
    )  # fmt: skip


router_cases = st.sampled_from(
    [(8, 1, 1, 2), (8, 4, 2, 3), (16, 4, 1, 4), (16, 8, 3, 6), (12, 3, 2, 8), (6, 2, 1, 3)]
)


@given(
    case=router_cases, norm=st.booleans(), seed=st.integers(0, 2**16), bias_shift=st.floats(-3, 0)
)
def test_route_matches_reference_and_properties(case, norm, seed, bias_shift):
    e, g, tg, k = case
    cfg = cfg_for(e, g, tg, k, norm, 2.5)
    rng = np.random.default_rng(seed)
    s = 1 / (1 + np.exp(-rng.normal(size=(20, e))))
    b = rng.normal(size=e) * 0.3 + bias_shift  # shifts below -1 make every biased score negative
    w, idx = route(jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32), cfg)
    w, idx = np.asarray(w), np.asarray(idx)
    want_idx, want_w = np_route(s, b, cfg)
    order = np.argsort(idx, 1)
    want_order = np.argsort(want_idx, 1)
    np.testing.assert_array_equal(
        np.take_along_axis(idx, order, 1), np.take_along_axis(want_idx, want_order, 1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(w, order, 1), np.take_along_axis(want_w, want_order, 1), rtol=1e-5
    )
    # Every chosen expert lies in one of the topk_group kept groups.
    assert all(len(set(row // (e // g))) <= tg for row in idx)
    # Gates come from the unbiased scores, scaled by routed_scaling_factor exactly once.
    raw = np.take_along_axis(s, idx, 1)
    expect = raw / raw.sum(1, keepdims=True) if norm else raw
    np.testing.assert_allclose(w, 2.5 * expect, rtol=1e-5)
    # Adding one constant to every bias changes neither the choice nor the gates.
    w2, idx2 = route(jnp.asarray(s, jnp.float32), jnp.asarray(b + 0.731, jnp.float32), cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(idx2), 1), np.sort(idx, 1))
    np.testing.assert_allclose(np.sort(np.asarray(w2), 1), np.sort(w, 1), rtol=1e-6)


def test_bias_steers_selection_only():
    cfg = cfg_for(8, 1, 1, 2, True, 1.0)
    s = np.full((1, 8), 0.5, np.float32)
    s[0, :2] = 0.9  # experts 0 and 1 win without bias
    b = np.zeros(8, np.float32)
    b[5] = b[6] = 1.0  # the bias pushes 5 and 6 in
    w, idx = route(jnp.asarray(s), jnp.asarray(b), cfg)
    assert sorted(np.asarray(idx)[0].tolist()) == [5, 6]
    np.testing.assert_allclose(np.asarray(w), [[0.5, 0.5]])  # gates from s, not s + b


def _np_swiglu(x, wg, wu, wd):
    h = x @ wg
    return ((h / (1 + np.exp(-h))) * (x @ wu)) @ wd


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
@pytest.mark.parametrize(
    "sizes",
    [[5, 0, 3, 0, 12, 1, 0, 3], [24, 0, 0, 0, 0, 0, 0, 0], [3] * 8, [0, 1, 0, 0, 0, 0, 0, 0]],
)
@pytest.mark.parametrize("pad", [0, 7])  # rows past sum(sizes): an all-to-all buffer's padding
def test_expert_ffn_equals_per_row_loop(impl, sizes, pad):
    rng = np.random.default_rng(0)
    e, d, f = 8, 16, 12
    m = sum(sizes)
    x = rng.normal(size=(m + pad, d))
    wg, wu = rng.normal(size=(2, e, d, f)) * 0.3
    wd = rng.normal(size=(e, f, d)) * 0.3
    got = expert_ffn(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(sizes, jnp.int32),
        jnp.asarray(wg, jnp.float32),
        jnp.asarray(wu, jnp.float32),
        jnp.asarray(wd, jnp.float32),
        jnp.float32,
        impl,
    )
    expert = np.repeat(np.arange(e), sizes)
    want = np.stack(
        [_np_swiglu(x[i], wg[expert[i]], wu[expert[i]], wd[expert[i]]) for i in range(m)]
        + [np.zeros(d)] * pad  # padding rows: not computed, zero
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def _moe_reference(moe: MoE, x, cfg):
    """float64 per-token loop: (shared part, routed part) of the MoE output."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.state(moe))
    xs = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    s = 1 / (1 + np.exp(-(xs @ p["gate"]["kernel"])))
    idx, w = np_route(s, p["gate"]["e_score_correction_bias"], cfg)
    routed = np.zeros_like(xs)
    for t in range(len(xs)):
        for j, ex in enumerate(idx[t]):
            routed[t] += w[t, j] * _np_swiglu(
                xs[t], p["gate_proj"][ex], p["up_proj"][ex], p["down_proj"][ex]
            )
    shared = np.zeros_like(xs)
    if cfg.n_shared_experts:
        se = p["shared_experts"]
        shared = _np_swiglu(
            xs, se["gate_proj"]["kernel"], se["up_proj"]["kernel"], se["down_proj"]["kernel"]
        )
    return shared.reshape(x.shape), routed.reshape(x.shape), idx


@pytest.mark.parametrize("norm, rsf, shared", [(True, 2.5, 1), (False, 2.5, 2), (False, 1.0, 0)])
@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_moe_layer_equals_per_token_loop(norm, rsf, shared, impl):
    cfg = cfg_for(8, 4, 2, 3, norm, rsf, shared).replace(initializer_range=0.3, moe_impl=impl)
    moe = MoE(cfg, rngs=nnx.Rngs(3))
    moe.gate.e_score_correction_bias[...] = jnp.asarray(
        np.random.default_rng(1).normal(size=8) - 2, jnp.float32
    )
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 16)), jnp.float32)
    out, aux = moe(x)
    shared_part, routed_part, idx = _moe_reference(moe, x, cfg)
    np.testing.assert_allclose(np.asarray(out), shared_part + routed_part, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["load"]), np.bincount(idx.reshape(-1), minlength=8))
    assert aux["experts"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(aux["experts"]), idx.reshape(2, 5, 3))
    if shared:  # the shared experts' weight is exactly 1: zero them and the routed part remains
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.shared_experts, n).kernel[...] *= 0
        np.testing.assert_allclose(np.asarray(moe(x)[0]), routed_part, atol=1e-5)


def test_sequence_balance_loss_reference():
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 10, 8, 2
    s = rng.uniform(0.05, 1, size=(b, t, e))
    idx = np.stack([[rng.choice(e, k, replace=False) for _ in range(t)] for _ in range(b)])
    want = []
    for i in range(b):
        f = e / (k * t) * np.array([(idx[i] == j).any(-1).sum() for j in range(e)])
        p = (s[i] / s[i].sum(-1, keepdims=True)).mean(0)
        want.append((f * p).sum())
    got = sequence_balance_loss(jnp.asarray(s, jnp.float32), jnp.asarray(idx), e)
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
    uniform = sequence_balance_loss(
        jnp.full((1, 8, 4), 0.5), jnp.asarray([[[i % 4, (i + 1) % 4] for i in range(8)]]), 4
    )
    assert float(uniform) == pytest.approx(1.0)


def test_update_expert_bias_moves_against_load():
    load = jnp.array([[10.0, 2.0, 6.0, 6.0]])
    new = update_expert_bias(jnp.zeros((1, 4)), load, 0.001)
    np.testing.assert_allclose(np.asarray(new), [[-0.001, 0.001, 0.0, 0.0]])
