"""Autoregressive generation over the latent KV cache: a jitted prefill and a jitted decode step.

The cache holds, per layer, only the normed latent c_kv [b, t, c] and the roped k_rope [b, t, r]
(V3 report section 2.1.1); see ``mla.LatentCache``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.model import DeepseekV3, check_input_ids

_CACHE_BUCKET = 64  # cache lengths are rounded up to this, so prompts of similar length share code


# Donation saves a copy on GPU/TPU; the CPU backend ignores it (and would warn each compile).
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill(graphdef, state, input_ids, cache):
    model = nnx.merge(graphdef, state)
    out = model.forward(input_ids, cache=cache)
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode_step(graphdef, state, token, position, cache):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(position, token.shape).astype(jnp.int32)  # [b, 1]
    out = model.forward(token, positions=positions, cache=cache)
    return out.logits[:, -1], out.cache


def filter_logits(
    logits: jax.Array, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Masks logits [b, w] outside the top-k and/or the nucleus of mass top_p to -inf.

    Nucleus: the smallest set of most likely tokens whose probability reaches top_p (the token
    that crosses top_p is kept), as in HF ``TopPLogitsWarper``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [b, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = mass_before < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(jax.jit, static_argnames=("top_k", "top_p", "greedy"))
def sample_token(logits, key, temperature, *, top_k=None, top_p=None, greedy=False):
    """Next token ids int32 [b] from logits [b, w]: argmax if greedy, else filtered sampling."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling_args(
    max_len: int, prompt_len: int, max_new_tokens: int, temperature: float, top_k, top_p
) -> None:
    """Raises ValueError naming the argument that cannot work (see :func:`generate`)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds max_position_embeddings {max_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generate(
    model: DeepseekV3,
    input_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    callback: Callable[[np.ndarray], None] | None = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after each prompt.

    Args:
      model: a DeepseekV3.
      input_ids: int [b, s] prompts (same length; include the BOS yourself).
      max_new_tokens: tokens to add (>= 0).
      temperature: 0 means greedy argmax; > 0 scales the logits before sampling.
      top_k: keep the k most likely tokens (None: all). top_p: nucleus mass in (0, 1] (None: all).
      seed: PRNG seed for sampling.
      callback: called with each new token column, np.int32 [b], as soon as it is chosen.

    Returns:
      int32 [b, s + max_new_tokens], the prompts included.

    Raises:
      ValueError: bad ids, a bad sampling argument, or s + max_new_tokens > max_position_embeddings.
    """
    cfg = model.config
    check_input_ids(input_ids, cfg.vocab_size, cfg.max_position_embeddings)
    ids = jnp.asarray(input_ids, jnp.int32)
    b, s = ids.shape
    check_sampling_args(cfg.max_position_embeddings, s, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return ids
    graphdef, state = nnx.split(model)
    total = s + max_new_tokens
    cache_len = max(
        total, min(-(-total // _CACHE_BUCKET) * _CACHE_BUCKET, cfg.max_position_embeddings)
    )
    cache = model.init_cache(b, cache_len)
    greedy = temperature == 0.0
    key = jax.random.key(seed)
    logits, cache = _prefill(graphdef, state, ids, cache)
    out = [ids]
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = sample_token(
            logits,
            sub,
            jnp.float32(max(temperature, 1e-6)),
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
        )
        out.append(token[:, None])
        if callback is not None:
            callback(np.asarray(token))
        if i + 1 < max_new_tokens:
            logits, cache = _decode_step(graphdef, state, token[:, None], jnp.int32(s + i), cache)
    return jnp.concatenate(out, axis=1)
