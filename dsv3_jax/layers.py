"""Building blocks shared by every module: the one linear helper, RMSNorm, embedding, SwiGLU MLP.

Every parameter is created here with its logical axis names (``out_sharding`` metadata: embed,
vocab, q_heads, kv_heads, o_heads, q_lora, kv_lora, mlp, shared_mlp, experts, expert_mlp, router,
mtp_concat; ``layers`` is added by the layer scan); ``dsv3_jax.sharding`` maps them to a device
mesh. Kernels are stored [in, out] (HF stores [out, in]; conversion transposes).

Implementation settings (``config.IMPLEMENTATION_FIELDS``: computation dtype, kernels, ...) are
never copied into a module: every module keeps the ModelConfig and reads it when called, so
``model.with_implementation`` (which swaps the config of every module) changes the whole model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.sharding import constrain


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def linear(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype, out_dtype=None) -> jax.Array:
    """x @ kernel in ``dtype`` with float32 accumulation: the single swap point for FP8 GEMMs.

    Args:
      x: [..., in]. kernel: [in, out]. dtype: computation dtype. out_dtype: result dtype
        (default ``dtype``).
    Returns:
      [..., out].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)  # 2-D keeps XLA:CPU from transposing dW inputs
    w = kernel.astype(dtype)
    if x2.shape[0] == 2 and jax.default_backend() == "cpu":
        # XLA:CPU runs a 1-row product as a matrix-vector kernel but packs the whole weight for
        # a 2-row GEMM: two 1-row products are 2x faster (speculative verification at batch 1).
        rows = [jnp.dot(x2[i : i + 1], w, preferred_element_type=jnp.float32) for i in range(2)]
        y = jnp.concatenate(rows)
    else:
        y = jnp.dot(x2, w, preferred_element_type=jnp.float32)
    return y.astype(dtype if out_dtype is None else out_dtype).reshape(*lead, kernel.shape[-1])


def param(rngs: nnx.Rngs, shape, axes, config: ModelConfig, init=None) -> nnx.Param:
    """A parameter with its logical axis names; normal(initializer_range) unless ``init`` given."""
    if init is None:
        init = jax.nn.initializers.normal(config.initializer_range)
    value = init(rngs.params(), shape, dtype_of(config.param_dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=eager_sharding())


def eager_sharding() -> bool:
    """Never: flax would read the logical names as mesh axes. ``dsv3_jax.sharding`` places
    variables through its rules table (``shard_model``, ``model.init_model``, the loaders)."""
    return False


class Linear(nnx.Module):
    """Bias-free projection, kernel [in, out] with logical axes ``axes``."""

    def __init__(self, in_features: int, out_features: int, axes, config: ModelConfig, *, rngs):
        self.config = config
        self.kernel = param(rngs, (in_features, out_features), axes, config)

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        return linear(x, self.kernel[...], dtype_of(self.config.dtype), out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32: x / sqrt(mean(x^2) + eps) * weight (HF DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, axis: str, config: ModelConfig, eps: float | None = None):
        self.weight = nnx.Param(
            jnp.ones((dim,), dtype_of(config.param_dtype)),
            out_sharding=(axis,),
            eager_sharding=eager_sharding(),
        )
        self.config = config
        self.eps = config.rms_norm_eps if eps is None else eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply.
        out = self.weight[...].astype(jnp.float32) * xf.astype(x.dtype)
        return out.astype(dtype_of(self.config.dtype))


class Embed(nnx.Module):
    """Token embedding [vocab_size, hidden_size]."""

    def __init__(self, config: ModelConfig, *, rngs):
        self.config = config
        self.embedding = param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        dtype = dtype_of(self.config.dtype)
        h = jnp.take(self.embedding[...], ids, axis=0).astype(dtype)  # [b, s, d]
        return constrain(h, ("batch", "seq", "act_embed"), self.config.sharding_rules)


class MLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)) (dense layers and shared experts).

    ``width`` is the logical name of the intermediate dimension: "mlp" (dense layers) or
    "shared_mlp" (shared experts), so the two can be sharded differently.
    """

    def __init__(self, config: ModelConfig, intermediate_size: int, *, rngs, width: str = "mlp"):
        d, f = config.hidden_size, intermediate_size
        self.gate_proj = Linear(d, f, ("embed", width), config, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", width), config, rngs=rngs)
        self.down_proj = Linear(f, d, (width, "embed"), config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
