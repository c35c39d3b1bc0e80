"""Causal flash attention in MLA's prefill/training shapes (dk = n + r != dv), Pallas forward and
backward.

Source: FlashAttention-2 (Dao 2023), algorithms 1 (forward: online softmax over key blocks, the
[s, s] scores never exist; saves the row logsumexp) and 2 (backward: recompute P from the
logsumexp; one kernel per key block accumulates dK, dV over query blocks, one kernel per query
block accumulates dQ over key blocks; D = rowsum(dO * O)). Causal mode skips key blocks above the
diagonal in every kernel.

MLA keys are [k_nope ; k_rope] (n + r = 192 for V3, not a power of two, which Triton tiles need).
The kernels take q and k as power-of-two column parts (192 = 128 + 64) read in place from the same
arrays (no copy) and sum the parts' partial scores; dv is padded to a power of two only if needed.

Glossary: b batch, s positions (queries and keys), h heads, n qk_nope_head_dim,
r qk_rope_head_dim, v v_head_dim; dk = n + r.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the flash-attention kernels (powers of two >= 16 on GPU).

    Attributes:
      block_q, block_k: forward query / key block.
      block_q_bwd, block_k_bwd: backward query / key block (both backward kernels; the dK/dV
        kernel keeps [block_k_bwd, dk + dv] float32 accumulators in registers).
      num_warps, num_stages: Triton compiler parameters on GPU (None: Triton's defaults).
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 32
    block_k_bwd: int = 32
    num_warps: int | None = 4
    num_stages: int | None = 2


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    causal: bool
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    backward: str
    num_warps: int | None
    num_stages: int | None


def _parts(d: int) -> tuple[int, ...]:
    """Power-of-two column parts, largest first: 192 -> (128, 64). Part i starts at a multiple of
    its own width, so it is block index offset // width of a last-dim BlockSpec."""
    return tuple(1 << i for i in reversed(range(d.bit_length())) if d >> i & 1)


def _part_specs(parts, block_shape_fn, index_fn):
    """One BlockSpec per column part of the same [b, s, h, d] array."""
    specs, off = [], 0
    for w in parts:
        specs.append(pl.BlockSpec(block_shape_fn(w), functools.partial(index_fn, off // w)))
        off += w
    return specs


def _scores(q_parts, k_refs, start, block_k, scale):
    """scale * sum over parts of q_part @ k_part[start : start + block_k].T  -> [bq, bk] f32."""
    sc = None
    for q, k_ref in zip(q_parts, k_refs, strict=True):
        k = k_ref[pl.ds(start, block_k), :]
        d = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
        sc = d if sc is None else sc + d
    return sc * scale


def _mask(q_start, k_start, shape, causal, seq_len, padded):
    """Visibility of the [bq, bk] tile: key <= query (causal) and key < seq_len (padding)."""
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = k_idx <= q_idx if causal else None
    if padded and not causal:  # causal: padded keys are seen only by padded queries
        mask = k_idx < seq_len
    return mask


def _fwd_kernel(*refs, num_parts, cfg, seq_len, padded):
    q_refs, k_refs = refs[:num_parts], refs[num_parts : 2 * num_parts]
    v_ref, o_ref, lse_ref = refs[2 * num_parts :]
    bq, bk = cfg.block_q, cfg.block_k
    iq = pl.program_id(2)
    q_parts = [r[...] for r in q_refs]  # [bq, part] each, kept on chip for the whole loop
    num_kb = k_refs[0].shape[0] // bk

    def body(j, carry):
        acc, m, lsum = carry
        start = pl.multiple_of(j * bk, bk)
        sc = _scores(q_parts, k_refs, start, bk, cfg.scale)  # [bq, bk]
        mask = _mask(iq * bq, start, sc.shape, cfg.causal, seq_len, padded)
        if mask is not None:
            sc = jnp.where(mask, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(sc - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        lsum = alpha * lsum + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]  # [bk, dv]
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, lsum

    hi = num_kb
    if cfg.causal:  # skip key blocks entirely above the diagonal
        hi = jnp.minimum(num_kb, lax.div((iq + 1) * bq + bk - 1, bk))
    init = (
        jnp.zeros(o_ref.shape, jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, lsum = lax.fori_loop(0, hi, body, init)
    lsum_safe = jnp.where(lsum == 0.0, 1.0, lsum)
    o_ref[...] = (acc / lsum_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(lsum == 0.0, -jnp.inf, m + jnp.log(lsum_safe))


def _dkdv_kernel(*refs, num_parts, cfg, seq_len, padded):
    p_ = num_parts
    q_refs, k_refs = refs[:p_], refs[p_ : 2 * p_]
    v_ref, do_ref, lse_ref, delta_ref = refs[2 * p_ : 2 * p_ + 4]
    dk_refs, dv_ref = refs[2 * p_ + 4 : 3 * p_ + 4], refs[3 * p_ + 4]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    jk = pl.program_id(2)
    k_parts = [r[...] for r in k_refs]  # [bk, part]
    v = v_ref[...]  # [bk, dv]
    num_qb = q_refs[0].shape[0] // bq

    def body(i, carry):
        dks, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q_parts = [r[pl.ds(start, bq), :] for r in q_refs]
        sc = None
        for q, k in zip(q_parts, k_parts, strict=True):
            d = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
            sc = d if sc is None else sc + d
        sc *= cfg.scale  # [bq, bk]
        mask = _mask(start, jk * bk, sc.shape, cfg.causal, seq_len, padded)
        if mask is not None:
            sc = jnp.where(mask, sc, -jnp.inf)
        lse = lse_ref[pl.ds(start, bq)]
        p = jnp.exp(sc - lse[:, None])  # [bq, bk]
        do = do_ref[pl.ds(start, bq), :]  # [bq, dv]
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)  # [bq, bk]
        ds = p * (dp - delta_ref[pl.ds(start, bq)][:, None]) * cfg.scale
        dks = tuple(
            dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
            for dk, q in zip(dks, q_parts, strict=True)
        )
        return dks, dv

    lo = lax.div(jk * bk, bq) if cfg.causal else 0  # query blocks wholly above: skipped
    init = (
        tuple(jnp.zeros(r.shape, jnp.float32) for r in dk_refs),
        jnp.zeros(v.shape, jnp.float32),
    )
    dks, dv = lax.fori_loop(lo, num_qb, body, init)
    for r, dk in zip(dk_refs, dks, strict=True):
        r[...] = dk.astype(r.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, num_parts, cfg, seq_len, padded):
    p_ = num_parts
    q_refs, k_refs = refs[:p_], refs[p_ : 2 * p_]
    v_ref, do_ref, lse_ref, delta_ref = refs[2 * p_ : 2 * p_ + 4]
    dq_refs = refs[2 * p_ + 4 :]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    iq = pl.program_id(2)
    q_parts = [r[...] for r in q_refs]
    do = do_ref[...]  # [bq, dv]
    lse = lse_ref[...]
    delta = delta_ref[...]
    num_kb = k_refs[0].shape[0] // bk

    def body(j, dqs):
        start = pl.multiple_of(j * bk, bk)
        sc = _scores(q_parts, k_refs, start, bk, cfg.scale)
        mask = _mask(iq * bq, start, sc.shape, cfg.causal, seq_len, padded)
        if mask is not None:
            sc = jnp.where(mask, sc, -jnp.inf)
        p = jnp.exp(sc - lse[:, None])
        v = v_ref[pl.ds(start, bk), :]
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, None]) * cfg.scale).astype(q_parts[0].dtype)  # [bq, bk]
        return tuple(
            dq
            + lax.dot_general(
                ds, k_ref[pl.ds(start, bk), :], _NN, preferred_element_type=jnp.float32
            )
            for dq, k_ref in zip(dqs, k_refs, strict=True)
        )

    hi = num_kb
    if cfg.causal:
        hi = jnp.minimum(num_kb, lax.div((iq + 1) * bq + bk - 1, bk))
    dqs = lax.fori_loop(0, hi, body, tuple(jnp.zeros(r.shape, jnp.float32) for r in dq_refs))
    for r, dq in zip(dq_refs, dqs, strict=True):
        r[...] = dq.astype(r.dtype)


def _compiler_params(cfg: _Config):
    if cfg.interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu

    kw = {k: v for k, v in (("num_warps", cfg.num_warps), ("num_stages", cfg.num_stages)) if v}
    params = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # older jax
    return params(**kw) if kw else None


def _pad_seq(x, s_p):
    s = x.shape[1]
    return x if s == s_p else jnp.pad(x, ((0, 0), (0, s_p - s), (0, 0), (0, 0)))


def _pad_last(x, d_p):
    d = x.shape[-1]
    return x if d == d_p else jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_p - d)))


def _fwd(q, k, v, cfg: _Config):
    """-> (out [b, s, h, v] q.dtype, lse [b, h, s_p] float32)."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    s_p = -(-s // max(bq, bk)) * max(bq, bk)
    parts = _parts(dk)
    dv_p = pl.next_power_of_2(dv)
    qp, kp, vp = _pad_seq(q, s_p), _pad_seq(k, s_p), _pad_last(_pad_seq(v, s_p), dv_p)
    kernel = functools.partial(
        _fwd_kernel, num_parts=len(parts), cfg=cfg, seq_len=s, padded=s_p != s
    )
    q_specs = _part_specs(parts, lambda w: (None, bq, None, w), lambda p, i, j, x: (i, x, j, p))
    k_specs = _part_specs(parts, lambda w: (None, s_p, None, w), lambda p, i, j, x: (i, 0, j, p))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, s_p // bq),
        in_specs=[
            *q_specs,
            *k_specs,
            pl.BlockSpec((None, s_p, None, dv_p), lambda i, j, x: (i, 0, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dv_p), lambda i, j, x: (i, x, j, 0)),
            pl.BlockSpec((None, None, bq), lambda i, j, x: (i, j, x)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, s_p, h, dv_p), q.dtype),
            jax.ShapeDtypeStruct((b, h, s_p), jnp.float32),
        ],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="mla_flash_attention_fwd",
    )(*([qp] * len(parts)), *([kp] * len(parts)), vp)
    return out[:, :s, :, :dv], lse


def _bwd(q, k, v, out, lse, do, cfg: _Config):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    s_p = lse.shape[-1]
    if s_p % bq or s_p % bk:  # forward padding was for other blocks
        s_p = -(-s_p // max(bq, bk)) * max(bq, bk)
        pad = ((0, 0), (0, 0), (0, s_p - lse.shape[-1]))
        lse = jnp.pad(lse, pad, constant_values=jnp.inf)  # new padded rows: P = 0
    parts = _parts(dk)
    n = len(parts)
    dv_p = pl.next_power_of_2(dv)
    f32 = jnp.float32
    delta = jnp.einsum("bshv,bshv->bhs", out.astype(f32), do.astype(f32))  # D = rowsum(dO * O)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, s_p - s)))  # [b, h, s_p]
    qp, kp = _pad_seq(q, s_p), _pad_seq(k, s_p)
    vp = _pad_last(_pad_seq(v, s_p), dv_p)
    dop = _pad_last(_pad_seq(do.astype(q.dtype), s_p), dv_p)
    static = dict(num_parts=n, cfg=cfg, seq_len=s, padded=s_p != s)

    def full(w):
        return (None, s_p, None, w)

    def full_idx(p, i, j, x):
        return (i, 0, j, p)

    def blk(bx):
        return lambda w: (None, bx, None, w)

    def blk_idx(p, i, j, x):
        return (i, x, j, p)

    row_full = pl.BlockSpec((None, None, s_p), lambda i, j, x: (i, j, 0))
    common = dict(interpret=cfg.interpret, compiler_params=_compiler_params(cfg))

    # dK, dV: one program per key block, looping over query blocks (from the diagonal down).
    *dks, dv_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, **static),
        grid=(b, h, s_p // bk),
        in_specs=[
            *_part_specs(parts, full, full_idx),
            *_part_specs(parts, blk(bk), blk_idx),
            pl.BlockSpec((None, bk, None, dv_p), lambda i, j, x: (i, x, j, 0)),
            pl.BlockSpec((None, s_p, None, dv_p), lambda i, j, x: (i, 0, j, 0)),
            row_full,
            row_full,
        ],
        out_specs=[
            *[pl.BlockSpec((None, bk, None, w), lambda i, j, x: (i, x, j, 0)) for w in parts],
            pl.BlockSpec((None, bk, None, dv_p), lambda i, j, x: (i, x, j, 0)),
        ],
        out_shape=[
            *[jax.ShapeDtypeStruct((b, s_p, h, w), k.dtype) for w in parts],
            jax.ShapeDtypeStruct((b, s_p, h, dv_p), v.dtype),
        ],
        name="mla_flash_attention_dkdv",
        **common,
    )(*([qp] * n), *([kp] * n), vp, dop, lse, delta)

    # dQ: one program per query block, looping over key blocks up to the diagonal.
    row_blk = pl.BlockSpec((None, None, bq), lambda i, j, x: (i, j, x))
    dqs = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(b, h, s_p // bq),
        in_specs=[
            *_part_specs(parts, blk(bq), blk_idx),
            *_part_specs(parts, full, full_idx),
            pl.BlockSpec((None, s_p, None, dv_p), lambda i, j, x: (i, 0, j, 0)),
            pl.BlockSpec((None, bq, None, dv_p), lambda i, j, x: (i, x, j, 0)),
            row_blk,
            row_blk,
        ],
        out_specs=[pl.BlockSpec((None, bq, None, w), lambda i, j, x: (i, x, j, 0)) for w in parts],
        out_shape=[jax.ShapeDtypeStruct((b, s_p, h, w), q.dtype) for w in parts],
        name="mla_flash_attention_dq",
        **common,
    )(*([qp] * n), *([kp] * n), vp, dop, lse, delta)

    dq = jnp.concatenate(dqs, axis=-1)[:, :s] if n > 1 else dqs[0][:, :s]
    dk_ = jnp.concatenate(dks, axis=-1)[:, :s] if n > 1 else dks[0][:, :s]
    return dq, dk_, dv_out[:, :s, :, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
    return _fwd(q, k, v, cfg)[0]


def _flash_fwd(q, k, v, cfg: _Config):
    out, lse = _fwd(q, k, v, cfg)
    return out, (q, k, v, out, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, out, lse = res
    if cfg.backward == "reference":  # debug path: the vjp of the plain-jnp reference
        ref = functools.partial(flash_attention_reference, scale=cfg.scale, causal=cfg.causal)
        return jax.vjp(ref, q, k, v)[1](do)
    return _bwd(q, k, v, out, lse, do, cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int, s: int) -> int:
    """A power of two, at most the requested size and at most next_pow2(max(s, 16))."""
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"block sizes must be powers of two: {requested=}")
    return min(requested, max(16, pl.next_power_of_2(s)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "causal", "impl", "block_q", "block_k", "interpret", "backward", "block_sizes",
    ),
)  # fmt: skip
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    impl: str = "pallas",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backward: str = "pallas",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Flash attention (FlashAttention-2) for MLA prefill and training; differentiable.

    Args:
      q: [b, s, h, dk] queries, dk = n + r ([q_nope ; roped q_rope]).
      k: [b, s, h, dk] keys ([k_nope ; roped k_rope broadcast over heads]).
      v: [b, s, h, v] values (v may differ from dk).
      scale: softmax scale (python float), e.g. rope.softmax_scale(config).
      causal: query i attends keys j <= i; otherwise all s keys.
      impl: "pallas" (kernels) or "reference" (flash_attention_reference).
      block_q, block_k: forward tiles (powers of two; default BlockSizes; clamped for tiny s).
        s need not be a multiple: q/k/v are zero-padded (copied) to one and the tail masked.
      interpret: Pallas interpret mode; None means True on the CPU backend.
      backward: "pallas" (FlashAttention-2 dK/dV and dQ kernels) or "reference" (jax.vjp of
        flash_attention_reference, materialises [s, s]; a debug path).
      block_sizes: full tiling, including the backward blocks; block_q / block_k override it.

    Returns:
      [b, s, h, v] in q.dtype. Inputs of different float dtypes are promoted to a common one.
      Matmuls run in the input dtype with float32 accumulation; softmax statistics are float32.

    Raises:
      ValueError: on inconsistent shapes, non-power-of-two blocks, or an unknown impl/backward.
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b, s, h, dk]: {q.shape=} {k.shape=}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [b, s, h, v] matching q's [b, s, h]: {v.shape=} {q.shape=}")
    if q.shape[1] < 1:
        raise ValueError(f"need at least one position: {q.shape=}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point: {x.dtype=}")
    if impl == "reference":
        return flash_attention_reference(q, k, v, scale=scale, causal=causal)
    if impl != "pallas":
        raise ValueError(f'impl must be "pallas" or "reference": {impl=}')
    if backward not in ("pallas", "reference"):
        raise ValueError(f'backward must be "pallas" or "reference": {backward=}')
    bs = block_sizes or BlockSizes()
    s = q.shape[1]
    cfg = _Config(
        scale=float(scale),
        causal=bool(causal),
        block_q=_block(block_q or bs.block_q, s),
        block_k=_block(block_k or bs.block_k, s),
        block_q_bwd=_block(bs.block_q_bwd, s),
        block_k_bwd=_block(bs.block_k_bwd, s),
        interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret),
        backward=backward,
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
    )
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    out = _flash(q.astype(dtype), k.astype(dtype), v.astype(dtype), cfg)
    return out.astype(q.dtype)


def flash_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool = True
) -> jax.Array:
    """Plain-jnp attention (float32 softmax, materialises [b, h, s, s]): the specification.

    Same arguments and result ([b, s, h, v] in q.dtype) as flash_attention.
    """
    f32 = jnp.float32
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=f32, precision=hi)
    scores = scores * scale
    if causal:
        s = q.shape[1]
        mask = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]  # [s, t]: key t <= query s
        scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhst,bthv->bshv", probs.astype(v.dtype), v, preferred_element_type=f32,
                     precision=hi)  # fmt: skip
    return out.astype(q.dtype)
