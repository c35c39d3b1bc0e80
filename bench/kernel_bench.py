"""Times the Pallas kernels against their jnp references and checks that they agree.

  decode   latent_attention (absorbed-MLA split-K decode), DeepSeek-V3 shapes: h 128, c 512, r 64,
           s 1, bf16, b 1/8/32, t 1K..32K, every slot visible. Reports ms and achieved GB/s
           (cache bytes b*t*(c+r)*2 plus q and out, over the kernel time).
  prefill  flash_attention (causal), b 1, s 1K..8K, h 16/128, dk 192, dv 128, bf16. Reports ms and
           TFLOP/s of the causal forward (2 * b * h * s^2 / 2 * (dk + dv)); with --grad also the
           forward + backward (2.5x the forward's FLOPs counted, as FlashAttention-2 does).

Each line prints the max |pallas - reference| and OK/MISMATCH; a case whose reference would need
more than --ref_gb of score memory is timed without it (agreement then reads "ref skipped").
A failing case prints its error and the run continues. Needs a GPU; on CPU it exits unless
--interpret, which runs tiny shapes in Pallas interpret mode (a smoke test of this script).

Usage: python bench/kernel_bench.py [--suite decode|prefill|all] [--grad] [--iters 20] [--quick]
       python bench/kernel_bench.py --interpret     # CPU smoke run
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dsv3_jax.kernels import flash_attention as fa  # noqa: E402
from dsv3_jax.kernels import mla_decode as md  # noqa: E402


def timeit(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn(*args) in milliseconds (after warmup calls, which compile)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def agree(a, b, tol: float) -> str:
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    return f"maxerr {err:.2e} {'OK' if err <= tol else 'MISMATCH'}"


def bench_decode(args, interpret: bool) -> None:
    if interpret:
        h, c, r, dtype = 4, 32, 8, jnp.float32
        cases = [(b, t) for b in (1, 2) for t in (64, 100)]
    else:
        h, c, r, dtype = 128, 512, 64, jnp.bfloat16
        ts = (1024, 8192, 32768) if args.quick else (1024, 4096, 8192, 16384, 32768)
        cases = [(b, t) for b in (1, 8, 32) for t in ts]
    scale = 0.135234  # V3's softmax scale (192^-0.5 * mscale^2)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    print(f"\n== decode: latent_attention, s 1, h {h}, c {c}, r {r}, {jnp.dtype(dtype).name}")
    print(f"{'b':>3} {'t':>6} | {'pallas ms':>9} {'GB/s':>7} | {'ref ms':>8} {'GB/s':>7} | agree")
    for b, t in cases:
        try:
            ks = jax.random.split(jax.random.PRNGKey(b * 100003 + t), 4)
            q_c = jax.random.normal(ks[0], (b, 1, h, c), dtype)
            q_r = jax.random.normal(ks[1], (b, 1, h, r), dtype)
            c_kv = jax.random.normal(ks[2], (b, t, c), dtype)
            k_rope = jax.random.normal(ks[3], (b, t, r), dtype)
            pos = jnp.full((b, 1), t - 1, jnp.int32)
            kw = dict(scale=scale, interpret=interpret or None)
            kern = jax.jit(lambda *a: md.latent_attention(*a, **kw))
            ref = jax.jit(lambda *a: md.latent_attention(*a, impl="reference", **kw))
            inputs = (q_c, q_r, c_kv, k_rope, pos)
            ms = timeit(kern, *inputs, iters=args.iters)
            ref_gb = b * h * t * 4 * 3 / 1e9  # scores, exp, probs in f32
            ref_ms, check = float("nan"), "ref skipped"
            if ref_gb <= args.ref_gb:
                ref_ms = timeit(ref, *inputs, iters=args.iters)
                check = agree(kern(*inputs), ref(*inputs), tol)
            item = jnp.dtype(dtype).itemsize
            nbytes = b * t * (c + r) * item + b * h * (c + r) * item + b * h * c * 4
            print(
                f"{b:>3} {t:>6} | {ms:9.3f} {nbytes / ms / 1e6:7.0f} | "
                f"{ref_ms:8.3f} {nbytes / ref_ms / 1e6:7.0f} | {check}"
            )
        except Exception as e:  # keep going: one failing shape should not hide the others
            print(f"{b:>3} {t:>6} | FAILED {type(e).__name__}: {str(e)[:300]}")


def bench_prefill(args, interpret: bool) -> None:
    if interpret:
        dk, dv, dtype = 24, 8, jnp.float32
        cases = [(2, 33), (2, 64)]
        blocks = dict(block_q=16, block_k=16)
    else:
        dk, dv, dtype = 192, 128, jnp.bfloat16
        ss = (1024, 4096, 8192) if args.quick else (1024, 2048, 4096, 8192)
        cases = [(h, s) for h in (16, 128) for s in ss]
        blocks = {}
    scale = 0.135234
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    print(f"\n== prefill: flash_attention causal, b 1, dk {dk}, dv {dv}, {jnp.dtype(dtype).name}")
    mode = "fwd+bwd" if args.grad else "fwd"
    print(f"{'h':>4} {'s':>5} {mode:>7} | {'pallas ms':>9} {'TFLOP/s':>7} | {'ref ms':>8} "
          f"{'TFLOP/s':>7} | agree")  # fmt: skip
    for h, s in cases:
        try:
            ks = jax.random.split(jax.random.PRNGKey(h * 100003 + s), 3)
            q = jax.random.normal(ks[0], (1, s, h, dk), dtype)
            k = jax.random.normal(ks[1], (1, s, h, dk), dtype)
            v = jax.random.normal(ks[2], (1, s, h, dv), dtype)
            kw = dict(scale=scale, interpret=interpret or None, **blocks)

            def kern_fn(q, k, v):
                return fa.flash_attention(q, k, v, **kw)

            def ref_fn(q, k, v):
                return fa.flash_attention(q, k, v, impl="reference", **kw)

            flops = 2 * h * s * s / 2 * (dk + dv)
            if args.grad:
                flops *= 3.5  # forward + backward (2.5x forward)

                def with_grad(f):
                    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2))
                    return jax.jit(lambda q, k, v: (f(q, k, v), g(q, k, v)))

                kern, ref = with_grad(kern_fn), with_grad(ref_fn)
            else:
                kern, ref = jax.jit(kern_fn), jax.jit(ref_fn)
            ms = timeit(kern, q, k, v, iters=args.iters)
            ref_gb = h * s * s * (4 + 4 + 2) * (3 if args.grad else 1) / 1e9
            ref_ms, check = float("nan"), "ref skipped"
            if ref_gb <= args.ref_gb:
                ref_ms = timeit(ref, q, k, v, iters=args.iters)
                got, want = kern(q, k, v), ref(q, k, v)
                if args.grad:  # outputs, then dq, dk, dv (scaled: grads of a sum are large)
                    checks = [agree(got[0], want[0], tol)]
                    for g, w in zip(got[1], want[1], strict=True):
                        norm = float(jnp.max(jnp.abs(w.astype(jnp.float32)))) or 1.0
                        checks.append(agree(g / norm, w / norm, tol))
                    ok = all(c.endswith("OK") for c in checks)
                    errs = " ".join(c.split()[1] for c in checks)
                    check = f"out,dq/max,dk/max,dv/max maxerr {errs} {'OK' if ok else 'MISMATCH'}"
                else:
                    check = agree(got, want, tol)
            print(
                f"{h:>4} {s:>5} {mode:>7} | {ms:9.3f} {flops / ms / 1e9:7.1f} | "
                f"{ref_ms:8.3f} {flops / ref_ms / 1e9:7.1f} | {check}"
            )
        except Exception as e:
            print(f"{h:>4} {s:>5} {mode:>7} | FAILED {type(e).__name__}: {str(e)[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("decode", "prefill", "all"), default="all")
    parser.add_argument("--interpret", action="store_true", help="tiny shapes, interpret mode")
    parser.add_argument("--grad", action="store_true", help="prefill: time forward + backward")
    parser.add_argument("--quick", action="store_true", help="fewer GPU shapes")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ref_gb", type=float, default=24.0, help="skip larger references")
    args = parser.parse_args()

    backend = jax.default_backend()
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
    if backend != "gpu" and not args.interpret:
        sys.exit(
            f"kernel_bench: no GPU (backend {backend!r}); the Pallas kernels target Triton on GPU."
            " Run with --interpret for a tiny CPU smoke run."
        )
    if args.interpret:
        args.iters = min(args.iters, 2)
    if args.suite in ("decode", "all"):
        bench_decode(args, args.interpret)
    if args.suite in ("prefill", "all"):
        bench_prefill(args, args.interpret)


if __name__ == "__main__":
    main()
