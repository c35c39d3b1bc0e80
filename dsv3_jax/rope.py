"""Rotary position embedding with YaRN (DeepSeek-V2 report App. B; V3 section 2.1.1).

Glossary: b batch, s positions, h heads, r qk_rope_head_dim.

DeepSeek checkpoints lay the rotary dims out as adjacent pairs (2i, 2i+1), each pair rotated by one
frequency, as the official code's complex multiply does (``rope_interleave=True``, the default).
HF de-interleaves q and k alike before rotating, which permutes both the same way and leaves the
scores unchanged; we rotate the pairs in place, so cached keys stay in the checkpoint's layout.
``rope_interleave=False`` selects the half-split (``rotate_half``) layout instead.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN temperature term: 0.1 * mscale * ln(scale) + 1, or 1 when scale <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(config: ModelConfig) -> float:
    rs = config.rope_scaling
    if rs.factor is not None:
        return float(rs.factor)
    return config.max_position_embeddings / rs.original_max_position_embeddings


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies theta^(-2i/r) for i < r/2, blended by YaRN when configured.

    YaRN: with d(beta) = r * ln(L0 / (2 pi beta)) / (2 ln theta), low = floor(d(beta_fast)),
    high = ceil(d(beta_slow)) (10 and 23 for V3), frequency indices below low keep the base
    frequency, those above high are divided by ``factor``, and a linear ramp blends in between
    (matches HF ``_compute_yarn_parameters``; computed in float32 like it).

    Returns:
      float32 [r/2].
    """
    config = ModelConfig.coerce(config)
    r = config.qk_rope_head_dim
    base = float(config.rope_theta)
    pos_freqs = base ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor = _yarn_factor(config)
    l0 = rs.original_max_position_embeddings

    def correction_dim(num_rotations):
        return r * math.log(l0 / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)  # 1 keeps the base frequency
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """Factor on cos and sin: HF's YaRN ``attention_factor`` (1.0 for V3, where mscale == mscale_all_dim)."""
    config = ModelConfig.coerce(config)
    rs = config.rope_scaling
    if rs is None:
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    factor = _yarn_factor(config)
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim)
    return yarn_get_mscale(factor)


def softmax_scale(config: ModelConfig) -> float:
    """Attention softmax scale (nope + rope)^-0.5, times mscale^2 under YaRN with mscale_all_dim.

    mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (1.3689 for V3, so the scale is 0.135234).
    Applied whenever YaRN is configured, whatever the sequence length (as HF does).
    """
    config = ModelConfig.coerce(config)
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_get_mscale(_yarn_factor(config), rs.mscale_all_dim)
        scale *= m * m
    return scale


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    inv_freq: np.ndarray,
    attention_factor: float = 1.0,
    interleave: bool = True,
) -> jnp.ndarray:
    """Rotates the rope dims of ``x``.

    Args:
      x: [b, s, h, r] (any float dtype; computed in float32, returned in x.dtype).
      positions: int [b, s] absolute positions.
      inv_freq: float32 [r/2] from :func:`rope_inv_freq`.
      attention_factor: multiplies cos and sin (YaRN).
      interleave: pairs (2i, 2i+1) if True (checkpoint layout), halves (i, i + r/2) if False.

    Returns:
      [b, s, h, r], same dtype as x.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, r/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]  # [b, s, 1, r/2]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [b, s, h, r/2, 2]
        out = out.reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
