"""The HF transformers side of ``bench/decode_bench.py`` (runs in the torch venv, Python 3.11).

python bench/hf_decode.py --spec=SPEC.json --out=RESULT.json

SPEC.json: {"config": HF config dict, "weights_dir": DIR, "prompts": {"<batch>": [[ids]...]},
"new_tokens": N, "repeats": R, "threads": T}. Builds DeepseekV3ForCausalLM with random weights
(torch seed 0), saves them to DIR (safetensors, the HF layout) so dsv3_jax decodes the same model,
then times greedy ``generate`` (KV cache on, no EOS stop) per batch size: one warm-up, then R timed
runs. Writes tokens/s (best run), the generated ids, and the KV cache bytes per token measured
from the returned cache.
"""

import argparse
import json
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def cache_bytes_per_token(cache) -> int:
    """Bytes held by an HF cache object per cached token (batch row 0's share)."""
    total, batch = 0, None
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
            batch = t.shape[0]
    return total // (batch * cache.get_seq_length())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = DeepseekV3Config(**spec["config"])
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(spec["weights_dir"], safe_serialization=True)
    result = {"torch": torch.__version__, "threads": spec["threads"], "batches": {}}
    new = spec["new_tokens"]
    for batch, prompts in spec["prompts"].items():
        ids = torch.tensor(prompts, dtype=torch.long)
        kwargs = dict(
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
            return_dict_in_generate=True,
        )
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up
            times = []
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                out = model.generate(ids, **kwargs)
                times.append(time.perf_counter() - start)
        result["batches"][batch] = {
            "seconds": min(times),
            "tokens_per_s": ids.shape[0] * new / min(times),
            "ids": out.sequences[:, ids.shape[1] :].tolist(),
            "cache_bytes_per_token": cache_bytes_per_token(out.past_key_values),
        }
    json.dump(result, open(args.out, "w"))


if __name__ == "__main__":
    main()
