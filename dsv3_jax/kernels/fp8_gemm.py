"""Block-scaled FP8 GEMM (DeepSeek-V3 report section 3.3): a Pallas kernel beside its jnp reference.

  out[m, n] = sum_k  P_k[m, n] * a_scale_inv[m, k] * b_scale_inv[n // bn, k]
  P_k[m, n] = sum_{c in chunk k} a[m, c] * b[n, c]          (chunk k: K elements [128 k, 128 k + 128))

``a`` [M, K] and ``b`` [N, K] hold float8_e4m3fn values; ``a`` is scaled per 1 x 128 tile (a row
and a chunk of K), ``b`` per bn x 128 block (bn = 128: the checkpoint's [out, in] weight blocks;
bn = 1: 1 x 128 tiles, the Wgrad operand). Each chunk's partial product P_k is the tensor core's
work (e4m3 x e4m3 products are exact in float32); it is promoted to the float32 accumulator every
N_C = 128 elements of K, multiplied by its two scales there (report 3.3.2, "increasing accumulation
precision"). K, M and N need not be multiples of 128: the last chunk is partial (zero-padded).

``accumulator_bits`` (reference only) emulates the limited-precision accumulator of H800 tensor
cores inside a chunk: the running sum keeps ``bits`` significant bits (truncated after every
addition, as an aligned fixed-point adder drops the low bits); the report measures about 14.

Glossary: M rows (tokens), N outputs, K contracted dimension, kb = ceil(K / 128) chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

CHUNK = 128  # N_C: promotion interval = scale tile width along K
_NT = (((1,), (1,)), ((), ()))  # dot_general: a @ b.T


def check_operands(a, a_scale_inv, b, b_scale_inv, b_block) -> tuple[int, int, int, int]:
    """Shape checks shared by both implementations -> (M, N, K, kb).

    Raises:
      ValueError: naming the operand whose shape or dtype does not fit.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"fp8 gemm: a and b must be 2-D, got {a.shape} and {b.shape}")
    (m, k), (n, kk) = a.shape, b.shape
    if k != kk:
        raise ValueError(f"fp8 gemm: a [M, K] = {a.shape} and b [N, K] = {b.shape} differ in K")
    kb = -(-k // CHUNK)
    if tuple(b_block) not in ((CHUNK, CHUNK), (1, CHUNK)):
        raise ValueError(f"fp8 gemm: b_block must be (128, 128) or (1, 128), got {b_block}")
    want_a = (m, kb)
    want_b = (-(-n // b_block[0]), kb)
    if tuple(a_scale_inv.shape) != want_a:
        raise ValueError(f"fp8 gemm: a_scale_inv shape {a_scale_inv.shape}, expected {want_a}")
    if tuple(b_scale_inv.shape) != want_b:
        raise ValueError(
            f"fp8 gemm: b_scale_inv shape {b_scale_inv.shape}, expected {want_b} for b {b.shape} "
            f"in {b_block[0]}x{b_block[1]} blocks"
        )
    for name, x in (("a", a), ("b", b)):
        if x.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"fp8 gemm: {name} must be float8_e4m3fn, got {x.dtype}")
    return m, n, k, kb


def _pad_to(x: jax.Array, shape) -> jax.Array:
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])


def truncate(x: jax.Array, bits: int) -> jax.Array:
    """float32 ``x`` with only its top ``bits`` significant bits kept (truncated toward zero)."""
    drop = 24 - bits
    mask = jnp.uint32((0xFFFFFFFF >> drop) << drop)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & mask, jnp.float32)


def _chunked(a, b, kb):
    """a [M, K], b [N, K] fp8 -> zero-padded [kb, M, 128], [kb, N, 128] chunks of K."""
    m, n = a.shape[0], b.shape[0]
    a = _pad_to(a, (m, kb * CHUNK)).reshape(m, kb, CHUNK).transpose(1, 0, 2)
    b = _pad_to(b, (n, kb * CHUNK)).reshape(n, kb, CHUNK).transpose(1, 0, 2)
    return a, b


def _b_scale_rows(b_scale_inv, b_block, n):
    """b_scale_inv [ceil(N / bn), kb] -> [N, kb] (one scale per output row)."""
    return jnp.repeat(b_scale_inv, b_block[0], axis=0)[:n] if b_block[0] > 1 else b_scale_inv


def gemm_reference(
    a, a_scale_inv, b, b_scale_inv, out_dtype=jnp.float32, b_block=(CHUNK, CHUNK),
    accumulator_bits: int | None = None,
) -> jax.Array:  # fmt: skip
    """The module docstring's formula in plain jnp (see there) -> [M, N] ``out_dtype``.

    P_k is a float32 dot of the fp8 values (exact products, float32 sums) or, with
    ``accumulator_bits``, a sequential sum truncated to that many significant bits after each
    addition (O(K) scan: for error studies, not speed). The chunks are then scaled and summed in
    float32 in chunk order.
    """
    m, n, _, kb = check_operands(a, a_scale_inv, b, b_scale_inv, b_block)
    ac, bc = _chunked(a, b, kb)  # [kb, M, 128], [kb, N, 128]
    if accumulator_bits is None:
        partial = jnp.einsum(
            "kmc,knc->kmn", ac.astype(jnp.float32), bc.astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )  # fmt: skip
    else:

        def add(acc, c):  # acc [kb, M, N]
            prod = ac[:, :, c, None].astype(jnp.float32) * bc[:, None, :, c].astype(jnp.float32)
            return truncate(acc + prod, accumulator_bits), None

        partial, _ = lax.scan(add, jnp.zeros((kb, m, n), jnp.float32), jnp.arange(CHUNK))
    scale = (
        a_scale_inv.astype(jnp.float32).T[:, :, None]
        * _b_scale_rows(b_scale_inv.astype(jnp.float32), b_block, n).T[:, None, :]
    )  # [kb, M, N]

    out = partial[0] * scale[0]
    for k in range(1, kb):  # promotion in chunk order (unrolled: kb = ceil(K / 128) is static)
        out = out + partial[k] * scale[k]
    return out.astype(out_dtype)


def accumulate_limited(
    a: jax.Array, b: jax.Array, bits: int, interval: int | None = None
) -> jax.Array:
    """a @ b.T summed sequentially over K in an accumulator of ``bits`` significant bits.

    Models a tensor core's limited-precision accumulator (report 3.3.2: about 14 bits on H800)
    with the running sum truncated after every addition. ``interval`` None: the whole K in that
    accumulator (no promotion); an int: the partial sum is added to a float32 accumulator and
    reset every ``interval`` elements (promotion, N_C = 128 in the report).

    Args:
      a: float32 [M, K]; b: float32 [N, K] (e.g. dequantised FP8 operands).
    Returns:
      float32 [M, N].
    """
    k = a.shape[1]
    interval = k if interval is None else int(interval)

    def add(carry, c):
        acc, total = carry
        acc = truncate(acc + a[:, c, None] * b[None, :, c], bits)
        flush = (c + 1) % interval == 0
        return (jnp.where(flush, 0.0, acc), jnp.where(flush, total + acc, total)), None

    zeros = jnp.zeros((a.shape[0], b.shape[0]), jnp.float32)
    (acc, total), _ = lax.scan(add, (zeros, zeros), jnp.arange(k))
    return total + acc


def _gemm_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, kb: int):
    """One [block_m, block_n] output tile: loop over K chunks, promote each partial product."""

    def body(k, acc):
        cols = pl.ds(pl.multiple_of(k * CHUNK, CHUNK), CHUNK)
        p = lax.dot_general(a_ref[:, cols], b_ref[:, cols], _NT, preferred_element_type=jnp.float32)
        a_s = as_ref[:, pl.ds(k, 1)]  # [block_m, 1]
        b_s = bs_ref[:, pl.ds(k, 1)]  # [block_n or 1, 1]
        return acc + p * a_s * jnp.transpose(b_s)

    acc = lax.fori_loop(0, kb, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "b_block", "block_m", "interpret")
)  # fmt: skip
def gemm_pallas(
    a, a_scale_inv, b, b_scale_inv, out_dtype=jnp.float32, b_block=(CHUNK, CHUNK),
    block_m: int = 64, interpret: bool | None = None,
) -> jax.Array:  # fmt: skip
    """The same product as :func:`gemm_reference` (float32 partials, chunk-order promotion) as a
    Pallas kernel: a grid of [block_m, 128] output tiles, each looping over the K chunks.

    Operands are zero-padded to whole tiles (M to block_m, N to 128, K to a power-of-two number
    of 128-chunks, as Triton block shapes must be powers of two); padded scales are 0.
    ``interpret`` None means interpret mode on the CPU backend.
    """
    m, n, _, kb = check_operands(a, a_scale_inv, b, b_scale_inv, b_block)
    interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
    block_m = min(block_m, max(16, _next_pow2(m)))
    mp, np_, kbp = -(-m // block_m) * block_m, -(-n // CHUNK) * CHUNK, _next_pow2(kb)
    a_p = _pad_to(a, (mp, kbp * CHUNK))
    b_p = _pad_to(b, (np_, kbp * CHUNK))
    as_p = _pad_to(a_scale_inv.astype(jnp.float32), (mp, kbp))
    bn = b_block[0]
    bs_p = _pad_to(b_scale_inv.astype(jnp.float32), (np_ // bn, kbp))
    b_rows = 1 if bn == CHUNK else CHUNK  # scale rows per output tile
    out = pl.pallas_call(
        functools.partial(_gemm_kernel, kb=kb),
        grid=(mp // block_m, np_ // CHUNK),
        in_specs=[
            pl.BlockSpec((block_m, kbp * CHUNK), lambda i, j: (i, 0)),
            pl.BlockSpec((block_m, kbp), lambda i, j: (i, 0)),
            pl.BlockSpec((CHUNK, kbp * CHUNK), lambda i, j: (j, 0)),
            pl.BlockSpec((b_rows, kbp), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((block_m, CHUNK), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=interpret,
    )(a_p, as_p, b_p, bs_p)
    return out[:m, :n]


def gemm(
    a, a_scale_inv, b, b_scale_inv, out_dtype=jnp.float32, b_block=(CHUNK, CHUNK),
    impl: str = "reference",
) -> jax.Array:  # fmt: skip
    """Dispatch: ``impl`` "reference" (:func:`gemm_reference`) or "pallas" (:func:`gemm_pallas`).

    Leading batch dimensions (equal on every operand) are mapped with ``jax.vmap``.
    """
    if impl not in ("reference", "pallas"):
        raise ValueError(f"fp8 gemm impl must be 'reference' or 'pallas', got {impl!r}")
    fn = gemm_reference if impl == "reference" else gemm_pallas
    fn = functools.partial(fn, out_dtype=out_dtype, b_block=tuple(b_block))
    for _ in range(a.ndim - 2):
        fn = jax.vmap(fn)
    return fn(a, a_scale_inv, b, b_scale_inv)
