"""Latent attention (placeholder: reference only; replaced by the Pallas kernel branch)."""

import jax
import jax.numpy as jnp


def latent_attention_reference(q_c, q_r, c_kv, k_rope, q_positions, *, scale):
    f32 = jnp.float32
    scores = jnp.einsum("bshc,btc->bsht", q_c, c_kv, preferred_element_type=f32)
    scores += jnp.einsum("bshr,btr->bsht", q_r, k_rope, preferred_element_type=f32)
    scores *= scale
    slots = jnp.arange(c_kv.shape[1])
    mask = slots[None, None, None, :] <= q_positions[:, :, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bsht,btc->bshc", probs, c_kv.astype(f32))


def latent_attention(q_c, q_r, c_kv, k_rope, q_positions, *, scale, impl="pallas", **kw):
    if impl != "reference":
        raise NotImplementedError("pallas latent attention not merged yet")
    return latent_attention_reference(q_c, q_r, c_kv, k_rope, q_positions, scale=scale)
