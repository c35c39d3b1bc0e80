"""Absorbed-MLA decode attention over the latent cache: a split-K (flash-decoding) Pallas kernel.

Source: DeepSeek-V2 report section 2.1 (absorbed MLA: W_uk folds into the query, W_uv after the
attention), so every head attends over ONE shared latent cache as multi-query attention:

  key   = [c_kv ; k_rope]   width c + r   (kv_lora_rank + qk_rope_head_dim)
  value = c_kv              width c
  out[b, s, h] = softmax_t(scale * (q_c . c_kv[t] + q_r . k_rope[t]), t <= q_positions[b, s]) @ c_kv

The s * h query rows of a batch row form one group of MQA rows sharing the same K/V, each row with
its own position (s > 1 for speculative verification). Flash-decoding (Dao et al. 2023): t is cut
into ``num_splits`` chunks processed in parallel; each chunk runs an online softmax over blocks of
``block_t`` slots (FlashAttention-2 recurrence) and writes a partial (max, sum, unnormalised acc);
a log-sum-exp merge in plain jnp combines the chunks.

Glossary: b batch, s query positions, t cache positions, h heads, c kv_lora_rank,
r qk_rope_head_dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NT = (((1,), (1,)), ((), ()))  # dot_general: contract the last dims of both (a @ b.T)
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the decode kernel.

    Attributes:
      block_t: cache slots per inner-loop step (power of two >= 16 on GPU).
      block_rows: query rows (of the s * h group) per program (power of two >= 16 on GPU; the
        [block_rows, c] float32 accumulator lives in registers).
      num_splits: chunks of t run in parallel; None picks enough to fill about ``target_programs``.
      target_programs: programs the automatic num_splits aims for (H100/H200: 132 SMs, ~2 waves).
      min_split_t: fewest cache slots per automatic split: each split writes a [rows, c] float32
        partial (256 KiB for V3's 128 heads), which must stay small beside the cache it reads
        (512 slots of c + r bf16 = 576 KiB).
      num_warps, num_stages: Triton compiler parameters on GPU (None: Triton's defaults).
    """

    block_t: int = 32
    block_rows: int = 32
    num_splits: int | None = None
    target_programs: int = 256
    min_split_t: int = 512
    num_warps: int | None = 8
    num_stages: int | None = 2


def _decode_kernel(
    pos_ref,  # [block_rows] int32: last visible slot per query row (-1: none)
    qc_ref,  # [block_rows, c]
    qr_ref,  # [block_rows, r]
    ckv_ref,  # [chunk, c] this split's cache latents
    kr_ref,  # [chunk, r] this split's rope keys
    acc_ref,  # [block_rows, c] float32, unnormalised
    m_ref,  # [block_rows] float32 running max (-inf: nothing visible)
    lsum_ref,  # [block_rows] float32 running sum of exp
    *,
    scale: float,
    block_t: int,
    chunk: int,
):
    split = pl.program_id(1)
    base = split * chunk  # first cache slot of this split
    pos = pos_ref[...]
    qc = qc_ref[...]
    qr = qr_ref[...]
    rows = qc.shape[0]
    # Visit only the blocks holding a slot some row of this program can see (early exit).
    visible = jnp.maximum(jnp.max(pos) + 1 - base, 0)
    num_blocks = jnp.minimum(lax.div(visible + (block_t - 1), block_t), chunk // block_t)

    def body(i, carry):
        acc, m, lsum = carry
        start = pl.multiple_of(i * block_t, block_t)
        ck = ckv_ref[pl.ds(start, block_t), :]  # [block_t, c]
        kr = kr_ref[pl.ds(start, block_t), :]  # [block_t, r]
        f32 = jnp.float32
        sc = lax.dot_general(qc, ck, _NT, preferred_element_type=f32)  # [rows, block_t]
        sc += lax.dot_general(qr, kr, _NT, preferred_element_type=f32)
        sc *= scale
        slot = base + start + lax.broadcasted_iota(jnp.int32, (rows, block_t), 1)
        sc = jnp.where(slot <= pos[:, None], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked so far: no NaN
        p = jnp.exp(sc - m_safe[:, None])  # masked slots -> exactly 0
        alpha = jnp.exp(m - m_safe)
        lsum = alpha * lsum + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(ck.dtype), ck, _NN, preferred_element_type=f32)
        acc = alpha[:, None] * acc + pv  # [rows, c]
        return acc, m_new, lsum

    init = (
        jnp.zeros(acc_ref.shape, jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, lsum = lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    lsum_ref[...] = lsum


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _auto_num_splits(num_blocks: int, programs_per_split: int, target: int, max_splits: int) -> int:
    """Enough splits to reach ``target`` programs (at most ``max_splits``), preferring a split
    size that divides the blocks (no cache padding)."""
    want = -(-target // max(programs_per_split, 1))
    want = max(1, min(num_blocks, max_splits, want))
    per = -(-num_blocks // want)  # blocks per split
    for d in range(per, min(2 * per, num_blocks) + 1):  # a divisor avoids padding the cache
        if num_blocks % d == 0:
            return num_blocks // d
    return -(-num_blocks // per)


def _resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _compiler_params(bs, interpret: bool):
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu

    kw = {k: v for k, v in (("num_warps", bs.num_warps), ("num_stages", bs.num_stages)) if v}
    params = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # older jax
    return params(**kw) if kw else None


def _check_shapes(q_c, q_r, c_kv, k_rope, q_positions):
    if q_c.ndim != 4 or q_r.ndim != 4 or q_c.shape[:3] != q_r.shape[:3]:
        raise ValueError(
            f"q_c [b, s, h, c] and q_r [b, s, h, r] must agree: {q_c.shape=} {q_r.shape=}"
        )
    b, s, h, c = q_c.shape
    r = q_r.shape[3]
    if c_kv.ndim != 3 or c_kv.shape[0] != b or c_kv.shape[2] != c:
        raise ValueError(f"c_kv must be [b, t, c] = [{b}, t, {c}]: {c_kv.shape=} {q_c.shape=}")
    if k_rope.shape != (b, c_kv.shape[1], r):
        raise ValueError(f"k_rope must be [b, t, r]: {k_rope.shape=} {c_kv.shape=} {q_r.shape=}")
    if c_kv.shape[1] < 1:
        raise ValueError(f"the cache needs at least one slot: {c_kv.shape=}")
    if q_positions.shape != (b, s) or not jnp.issubdtype(q_positions.dtype, jnp.integer):
        raise ValueError(
            f"q_positions must be integer [b, s] = [{b}, {s}]: "
            f"{q_positions.shape=} {q_positions.dtype=}"
        )
    for name, x in (("q_c", q_c), ("q_r", q_r), ("c_kv", c_kv), ("k_rope", k_rope)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point: {x.dtype=}")


@functools.partial(
    jax.jit, static_argnames=("scale", "impl", "block_t", "num_splits", "interpret", "block_sizes")
)
def latent_attention(
    q_c: jax.Array,
    q_r: jax.Array,
    c_kv: jax.Array,
    k_rope: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    impl: str = "pallas",
    block_t: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Absorbed-MLA attention of s * h query rows over the shared latent cache (decode).

    Args:
      q_c: [b, s, h, c] query in the latent space (q_nope @ W_uk), any float dtype.
      q_r: [b, s, h, r] roped rope part of the query.
      c_kv: [b, t, c] cache latents (after their RMSNorm); also the values.
      k_rope: [b, t, r] roped rope keys (one per slot, shared by all heads).
      q_positions: int [b, s]; slot j is visible to query (b, s) iff j <= q_positions[b, s]
        (and j < t). Invisible slots may hold any finite garbage: they never reach the output.
        A row that sees no slot (position < 0) returns zeros.
      scale: softmax scale (python float), e.g. rope.softmax_scale(config).
      impl: "pallas" (the kernel) or "reference" (latent_attention_reference).
      block_t: cache slots per inner step (default BlockSizes.block_t, clamped for tiny t).
      num_splits: chunks of t processed in parallel (default: automatic). Splits past the
        visible slots do no work.
      interpret: Pallas interpret mode; None means True on the CPU backend.
      block_sizes: full tiling (BlockSizes); block_t / num_splits override its fields.

    Returns:
      [b, s, h, c] float32: softmax(scale * (q_c . c_kv + q_r . k_rope)) @ c_kv over the visible
      slots. Multiply by W_uv afterwards for the per-head values.

    Raises:
      ValueError: on inconsistent shapes, non-integer positions, or an unknown impl.

    The two matmuls take the inputs' common dtype (bf16 runs bf16 x bf16 -> f32 on GPU); the
    softmax and accumulation are float32. The cache is padded (copied) only when t is not a
    multiple of num_splits * block_t; choose cache lengths that are to avoid the copy.
    """
    _check_shapes(q_c, q_r, c_kv, k_rope, q_positions)
    if impl == "reference":
        return latent_attention_reference(q_c, q_r, c_kv, k_rope, q_positions, scale=scale)
    if impl != "pallas":
        raise ValueError(f'impl must be "pallas" or "reference": {impl=}')
    bs = block_sizes or BlockSizes()
    interpret = _resolve_interpret(interpret)
    b, s, h, c = q_c.shape
    r, t = q_r.shape[3], c_kv.shape[1]
    rows = s * h

    block_t = block_t or bs.block_t
    block_t = min(block_t, max(16, pl.next_power_of_2(t)))
    block_rows = min(bs.block_rows, max(16, pl.next_power_of_2(rows)))
    if block_t < 1 or block_rows < 1:
        raise ValueError(f"block sizes must be positive: {block_t=} {block_rows=}")
    rows_p = _round_up(rows, block_rows)
    num_row_blocks = rows_p // block_rows
    num_blocks = -(-t // block_t)
    num_splits = num_splits or bs.num_splits
    if num_splits is None:
        max_splits = max(1, t // bs.min_split_t)
        num_splits = _auto_num_splits(
            num_blocks, b * num_row_blocks, bs.target_programs, max_splits
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1: {num_splits=}")
    chunk = -(-num_blocks // num_splits) * block_t  # slots per split
    t_p = chunk * num_splits

    dtype = jnp.result_type(q_c.dtype, q_r.dtype, c_kv.dtype, k_rope.dtype)
    qc = q_c.astype(dtype).reshape(b, rows, c)  # [b, s*h, c] rows ordered (s, h)
    qr = q_r.astype(dtype).reshape(b, rows, r)  # [b, s*h, r]
    pos = jnp.repeat(jnp.minimum(q_positions.astype(jnp.int32), t - 1), h, axis=1)  # [b, s*h]
    if rows_p != rows:  # padded rows see nothing (position -1) and are dropped below
        qc = jnp.pad(qc, ((0, 0), (0, rows_p - rows), (0, 0)))
        qr = jnp.pad(qr, ((0, 0), (0, rows_p - rows), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, rows_p - rows)), constant_values=-1)
    ckv, kr = c_kv.astype(dtype), k_rope.astype(dtype)
    if t_p != t:  # zero tail, never visible: positions are clamped to t - 1 above
        ckv = jnp.pad(ckv, ((0, 0), (0, t_p - t), (0, 0)))
        kr = jnp.pad(kr, ((0, 0), (0, t_p - t), (0, 0)))

    kernel = functools.partial(_decode_kernel, scale=float(scale), block_t=block_t, chunk=chunk)
    acc, m, lsum = pl.pallas_call(
        kernel,
        grid=(b, num_splits, num_row_blocks),  # row blocks fastest: they share a K/V chunk in L2
        in_specs=[
            pl.BlockSpec((None, block_rows), lambda i, j, k: (i, k)),
            pl.BlockSpec((None, block_rows, c), lambda i, j, k: (i, k, 0)),
            pl.BlockSpec((None, block_rows, r), lambda i, j, k: (i, k, 0)),
            pl.BlockSpec((None, chunk, c), lambda i, j, k: (i, j, 0)),
            pl.BlockSpec((None, chunk, r), lambda i, j, k: (i, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_rows, c), lambda i, j, k: (i, j, k, 0)),
            pl.BlockSpec((None, None, block_rows), lambda i, j, k: (i, j, k)),
            pl.BlockSpec((None, None, block_rows), lambda i, j, k: (i, j, k)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, num_splits, rows_p, c), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, rows_p), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, rows_p), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(bs, interpret),
        name="mla_latent_decode",
    )(pos, qc, qr, ckv, kr)

    # Log-sum-exp merge of the splits (flash-decoding's reduction step).
    m_all = jnp.max(m, axis=1, keepdims=True)  # [b, 1, rows_p]
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)  # no split saw anything: weights 0, no NaN
    w = jnp.exp(m - m_all)  # [b, splits, rows_p]; 0 for empty splits
    num = jnp.einsum("bjx,bjxc->bxc", w, acc)  # [b, rows_p, c]
    den = jnp.sum(w * lsum, axis=1)  # [b, rows_p]
    out = num / jnp.where(den == 0.0, 1.0, den)[..., None]
    return out[:, :rows].reshape(b, s, h, c)  # [b, s, h, c]


def latent_attention_reference(
    q_c: jax.Array,
    q_r: jax.Array,
    c_kv: jax.Array,
    k_rope: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Plain-jnp float32 absorbed-MLA attention: the specification of ``latent_attention``.

    Same arguments, shapes and result ([b, s, h, c] float32) as latent_attention; materialises
    the [b, s, h, t] scores. Rows that see no slot return zeros.
    """
    f32 = jnp.float32
    qc, qr, ckv, kr = (x.astype(f32) for x in (q_c, q_r, c_kv, k_rope))
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("bshc,btc->bsht", qc, ckv, precision=hi)
    scores += jnp.einsum("bshr,btr->bsht", qr, kr, precision=hi)
    scores *= scale
    slot = jnp.arange(c_kv.shape[1])
    visible = slot[None, None, None, :] <= q_positions[:, :, None, None]  # [b, s, 1, t]
    scores = jnp.where(visible, scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    mx = jnp.where(mx == -jnp.inf, 0.0, mx)
    p = jnp.where(visible, jnp.exp(scores - mx), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0.0, 1.0, den)
    return jnp.einsum("bsht,btc->bshc", p, ckv, precision=hi)  # [b, s, h, c]
