"""Building blocks shared by every module: the one product helper, RMSNorm, embedding, SwiGLU MLP.

Every parameter is created here with its logical axis names (``out_sharding`` metadata: embed,
vocab, q_heads, kv_heads, o_heads, q_lora, kv_lora, mlp, shared_mlp, experts, expert_mlp, router,
mtp_concat; ``layers`` is added by the layer scan); ``dsv3_jax.sharding`` maps them to a device
mesh. Kernels are stored [in, out] (HF stores [out, in]; conversion transposes).

Implementation settings (``config.IMPLEMENTATION_FIELDS``: computation dtype, kernels, ...) are
never copied into a module: every module keeps the ModelConfig and reads it when called, so
``model.with_implementation`` (which swaps the config of every module) changes the whole model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.sharding import constrain


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class ScaleInv(nnx.Param):
    """An FP8 kernel's float32 block scales (``dsv3_jax.fp8`` layout: kernel [..., i, o] ->
    [..., ceil(i/128), ceil(o/128)]); a Param so checkpoints carry it beside its kernel."""


SCALE_SUFFIX = "_scale_inv"


def fp8_scale_paths(flat) -> dict[tuple, tuple]:
    """{float8 kernel path: its :class:`ScaleInv` path} of a flat model state (path -> Variable,
    ``nnx.to_flat_state``): ``kernel`` -> ``kernel_scale_inv``, experts' ``gate_proj`` ->
    ``gate_proj_scale_inv`` (empty unless ``fp8_weights``)."""
    return {
        (*p[:-1], p[-1][: -len(SCALE_SUFFIX)]): p
        for p, v in dict(flat).items()
        if isinstance(v, ScaleInv)
    }


def product(
    x: jax.Array,
    kernel: jax.Array,
    config: ModelConfig,
    *,
    scale_inv: jax.Array | None = None,
    out_dtype=None,
    allow_fp8: bool = True,
) -> jax.Array:
    """x @ kernel: the one product helper for every weight (dense, output head, experts).

    The implementation follows ``config`` (report section 3.3 for the FP8 modes):
    - ``scale_inv`` given (FP8 weights, ``config.fp8_weights``): activations quantised on the fly
      in 1x128 tiles, ``fp8.gemm`` with the kernel's 128x128 blocks (``config.fp8_kernel``);
    - ``config.fp8_training`` and ``allow_fp8``: ``fp8.linear`` (Fprop, Dgrad and Wgrad in FP8);
    - otherwise: a dot in ``config.dtype`` with float32 accumulation.
    ``allow_fp8=False`` keeps a product in high precision whatever the config (the output head: the
    report keeps the embedding, head, router, norms and attention core out of FP8).

    Args:
      x: [..., in], or [g, ..., in] when ``kernel`` is a stack [g, in, out] (one product per g:
        the experts' blocked layout). kernel: [in, out] or [g, in, out]. scale_inv: float32
        [(g,) ceil(in/128), ceil(out/128)]. out_dtype: result dtype (default ``config.dtype``).
    Returns:
      [..., out] (or [g, ..., out]).
    """
    dtype = dtype_of(config.dtype)
    out_dtype = dtype if out_dtype is None else out_dtype
    if kernel.ndim == 3:
        one = functools.partial(product, config=config, out_dtype=out_dtype, allow_fp8=allow_fp8)
        if scale_inv is None:
            return jax.vmap(lambda a, w: one(a, w))(x, kernel)
        return jax.vmap(lambda a, w, s: one(a, w, scale_inv=s))(x, kernel, scale_inv)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)  # 2-D keeps XLA:CPU from transposing dW inputs
    if scale_inv is not None:
        xq, xs = fp8.quantize(x2, fp8.ACT_BLOCK)
        y = fp8.gemm(xq, xs, kernel.T, scale_inv.T, jnp.float32, impl=config.fp8_kernel)
    elif allow_fp8 and config.fp8_training:
        y = fp8.linear(x2, kernel, jnp.float32, config.fp8_kernel)
    else:
        y = _dot(x2, kernel.astype(dtype))
    return y.astype(out_dtype).reshape(*lead, kernel.shape[-1])


def _dot(x2: jax.Array, w: jax.Array) -> jax.Array:
    """[m, in] @ [in, out] with float32 accumulation (float32 result)."""
    if x2.shape[0] == 2 and jax.default_backend() == "cpu":
        # XLA:CPU runs a 1-row product as a matrix-vector kernel but packs the whole weight for
        # a 2-row GEMM: two 1-row products are 2x faster (speculative verification at batch 1).
        rows = [jnp.dot(x2[i : i + 1], w, preferred_element_type=jnp.float32) for i in range(2)]
        return jnp.concatenate(rows)
    return jnp.dot(x2, w, preferred_element_type=jnp.float32)


def param(rngs: nnx.Rngs, shape, axes, config: ModelConfig, init=None) -> nnx.Param:
    """A parameter with its logical axis names; normal(initializer_range) unless ``init`` given."""
    if init is None:
        init = jax.nn.initializers.normal(config.initializer_range)
    value = init(rngs.params(), shape, dtype_of(config.param_dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=eager_sharding())


def kernel_params(rngs: nnx.Rngs, shape, axes, config: ModelConfig):
    """(kernel, scale_inv) Params of a weight [..., in, out]: float values and None, or with
    ``config.fp8_weights`` its FP8 block quantisation (values float8_e4m3fn, :class:`ScaleInv`
    [..., ceil(in/128), ceil(out/128)], block dims replicated)."""
    kernel = param(rngs, shape, axes, config)
    if not config.fp8_weights:
        return kernel, None
    values, scale = fp8.quantize(kernel[...], fp8.WEIGHT_BLOCK)
    scale_axes = (*tuple(axes)[:-2], None, None)
    return (
        nnx.Param(values, out_sharding=tuple(axes), eager_sharding=eager_sharding()),
        ScaleInv(scale, out_sharding=scale_axes, eager_sharding=eager_sharding()),
    )


def weight(kernel, scale_inv, dtype) -> jax.Array:
    """A kernel as a ``dtype`` array: FP8 values dequantised with their scales (``fp8``)."""
    if scale_inv is None:
        return kernel.astype(dtype)
    return fp8.dequantize(kernel, scale_inv, fp8.WEIGHT_BLOCK, dtype)


def _scale(var) -> jax.Array | None:
    return None if var is None else var[...]


def eager_sharding() -> bool:
    """Never: flax would read the logical names as mesh axes. ``dsv3_jax.sharding`` places
    variables through its rules table (``shard_model``, ``model.init_model``, the loaders)."""
    return False


class Linear(nnx.Module):
    """Bias-free projection, kernel [in, out] with logical axes ``axes`` (``allow_fp8=False``:
    never FP8, e.g. the output head)."""

    def __init__(
        self, in_features: int, out_features: int, axes, config: ModelConfig, *, rngs,
        allow_fp8: bool = True,
    ):  # fmt: skip
        self.config = config
        self.allow_fp8 = allow_fp8
        self.kernel, self.kernel_scale_inv = kernel_params(
            rngs, (in_features, out_features), axes,
            config if allow_fp8 else config.replace(fp8_weights=False),
        )  # fmt: skip

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        return product(
            x, self.kernel[...], self.config, scale_inv=_scale(self.kernel_scale_inv),
            out_dtype=out_dtype, allow_fp8=self.allow_fp8,
        )  # fmt: skip

    def weight(self, dtype) -> jax.Array:
        """The kernel [in, out] as ``dtype`` (FP8 dequantised)."""
        return weight(self.kernel[...], _scale(self.kernel_scale_inv), dtype)


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
        gate, up = checkpoint_name(self.gate_proj(x), "mlp_gate"), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * checkpoint_name(up, "mlp_up"))
