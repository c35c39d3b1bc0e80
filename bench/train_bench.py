"""Training speed: dsv3_jax vs HF transformers, same model and batch, alternating rounds in one run.

python bench/train_bench.py [--hf_python=.venv-hf/bin/python] [--rounds=3] [--steps=3]

Model (``bench_config``): vocab 8192, hidden 256, 4 layers (1 dense), 8 heads, q_lora 128,
kv_lora 64, qk_nope 32, qk_rope 16, v_head 32, 16 routed experts in 4 groups (top-2 groups),
top-4, expert width 128, 1 shared expert, dense width 512, one MTP module; float32, random
weights (``init_model``, initializer_range 0.02). Batch ``--batch`` x ``--seq`` tokens
(default 8 x 256): windows of s + 1 random ids, inputs [:, :-1], targets [:, 1:].

Sides (each a train step: forward, backward, optimizer update; timings exclude compilation):
  * ours (MTP): the real ``dsv3_jax.train_lib.train_step``: CE + 0.3 MTP CE + balance loss,
    global-norm clipping + AdamW, the correction-bias update.
  * ours (plain): the work HF does: next-token CE of the main model only, ``optax.adamw``, no MTP,
    no clipping (the MoE layers still route with their biases; the balance loss is not used).
  * HF: ``bench/hf_train.py`` in the torch venv: DeepseekV3ForCausalLM loaded from our weights
    (``convert_hf.save_hf``; HF ignores the MTP layer), eager attention, default experts
    implementation, ``torch.optim.AdamW``, ``F.cross_entropy``; torch threads = CPU count.
Each round runs ``--steps`` timed steps of every side in turn (the HF process waits on stdin
meanwhile); a side's speed is batch * seq / its median step time over all rounds.

Model FLOPs (PaLM convention, Chowdhery et al. 2022, appendix B; no causal halving):
  per token 6 * N + 6 * L * h * (qk_head_dim + v_head_dim) * s, where N = activated parameters
  without the input embedding (a lookup): attention, dense MLP, shared experts, router, norms, the
  output head, and of the routed experts only the top-k share (k / e of their weights); L layers,
  h heads, s the sequence length (the attention term is PaLM's 12 * L * H * Q * T with the query
  and value head widths of MLA). With MTP the module adds, for its b * (s - 1) tokens, its own N
  (eh_proj, its decoder layer with top-k experts, its norms) plus the shared output head again,
  and one layer's attention. MFU = model FLOPs per second / peak, the peak being the best
  float32 ``jnp.dot`` of ``--peak_size`` cubed matrices measured in each round (best kept).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsv3_jax import ModelConfig, init_model, train_lib  # noqa: E402
from dsv3_jax.convert_hf import save_hf  # noqa: E402

_HF_PYTHON = flags.DEFINE_string(
    "hf_python", os.path.join(ROOT, ".venv-hf/bin/python"), "Python with torch + transformers."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per side per round.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence (inputs; windows are seq + 1).")
_PEAK = flags.DEFINE_integer("peak_size", 2048, "Matrix size of the peak float32 jnp.dot.")
_NO_HF = flags.DEFINE_bool("no_hf", False, "Time dsv3_jax only (no torch venv needed).")
_LR = 1e-4


def bench_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
        num_nextn_predict_layers=1, max_position_embeddings=4096, rope_scaling=None,
        initializer_range=0.02, dtype="float32", param_dtype="float32",
    )  # fmt: skip


# ----------------------------------------------------------------------------- FLOPs
def activated_params(params: nnx.State, config: ModelConfig) -> dict[str, int]:
    """Activated parameters per token: {"embed", "head", "main" (no embedding, head included),
    "mtp" (MTP modules, head excluded)}; routed experts count k / e of their weights."""
    share = config.num_experts_per_tok / config.n_routed_experts
    out = {"embed": 0, "head": 0, "main": 0, "mtp": 0}
    for path, x in nnx.to_flat_state(params):
        names = [str(p) for p in path]
        n = int(np.prod(x.shape))
        if names[-1] in ("gate_proj", "up_proj", "down_proj"):  # routed experts [(l,) e, i, o]
            n = int(round(n * share))
        if names[0] == "embed_tokens":
            out["embed"] += n
        elif names[0] == "mtp":
            out["mtp"] += n
        else:
            out["main"] += n
            if names[0] == "lm_head":
                out["head"] += n
    return out


def model_flops(params: nnx.State, config: ModelConfig, b: int, s: int, mtp: bool) -> float:
    """Model FLOPs of one train step (module docstring)."""
    n = activated_params(params, config)
    attn_per_layer = 6 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    flops = b * s * (6 * n["main"] + attn_per_layer * config.num_hidden_layers * s)
    if mtp:
        t = s - 1
        flops += b * t * (6 * (n["mtp"] + n["head"]) + attn_per_layer * t)
    return float(flops)


def matmul_peak(size: int, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a size^3 jnp.dot on this backend."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------- our two steps
def plain_step_fn(tx):
    """Next-token CE of the main model and ``tx`` (AdamW): the work HF's side does."""

    def step(graphdef, params, biases, opt_state, tokens):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, biases)
            out = model.forward(tokens[:, :-1])
            total, count = train_lib.cross_entropy(out.logits, tokens[:, 1:])
            return total / count

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, static_argnums=0, donate_argnums=(1, 3))


class Ours:
    """One of our train steps with its state; ``run(n)`` returns n step times (seconds)."""

    def __init__(self, model, tokens, mtp: bool):
        self.tokens, self.mtp = tokens, mtp
        self.graphdef, self.params, self.biases = train_lib.split_model(model)
        if mtp:
            self.tx = train_lib.make_optimizer(_LR)
            self.weights = train_lib.LossWeights()
        else:
            self.tx = optax.adamw(_LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
            self.step = plain_step_fn(self.tx)
        self.opt_state = train_lib.init_opt_state(self.tx, self.params)
        self.loss = self.first_loss = None
        self.run(2)  # compile + warm-up

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            if self.mtp:
                self.params, self.biases, self.opt_state, metrics = train_lib.train_step(
                    self.graphdef, self.tx, self.weights, self.params, self.biases,
                    self.opt_state, self.tokens,
                )  # fmt: skip
                loss = metrics["loss"]
            else:
                self.params, self.opt_state, loss = self.step(
                    self.graphdef, self.params, self.biases, self.opt_state, self.tokens
                )
            self.loss = float(loss)  # waits for the step
            self.first_loss = self.loss if self.first_loss is None else self.first_loss
            times.append(time.perf_counter() - start)
        return times


# ----------------------------------------------------------------------------- HF side
class HF:
    def __init__(self, weights_dir: str, tokens: np.ndarray, tmp: str):
        if not os.path.exists(_HF_PYTHON.value):
            sys.exit(f"error: no HF venv at {_HF_PYTHON.value}; run `make bench-train`")
        spec = {"weights_dir": weights_dir, "tokens": tokens.tolist(),
                "threads": os.cpu_count(), "lr": _LR}  # fmt: skip
        spec_path = os.path.join(tmp, "spec.json")
        json.dump(spec, open(spec_path, "w"))
        self.proc = subprocess.Popen(
            [_HF_PYTHON.value, os.path.join(ROOT, "bench/hf_train.py"), "--spec", spec_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.info = self._read()
        self.loss = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"error: the HF process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        out = self._read()
        self.loss = out["loss"]
        return out["seconds"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


# ----------------------------------------------------------------------------- main
def main(argv):
    del argv
    config = bench_config()
    b, s = _BATCH.value, _SEQ.value
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (b, s + 1)).astype(np.int32)
    model = init_model(config, seed=0, mtp=True)
    plain_model = init_model(config, seed=0, mtp=False)  # the same main-model weights
    np.testing.assert_array_equal(
        model.lm_head.kernel[...], plain_model.lm_head.kernel[...], "same weights"
    )
    params = nnx.state(model, nnx.Param)
    flops = {
        "ours (MTP)": model_flops(params, config, b, s, mtp=True),
        "ours (plain)": model_flops(params, config, b, s, mtp=False),
        "HF": model_flops(params, config, b, s, mtp=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        if not _NO_HF.value:
            save_hf(model, os.path.join(tmp, "hf"), progress=False)
            sides["HF"] = HF(os.path.join(tmp, "hf"), tokens, tmp)
        ids = jnp.asarray(tokens)
        sides["ours (MTP)"] = Ours(model, ids, mtp=True)
        sides["ours (plain)"] = Ours(plain_model, ids, mtp=False)
        times = {name: [] for name in sides}
        peak = 0.0
        for r in range(_ROUNDS.value):
            peak = max(peak, matmul_peak(_PEAK.value))
            for name, side in sides.items():
                times[name] += side.run(_STEPS.value)
            print(f"round {r + 1}: " + ", ".join(
                f"{name} {b * s / statistics.median(t[-_STEPS.value:]):.0f} tok/s"
                for name, t in times.items()
            ), flush=True)  # fmt: skip
        if "HF" in sides:
            sides["HF"].close()
    tps = {name: b * s / statistics.median(t) for name, t in times.items()}
    hf = sides.get("HF")
    lines = [
        f"model: bench config (d={config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, vocab "
        f"{config.vocab_size}), float32; batch {b} x {s} tokens; {_ROUNDS.value} alternating "
        f"rounds of {_STEPS.value} steps, median step",
        f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} cores)"
        + (
            f" vs torch {hf.info['torch']} ({hf.info['threads']} threads) + transformers "
            f"{hf.info['transformers']} (experts: {hf.info['experts']}, attention: eager)"
            if hf
            else ""
        ),  # fmt: skip
        f"float32 matmul peak ({_PEAK.value}^3 jnp.dot, best): {peak:.1f} GFLOP/s",
        f"{'side':>12} | {'tok/s':>7} | {'vs HF':>6} | {'model GFLOP/step':>16} | "
        f"{'GFLOP/s':>7} | {'MFU':>5} | last loss",
    ]
    for name, t in tps.items():
        side = sides[name]
        ratio = f"{t / tps['HF']:5.2f}x" if "HF" in tps else "   n/a"
        achieved = flops[name] * t / (b * s) / 1e9
        lines.append(
            f"{name:>12} | {t:7.0f} | {ratio} | {flops[name] / 1e9:16.1f} | {achieved:7.1f} | "
            f"{achieved / peak:5.1%} | {side.loss:.4f}"
        )
    if hf:
        lines.append(
            f"loss of the first step (same weights and batch): ours (plain) "
            f"{sides['ours (plain)'].first_loss:.5f}, HF {hf.info['first_loss']:.5f}"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
