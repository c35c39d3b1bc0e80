"""dsv3_jax.fp8 and kernels/fp8_gemm against float64 numpy (report section 3.3).

Error model (e4m3: 3 mantissa bits, unit roundoff u = 2^-4; subnormal spacing 2^-9 below 2^-6).
Quantising x with block scale s gives x' = s * q with |x' - x| <= u |x| + 2^-10 s (clipping to
448 only removes the rounding overshoot of amax / s). A product of two quantised operands then
satisfies, element by element,
    |a' b' - a b| <= ((1 + u)|a| + d_a)((1 + u)|b| + d_b) - |a||b|,   d = 2^-10 s,
and the GEMM adds float32 accumulation error (at most K 2^-24 sum|a'||b'|, with promotion to
float32 every 128 elements). :func:`_bound` is that sum over K; every GEMM here and the gradients
of the FP8 linear stay inside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax import fp8
from dsv3_jax.kernels import fp8_gemm

U = 2.0**-4
F8 = ml_dtypes.float8_e4m3fn


def _ref_quantize(x: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy: scale = amax / 448 per ceil-div block, values clip(x / scale) -> e4m3."""
    br, bc = block
    *lead, r, c = x.shape
    gr, gc = -(-r // br), -(-c // bc)
    scale = np.ones((*lead, gr, gc))
    for i in range(gr):
        for j in range(gc):
            amax = np.abs(x[..., i * br : (i + 1) * br, j * bc : (j + 1) * bc]).max(axis=(-2, -1))
            scale[..., i, j] = np.where(amax > 0, amax / 448.0, 1.0)
    full = np.repeat(np.repeat(scale, br, -2), bc, -1)[..., :r, :c]
    return np.clip(x / full, -448, 448).astype(F8), scale


def _deq(values, scale, block) -> np.ndarray:
    br, bc = block
    r, c = values.shape[-2:]
    s = np.repeat(np.repeat(np.asarray(scale, np.float64), br, -2), bc, -1)[..., :r, :c]
    return np.asarray(values).astype(np.float64) * s


def _bound(a, a_s, b, b_s, a_block=(1, 128), b_block=(128, 128)) -> np.ndarray:
    """The module docstring's elementwise bound on |gemm(quantised) - a @ b.T| (float64)."""
    da = 2.0**-10 * np.repeat(np.repeat(np.asarray(a_s, np.float64), a_block[0], 0), 128, 1)
    db = 2.0**-10 * np.repeat(np.repeat(np.asarray(b_s, np.float64), b_block[0], 0), 128, 1)
    da, db = da[: a.shape[0], : a.shape[1]], db[: b.shape[0], : b.shape[1]]
    aa, bb = np.abs(a), np.abs(b)
    quant = ((1 + U) * aa + da) @ ((1 + U) * bb + db).T - aa @ bb.T
    return quant + a.shape[1] * 2.0**-24 * (((1 + U) * aa + da) @ ((1 + U) * bb + db).T)


def _rand(shape, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    # per-row magnitudes over 6 decades: blocks with very different scales, subnormals inside
    return rng.standard_normal(shape) * scale * 10.0 ** rng.uniform(-3, 3, (*shape[:-1], 1))


@pytest.mark.parametrize("shape,block", [((37, 300), (1, 128)), ((200, 300), (128, 128)),
                                         ((3, 130, 256), (128, 128)), ((1, 128), (1, 128))])  # fmt: skip
def test_quantize_matches_float64_reference(shape, block):
    x = _rand(shape, 0)
    q, s = fp8.quantize(jnp.asarray(x, jnp.float32), block)
    rq, rs = _ref_quantize(np.asarray(x, np.float32).astype(np.float64), block)
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    assert s.shape == rs.shape == fp8.scale_shape(shape, block)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=2e-7)
    got, want = np.asarray(q).astype(np.float64), rq.astype(np.float64)
    # float32 vs float64 division may round a value on an e4m3 tie differently: one ulp, rarely
    differ = got != want
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(got[differ], want[differ], rtol=2 * U)
    deq = np.asarray(fp8.dequantize(q, s, block), np.float64)
    full_s = np.repeat(np.repeat(rs, block[0], -2), block[1], -1)[..., : shape[-2], : shape[-1]]
    assert np.all(np.abs(deq - x) <= U * np.abs(x) + 2.0**-10 * full_s * (1 + 1e-6))


def test_quantize_clips_at_range_limit_and_zero_blocks_get_finite_scales():
    # amax / (amax / 448) rounds above 448 in float32 for some amax: the clip keeps it finite
    rng = np.random.default_rng(1)
    amax = rng.uniform(1, 2, 20000).astype(np.float32)
    over = (amax / (amax / np.float32(448))) > 448
    assert over.any()  # the trap exists in float32
    assert np.isnan(np.float32(464.1).astype(F8))  # and a plain cast would make it NaN
    x = np.zeros((over.sum(), 256), np.float32)
    x[:, 5] = amax[over]
    x[:, 200] = -amax[over]
    q, s = fp8.quantize(jnp.asarray(x), (1, 128))
    qf = np.asarray(q).astype(np.float32)
    assert np.isfinite(qf).all()
    np.testing.assert_array_equal(qf[:, 5], 448)
    np.testing.assert_array_equal(qf[:, 200], -448)
    np.testing.assert_array_equal(np.asarray(s)[:, 0], np.asarray(s)[:, 1])
    z = jnp.zeros((4, 300))
    zq, zs = fp8.quantize(z, (128, 128))
    assert np.isfinite(np.asarray(zs)).all() and (np.asarray(zs) > 0).all()
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(zq, zs, (128, 128))), 0)


def test_power_of_two_scales():
    x = _rand((64, 300), 2)
    q, s = fp8.quantize(jnp.asarray(x, jnp.float32), (1, 128), power_of_two=True)
    s = np.asarray(s, np.float64)
    _, exact = _ref_quantize(np.asarray(x, np.float32).astype(np.float64), (1, 128))
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)  # powers of two
    assert np.all(s >= exact * (1 - 1e-7)) and np.all(s < 2 * exact)  # rounded up, < 2x
    qf = np.asarray(q).astype(np.float64)
    assert np.isfinite(qf).all() and np.abs(qf).max() <= 448
    deq = _deq(q, s, (1, 128))
    full_s = np.repeat(s, 128, -1)[:, :300]
    assert np.all(np.abs(deq - x) <= U * np.abs(x) + 2.0**-10 * full_s * (1 + 1e-6))


def test_dequantize_rejects_a_wrong_scale_grid():
    q, s = fp8.quantize(jnp.ones((130, 300)), (128, 128))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        fp8.dequantize(q, s[:, :2], (128, 128))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize(
    "m,n,k,b_block", [(37, 200, 300, (128, 128)), (1, 128, 128, (128, 128)),
                      (64, 130, 257, (1, 128)), (5, 7, 1000, (128, 128))],
)  # fmt: skip
def test_gemm_against_float64(impl, m, n, k, b_block):
    a, b = _rand((m, k), 3), _rand((n, k), 4, scale=0.01)
    aq, a_s = fp8.quantize(jnp.asarray(a, jnp.float32), (1, 128))
    bq, b_s = fp8.quantize(jnp.asarray(b, jnp.float32), b_block)
    out = fp8.gemm(aq, a_s, bq, b_s, b_block=b_block, impl=impl)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    # 1. it is the product of the quantised operands up to float32 accumulation
    ad, bd = _deq(aq, a_s, (1, 128)), _deq(bq, b_s, b_block)
    assert np.all(np.abs(out - ad @ bd.T) <= k * 2.0**-24 * (np.abs(ad) @ np.abs(bd).T) + 1e-30)
    # 2. against the unquantised inputs it stays within the e4m3 error model
    assert np.all(np.abs(out - a @ b.T) <= _bound(a, a_s, b, b_s, (1, 128), b_block))


def test_pallas_equals_reference_batched_and_bf16_out():
    a, b = _rand((2, 40, 300), 5), _rand((2, 200, 300), 6)
    aq, a_s = fp8.quantize(jnp.asarray(a, jnp.float32), (1, 128))
    bq, b_s = fp8.quantize(jnp.asarray(b, jnp.float32), (128, 128))
    ref = fp8.gemm(aq, a_s, bq, b_s, jnp.float32, impl="reference")
    pal = fp8.gemm(aq, a_s, bq, b_s, jnp.float32, impl="pallas")
    scale = np.abs(_deq(aq, a_s, (1, 128))) @ np.abs(_deq(bq, b_s, (128, 128))).swapaxes(-1, -2)
    assert np.all(np.abs(np.asarray(ref) - np.asarray(pal)) <= 300 * 2.0**-24 * scale + 1e-30)
    out = fp8.gemm(aq, a_s, bq, b_s, jnp.bfloat16, impl="pallas")
    assert out.dtype == jnp.bfloat16


def test_gemm_errors_name_the_operand():
    aq, a_s = fp8.quantize(jnp.ones((4, 300)), (1, 128))
    bq, b_s = fp8.quantize(jnp.ones((8, 300)), (128, 128))
    with pytest.raises(ValueError, match="b_scale_inv shape"):
        fp8.gemm(aq, a_s, bq, b_s[:, :2])
    with pytest.raises(ValueError, match="a must be float8_e4m3fn"):
        fp8.gemm(aq.astype(jnp.float32), a_s, bq, b_s)
    with pytest.raises(ValueError, match="differ in K"):
        fp8.gemm(aq[:, :200], a_s[:, :2], bq, b_s)
    with pytest.raises(ValueError, match="impl"):
        fp8.gemm(aq, a_s, bq, b_s, impl="cuda")


def test_limited_accumulator_error_grows_with_k_and_promotion_bounds_it():
    """Report 3.3.2: H800 tensor cores keep about 14 bits of the accumulator; without promotion
    the error of a K = 4096 GEMM reaches about 2%. Our model (14 significant bits, truncated after
    every addition) on positive inputs (no cancellation; the worst case for truncation) measures
    0.6% / 2.3% / 8.1% at K = 256 / 1024 / 4096 without promotion and below 0.35% at every K when
    the partial sums move to float32 every 128 elements."""
    rng = np.random.default_rng(7)
    run = jax.jit(fp8_gemm.accumulate_limited, static_argnums=(2, 3))
    errors = {}
    for k in (256, 1024, 4096):
        a, b = rng.uniform(0, 1, (16, k)), rng.uniform(0, 1, (16, k))
        ref = a @ b.T
        for interval in (None, 128):
            got = np.asarray(run(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 14,
                                 interval), np.float64)  # fmt: skip
            errors[k, interval] = (np.abs(got - ref) / ref).max()
    assert errors[256, None] < errors[1024, None] < errors[4096, None]
    assert errors[4096, None] > 0.01  # about 2% in the report
    assert max(errors[k, 128] for k in (256, 1024, 4096)) < 0.0035
    # the 14-bit GEMM with promotion every 128 (DeepSeek's kernel) stays within 2^-8 of float32
    a, b = rng.uniform(0, 1, (16, 4096)), rng.uniform(0, 1, (24, 4096))
    aq, a_s = fp8.quantize(jnp.asarray(a, jnp.float32), (1, 128))
    bq, b_s = fp8.quantize(jnp.asarray(b, jnp.float32), (128, 128))
    full = np.asarray(fp8_gemm.gemm_reference(aq, a_s, bq, b_s), np.float64)
    lim = np.asarray(fp8_gemm.gemm_reference(aq, a_s, bq, b_s, accumulator_bits=14), np.float64)
    assert 0 < (np.abs(lim - full) / full).max() < 2.0**-8


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_fp8_linear_gradients_within_error_model(impl):
    """Fprop, Dgrad and Wgrad each stay inside the quantised-product bound of their operands'
    tilings (x 1x128 / w 128x128; dy 1x128 / w 128x128; x and dy 128x1 along tokens)."""
    m, k, n = 150, 300, 200
    x, w = _rand((m, k), 8), _rand((k, n), 9, scale=0.02)
    dy = _rand((m, n), 10)
    y, vjp = jax.vjp(
        lambda x, w: fp8.linear(x, w, jnp.float32, impl),
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
    )  # fmt: skip
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    assert dx.dtype == dw.dtype == jnp.float32

    def scales(v, block):
        return np.asarray(fp8.quantize(jnp.asarray(v, jnp.float32), block)[1])

    _, w_s = fp8.quantize(jnp.asarray(w.T, jnp.float32), (128, 128))
    x_s, dy_s = scales(x, (1, 128)), scales(dy, (1, 128))
    y_bound = _bound(x, x_s, w.T, w_s)
    assert np.all(np.abs(np.asarray(y, np.float64) - x @ w) <= y_bound)
    dx_bound = _bound(dy, dy_s, w, np.asarray(w_s).T)
    assert np.all(np.abs(np.asarray(dx, np.float64) - dy @ w.T) <= dx_bound)
    xt_s, dyt_s = scales(x.T, (1, 128)), scales(dy.T, (1, 128))
    dw_bound = _bound(x.T, xt_s, dy.T, dyt_s, (1, 128), (1, 128))
    assert np.all(np.abs(np.asarray(dw, np.float64) - x.T @ dy) <= dw_bound)
    if impl == "pallas":  # the kernel computes what the reference does, forward and backward
        y_r, vjp_r = jax.vjp(
            lambda x, w: fp8.linear(x, w, jnp.float32, "reference"),
            jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
        )  # fmt: skip
        for got, want in zip((y, dx, dw), (y_r, *vjp_r(jnp.asarray(dy, jnp.float32))), strict=True):
            err = np.abs(np.asarray(got) - np.asarray(want)).max()
            assert err <= 1e-5 * np.abs(np.asarray(want)).max(), err
    # and the error is that of FP8, not of a bug that happens to fit a loose bound
    for got, want in ((y, x @ w), (dx, dy @ w.T), (dw, x.T @ dy)):
        rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert 1e-3 < rel < 0.05, rel


def test_fp8_bench_runs_and_checks_the_kernel(monkeypatch, capsys):
    import runpy

    from conftest import ROOT

    monkeypatch.setattr("sys.argv", ["fp8_bench.py", "--iters", "1", "--shapes", "40x300x130"])
    runpy.run_path(str(ROOT / "bench" / "fp8_bench.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "M 40 x K 300 x N 130: pallas vs reference" in out and " OK" in out, out
    assert "MISMATCH" not in out and "fp8 reference (jnp)" in out
