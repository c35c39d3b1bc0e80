"""FP8 block-scaled GEMM (dsv3_jax.fp8.gemm): correctness of the Pallas kernel and speed.

On a GPU: TFLOP/s (2 M N K / time) of the Pallas FP8 GEMM (inputs already quantised: e4m3 values
with 1x128 / 128x128 scales) against bf16 ``jnp.dot`` (float32 accumulation) on DeepSeek-V3
shapes 4096x7168x2048 and 4096x2048x7168 (M x K x N: tokens x in x out), plus the jnp reference.
On CPU (no GPU here): the Pallas kernel in interpret mode checked against the reference, and the
reference's speed against float32 ``jnp.dot`` at reduced shapes (interpret mode is an emulator:
its speed means nothing).

Every line prints the max |pallas - reference| relative to max |reference| and OK/MISMATCH
(tolerance 1e-5: both sum float32 partials in chunk order; only the partial dots' summation order
may differ). Usage: python bench/fp8_bench.py [--iters 10] [--shapes 4096x7168x2048,...]
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kernel_bench import timeit  # noqa: E402  (median ms after warm-up calls)

from dsv3_jax import fp8  # noqa: E402

GPU_SHAPES = "4096x7168x2048,4096x2048x7168"
CPU_SHAPES = "512x1024x512,512x512x1024"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--shapes", default=None, help="MxKxN list (default: GPU or CPU set)")
    args = p.parse_args()
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    shapes = args.shapes or (CPU_SHAPES if on_cpu else GPU_SHAPES)
    print(f"backend {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    rng = np.random.default_rng(0)
    for spec in shapes.split(","):
        m, k, n = (int(v) for v in spec.split("x"))
        flops = 2 * m * n * k
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32)
        aq, a_s = fp8.quantize(a, fp8.ACT_BLOCK)
        bq, b_s = fp8.quantize(b, fp8.WEIGHT_BLOCK)
        ref_fn = jax.jit(lambda *o: fp8.gemm(*o, impl="reference"))
        pal_fn = jax.jit(lambda *o: fp8.gemm(*o, impl="pallas"))
        ref = ref_fn(aq, a_s, bq, b_s)
        pal = pal_fn(aq, a_s, bq, b_s)
        err = float(jnp.max(jnp.abs(pal - ref)) / jnp.max(jnp.abs(ref)))
        print(f"\n== M {m} x K {k} x N {n}: pallas vs reference {err:.1e} "
              f"{'OK' if err <= 1e-5 else 'MISMATCH'}")  # fmt: skip
        dense_dtype = jnp.float32 if on_cpu else jnp.bfloat16
        a_d, b_d = a.astype(dense_dtype), b.T.astype(dense_dtype)
        dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
        rows = [(f"jnp.dot {jnp.dtype(dense_dtype).name}", timeit(dense, a_d, b_d, iters=args.iters)),
                ("fp8 reference (jnp)", timeit(ref_fn, aq, a_s, bq, b_s, iters=args.iters))]  # fmt: skip
        if not on_cpu:
            rows.append(("fp8 pallas", timeit(pal_fn, aq, a_s, bq, b_s, iters=args.iters)))
        for name, ms in rows:
            print(f"  {name:24s} {ms:9.2f} ms  {flops / ms / 1e9:8.3f} TFLOP/s")
        if on_cpu:
            print("  fp8 pallas               (interpret mode on CPU: checked, not timed)")


if __name__ == "__main__":
    main()
