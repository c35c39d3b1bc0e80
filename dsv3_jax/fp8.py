"""FP8 (e4m3) block scaling as DeepSeek-V3 trains and ships it (report section 3.3): the one module
for quantisation, dequantisation, the block-scaled GEMM and the FP8 linear used in training.

Format: float8_e4m3fn (max 448, 3 mantissa bits, no inf), each block of values sharing one float32
``scale_inv`` with real value = value * scale_inv; scale_inv = amax / 448 of the block, computed
online; values are clipped to [-448, 448] before the cast (a cast does not saturate: 449 -> NaN).

Block layouts (ceil-div grids: a partial edge block keeps its own scale):
- activations [M, K]: 1 x 128 tiles (a token, 128 channels) -> scale_inv [M, ceil(K/128)];
- checkpoint weights (HF, [out, in]) W [o, i]: 128 x 128 blocks -> scale_inv [ceil(o/128),
  ceil(i/128)] (``weight_scale_inv`` of the official checkpoint);
- our kernels are stored [in, out] (the transpose): kernel [..., i, o] with ``kernel_scale_inv``
  [..., ceil(i/128), ceil(o/128)] (the transposed grid; stacked layers/experts lead on both);
- Wgrad operands: activations and output gradients in 128 x 1 tiles along the token dimension
  (quantise the transpose in 1 x 128 tiles).

The GEMM and its Pallas kernel live in ``dsv3_jax.kernels.fp8_gemm``; ``impl`` ("reference" or
"pallas") selects one, as ``ModelConfig.fp8_kernel`` does for the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax.kernels import fp8_gemm
from dsv3_jax.kernels.fp8_gemm import CHUNK, truncate  # noqa: F401  (re-exported)

E4M3_MAX = 448.0
DTYPE = jnp.float8_e4m3fn
NP_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
ACT_BLOCK = (1, CHUNK)
WEIGHT_BLOCK = (CHUNK, CHUNK)


def scale_shape(shape, block) -> tuple[int, ...]:
    """Scale grid of an array [..., r, c] in blocks (br, bc): [..., ceil(r/br), ceil(c/bc)]."""
    *lead, r, c = shape
    return (*lead, -(-r // block[0]), -(-c // block[1]))


def _check_block(shape, block) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fp8: expected an array [..., rows, cols], got shape {tuple(shape)}")
    br, bc = (int(v) for v in block)
    if br < 1 or bc < 1:
        raise ValueError(f"fp8: block must be two positive ints, got {block}")
    return br, bc


def quantize(
    x: jax.Array, block=ACT_BLOCK, *, power_of_two: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Block FP8 quantisation of the last two dims (report 3.3.2, fine-grained quantisation).

    Args:
      x: float [..., r, c]. block: (br, bc): (1, 128) activations, (128, 128) weights.
      power_of_two: round each scale up to a power of two (DeepSeek-V3.1 checkpoints'
        ``scale_fmt: ue8m0``), then quantise with that scale.
    Returns:
      (values float8_e4m3fn [..., r, c], scale_inv float32 [..., ceil(r/br), ceil(c/bc)]) with
      scale_inv = amax / 448 per block (1.0 for an all-zero block), values = clip(x / scale_inv,
      -448, 448) rounded to nearest e4m3. Non-finite inputs give NaN in their block.
    Raises:
      ValueError: x has fewer than 2 dims or block is not two positive ints.
    """
    x = jnp.asarray(x)
    br, bc = _check_block(x.shape, block)
    *lead, r, c = x.shape
    gr, gc = -(-r // br), -(-c // bc)
    xf = x.astype(jnp.float32)
    pad = [(0, 0)] * len(lead) + [(0, gr * br - r), (0, gc * bc - c)]
    blocks = jnp.pad(xf, pad).reshape(*lead, gr, br, gc, bc)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., gr, gc]
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    if power_of_two:
        scale = _round_up_pow2(scale)
    q = jnp.clip(blocks / scale[..., :, None, :, None], -E4M3_MAX, E4M3_MAX).astype(DTYPE)
    q = q.reshape(*lead, gr * br, gc * bc)[..., :r, :c]
    return q, scale


def _round_up_pow2(scale: jax.Array) -> jax.Array:
    """Positive normal float32 -> the smallest power of two >= it, exactly (bit arithmetic:
    jnp.exp2 is an approximation on some backends)."""
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exponent = bits & jnp.uint32(0x7F800000)
    up = jnp.where(bits & jnp.uint32(0x007FFFFF), exponent + jnp.uint32(0x00800000), exponent)
    return jax.lax.bitcast_convert_type(up, jnp.float32)


def dequantize(values: jax.Array, scale_inv: jax.Array, block, dtype=jnp.float32) -> jax.Array:
    """values [..., r, c] * scale_inv[..., row // br, col // bc] in float32, then cast to ``dtype``.

    Raises:
      ValueError: scale_inv is not the ceil-div grid of ``values`` in ``block``.
    """
    br, bc = _check_block(values.shape, block)
    want = scale_shape(values.shape, (br, bc))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"fp8: scale_inv shape {tuple(scale_inv.shape)} does not fit values "
            f"{tuple(values.shape)} in {br}x{bc} blocks (expected {want})"
        )
    r, c = values.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), br, axis=-2), bc, axis=-1)
    return (values.astype(jnp.float32) * s[..., :r, :c]).astype(dtype)


def gemm(
    a: jax.Array,
    a_scale_inv: jax.Array,
    b: jax.Array,
    b_scale_inv: jax.Array,
    out_dtype=jnp.float32,
    *,
    b_block=WEIGHT_BLOCK,
    impl: str = "reference",
) -> jax.Array:
    """Block-scaled FP8 GEMM a @ b.T with float32 promotion every 128 elements of K.

    Args:
      a: float8_e4m3fn [..., M, K], a_scale_inv float32 [..., M, ceil(K/128)] (1x128 tiles).
      b: float8_e4m3fn [..., N, K] (the checkpoint's [out, in] layout), b_scale_inv float32
        [..., ceil(N/bn), ceil(K/128)] for ``b_block`` (bn, 128): (128, 128) weight blocks or
        (1, 128) tiles (Wgrad).
      impl: "reference" (jnp) or "pallas" (interpret mode on CPU).
    Returns:
      [..., M, N] ``out_dtype``: sum over chunks k of (a_k . b_k) * a_scale_inv[:, k] *
      b_scale_inv[n // bn, k] (``dsv3_jax.kernels.fp8_gemm`` states it exactly).
    Raises:
      ValueError: naming the operand whose shape or dtype does not fit.
    """
    return fp8_gemm.gemm(a, a_scale_inv, b, b_scale_inv, out_dtype, b_block, impl)


# ----------------------------------------------------------------------------- training
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, w: jax.Array, out_dtype=None, impl: str = "reference") -> jax.Array:
    """FP8 linear x @ w with all three GEMMs in FP8 (report 3.3, Figure 6).

    Fprop: y = x w, x in 1x128 tiles, w in 128x128 blocks. Dgrad: dx = dy w^T, dy in 1x128 tiles
    (along N), w in the same 128x128 blocks. Wgrad: dw = x^T dy, x and dy in 128x1 tiles along the
    token dimension. Every GEMM promotes to float32 every 128 elements of its K; the backward keeps
    x only in FP8 (the report caches the activations of Linear in FP8).

    Args:
      x: [M, K] (bf16/float32). w: [K, N] master weight (float32). out_dtype: y's dtype (default
        x's). impl: :func:`gemm`'s.
    Returns:
      [M, N]; gradients dx in x's dtype, dw in w's dtype.
    """
    return _linear_fwd(x, w, out_dtype, impl)[0]


def _linear_fwd(x, w, out_dtype, impl):
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xq, xs = quantize(x, ACT_BLOCK)
    wq, ws = quantize(w.T, WEIGHT_BLOCK)  # [N, K] blocks; the same blocks serve w [K, N]
    y = gemm(xq, xs, wq, ws, out_dtype, impl=impl)
    xtq, xts = quantize(x.T, ACT_BLOCK)  # [K, M]: 128x1 tiles of x along tokens (Wgrad)
    res = (xtq, xts, wq, ws, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return y, res


def _linear_bwd(out_dtype, impl, res, dy):
    xtq, xts, wq, ws, x_proto, w_proto = res
    dyq, dys = quantize(dy, ACT_BLOCK)  # [M, N] tiles along N
    dx = gemm(dyq, dys, wq.T, ws.T, x_proto.dtype, impl=impl)  # [M, K]
    dytq, dyts = quantize(dy.T, ACT_BLOCK)  # [N, M] tiles along tokens
    dw = gemm(xtq, xts, dytq, dyts, w_proto.dtype, b_block=(1, CHUNK), impl=impl)  # [K, N]
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)


# ----------------------------------------------------------------------------- numpy (host)
# Loaders and conversion work on the host in numpy (nothing of a checkpoint needs a device).
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(NP_DTYPE).astype(np.float32)
BF16_NP_DTYPE = np.dtype(ml_dtypes.bfloat16)


def to_float32(x: np.ndarray) -> np.ndarray:
    """float8_e4m3fn / bfloat16 / any float numpy array -> float32, exactly (fast paths for the
    first two: a 256-entry table and a 16-bit shift; ml_dtypes' own casts run element by element).
    """
    x = np.asarray(x)
    if x.dtype == NP_DTYPE:
        return _FP8_TO_F32[x.view(np.uint8)]
    if x.dtype == BF16_NP_DTYPE:
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def quantize_np(w: np.ndarray, block=WEIGHT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize` on the host in numpy (conversion and loaders, without a device).

    Args:
      w: any float (bfloat16 and float8 included) [..., r, c]. block: (br, bc).
    Returns:
      (ml_dtypes float8_e4m3fn [..., r, c], float32 scale_inv [..., ceil(r/br), ceil(c/bc)]);
      :func:`quantize`'s arithmetic (scale_inv = amax / 448, 1.0 for an all-zero block; clipped
      cast), so :func:`dequantize_np` of the result is within 2^-4 relative of ``w`` per element
      (plus e4m3's subnormal step, 2^-9 x scale_inv).
    Raises:
      ValueError: w has fewer than 2 dims or block is not two positive ints.
    """
    br, bc = _check_block(w.shape, block)
    *lead, r, c = w.shape
    gr, gc = -(-r // br), -(-c // bc)
    padded = np.zeros((*lead, gr * br, gc * bc), np.float32)
    padded[..., :r, :c] = to_float32(w)
    blocks = padded.reshape(*lead, gr, br, gc, bc)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    q = np.clip(blocks / scale[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    return q.reshape(*lead, gr * br, gc * bc)[..., :r, :c].astype(NP_DTYPE), scale


def dequantize_np(
    w: np.ndarray, scale: np.ndarray, block=WEIGHT_BLOCK, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """:func:`dequantize` on the host: out[..., r, c] = w[..., r, c] * scale[..., r // br, c // bc]
    in float32, for a whole weight or a slice of one.

    Args:
      w: float8_e4m3fn (or any float) [..., r, c]: the weight, or a slice of it.
      scale: float32 (bfloat16 accepted) [..., ceil(r/br), ceil(c/bc)] for the whole weight; for
        a slice, the scale blocks it touches (``hf_io.scale_box`` of its box).
      block: (br, bc): 128 x 128 in the official checkpoint (whatever layout: the HF [out, in]
        weights and our [in, out] kernels alike); edge blocks may be partial.
      offset: (row, col) of ``w[..., 0, 0]`` in the whole weight (a slice's start).
    Returns:
      float32 [..., r, c], computed one block row at a time (memory: the output and one row of
      scales broadcast over its columns).
    Raises:
      ValueError: the scale's shape is not the grid of blocks ``w`` covers, or a bad block.
    """
    br, bc = _check_block(w.shape, block)
    r0, c0 = (int(v) for v in offset)
    *lead, r, c = w.shape
    grid = (*lead, -(-(r0 + r) // br) - r0 // br, -(-(c0 + c) // bc) - c0 // bc)
    if tuple(scale.shape) != grid:
        at = f" at offset {(r0, c0)}" if r0 or c0 else ""
        raise ValueError(
            f"FP8 scale shape {tuple(scale.shape)} does not fit weight shape {tuple(w.shape)}{at} "
            f"in {br}x{bc} blocks (expected {grid})"
        )
    w = np.asarray(w)
    out = to_float32(w)
    if not out.flags.writeable or np.may_share_memory(out, w):
        out = out.copy()
    cols = (c0 + np.arange(c)) // bc - c0 // bc  # [c]: each column's block
    for k in range(scale.shape[-2]):
        start = max((r0 // br + k) * br - r0, 0)
        row = to_float32(scale[..., k, :])[..., cols]  # [..., c]
        out[..., start : (r0 // br + k + 1) * br - r0, :] *= row[..., None, :]
    return out
