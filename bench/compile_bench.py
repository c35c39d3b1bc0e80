"""Compile time of the train step against depth, and the memory each remat policy saves.

1. Compile time: ``train_lib.train_step`` (AdamW, MTP, bias update) lowered and compiled for
   DeepSeek-V3's layer structure (``first_k_dense_replace=3`` dense layers, then MoE layers, one
   MTP module) at a reduced width, with 4 and with 61 layers side by side. ``model._stack`` /
   ``_run_stack`` scan one layer body per stack, so the program, and its compile time, do not grow
   with depth. The inputs are abstract (``nnx.eval_shape``): nothing is allocated.
2. Remat memory: XLA's ``memory_analysis().temp_size_in_bytes`` of the same compiled step for each
   ``ModelConfig.remat`` policy (dsv3_jax.model.REMAT_POLICIES) on a small config; temp bytes are
   the activations kept for the backward pass plus scratch (parameters, optimizer state and the
   batch are arguments, not temps).

Usage: python bench/compile_bench.py [--layers 4,61] [--hidden 64] [--batch 8] [--seq_len 64]
  [--no_remat]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dsv3_jax import sharding, train_lib  # noqa: E402
from dsv3_jax.config import REMAT_NAMES, ModelConfig  # noqa: E402
from dsv3_jax.model import DeepseekV3  # noqa: E402


def v3_structure(num_hidden_layers: int = 61, hidden: int = 64, **kw) -> ModelConfig:
    """DeepSeek-V3's structure (3 dense layers first, MoE after, 1 MTP module, 8 of 256 experts
    routed by group, MLA with q/kv LoRA and decoupled RoPE) at a reduced width."""
    fields = dict(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, num_hidden_layers=num_hidden_layers,
        first_k_dense_replace=min(3, num_hidden_layers), num_nextn_predict_layers=1,
        num_attention_heads=2, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=4096, rope_scaling=None,
        moe_impl="blocked",
    )  # fmt: skip
    return ModelConfig(**{**fields, **kw})


def compile_seconds(config: ModelConfig, batch: int, seq_len: int) -> tuple[float, float, float]:
    """(lower, compile) wall seconds and the compile's CPU seconds (this process, all threads:
    the figure that shared cores do not inflate) of the train step (caches off: a cold compile)."""
    start = time.perf_counter()
    lowered = train_lib.lower_train_step(config, batch, seq_len)
    mid, cpu = time.perf_counter(), time.process_time()
    lowered.compile()
    return mid - start, time.perf_counter() - mid, time.process_time() - cpu


def remat_temp_bytes(config: ModelConfig, batch: int, seq_len: int) -> dict[str, int]:
    """XLA temp bytes of the compiled train step for each ModelConfig.remat policy."""
    return {
        name: train_lib.lower_train_step(config.replace(remat=name), batch, seq_len)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
        for name in REMAT_NAMES
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="4,61", help="depths to compile, comma-separated")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--no_remat", action="store_true", help="skip the remat memory table")
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(
        f"train_step compile time, V3 structure (3 dense + MoE layers + 1 MTP), hidden "
        f"{args.hidden}, batch {args.batch} x seq {args.seq_len}:"
    )
    print(f"{'layers':>7} {'params':>12} {'lower s':>8} {'compile s':>10} {'compile CPU s':>14}")
    for n in (int(x) for x in args.layers.split(",")):
        config = v3_structure(n, args.hidden)
        lower_s, compile_s, cpu_s = compile_seconds(config, args.batch, args.seq_len)
        params = config_params(config)
        print(f"{n:>7} {params:>12,} {lower_s:>8.1f} {compile_s:>10.1f} {cpu_s:>14.1f}")
    if args.no_remat:
        return
    config = v3_structure(4, args.hidden)
    print(
        f"\nremat policies: XLA temp bytes of the train step (V3 structure, 4 layers, hidden "
        f"{args.hidden}, batch {args.batch} x seq {args.seq_len}, float32):"
    )
    temps = remat_temp_bytes(config, args.batch, args.seq_len)
    for name, temp in temps.items():
        print(f"{name:>10} {temp / 2**20:10.2f} MiB  ({temp / temps['none']:.0%} of none)")


def config_params(config: ModelConfig) -> int:
    with sharding.no_mesh():
        abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


if __name__ == "__main__":
    main()
