"""A small DeepSeek-V3 checkpoint in the official FP8 layout, built deterministically, and an
independent float64 dequantisation of it.

Imported by tests/goldens/make_goldens.py (HF venv: computes the transformers reference from
``dequantize_f64`` weights) and by tests/test_convert.py (project venv: converts the same bytes).
numpy + safetensors + ml_dtypes only.

What it covers: float8_e4m3fn weights with float32 ``weight_scale_inv`` in 128 x 128 blocks, every
weight dimension that crosses 128 is not a multiple of it (partial edge blocks, e.g.
kv_a_proj_with_mqa 152 rows -> 2 scale rows), scales that differ per block, bf16 embeddings /
norms / head / router, float32 correction bias, two shards with many weights and their scales in
different shards, an MTP layer at index num_hidden_layers (official names, with its copies of the
embedding and head), config.json in the official ``rope_scaling`` form with ``quantization_config``.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BLOCK = (128, 128)
FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 300,
    "hidden_size": 160,
    "intermediate_size": 272,
    "moe_intermediate_size": 136,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 144,
    "kv_lora_rank": 136,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 40,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(BLOCK),
    },
}


def _layer(p: str, c: dict, moe: bool) -> dict[str, np.ndarray]:
    """HF tensors of one decoder layer: (name -> float64 value or ('fp8', shape))."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    t = {
        p + "input_layernorm.weight": ("norm", d),
        p + "post_attention_layernorm.weight": ("norm", d),
        p + "self_attn.q_a_proj.weight": ("fp8", (c["q_lora_rank"], d)),
        p + "self_attn.q_a_layernorm.weight": ("norm", c["q_lora_rank"]),
        p + "self_attn.q_b_proj.weight": ("fp8", (h * (nope + rope), c["q_lora_rank"])),
        p + "self_attn.kv_a_proj_with_mqa.weight": ("fp8", (c["kv_lora_rank"] + rope, d)),
        p + "self_attn.kv_a_layernorm.weight": ("norm", c["kv_lora_rank"]),
        p + "self_attn.kv_b_proj.weight": ("fp8", (h * (nope + v), c["kv_lora_rank"])),
        p + "self_attn.o_proj.weight": ("fp8", (d, h * v)),
    }
    if not moe:
        f = c["intermediate_size"]
        for n, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            t[f"{p}mlp.{n}.weight"] = ("fp8", shape)
        return t
    f, e = c["moe_intermediate_size"], c["n_routed_experts"]
    t[p + "mlp.gate.weight"] = ("bf16", (e, d))
    t[p + "mlp.gate.e_score_correction_bias"] = ("bias", e)
    fs = f * c["n_shared_experts"]
    for n, shape in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
        t[f"{p}mlp.shared_experts.{n}.weight"] = ("fp8", shape)
    for i in range(e):
        for n, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            t[f"{p}mlp.experts.{i}.{n}.weight"] = ("fp8", shape)
    return t


def _specs(c: dict) -> dict:
    v, d, n = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    t = {
        "model.embed_tokens.weight": ("embed", (v, d)),
        "model.norm.weight": ("norm", d),
        "lm_head.weight": ("bf16", (v, d)),
    }
    for i in range(n):
        t.update(_layer(f"model.layers.{i}.", c, i >= c["first_k_dense_replace"]))
    p = f"model.layers.{n}."  # the MTP module (depth 1)
    t.update(_layer(p, c, True))
    t[p + "enorm.weight"] = ("norm", d)
    t[p + "hnorm.weight"] = ("norm", d)
    t[p + "eh_proj.weight"] = ("bf16", (d, 2 * d))
    t[p + "shared_head.norm.weight"] = ("norm", d)
    t[p + "embed_tokens.weight"] = ("copy", "model.embed_tokens.weight")
    t[p + "shared_head.head.weight"] = ("copy", "lm_head.weight")
    return t


def _narrow(x: np.ndarray, dtype) -> np.ndarray:
    """float64 -> float32 -> ``dtype``: the bytes ml_dtypes < 0.7 gave for a direct float64 cast
    (0.7 rounds float64 once, which moves a few of them), so the checkpoint's sha256 stays the
    golden one with either version."""
    return x.astype(np.float32).astype(dtype)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor as stored in the files (FP8 weights + float32 ``*_scale_inv``), by name."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (kind, arg) in _specs(CONFIG).items():
        if kind == "norm":
            out[name] = _narrow(1.0 + 0.1 * rng.standard_normal(arg), BF16)
        elif kind == "embed":
            out[name] = _narrow(rng.standard_normal(arg), BF16)
        elif kind == "bf16":
            out[name] = _narrow(0.2 * rng.standard_normal(arg), BF16)
        elif kind == "bias":
            out[name] = (0.2 * rng.standard_normal(arg)).astype(np.float32)
        elif kind == "copy":
            out[name] = out[arg].copy()
        else:  # fp8: values spread over the e4m3 range, a different scale in every block
            q = _narrow(np.clip(rng.standard_normal(arg) * 120.0, -448, 448), FP8)
            grid = (-(-arg[0] // BLOCK[0]), -(-arg[1] // BLOCK[1]))
            out[name] = q
            # scale ~ 0.2 / 120 per element std, times a per-block factor in [0.5, 2]
            out[name + "_scale_inv"] = ((0.2 / 120.0) * np.exp2(rng.uniform(-1, 1, grid))).astype(
                np.float32
            )
    return out


def build(path: str | os.PathLike, seed: int = 0) -> str:
    """Writes the checkpoint into ``path`` (created) and returns the sha256 of its files.

    Shards: model-00001-of-00002 holds the main model's weights and the scales of layer 0;
    model-00002-of-00002 holds the scales of layer 1 and the whole MTP layer (so most weights and
    their scales sit in different files), both listed in model.safetensors.index.json.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    t = tensors(seed)
    n = CONFIG["num_hidden_layers"]
    mtp = f"model.layers.{n}."

    def shard_of(name):
        if name.startswith(mtp):
            return 2
        if name.endswith("_scale_inv") and not name.startswith("model.layers.0."):
            return 2
        return 1

    files = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    for i, fname in files.items():
        part = {k: v for k, v in sorted(t.items()) if shard_of(k) == i}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in t.values()))},
        "weight_map": {k: files[shard_of(k)] for k in sorted(t)},
    }
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
    return files_sha256(path)


def files_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for fname in sorted(os.listdir(path)):
        h.update(fname.encode())
        with open(os.path.join(path, fname), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def dequantize_f64(w: np.ndarray, scale: np.ndarray, block=BLOCK) -> np.ndarray:
    """Reference dequantisation in float64, block by block with explicit edges:
    out[r, c] = float(w[r, c]) * scale[r // bo, c // bi] (README_WEIGHTS.md, ceil-div grid)."""
    bo, bi = block
    rows, cols = w.shape
    assert scale.shape == (-(-rows // bo), -(-cols // bi)), (w.shape, scale.shape)
    out = w.astype(np.float64)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            out[r * bo : min((r + 1) * bo, rows), c * bi : min((c + 1) * bi, cols)] *= float(
                scale[r, c]
            )
    return out


def dequantized(seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight in float64 (FP8 ones dequantized by ``dequantize_f64``), scales removed."""
    t = tensors(seed)
    out = {}
    for name, x in t.items():
        if name.endswith("_scale_inv"):
            continue
        s = t.get(name + "_scale_inv")
        out[name] = x.astype(np.float64) if s is None else dequantize_f64(x, s)
    return out
