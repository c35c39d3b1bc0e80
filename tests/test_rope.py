import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, rope
from dsv3_jax.config import RopeScaling


def test_v3_yarn_numbers_from_the_report():
    c = ModelConfig()  # 671B: factor 40, L0 4096, beta 32/1, mscale_all_dim 1
    # mscale = 0.1 * ln(40) + 1 = 1.3689; softmax scale = 192^-0.5 * mscale^2 = 0.135234.
    assert rope.yarn_get_mscale(40, 1.0) == pytest.approx(1.3689, abs=1e-4)
    assert rope.softmax_scale(c) == pytest.approx(0.135234, abs=1e-6)
    assert rope.rope_attention_factor(c) == 1.0
    # Correction range low = floor(d(32)) = 10, high = ceil(d(1)) = 23 over the 32 frequencies.
    inv = rope.rope_inv_freq(c).astype(np.float64)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:10], base[:10], rtol=1e-6)  # kept
    np.testing.assert_allclose(inv[23:], base[23:] / 40, rtol=1e-6)  # interpolated
    ramp = (np.arange(10, 23) - 10) / 13  # linear blend in between
    np.testing.assert_allclose(
        inv[10:23], base[10:23] / 40 * ramp + base[10:23] * (1 - ramp), rtol=1e-5
    )


def test_inv_freq_and_scales_match_hf(golden_dir):
    g = np.load(golden_dir / "golden.npz")
    c = ModelConfig.from_hf(golden_dir)
    np.testing.assert_allclose(rope.rope_inv_freq(c), g["rope_inv_freq"], rtol=1e-6)
    assert rope.rope_attention_factor(c) == pytest.approx(
        float(g["rope_attention_scaling"]), rel=1e-6
    )
    assert rope.softmax_scale(c) == pytest.approx(float(g["softmax_scale"]), rel=1e-6)


def test_attention_factor_without_mscale_keys_follows_hf():
    c = ModelConfig(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16))
    assert rope.rope_attention_factor(c) == pytest.approx(0.1 * math.log(4) + 1)
    assert rope.softmax_scale(c) == pytest.approx(c.qk_head_dim**-0.5)


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_matches_complex_rotation_float64(interleave):
    rng = np.random.default_rng(0)
    b, s, h, r = 2, 7, 3, 16
    x = rng.normal(size=(b, s, h, r))
    pos = rng.integers(0, 500, size=(b, s))
    inv = 10000.0 ** (-np.arange(0, r, 2) / r)
    if interleave:
        z = x[..., 0::2] + 1j * x[..., 1::2]  # the official code's complex pairs
    else:
        z = x[..., : r // 2] + 1j * x[..., r // 2 :]
    z = z * np.exp(1j * pos[..., None, None] * inv)[..., :] * 0.9
    want = np.empty_like(x)
    if interleave:
        want[..., 0::2], want[..., 1::2] = z.real, z.imag
    else:
        want[..., : r // 2], want[..., r // 2 :] = z.real, z.imag
    got = rope.apply_rope(
        jnp.asarray(x, jnp.float32), jnp.asarray(pos), inv.astype(np.float32), 0.9, interleave
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_rope_is_relative():
    # <rope(q, m), rope(k, n)> depends only on m - n.
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)
    inv = rope.rope_inv_freq(ModelConfig(qk_rope_head_dim=8, rope_scaling=None))

    def score(m, n):
        a = rope.apply_rope(jnp.asarray(q), jnp.array([[m]]), inv)
        bb = rope.apply_rope(jnp.asarray(k), jnp.array([[n]]), inv)
        return float((a * bb).sum())

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
