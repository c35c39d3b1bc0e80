"""Conversion throughput and memory on a synthetic official-layout FP8 checkpoint (>= 2 GB).

Builds a DeepSeek-V3-shaped checkpoint (FP8 e4m3 weights + 128x128 float32 scales, bf16
embeddings/norms/head/router, an MTP layer, one shard per layer with each layer's scales in the next
shard), then in one run reports, each conversion in a fresh child process:
  raw read   GB/s of reading every shard file once (plain file reads, page cache as it is)
  hf_to_orbax --dtype=bfloat16 and --keep_fp8: GB/s of source bytes, peak RSS of the child
  (ru_maxrss), its RSS after imports, and the largest layer's bytes (in the files and as stored).

Usage: python bench/convert_bench.py [--dir /tmp/convert_bench] [--layers 6] [--keep]
"""

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = 128


def config(layers: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1024,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "q_lora_rank": 768,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        },
    }


def _fp8(rng, shape):
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x7E  # e4m3fn has NaN at S.1111.111 only
    return b.view(ml_dtypes.float8_e4m3fn)


def _layer(rng, c, i: int, mtp: bool) -> tuple[dict, dict]:
    """(weights, scales) of decoder layer i in the official names."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    p = f"model.layers.{i}."
    fp8 = {
        "self_attn.q_a_proj": (c["q_lora_rank"], d),
        "self_attn.q_b_proj": (h * (nope + rope), c["q_lora_rank"]),
        "self_attn.kv_a_proj_with_mqa": (c["kv_lora_rank"] + rope, d),
        "self_attn.kv_b_proj": (h * (nope + v), c["kv_lora_rank"]),
        "self_attn.o_proj": (d, h * v),
    }
    bf16 = {
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "self_attn.q_a_layernorm": (c["q_lora_rank"],),
        "self_attn.kv_a_layernorm": (c["kv_lora_rank"],),
    }
    moe = mtp or i >= c["first_k_dense_replace"]
    f = c["moe_intermediate_size"] if moe else c["intermediate_size"]
    mats = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    if moe:
        for e in range(c["n_routed_experts"]):
            fp8.update({f"mlp.experts.{e}.{n}": s for n, s in mats.items()})
        fp8.update({f"mlp.shared_experts.{n}": s for n, s in mats.items()})
        bf16["mlp.gate"] = (c["n_routed_experts"], d)
    else:
        fp8.update({f"mlp.{n}": s for n, s in mats.items()})
    if mtp:
        bf16.update({"enorm": (d,), "hnorm": (d,), "shared_head.norm": (d,), "eh_proj": (d, 2 * d)})
    weights, scales = {}, {}
    for n, s in fp8.items():
        weights[f"{p}{n}.weight"] = _fp8(rng, s)
        grid = (-(-s[0] // BLOCK), -(-s[1] // BLOCK))
        scales[f"{p}{n}.weight_scale_inv"] = rng.uniform(1e-4, 1e-3, grid).astype(np.float32)
    for n, s in bf16.items():
        weights[f"{p}{n}.weight"] = rng.standard_normal(s, np.float32).astype(ml_dtypes.bfloat16)
    if moe:
        weights[f"{p}mlp.gate.e_score_correction_bias"] = np.zeros(
            c["n_routed_experts"], np.float32
        )
    return weights, scales


def build(path: pathlib.Path, layers: int) -> dict:
    """One shard per layer; the scales of layer i go to shard i + 1 (split weight/scale)."""
    c = config(layers)
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(c, indent=1))
    n_layers = layers + c["num_nextn_predict_layers"]
    n_shards = n_layers + 2
    weight_map, layer_bytes, carry = {}, {}, {}
    v, d = c["vocab_size"], c["hidden_size"]
    embed = rng.standard_normal((v, d), np.float32).astype(ml_dtypes.bfloat16)
    head = rng.standard_normal((v, d), np.float32).astype(ml_dtypes.bfloat16)
    for s in range(n_shards):
        tensors = dict(carry)
        carry = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = embed
        elif s <= n_layers:
            i = s - 1
            weights, carry = _layer(rng, c, i, mtp=i >= layers)
            layer_bytes[i] = sum(x.nbytes for x in weights.values()) + sum(
                x.nbytes for x in carry.values()
            )
            if i >= layers:  # the MTP module's copies of the embedding and head (not converted)
                weights[f"model.layers.{i}.embed_tokens.weight"] = embed
                weights[f"model.layers.{i}.shared_head.head.weight"] = head
            tensors.update(weights)
        else:
            tensors["lm_head.weight"] = head
            tensors["model.norm.weight"] = np.ones(d, ml_dtypes.bfloat16)
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    return layer_bytes


def raw_read(path: pathlib.Path) -> tuple[float, int]:
    total, start = 0, time.perf_counter()
    buf = bytearray(64 << 20)
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return time.perf_counter() - start, total


def child(src: str, out: str, mode: str) -> None:
    """Runs one conversion and prints its timing and memory as JSON."""
    sys.path.insert(0, str(ROOT))
    from dsv3_jax import convert_hf

    def rss_now():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

    base = rss_now()
    r = convert_hf.hf_to_orbax(
        src, out, dtype="bfloat16", keep_fp8=mode == "keep_fp8", progress=False
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(r, base_rss=base, peak_rss=peak)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/convert_bench")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    root = pathlib.Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    src = root / "hf"
    t0 = time.perf_counter()
    layer_bytes = build(src, args.layers)
    files = sum(f.stat().st_size for f in src.iterdir())
    print(f"built {files / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    secs, nbytes = raw_read(src)
    print(
        f"raw read       {nbytes / 1e9:6.2f} GB in {secs:6.1f} s = {nbytes / 1e9 / secs:6.2f} GB/s"
    )
    largest = max(layer_bytes.values())
    print(f"largest layer  {largest / 1e9:6.2f} GB in the files (FP8 + scales)")
    for mode in ("bfloat16", "keep_fp8"):
        out = root / f"orbax_{mode}"
        r = subprocess.run(
            [sys.executable, __file__, "--child", str(src), str(out), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(r.stdout.strip().splitlines()[-1])
        stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(
            f"hf_to_orbax {mode:9s} {res['bytes'] / 1e9:6.2f} GB in {res['seconds']:6.1f} s = "
            f"{res['bytes'] / 1e9 / res['seconds']:6.2f} GB/s | peak RSS {res['peak_rss'] / 1e9:5.2f} GB "
            f"(after imports {res['base_rss'] / 1e9:4.2f} GB; peak - that = "
            f"{(res['peak_rss'] - res['base_rss']) / 1e9:4.2f} GB) | output {stored / 1e9:.2f} GB"
        )
        layer = max(
            sum(f.stat().st_size for f in g.rglob("*") if f.is_file())
            for g in (out / "model").iterdir()
        )
        extra = res["peak_rss"] - res["base_rss"]
        print(
            f"    largest stored layer {layer / 1e9:.2f} GB; peak RSS - RSS after imports = "
            f"{extra / layer:.2f} x that layer"
        )
        shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
